"""The one KV buffer: keys and values of every layer, for `batch` sequences, in ONE tensor.

    buf [layers, 2 (K, V), batch, kv_heads, capacity, head_dim];  columns [0, length) are committed

Every cache in eagle3 is this buffer: the target runners (`infer/runner.py`, `infer/fast_runner.py`,
batch 1), the draft head's cache (`infer/tree.py`, one layer) and the regeneration decoder
(`data/decode.py`, one batch slot per answer in flight). HF model forwards see it through
`models/hf_cache.py`.

Columns are cache rows, not positions: a forward writes its n rows at [length, length + n) whatever
their position ids, and nothing is committed until the owner says so. Then either `commit(n)` (a
prefill, a decode step) or `keep(rows)` (a verified tree: only the accepted root path stays).

Why one tensor: `keep` moves the accepted columns of every layer, K and V, with ONE index_select +
copy, and growing, trimming or dropping slots is one allocation. Writes go in place (HF's
DynamicCache concatenates, i.e. copies the whole cache, on every step); `write` returns views of the
valid prefix, already 4-D [batch, kv_heads, columns, head_dim] as SDPA's fused CPU kernel wants.
"""

from __future__ import annotations

import torch


class KVBuffer:
    def __init__(self, layers, kv_heads, head_dim, capacity, dtype, device, batch: int = 1):
        self.buf = torch.zeros(
            layers, 2, batch, kv_heads, capacity, head_dim, dtype=dtype, device=device
        )
        self.length = 0  # committed columns
        self._views()

    def _views(self) -> None:
        # K and V of every layer [layers, batch, kv_heads, capacity, head_dim]: views, re-made
        # whenever `buf` is replaced.
        self.k, self.v = self.buf[:, 0], self.buf[:, 1]
        # Per layer [batch, kv_heads, capacity, head_dim]: a write indexes a Python list, not the
        # tensor (one aten select fewer per write and per read, on every layer of every forward).
        self.layer_k = [self.buf[i, 0] for i in range(self.buf.shape[0])]
        self.layer_v = [self.buf[i, 1] for i in range(self.buf.shape[0])]

    @property
    def capacity(self) -> int:
        return self.buf.shape[4]

    @property
    def batch(self) -> int:
        return self.buf.shape[2]

    @property
    def num_layers(self) -> int:
        return self.buf.shape[0]

    def reset(self) -> None:
        """Empty (keeps the allocation)."""
        self.length = 0

    # --- the hot path: one write per layer per forward, then commit or keep ---------------------
    def write(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns [start, start + n) of `layer` := k, v ([batch, kv_heads, n, head_dim]; the
        batch dim may be left out at batch 1). Returns the layer's keys and values over
        [0, start + n) as views [batch, kv_heads, start + n, head_dim]. Commits nothing."""
        end = start + k.shape[-2]
        # copy_ broadcasts a missing batch dim inside the kernel (`[...] = k` adds view + expand).
        lk, lv = self.layer_k[layer], self.layer_v[layer]
        lk[:, :, start:end].copy_(k)
        lv[:, :, start:end].copy_(v)
        return lk[:, :, :end], lv[:, :, :end]

    def commit(self, n: int) -> None:
        """The n columns written after the committed prefix are now part of it."""
        self.length += n

    def keep(self, rows: torch.Tensor) -> None:
        """Columns length + rows[i] -> length + i for every layer, K and V, then commit them.

        rows: ascending indices into the columns written after the prefix (a verified tree's
        accepted root path). In place; only len(rows) columns move, and none when they are
        already in place.
        """
        m = int(rows.numel())
        base = self.length
        # Fast path: rows 0..m-1 already sit right after the prefix (a chain, the first branch).
        if m and int(rows[-1]) != m - 1:
            src = rows.to(self.buf.device) + base
            # index_select copies the m columns first, so overlapping source/target is safe.
            self.buf[..., base : base + m, :] = self.buf.index_select(4, src)
        self.length = base + m

    # --- rare: reallocations ------------------------------------------------------------------
    def reserve(self, n: int) -> bool:
        """Room for n more columns after the committed prefix; when full, the capacity doubles (so
        growth is rare and amortised). True when it grew (the buffer is a new tensor then)."""
        need = self.length + n
        if need <= self.capacity:
            return False
        self.resize(max(need, 2 * self.capacity))
        return True

    def resize(self, capacity: int, shift: int = 0) -> None:
        """A new buffer of `capacity` columns; the committed columns move right by `shift` (zeros
        before them, and `length` grows by `shift`): the regeneration decoder left-pads this way
        when a longer prompt joins the batch."""
        if shift + self.length > capacity:
            raise ValueError(
                f"KV resize: {self.length} columns shifted by {shift} do not fit {capacity}"
            )
        new = self.buf.new_zeros(*self.buf.shape[:4], capacity, self.buf.shape[5])
        new[..., shift : shift + self.length, :] = self.buf[..., : self.length, :]
        self.buf = new
        self.length += shift
        self._views()

    def trim(self, first: int) -> None:
        """Drop the first `first` columns (no sequence attends to them any more): one copy, and
        the capacity shrinks by `first`."""
        if not 0 <= first <= self.length:
            raise ValueError(f"KV trim: {first} columns of {self.length}")
        self.buf = self.buf[..., first:, :].contiguous()
        self.length -= first
        self._views()

    # --- batch slots (the regeneration decoder) -------------------------------------------------
    def select(self, slots: torch.Tensor) -> None:
        """Only these batch slots stay, in this order (a copy of what stays)."""
        self.buf = self.buf.index_select(2, slots.to(self.buf.device))
        self._views()

    def write_slot(self, slot: int, layers_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Slot `slot`'s committed columns := each layer's (K, V) [kv_heads, n, head_dim],
        right-aligned so they end at `length`, with zeros before them (left padding)."""
        if len(layers_kv) != self.num_layers:
            raise ValueError(f"KV write_slot: {len(layers_kv)} layers, want {self.num_layers}")
        end = self.length
        self.buf[:, :, slot, :, :end] = 0
        for i, (k, v) in enumerate(layers_kv):
            n = k.shape[1]
            if n > end:
                raise ValueError(f"KV write_slot: {n} columns do not fit the {end} committed")
            if n:
                self.k[i, slot, :, end - n : end] = k
                self.v[i, slot, :, end - n : end] = v
