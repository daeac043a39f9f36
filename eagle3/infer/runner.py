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

Backends: `infer.backend: hf` (this file) and `infer.backend: fast` (a compact gpt-fast style
forward: `eagle3.infer.fast_runner.FastRunner(target, capacity=...)`, same protocol).
"""

from __future__ import annotations

import functools
import inspect
import time
from typing import Protocol, runtime_checkable

import torch


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


# --- the HF runner ----------------------------------------------------------------------------------
class _LayerView:
    """What HF's mask code asks a cache layer: its length. The data lives in BufferCache.buf."""

    is_sliding = False
    is_compileable = False

    def __init__(self, owner: BufferCache):
        self.owner = owner
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass


def BufferCache(num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, dtype, device):
    return _buffer_cache_class()(num_layers, num_kv_heads, head_dim, capacity, dtype, device)


@functools.cache
def _buffer_cache_class():
    """A preallocated KV cache for all layers in ONE tensor [L, 2, 1, nkv, cap, d].

    One tensor lets `compact` move the accepted rows of every layer with a single index_select +
    copy. `update` writes the new rows in place at [length, length + n) and returns views of the
    valid prefix; `length` only advances when the runner commits (prefill / keep).
    """
    from transformers.cache_utils import Cache

    class _BufferCache(Cache):
        def __init__(self, num_layers, num_kv_heads, head_dim, capacity, dtype, device):
            self.num_layers = num_layers
            self.buf = torch.zeros(
                num_layers, 2, 1, num_kv_heads, capacity, head_dim, dtype=dtype, device=device
            )
            self.length = 0  # committed rows
            self.pending = 0  # rows written by the current forward (not committed)
            super().__init__(layers=[_LayerView(self) for _ in range(num_layers)])

        @property
        def capacity(self) -> int:
            return self.buf.shape[4]

        def reserve(self, n: int) -> None:
            """Make room for n more rows (doubling, so growth is rare and amortised)."""
            need = self.length + n
            if need <= self.capacity:
                return
            cap = max(need, 2 * self.capacity)
            new = self.buf.new_zeros(*self.buf.shape[:4], cap, self.buf.shape[5])
            new[..., : self.length, :] = self.buf[..., : self.length, :]
            self.buf = new

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            n = key_states.shape[2]
            end = self.length + n
            kv = self.buf[layer_idx]
            kv[0, :, :, self.length : end].copy_(key_states)
            kv[1, :, :, self.length : end].copy_(value_states)
            self.pending = n
            return kv[0, :, :, :end], kv[1, :, :, :end]

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.length

        def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
            return self.length + query_length, 0

        def commit(self, n: int) -> None:
            self.length += n
            self.pending = 0

        def compact(self, rows: torch.Tensor) -> None:
            """Append pending rows `rows` (ascending) to the committed prefix, in place."""
            m = int(rows.numel())
            base = self.length
            # Fast path: the accepted rows already sit right after the prefix (chain, first branch).
            if m and int(rows[-1]) != m - 1:
                src = rows + base
                # index_select copies the m rows first, so overlapping source/target is safe.
                self.buf[..., base : base + m, :] = self.buf.index_select(4, src)
            self.length = base + m
            self.pending = 0

        def reset(self) -> None:
            self.length = 0
            self.pending = 0

    return _BufferCache


class HFRunner:
    """Any HF causal LM through `model.model(...)` with a BufferCache and explicit 4D masks."""

    def __init__(self, target, capacity: int = 1024):
        self.target = target
        cfg = target.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        nkv = getattr(cfg, "num_key_value_heads", None) or heads
        self.cache = BufferCache(
            cfg.num_hidden_layers, nkv, head_dim, capacity, target.dtype, target.device
        )
        self.device = target.device
        # The most negative finite value: -inf would give NaN on a fully masked row.
        self._neg = torch.finfo(target.dtype).min
        self._last_n = 0
        # transformers 5.24 names the cache `cache=`; older 5.x (e.g. 5.17 on the GPU boxes) and
        # 4.x call it `past_key_values=` and would silently ignore `cache=`.
        params = inspect.signature(target.model.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @property
    def cache_len(self) -> int:
        return self.cache.length

    def reset(self) -> None:
        self.cache.reset()

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
    def prefill(self, input_ids: torch.Tensor, last_only: bool = False):
        ids = input_ids.to(self.device).long().view(-1)
        n, past = ids.numel(), self.cache.length
        if n == 0:
            raise ValueError("prefill: input_ids is empty")
        self.cache.reserve(n)
        pos = torch.arange(past, past + n, device=self.device)
        mask = None  # empty cache: sdpa's causal kernel
        if past or self.target.config._attn_implementation != "sdpa":
            allowed = torch.ones(n, past + n, dtype=torch.bool, device=self.device).tril(past)
            mask = self._float_mask(allowed)
        hidden, aux = self._forward(ids, pos, mask)
        self.cache.commit(n)
        if last_only:
            hidden = hidden[-1:]
        return self.target.lm_head(hidden).float(), aux

    @torch.no_grad()
    def verify(self, tokens: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor):
        n, past = tokens.numel(), self.cache.length
        if tree_mask.shape != (n, n):
            raise ValueError(
                f"verify: tree_mask has shape {tuple(tree_mask.shape)}, want ({n}, {n})"
            )
        self.cache.reserve(n)
        allowed = torch.ones(n, past + n, dtype=torch.bool, device=self.device)
        allowed[:, past:] = tree_mask
        hidden, aux = self._forward(
            tokens.view(-1), position_ids.view(-1), self._float_mask(allowed)
        )
        self._last_n = n
        return self.target.lm_head(hidden).float(), aux

    @torch.no_grad()
    def keep(self, rows: torch.Tensor) -> None:
        if rows.numel() and int(rows[-1]) >= self._last_n:
            raise ValueError(
                f"keep: row {int(rows[-1])} was not verified (last verify had {self._last_n})"
            )
        self.cache.compact(rows.to(self.cache.buf.device))
        self._last_n = 0

    def _float_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(allowed.shape, dtype=self.target.dtype, device=self.device)
        return m.masked_fill_(~allowed, self._neg)[None, None]

    # For tests and debugging: the committed keys/values of one layer, [nkv, length, d] each.
    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.cache.buf[layer, :, 0, :, : self.cache.length]
        return kv[0], kv[1]
