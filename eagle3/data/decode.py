"""Continuous batching for regeneration: `batch_size` answers in flight, a finished one's slot refilled.

A static batch (HF `generate` over 8 left-padded prompts) runs until its LONGEST answer ends: with
ShareGPT prompts and max_new_tokens 256, about 40% of its row-steps were measured decoding rows that
had already stopped. Here a row that stops hands its slot to the next prompt right away, so every
decode step works on `batch_size` live answers until the queue runs dry; rows are then dropped, not
carried.

The batch cache is the preallocated KVBuffer (eagle3/models/kv.py) with one batch slot per row,
[layers, 2, batch, kv_heads, capacity, head_dim], left-padded: every row's next token goes to the
same column, padding is masked out, and each row has its own position ids. A new prompt is
prefilled on its own (a batched prefill would pay for padding) and written right-aligned into the
freed row. A step writes one column in place (HF's DynamicCache concatenates, i.e. copies the whole
cache every step). Columns no row needs any more are trimmed.

Greedy answers equal one-at-a-time `generate` (tests). Sampling uses one generator per prompt,
seeded by the caller, so an answer does not depend on which prompts shared its batch.
Models whose cache is not plain per-layer K/V (sliding windows, recurrent state) get `None` from
`decode_continuous`; the caller falls back to HF `generate`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicLayer

from eagle3.models.hf_cache import BufferCache
from eagle3.models.kv import KVBuffer

HEADROOM = 128  # columns added when the buffer is full: one copy per 128 steps
TRIM_AT = 64  # drop dead leading columns once there are this many (a copy of the cache)


class _Batch:
    """The rows in flight: cache, attention mask, next token and position of each row."""

    def __init__(self, layers_kv: list[tuple[torch.Tensor, torch.Tensor]], rows: int, cap: int):
        k0 = layers_kv[0][0]  # [heads, L, d] of the first prompt: shapes and dtype
        self.kv = KVBuffer(
            len(layers_kv), k0.shape[0], k0.shape[2], cap, k0.dtype, k0.device, batch=rows
        )
        self.cache = BufferCache(self.kv)  # the model writes each step's column through this
        self.mask = torch.zeros(rows, cap, dtype=torch.long, device=k0.device)
        self.next = torch.zeros(rows, dtype=torch.long, device=k0.device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=k0.device)
        self.prompt = [-1] * rows  # which prompt each row answers (-1: free)

    @property
    def cap(self) -> int:
        return self.mask.shape[1]

    @property
    def width(self) -> int:
        """Columns in use (committed in the KV buffer)."""
        return self.kv.length

    def _realloc(self, left: int, cap: int) -> None:
        """New buffers of `cap` columns; the live columns move right by `left`."""
        w = self.width
        self.kv.resize(cap, shift=left)
        mask = self.mask.new_zeros((self.mask.shape[0], cap))
        mask[:, left : left + w] = self.mask[:, :w]
        self.mask = mask

    def place(self, row: int, kv: list[tuple[torch.Tensor, torch.Tensor]], ids: list[int]) -> None:
        """Row `row` now answers prompt `ids`: its cache (all but the last token) right-aligned."""
        n = len(ids) - 1
        if n > self.width:  # the new prompt is longer than the batch so far: pad everyone left
            self._realloc(n - self.width, max(self.cap, n + HEADROOM))
        w = self.width
        self.mask[row, :w] = 0
        self.mask[row, w - n : w] = 1
        self.kv.write_slot(row, kv)
        self.next[row] = ids[-1]
        self.pos[row] = n

    def keep(self, rows: list[int]) -> None:
        """Only these rows stay in the batch (the others are done and nothing waits)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.kv.select(idx)
        self.mask = self.mask.index_select(0, idx)
        self.next, self.pos = self.next[idx], self.pos[idx]
        self.prompt = [self.prompt[r] for r in rows]

    def trim(self) -> None:
        """Drop leading columns that no row attends to any more."""
        live = self.mask[:, : self.width].any(0).nonzero()
        first = int(live[0]) if live.numel() else self.width
        if first >= TRIM_AT:
            self.kv.trim(first)
            self.mask = self.mask[:, first:].contiguous()

    def step(self, model) -> torch.Tensor:
        """One decode step for every row; the last-position logits [rows, V] in float32."""
        w = self.width
        if w + 1 > self.cap:
            self._realloc(0, w + HEADROOM)
        rows = self.mask.shape[0]
        ones = self.mask.new_ones((rows, 1))
        attn = torch.cat([self.mask[:, :w], ones], dim=1)
        out = model(
            input_ids=self.next[:, None],
            attention_mask=attn,
            position_ids=self.pos[:, None],
            cache=self.cache,
            use_cache=True,
        )
        self.kv.commit(1)
        self.mask[:, w] = 1
        self.pos += 1
        return out.logits[:, -1].float()


