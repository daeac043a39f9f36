"""A KVBuffer (eagle3/models/kv.py) as a transformers `Cache`, for forwards of HF models.

HF attention calls `cache.update(k, v, layer_idx)` once per layer; here that writes the new rows in
place at [length, length + n) of the shared buffer and returns views of the valid prefix. HF's mask
code asks the cache for its length; `length` only advances when the owner commits (after the
forward), so every layer of one forward writes at the same columns, and a verified tree's rows can
still be kept or dropped. Used by the HF runner (eagle3/infer/runner.py) and the regeneration
decoder (eagle3/data/decode.py). Imported lazily: it imports transformers.
"""

from __future__ import annotations

from transformers.cache_utils import Cache

from eagle3.models.kv import KVBuffer


class _LayerView:
    """What HF's mask code asks a cache layer: its length. The data lives in the KVBuffer."""

    is_sliding = False
    is_compileable = False

    def __init__(self, kv: KVBuffer):
        self.kv = kv
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.kv.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.kv.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass


class BufferCache(Cache):
    def __init__(self, kv: KVBuffer):
        self.kv = kv
        super().__init__(layers=[_LayerView(kv) for _ in range(kv.num_layers)])

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.kv.write(layer_idx, self.kv.length, key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv.length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.kv.length + query_length, 0

    def reset(self) -> None:
        self.kv.reset()
