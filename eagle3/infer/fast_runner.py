"""The `fast` target backend: the Runner protocol (eagle3/infer/runner.py) on FastLlama.

Same semantics as HFRunner, and the same KVBuffer (eagle3/models/kv.py) through `RunnerBase`:
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

from eagle3.infer.runner import RunnerBase, tree_attention
from eagle3.models.fast_llama import FastLlama


class FastRunner(RunnerBase):
    def __init__(self, target, capacity: int = 1024, compile: bool = False):
        self.model = FastLlama(target.model, target.aux_layer_ids, capacity)
        super().__init__(target, self.model.new_cache(capacity))
        self._forward = self.model.forward_raw
        # inference_mode is the cheaper guard in eager; torch.compile cannot write the (normal)
        # cache tensors inside it, so the compiled path runs under no_grad.
        self._mode = torch.inference_mode
        if compile:
            self._forward = torch.compile(self.model.forward_raw, dynamic=True)
            self._mode = torch.no_grad

    def _reserve(self, n: int) -> None:
        # The RoPE tables grow with the buffer (rare, amortised: the buffer doubles).
        if self.kv.reserve(n):
            self.model.extend_rope(self.kv.capacity)

    def _prefill(self, ids, pos, past: int, last_only: bool):
        n = ids.numel()
        rows = slice(n - 1, n) if last_only else None
        with self._mode():
            return self._forward(ids, pos, self.kv, past, None, rows)

    def _verify(self, tokens, position_ids, tree_mask, past: int):
        n = tokens.numel()
        # Row j sees the whole prefix and the tree rows its mask allows. A single row that sees
        # itself (plain decoding) needs no mask at all; only checked on CPU (no device sync).
        if n == 1 and tree_mask.device.type == "cpu" and bool(tree_mask[0, 0]):
            mask = None
        else:
            mask = tree_attention(tree_mask, past, self.device)
        with self._mode():
            return self._forward(
                tokens.to(self.device).view(-1),
                position_ids.to(self.device).view(-1),
                self.kv,
                past,
                mask,
                None,
            )