def prefill_kv(model, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer (K, V) [kv_heads, len(ids)-1, d] of all but the last prompt token; None when the
    model's cache is not plain per-layer K/V."""
    dev = model.device
    out = model(input_ids=torch.tensor([ids[:-1] or ids[:1]], device=dev), logits_to_keep=1)
    layers = getattr(out.cache, "layers", None)
    if not layers or any(type(la) is not DynamicLayer for la in layers):
        return None
    n = len(ids) - 1
    return [(la.keys[0, :, :n], la.values[0, :, :n]) for la in layers]


def _choose(logits: torch.Tensor, temperature: float, gens: list[torch.Generator | None]):
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.cat(
        [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, gens, strict=True)]
    )


@torch.inference_mode()
def decode_continuous(
    target,
    prompts: list[list[int]],
    limits: list[int],
    batch_size: int,
    temperature: float = 0.0,
    seeds: list[int] | None = None,
    on_done: Callable[[int, list[int], bool], None] | None = None,
) -> list[tuple[list[int], bool]] | None:
    """Answer every prompt, `batch_size` at a time, refilling slots as answers end.

    Per prompt: (new ids up to and including EOS, cut by its limit?). `on_done(i, ids, cut)` is
    called as each answer ends. None when the model's cache layout is not supported.
    """
    model, eos = target.model, set(target.eos_token_ids)
    n = len(prompts)
    out: list[tuple[list[int], bool] | None] = [None if m > 0 else ([], True) for m in limits]
    queue = [i for i in range(n) if out[i] is None]
    gens: list[torch.Generator | None] = [None] * n
    if temperature > 0:
        for i in range(n):
            gens[i] = torch.Generator(device=model.device).manual_seed(seeds[i] if seeds else i)
    if not queue:
        return out  # type: ignore[return-value]

    queue.reverse()  # pop() takes prompts in the given order
    first = queue[-1]
    kv = prefill_kv(model, prompts[first])
    if kv is None:
        return None
    batch = _Batch(kv, min(batch_size, len(queue)), max(len(p) for p in prompts) + HEADROOM)
    answers: dict[int, list[int]] = {}

    def fill(row: int, kv=None) -> None:
        i = queue.pop()
        kv = kv if kv is not None else prefill_kv(model, prompts[i])
        batch.place(row, kv, prompts[i])
        batch.prompt[row] = i
        answers[i] = []

    fill(0, kv)
    for row in range(1, batch.mask.shape[0]):
        fill(row)

    while batch.prompt:
        picked = _choose(batch.step(model), temperature, [gens[i] for i in batch.prompt])
        batch.next = picked.to(batch.next.dtype)
        done = []
        for row, (i, t) in enumerate(zip(batch.prompt, picked.tolist(), strict=True)):
            ans = answers[i]
            ans.append(t)
            if t in eos or len(ans) >= limits[i]:
                out[i] = (ans, t not in eos)
                done.append(row)
                if on_done:
                    on_done(i, ans, t not in eos)
        if not done:
            continue
        free = []
        for row in done:
            if queue:
                fill(row)
            else:
                free.append(row)
        if free:
            batch.keep([r for r in range(len(batch.prompt)) if r not in free])
        if batch.prompt:
            batch.trim()
    return out  # type: ignore[return-value]
