"""The `fast` target backend: the Runner protocol (eagle3/infer/runner.py) on FastLlama.

Same semantics as HFRunner, with a static KV cache [2, layers, kv_heads, capacity, head_dim]:
- prefill(ids[T], last_only) appends T tokens causally after the cached prefix and commits them;
- verify(tokens[n], position_ids[n], tree_mask[n, n]) writes n rows after the prefix, commits
  nothing, and returns logits [n, V] (float32) and aux [n, 3H];
- keep(rows) moves the accepted rows down to follow the prefix (only those rows move) and commits.

Per call this file does a handful of tensor ops (one mask for all layers, one gather + scatter in
keep); everything else is FastLlama's layer loop. Optional `compile=True` wraps the forward in
torch.compile (dynamic shapes). It is off by default and UNVERIFIED: on the shared 2-core CPU box
compiling the SmolLM2 forward had not finished after 15 minutes, so whether it pays is unknown.
"""

from __future__ import annotations

import torch

from eagle3.models.fast_llama import FastLlama


class FastRunner:
    def __init__(self, target, capacity: int = 1024, compile: bool = False):
        self.target = target
        self.device = target.device
        self.model = FastLlama(target.model, target.aux_layer_ids, capacity)
        self.cache = self.model.new_cache(capacity)
        self._forward = self.model.forward_raw
        # inference_mode is the cheaper guard in eager; torch.compile cannot write the (normal)
        # cache tensors inside it, so the compiled path runs under no_grad.
        self._mode = torch.inference_mode
        if compile:
            self._forward = torch.compile(self.model.forward_raw, dynamic=True)
            self._mode = torch.no_grad
        self._len = 0  # committed rows
        self._last_n = 0  # rows written by the last verify (not committed)

    @property
    def cache_len(self) -> int:
        return self._len

    @property
    def capacity(self) -> int:
        return self.cache.max_len

    def reset(self) -> None:
        self._len = 0
        self._last_n = 0

    def _reserve(self, n: int) -> None:
        """Room for n more rows; doubles the cache when full (rare, amortised, like HFRunner)."""
        need = self._len + n
        if need <= self.cache.max_len:
            return
        cap = max(need, 2 * self.cache.max_len)
        new = self.model.new_cache(cap)
        new.kv[..., : self._len, :] = self.cache.kv[..., : self._len, :]
        self.cache = new
        self.model.extend_rope(cap)

    def prefill(self, input_ids: torch.Tensor, last_only: bool = False):
        ids = input_ids.to(self.device).long().view(-1)
        n, past = ids.numel(), self._len
        if n == 0:
            raise ValueError("prefill: input_ids is empty")
        self._reserve(n)
        pos = torch.arange(past, past + n, device=self.device)
        rows = slice(n - 1, n) if last_only else None
        with self._mode():
            logits, aux = self._forward(ids, pos, self.cache, past, None, rows)
        self._len = past + n
        self._last_n = 0
        return logits, aux

    def verify(self, tokens: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor):
        n, past = tokens.numel(), self._len
        if tree_mask.shape != (n, n):
            raise ValueError(
                f"verify: tree_mask has shape {tuple(tree_mask.shape)}, want ({n}, {n})"
            )
        self._reserve(n)
        # Row j sees the whole prefix and the tree rows its mask allows. A single row that sees
        # itself (plain decoding) needs no mask at all; only checked on CPU (no device sync).
        if n == 1 and tree_mask.device.type == "cpu" and bool(tree_mask[0, 0]):
            mask = None
        else:
            mask = torch.ones(n, past + n, dtype=torch.bool, device=self.device)
            mask[:, past:] = tree_mask
        with self._mode():
            logits, aux = self._forward(
                tokens.to(self.device).view(-1),
                position_ids.to(self.device).view(-1),
                self.cache,
                past,
                mask,
                None,
            )
        self._last_n = n
        return logits, aux

    @torch.no_grad()
    def keep(self, rows: torch.Tensor) -> None:
        m = rows.numel()
        if m and int(rows[-1]) >= self._last_n:
            raise ValueError(
                f"keep: row {int(rows[-1])} was not verified (last verify had {self._last_n})"
            )
        # Fast path: rows 0..m-1 already sit right after the prefix (a chain, the first branch).
        if m and int(rows[-1]) != m - 1:
            self.cache.compact(self._len, rows)
        self._len += m
        self._last_n = 0

    # For tests and debugging: the committed keys/values of one layer, [nkv, length, d] each.
    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.k[layer, :, : self._len], self.cache.v[layer, :, : self._len]
