"""Talking to a vLLM server: token-id completions and the speculative-decoding counters.

Prompts go as token ids (`/v1/completions` with `prompt: [ids]`), so vLLM decodes exactly the
prompt our engine decodes, and the answer comes back as token ids (`return_token_ids`). The
acceptance numbers come from /metrics: `vllm:spec_decode_num_drafts` (verify steps that carried
drafts), `..._num_draft_tokens`, `..._num_accepted_tokens` and `..._num_accepted_tokens_per_pos`
(accepted at draft position i). Mean acceptance length = 1 + accepted / drafts: the tokens one
target forward emits, the same quantity as our engine's tau.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

_LINE = re.compile(r"^(vllm:spec_decode_[a-z_]+?)(?:_total)?(\{[^}]*\})?\s+([0-9.eE+-]+)$")
_POS = re.compile(r'position="(\d+)"')


@dataclass
class SpecCounters:
    drafts: float = 0.0
    draft_tokens: float = 0.0
    accepted: float = 0.0
    per_pos: list[float] = field(default_factory=list)

    def __sub__(self, other: SpecCounters) -> SpecCounters:
        n = max(len(self.per_pos), len(other.per_pos))
        a = self.per_pos + [0.0] * (n - len(self.per_pos))
        b = other.per_pos + [0.0] * (n - len(other.per_pos))
        return SpecCounters(
            self.drafts - other.drafts,
            self.draft_tokens - other.draft_tokens,
            self.accepted - other.accepted,
            [x - y for x, y in zip(a, b, strict=True)],
        )

    @property
    def acceptance_length(self) -> float:
        return 1.0 + self.accepted / self.drafts if self.drafts else 0.0

    def alpha(self) -> list[float]:
        """P(position i accepted | position i - 1 accepted): the report's alpha
        (docs/CONTRACTS.md §4)."""
        tried = [self.drafts, *self.per_pos[:-1]]
        return [round(a / t, 4) if t else 0.0 for a, t in zip(self.per_pos, tried, strict=True)]


def parse_spec_counters(text: str) -> SpecCounters:
    """The spec-decode counters of a Prometheus exposition, summed over engines."""
    c = SpecCounters()
    pos: dict[int, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if not m or "_created" in m.group(1):
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "vllm:spec_decode_num_drafts":
            c.drafts += value
        elif name == "vllm:spec_decode_num_draft_tokens":
            c.draft_tokens += value
        elif name == "vllm:spec_decode_num_accepted_tokens":
            c.accepted += value
        elif name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            p = _POS.search(labels)
            if p:
                i = int(p.group(1))
                pos[i] = pos.get(i, 0.0) + value
    c.per_pos = [pos.get(i, 0.0) for i in range(max(pos) + 1)] if pos else []
    return c


@dataclass
class Completion:
    tokens: list[int]
    seconds: float
    finish_reason: str | None
    # Whether the server returned token ids at all (a server without `return_token_ids`, or one
    # that drops them, leaves `tokens` empty): without them no output can be called identical.
    has_ids: bool = True


def same_output(a: Completion, b: Completion) -> bool:
    """Token for token the same output, both with their ids: two missing answers are not equal
    (fail closed: a lossless check must never pass on nothing)."""
    return a.has_ids and b.has_ids and a.tokens == b.tokens


class VLLMClient:
    """A thin httpx client for one vLLM server (thread-safe: httpx.Client is)."""

    def __init__(self, url: str, timeout: float = 600.0):
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=timeout)
        self._model: str | None = None

    @property
    def model(self) -> str:
        if self._model is None:
            data = self.http.get("/v1/models").raise_for_status().json().get("data") or []
            if not data:
                raise RuntimeError(f"{self.url}/v1/models lists no model")
            self._model = data[0]["id"]
        return self._model

    def complete(
        self, ids: list[int], max_tokens: int, temperature: float = 0.0, seed: int | None = None
    ) -> Completion:
        body = {
            "model": self.model,
            "prompt": list(ids),
            "max_tokens": int(max_tokens),
            "temperature": float(temperature),
            "return_token_ids": True,
        }
        if seed is not None:
            body["seed"] = int(seed)
        t0 = time.perf_counter()
        r = self.http.post("/v1/completions", json=body)
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"{self.url}/v1/completions: HTTP {r.status_code}: {r.text[:300]}")
        choice = r.json()["choices"][0]
        ids = choice.get("token_ids")
        # max_tokens >= 1: a real answer holds at least one token, so [] is as good as missing.
        return Completion(list(ids or []), dt, choice.get("finish_reason"), has_ids=bool(ids))

    def counters(self) -> SpecCounters:
        return parse_spec_counters(self.http.get("/metrics").raise_for_status().text)

    def close(self) -> None:
        self.http.close()


def complete_many(
    client: VLLMClient,
    prompts: list[list[int]],
    max_tokens: int,
    concurrency: int,
    temperature: float = 0.0,
    seed: int | None = None,
) -> tuple[list[Completion], float]:
    """All prompts with `concurrency` requests in flight; (completions in order, wall seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        out = list(pool.map(lambda p: client.complete(p, max_tokens, temperature, seed), prompts))
    return out, time.perf_counter() - t0


def generate_rows(
    client: VLLMClient,
    tokenizer,
    prompts: list[str],
    temperature: float,
    max_new_tokens: int,
    seed: int | None = None,
) -> list[dict]:
    """One chat prompt at a time (the inference flow's rows): text, tokens, tau from the counters."""
    from eagle3.infer.engine import encode_prompt

    rows = []
    for p in prompts:
        ids = encode_prompt(tokenizer, [{"role": "user", "content": p}])
        before = client.counters()
        out = client.complete(ids, max_new_tokens, temperature, seed)
        d = client.counters() - before
        n = len(out.tokens)
        rows.append(
            {
                "prompt": p,
                "messages": [{"role": "user", "content": p}],
                "text": tokenizer.decode(out.tokens, skip_special_tokens=True),
                "token_ids": out.tokens,
                "finish_reason": out.finish_reason,
                "acceptance": {  # the counters around this request alone (one at a time)
                    "drafts": int(d.drafts),
                    "accepted": int(d.accepted),
                    "per_pos": [int(x) for x in d.per_pos],
                    "source": "vllm-counters",
                },
                "new_tokens": n,
                "tau": float(d.acceptance_length) if d.drafts else 1.0,
                "verify_steps": int(d.drafts) if d.drafts else max(n - 1, 0),
                "tokens_per_s": n / out.seconds if out.seconds > 0 else 0.0,
                "seconds": out.seconds,
                "engine": "vllm",
            }
        )
    return rows
