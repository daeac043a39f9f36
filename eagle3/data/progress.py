"""The data stage's progress bar: conversations, the generation rate (tokens/s) and an ETA."""

from __future__ import annotations

import time

from eagle3.data.sources import Conversation


class Progress:
    """One bar over conversations with the generation rate (tokens/s) and an ETA.

    Within a shard the bar moves by answers (a conversation of m messages needs about m/2), so a
    long shard does not sit still; at the end of a shard it is set exactly.
    """

    def __init__(self, total: int, enabled: bool, desc: str = "regenerate"):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            disable=not enabled,
            unit="conv",
            desc=desc,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}{postfix}]",
        )
        self.tokens, self.seconds, self.start, self.base, self.per_answer = 0, 0.0, 0.0, 0, 0.0

    def shard_start(self, convs: list[Conversation]) -> None:
        self.start, self.base = time.perf_counter(), self.bar.n
        self.per_answer = 2 * len(convs) / max(1, sum(len(c.messages) for c in convs))

    def on_batch(self, answers: int, new_tokens: int) -> None:
        self.tokens += new_tokens
        self.bar.update(min(answers * self.per_answer, self.bar.total - self.bar.n))
        rate = self.tokens / max(self.seconds + time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:.1f} tok/s")

    def shard_done(self, n: int, resumed: bool) -> None:
        if not resumed:
            self.seconds += time.perf_counter() - self.start
        self.bar.n = self.base + n
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
