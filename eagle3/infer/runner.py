"""Target backends for the speculative engine: the `Runner` protocol and its HF implementation.

A runner owns the target's KV cache for ONE sequence (batch 1). The engine drives it as:

    logits, aux = runner.prefill(prompt_ids)              # appends the prompt, causally
    loop:
        logits, aux = runner.verify(tokens, pos, mask)    # tree rows on top of the cache
        runner.keep(accepted_rows)                        # commit these rows, drop the rest

Semantics every backend must honour (tests/test_infer_runner.py checks them on any runner):
- `prefill(ids[T])` appends T tokens after the cached prefix (causal among themselves) and commits
  them; returns logits [T, V] (or [1, V] for the last row when `last_only`) and aux [T, 3H].
- `verify(tokens[n], position_ids[n], tree_mask bool[n, n])`: row j attends to every cached
  position and to row i where tree_mask[j, i]; nothing is committed (cache_len is unchanged).
  Returns logits [n, V] (float32) and aux [n, 3H] (the residual stream entering the aux layers).
- `keep(rows)`: rows (ascending indices into the last verify) are appended, in that order, to the
  cached prefix; every other verified row is dropped. Must not copy the whole cache.
- `cache_len`: committed positions. `reset()`: empty the cache (keeps the allocation).

Both backends are a `RunnerBase` (below): the cache is a KVBuffer (eagle3/models/kv.py), and the
base does the checks, grows the buffer before a forward, commits and keeps; a backend only supplies
its two forwards. `infer.backend: hf` is `HFRunner` (this file, any HF causal LM) and
`infer.backend: fast` is `eagle3.infer.fast_runner.FastRunner` (a compact gpt-fast style forward).
"""

from __future__ import annotations

import inspect
import time
from typing import Protocol, runtime_checkable

import torch

from eagle3.models.kv import KVBuffer


