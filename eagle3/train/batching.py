"""Packing samples into micro-batches with no padding waste, and the epoch order across ranks.

Samples are packed into rows of at most `max_len` tokens (worst-fit decreasing); each sample keeps
its own span, with positions restarting at 0 and a segment id so that attention never crosses
samples. Rows of similar fill are grouped into micro-batches of about `batch_tokens` tokens, so the
only padding is the small gap between rows of one micro-batch.

The composition of micro-batches is fixed for a run (a function of the lengths and the seed); each
epoch visits them in a seeded permutation. The data position is then just the optimizer step, which
makes resuming exact without saving any iterator state.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


@dataclass
class Packed:
    """One micro-batch: [B,T] tensors (B packed rows); aux/last_hidden only for offline features."""

    input_ids: torch.Tensor  # int64
    loss_mask: torch.Tensor  # bool
    segment: torch.Tensor  # int64: sample index within its row, -1 on padding
    position_ids: torch.Tensor  # int64: restart at 0 for every sample
    sample_ids: list[str]
    aux: torch.Tensor | None = None  # [B,T,3Ht]
    last_hidden: torch.Tensor | None = None  # [B,T,Ht]

    @property
    def tokens(self) -> int:
        return int((self.segment >= 0).sum())

    def to(self, device) -> Packed:
        mv = lambda x: None if x is None else x.to(device, non_blocking=True)  # noqa: E731
        return Packed(
            mv(self.input_ids),
            mv(self.loss_mask),
            mv(self.segment),
            mv(self.position_ids),
            self.sample_ids,
            mv(self.aux),
            mv(self.last_hidden),
        )


def length_policy(
    lengths: list[int], max_len: int, policy: str
) -> tuple[list[int], list[int], dict[str, int]]:
    """(kept sample indices, their lengths after the policy, counts). Samples longer than max_len
    are dropped or truncated (counted either way); samples too short to hold one training position
    (< 3 tokens) are dropped."""
    if max_len < 3:
        raise ValueError(f"train.max_len must be >= 3, got {max_len}")
    if policy not in ("drop", "truncate"):
        raise ValueError(f"train.long_policy must be drop or truncate, got {policy!r}")
    kept, eff = [], []
    stats = {"samples": len(lengths), "dropped_long": 0, "truncated": 0, "dropped_short": 0}
    for i, n in enumerate(lengths):
        if n < 3:
            stats["dropped_short"] += 1
            continue
        if n > max_len:
            if policy == "drop":
                stats["dropped_long"] += 1
                continue
            stats["truncated"] += 1
            n = max_len
        kept.append(i)
        eff.append(n)
    stats["kept"] = len(kept)
    return kept, eff, stats


def truncate(sample, n: int):
    """A copy of a TokenSample or FeatureSample cut to its first n positions."""
    import dataclasses

    cut = {
        f.name: getattr(sample, f.name)[:n]
        for f in dataclasses.fields(sample)
        if isinstance(getattr(sample, f.name), torch.Tensor)
    }
    return dataclasses.replace(sample, **cut)


def pack_rows(lengths: list[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Sample indices packed into rows of at most `capacity` tokens (worst-fit decreasing, O(n log n)).

    Equal lengths are ordered by a seeded permutation, so that rows mix sources fairly."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    order = sorted(perm, key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    heap: list[tuple[int, int]] = []  # (-free space, row index): the emptiest row first
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the row capacity {capacity}")
        if heap and -heap[0][0] >= n:
            free, r = heapq.heappop(heap)
            rows[r].append(i)
            heapq.heappush(heap, (free + n, r))
        else:
            rows.append([i])
            heapq.heappush(heap, (-(capacity - n), len(rows) - 1))
    return rows


def group_rows(
    rows: list[list[int]], lengths: list[int], batch_tokens: int
) -> list[list[list[int]]]:
    """Rows grouped into micro-batches of at most batch_tokens padded tokens (at least one row);
    rows are sorted by fill so that rows of one micro-batch have nearly the same length."""
    fill = [sum(lengths[i] for i in r) for r in rows]
    order = sorted(range(len(rows)), key=lambda r: (-fill[r], r))
    batches: list[list[list[int]]] = []
    cur: list[list[int]] = []
    width = 0
    for r in order:
        w = max(width, fill[r])
        if cur and (len(cur) + 1) * w > batch_tokens:
            batches.append(cur)
            cur, w = [], fill[r]
        cur.append(rows[r])
        width = w
    if cur:
        batches.append(cur)
    return batches


def plan_batches(
    lengths: list[int], max_len: int, batch_tokens: int, seed: int
) -> list[list[list[int]]]:
    return group_rows(pack_rows(lengths, max_len, seed), lengths, batch_tokens)


def epoch_order(num_batches: int, epoch: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_batches, generator=g).tolist()


def batch_index(
    order: list[int], step_in_epoch: int, micro: int, rank: int, world: int, accum: int
) -> int:
    """Which micro-batch `rank` runs as its `micro`-th accumulation step: the global batch of one
    optimizer step is the same set whatever the split between ranks and accumulation."""
    return order[step_in_epoch * world * accum + micro * world + rank]


def collate(rows: list[list]) -> Packed:
    """rows: lists of TokenSample or FeatureSample -> one padded Packed micro-batch."""
    width = max(sum(len(s.input_ids) for s in row) for row in rows)
    b = len(rows)
    ids = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.bool)
    seg = torch.full((b, width), -1, dtype=torch.long)
    pos = torch.zeros(b, width, dtype=torch.long)
    first = rows[0][0]
    feats = getattr(first, "aux", None) is not None
    aux = last = None
    if feats:
        aux = torch.zeros(b, width, first.aux.shape[-1], dtype=first.aux.dtype)
        last = torch.zeros(b, width, first.last_hidden.shape[-1], dtype=first.last_hidden.dtype)
    sample_ids = []
    for r, row in enumerate(rows):
        at = 0
        for j, s in enumerate(row):
            n = len(s.input_ids)
            ids[r, at : at + n] = s.input_ids
            mask[r, at : at + n] = s.loss_mask.bool()
            seg[r, at : at + n] = j
            pos[r, at : at + n] = torch.arange(n)
            if feats:
                aux[r, at : at + n] = s.aux
                last[r, at : at + n] = s.last_hidden
            sample_ids.append(s.sample_id)
            at += n
    return Packed(ids, mask, seg, pos, sample_ids, aux, last)


def padding_fraction(batches: list[list[list[int]]], lengths: list[int]) -> float:
    real = padded = 0
    for rows in batches:
        fills = [sum(lengths[i] for i in r) for r in rows]
        real += sum(fills)
        padded += max(fills) * len(fills)
    return 1.0 - real / padded if padded else 0.0


class Loader:
    """Micro-batches of a dataset (SampleList / ShardDataset) under the length policy."""

    def __init__(self, dataset, max_len: int, policy: str, batch_tokens: int, seed: int):
        self.dataset, self.max_len = dataset, max_len
        self.kept, self.lengths, self.stats = length_policy(dataset.lengths, max_len, policy)
        self.batches = plan_batches(self.lengths, max_len, batch_tokens, seed) if self.kept else []
        self.stats["micro_batches"] = len(self.batches)
        self.stats["pad_fraction"] = padding_fraction(self.batches, self.lengths)
        self.stats["tokens"] = sum(self.lengths)

    def __len__(self) -> int:
        return len(self.batches)

    def get(self, batch_id: int) -> Packed:
        rows = []
        for row in self.batches[batch_id]:
            samples = []
            for i in row:
                s = self.dataset[self.kept[i]]
                samples.append(truncate(s, self.max_len) if len(s.input_ids) > self.max_len else s)
            rows.append(samples)
        return collate(rows)
