"""Packing, the epoch order across ranks, the length policy, the schedule, and packed target features."""

from __future__ import annotations

import math

import pytest
import torch

from eagle3.data.samples import TokenSample
from eagle3.train.batching import (
    Loader,
    batch_index,
    collate,
    epoch_order,
    length_policy,
    pack_rows,
    plan_batches,
)
from eagle3.train.dataset import SampleList
from eagle3.train.inputs import target_hidden
from eagle3.train.optim import warmup_cosine, warmup_steps

pytestmark = pytest.mark.slow


def test_pack_rows_fits_and_covers():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 100, (200,), generator=g).tolist()
    rows = pack_rows(lengths, 128, seed=1)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    # Close to the lower bound on the number of rows (worst-fit decreasing is near-optimal here).
    assert len(rows) <= math.ceil(sum(lengths) / 128) * 1.15 + 1
    with pytest.raises(ValueError, match="sample 0"):
        pack_rows([200], 128)


def test_plan_batches_respects_budget_and_wastes_little():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (300,), generator=g).tolist()
    batches = plan_batches(lengths, 64, 256, seed=0)
    assert sorted(i for b in batches for r in b for i in r) == list(range(300))
    for b in batches:
        width = max(sum(lengths[i] for i in r) for r in b)
        assert len(b) == 1 or len(b) * width <= 256
    loader = Loader(SampleList([_sample(i, n) for i, n in enumerate(lengths)]), 64, "drop", 256, 0)
    assert loader.stats["pad_fraction"] < 0.05


def test_global_batch_is_the_same_for_any_rank_accum_split():
    order = epoch_order(24, epoch=3, seed=7)
    assert sorted(order) == list(range(24)) and order != epoch_order(24, epoch=4, seed=7)
    for step in range(3):
        one = {batch_index(order, step, a, 0, 1, 4) for a in range(4)}
        two = {batch_index(order, step, a, r, 2, 2) for a in range(2) for r in range(2)}
        four = {batch_index(order, step, 0, r, 4, 1) for r in range(4)}
        assert one == two == four and len(one) == 4


def test_length_policy_counts():
    kept, eff, stats = length_policy([2, 5, 10, 11, 30], 10, "truncate")
    assert kept == [1, 2, 3, 4] and eff == [5, 10, 10, 10]
    assert stats == {"samples": 5, "dropped_long": 0, "truncated": 2, "dropped_short": 1, "kept": 4}
    kept, eff, stats = length_policy([2, 5, 10, 11, 30], 10, "drop")
    assert kept == [1, 2] and stats["dropped_long"] == 2
    with pytest.raises(ValueError, match="long_policy"):
        length_policy([5], 10, "wrap")
    # Truncation happens when a batch is built.
    loader = Loader(SampleList([_sample(0, 30)]), 10, "truncate", 64, 0)
    batch = loader.get(0)
    assert batch.input_ids.shape == (1, 10) and torch.equal(
        batch.input_ids[0], torch.arange(10) + 100
    )


def test_collate_segments_and_positions():
    b = collate([[_sample(0, 3), _sample(1, 2)], [_sample(2, 4)]])
    assert b.segment.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert b.sample_ids == ["s0", "s1", "s2"] and b.tokens == 9


def test_schedule():
    total, warm = 200, warmup_steps(200, 0.015)
    assert warm == 3
    lr = [warmup_cosine(s, total, warm) for s in range(total)]
    assert lr[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lr[3] == pytest.approx(1.0) and lr[-1] < 1e-3
    assert all(a >= b for a, b in zip(lr[3:], lr[4:], strict=False))
    mid = warm + (total - warm) // 2
    assert lr[mid] == pytest.approx(0.5 * (1 + math.cos(math.pi * (mid - warm) / (total - warm))))


def test_packed_target_features_equal_separate_forwards(tiny_target):
    """The block-diagonal mask and restarting positions make a packed row exactly separate runs."""
    g = torch.Generator().manual_seed(0)
    samples = [
        TokenSample(
            f"x{i}", torch.randint(100, 5000, (n,), generator=g), torch.ones(n, dtype=torch.bool)
        )
        for i, n in enumerate([7, 12, 5])
    ]
    batch = collate([[samples[0], samples[1]], [samples[2]]])
    aux, last = target_hidden(tiny_target, batch)
    spans = [(0, 0, 7), (0, 7, 19), (1, 0, 5)]
    for s, (row, a, b) in zip(samples, spans, strict=True):
        ref = tiny_target.features(s.input_ids[None], with_logits=False)
        torch.testing.assert_close(aux[row, a:b], ref.aux[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(last[row, a:b], ref.last_hidden[0], rtol=1e-4, atol=1e-5)


def _sample(i: int, n: int) -> TokenSample:
    return TokenSample(f"s{i}", torch.arange(n) + 100, torch.ones(n, dtype=torch.bool))