def synced_time(device) -> float:
    """perf_counter after the device's queued work is done (CUDA runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


@runtime_checkable
class Runner(Protocol):
    @property
    def cache_len(self) -> int: ...

    def reset(self) -> None: ...

    def prefill(
        self, input_ids: torch.Tensor, last_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def verify(
        self, tokens: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def keep(self, rows: torch.Tensor) -> None: ...


def make_runner(target, backend: str = "hf", capacity: int = 1024) -> Runner:
    """The runner named by `infer.backend`."""
    if backend == "hf":
        return HFRunner(target, capacity=capacity)
    if backend == "fast":
        from eagle3.infer.fast_runner import FastRunner

        return FastRunner(target, capacity=capacity)
    raise ValueError(f"infer.backend: unknown backend {backend!r} (have 'hf', 'fast')")


# --- what every backend shares -----------------------------------------------------------------
def tree_attention(tree_mask: torch.Tensor, past: int, device) -> torch.Tensor:
    """bool [n, past + n]: row j sees the whole cached prefix and the tree rows its mask allows."""
    n = tree_mask.shape[0]
    allowed = torch.ones(n, past + n, dtype=torch.bool, device=device)
    allowed[:, past:] = tree_mask
    return allowed


class RunnerBase:
    """The Runner protocol over a KVBuffer (eagle3/models/kv.py): checks, reserve-before-forward,
    commit and keep. A backend supplies `_prefill` and `_verify`, its forwards: they write their
    rows after the committed prefix (`past`) and commit nothing."""

    def __init__(self, target, kv: KVBuffer):
        self.target = target
        self.device = target.device
        self.kv = kv
        self._last_n = 0  # rows written by the last verify (not committed)

    @property
    def cache_len(self) -> int:
        return self.kv.length

    @property
    def capacity(self) -> int:
        return self.kv.capacity

    def reset(self) -> None:
        self.kv.reset()
        self._last_n = 0

    def _reserve(self, n: int) -> None:
        self.kv.reserve(n)

    def prefill(self, input_ids: torch.Tensor, last_only: bool = False):
        ids = input_ids.to(self.device).long().view(-1)
        n, past = ids.numel(), self.kv.length
        if n == 0:
            raise ValueError("prefill: input_ids is empty")
        self._reserve(n)
        pos = torch.arange(past, past + n, device=self.device)
        logits, aux = self._prefill(ids, pos, past, last_only)
        self.kv.commit(n)
        self._last_n = 0
        return logits, aux

    def verify(self, tokens: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor):
        n, past = tokens.numel(), self.kv.length
        if tree_mask.shape != (n, n):
            raise ValueError(
                f"verify: tree_mask has shape {tuple(tree_mask.shape)}, want ({n}, {n})"
            )
        self._reserve(n)
        logits, aux = self._verify(tokens, position_ids, tree_mask, past)
        self._last_n = n
        return logits, aux

    @torch.no_grad()
    def keep(self, rows: torch.Tensor) -> None:
        if rows.numel() and int(rows[-1]) >= self._last_n:
            raise ValueError(
                f"keep: row {int(rows[-1])} was not verified (last verify had {self._last_n})"
            )
        self.kv.keep(rows)
        self._last_n = 0

    def _prefill(self, ids, pos, past: int, last_only: bool):
        raise NotImplementedError

    def _verify(self, tokens, position_ids, tree_mask, past: int):
        raise NotImplementedError

    # For tests and debugging: the committed keys/values of one layer, [nkv, length, d] each.
    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.kv.length
        return self.kv.k[layer, 0, :, :n], self.kv.v[layer, 0, :, :n]


# --- the HF runner ----------------------------------------------------------------------------------
class HFRunner(RunnerBase):
    """Any HF causal LM through `model.model(...)` with the KVBuffer as its cache, explicit 4D masks."""

    def __init__(self, target, capacity: int = 1024):
        from eagle3.models.hf_cache import BufferCache

        cfg = target.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        nkv = getattr(cfg, "num_key_value_heads", None) or heads
        kv = KVBuffer(cfg.num_hidden_layers, nkv, head_dim, capacity, target.dtype, target.device)
        super().__init__(target, kv)
        self.cache = BufferCache(kv)  # what the HF forward writes through
        # The most negative finite value: -inf would give NaN on a fully masked row.
        self._neg = torch.finfo(target.dtype).min
        # transformers 5.24 names the cache `cache=`; older 5.x (e.g. 5.17 on the GPU boxes) and
        # 4.x call it `past_key_values=` and would silently ignore `cache=`.
        params = inspect.signature(target.model.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _forward(self, ids, position_ids, mask4d):
        t = self.target
        with t.capture() as store:
            out = t.model.model(
                input_ids=ids[None],
                position_ids=position_ids[None],
                attention_mask=mask4d,
                **{self._cache_kw: self.cache},
                use_cache=True,
            )
        return out.last_hidden_state[0], t.stack_aux(store)[0]

    @torch.no_grad()
    def _prefill(self, ids, pos, past: int, last_only: bool):
        n = ids.numel()
        mask = None  # empty cache: sdpa's causal kernel
        if past or self.target.config._attn_implementation != "sdpa":
            allowed = torch.ones(n, past + n, dtype=torch.bool, device=self.device).tril(past)
            mask = self._float_mask(allowed)
        hidden, aux = self._forward(ids, pos, mask)
        if last_only:
            hidden = hidden[-1:]
        return self.target.lm_head(hidden).float(), aux

    @torch.no_grad()
    def _verify(self, tokens, position_ids, tree_mask, past: int):
        allowed = tree_attention(tree_mask, past, self.device)
        hidden, aux = self._forward(
            tokens.view(-1), position_ids.view(-1), self._float_mask(allowed)
        )
        return self.target.lm_head(hidden).float(), aux

    def _float_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(allowed.shape, dtype=self.target.dtype, device=self.device)
        return m.masked_fill_(~allowed, self._neg)[None, None]
