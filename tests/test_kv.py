"""The KV buffer (eagle3/models/kv.py) against a naive reference: Python lists of columns.

Every operation the runners, the drafter and the regeneration decoder use (write, commit, keep,
reserve/grow, resize with a shift, trim, select slots, write_slot, reset) is replayed on both, in
random order, and the committed columns must be equal bit for bit (moves are exact copies).
"""

from __future__ import annotations

import random

import pytest
import torch

from eagle3.models.kv import KVBuffer

pytestmark = pytest.mark.unit

H, D = 2, 3  # kv heads, head dim


class NaiveKV:
    """cols[layer][slot]: the committed columns, each a (K [H, D], V [H, D]) pair; `written`
    holds the columns of the writes after them (index = column - length)."""

    def __init__(self, layers: int, batch: int):
        self.cols = [[[] for _ in range(batch)] for _ in range(layers)]
        self.written = [[{} for _ in range(batch)] for _ in range(layers)]

    @property
    def length(self) -> int:
        return len(self.cols[0][0])

    def write(self, layer, start, k, v):  # k, v [batch, H, n, D]
        for b in range(k.shape[0]):
            for j in range(k.shape[2]):
                self.written[layer][b][start + j - self.length] = (k[b, :, j], v[b, :, j])

    def _take(self, rows):
        for li, layer in enumerate(self.cols):
            for b in range(len(layer)):
                layer[b] = layer[b] + [self.written[li][b][r] for r in rows]
                self.written[li][b] = {}

    def commit(self, n):
        self._take(range(n))

    def keep(self, rows):
        self._take(rows)

    def resize(self, shift):
        zero = (torch.zeros(H, D), torch.zeros(H, D))
        self.cols = [[[zero] * shift + c for c in layer] for layer in self.cols]

    def trim(self, first):
        self.cols = [[c[first:] for c in layer] for layer in self.cols]

    def select(self, slots):
        self.cols = [[layer[s] for s in slots] for layer in self.cols]
        self.written = [[{} for _ in slots] for _ in self.cols]

    def write_slot(self, slot, layers_kv):
        end = self.length
        zero = (torch.zeros(H, D), torch.zeros(H, D))
        for li, (k, v) in enumerate(layers_kv):
            n = k.shape[1]
            self.cols[li][slot] = [zero] * (end - n) + [(k[:, j], v[:, j]) for j in range(n)]

    def kv(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, H, length, D] each."""

        def stack(i):
            return torch.stack(
                [torch.stack([c[i] for c in s], 1) if s else torch.zeros(H, 0, D) for s in layer]
            )

        layer = self.cols[layer]
        return stack(0), stack(1)


def assert_same(buf: KVBuffer, ref: NaiveKV) -> None:
    assert buf.length == ref.length and buf.capacity >= buf.length
    for layer in range(buf.num_layers):
        k, v = ref.kv(layer)
        assert torch.equal(buf.k[layer, :, :, : buf.length], k)
        assert torch.equal(buf.v[layer, :, :, : buf.length], v)


def _rand(*shape, g):
    return torch.randn(*shape, generator=g)


def test_write_keep_grow_trim_against_naive_batch_1():
    """The runners' cycle: prefill (write + commit), then verify (write) + keep(root path),
    with growth, the keep fast path, empty keeps and a trim, over many random cycles."""
    g, rnd = torch.Generator().manual_seed(0), random.Random(0)
    layers = 3
    buf, ref = KVBuffer(layers, H, D, 4, torch.float32, "cpu"), NaiveKV(layers, 1)
    grew = fast = slow = 0
    for cycle in range(60):
        n = rnd.randint(1, 7)
        cap = buf.capacity
        if buf.reserve(n):
            grew += 1
            assert buf.capacity == max(buf.length + n, 2 * cap)
        else:
            assert buf.capacity == cap
        start = buf.length
        for layer in range(layers):
            # The fast forward writes [H, n, D] (no batch dim), the HF forward [1, H, n, D].
            k, v = _rand(1, H, n, D, g=g), _rand(1, H, n, D, g=g)
            keys, values = buf.write(layer, start, k[0] if cycle % 2 else k, v)
            ref.write(layer, start, k, v)
            assert keys.shape == (1, H, start + n, D)
            assert torch.equal(keys[0, :, start:], k[0]) and torch.equal(values[0, :, start:], v[0])
            assert torch.equal(keys[..., :start, :], ref.kv(layer)[0])  # the prefix, untouched
        assert buf.length == start  # a write commits nothing
        ptr = buf.buf.data_ptr()
        kind = cycle % 4
        if kind == 0:  # a prefill
            buf.commit(n)
            ref.commit(n)
        else:
            if kind == 1:  # a chain or the first branch: already in place
                rows = list(range(rnd.randint(0, n)))
                fast += bool(rows)
            else:  # a random root path, ascending
                rows = sorted(rnd.sample(range(n), rnd.randint(0, n)))
                slow += bool(rows) and rows[-1] != len(rows) - 1
            buf.keep(torch.tensor(rows, dtype=torch.long))
            ref.keep(rows)
            assert buf.buf.data_ptr() == ptr  # in place
        assert_same(buf, ref)
        if cycle == 30:
            first = buf.length // 3
            buf.trim(first)
            ref.trim(first)
            assert_same(buf, ref)
    assert grew >= 2 and fast >= 5 and slow >= 5
    cap = buf.capacity
    buf.reset()
    assert buf.length == 0 and buf.capacity == cap


def test_batch_slots_against_naive():
    """The regeneration decoder's moves: prompts placed right-aligned into slots (left-padding the
    batch when a longer one joins), one column per step for every slot, growth by a headroom,
    trims of dead leading columns, and finished slots dropped."""
    g, rnd = torch.Generator().manual_seed(1), random.Random(1)
    layers, batch = 2, 3
    buf, ref = KVBuffer(layers, H, D, 5, torch.float32, "cpu", batch=batch), NaiveKV(layers, batch)

    def place(slot, n):
        if n > buf.length:  # pad everyone left
            shift = n - buf.length
            buf.resize(max(buf.capacity, n + 2), shift=shift)
            ref.resize(shift)
        kv = [(_rand(H, n, D, g=g), _rand(H, n, D, g=g)) for _ in range(layers)]
        buf.write_slot(slot, kv)
        ref.write_slot(slot, kv)
        assert_same(buf, ref)

    for slot, n in enumerate([2, 0, 6]):  # an empty prompt cache, then a longer one
        place(slot, n)
    for step in range(40):
        if buf.length + 1 > buf.capacity:
            buf.resize(buf.length + 2)
            ref.resize(0)
        start = buf.length
        for layer in range(layers):
            k, v = _rand(buf.batch, H, 1, D, g=g), _rand(buf.batch, H, 1, D, g=g)
            keys, _ = buf.write(layer, start, k, v)
            ref.write(layer, start, k, v)
            assert keys.shape == (buf.batch, H, start + 1, D)
        buf.commit(1)
        ref.commit(1)
        assert_same(buf, ref)
        if step % 7 == 3 and buf.batch > 1:
            place(rnd.randrange(buf.batch), rnd.randint(0, buf.length + 3))
        if step % 9 == 5:
            first = rnd.randint(0, buf.length)
            cap = buf.capacity
            buf.trim(first)
            ref.trim(first)
            assert buf.capacity == cap - first
            assert_same(buf, ref)
        if step in (20, 33):
            slots = sorted(rnd.sample(range(buf.batch), buf.batch - 1))
            buf.select(torch.tensor(slots))
            ref.select(slots)
            assert buf.batch == len(slots)
            assert_same(buf, ref)
    assert buf.batch == 1


def test_bad_moves_name_the_problem():
    buf = KVBuffer(2, H, D, 4, torch.float32, "cpu")
    buf.write(0, 0, torch.zeros(H, 3, D), torch.zeros(H, 3, D))
    buf.commit(3)
    with pytest.raises(ValueError, match="trim: 4 columns of 3"):
        buf.trim(4)
    with pytest.raises(ValueError, match="do not fit 4"):
        buf.resize(4, shift=2)
    with pytest.raises(ValueError, match="1 layers, want 2"):
        buf.write_slot(0, [(torch.zeros(H, 1, D), torch.zeros(H, 1, D))])
    with pytest.raises(ValueError, match="5 columns do not fit the 3"):
        buf.write_slot(0, [(torch.zeros(H, 5, D), torch.zeros(H, 5, D))] * 2)


def test_hf_cache_view_writes_at_the_committed_length():
    """What HF attention and mask code see: update writes at `length`, sizes count the new rows."""
    from eagle3.models.hf_cache import BufferCache

    buf = KVBuffer(2, H, D, 8, torch.float32, "cpu")
    buf.write(0, 0, torch.ones(H, 3, D), torch.ones(H, 3, D))
    buf.commit(3)
    cache = BufferCache(buf)
    assert cache.get_seq_length() == 3 and cache.get_mask_sizes(2, 0) == (5, 0)
    k = torch.full((1, H, 2, D), 2.0)
    keys, values = cache.update(k, k + 1, 1)
    assert keys.shape == (1, H, 5, D) and torch.equal(keys[:, :, 3:], k)
    assert torch.equal(values[:, :, 3:], k + 1)
    assert cache.get_seq_length() == 3  # the owner commits, not the forward
    cache.reset()
    assert buf.length == 0
