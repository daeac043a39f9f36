"""Verify-row padding: the size choice against a naive reference, padded verifies return the
unpadded rows' logits, and the engine's output stays exactly the target's with padding on."""

from __future__ import annotations

import random

import infer_support
import pytest
import torch

from eagle3.infer.engine import SpecEngine
from eagle3.infer.lookup import graft_chain
from eagle3.infer.padding import pad_tree, padded_sizes, verify_costs
from eagle3.infer.runner import make_runner
from eagle3.infer.tree import Drafter
from eagle3.models.draft import DraftConfig, Eagle3Draft

pytestmark = pytest.mark.slow


def test_padded_sizes_takes_the_cheapest_larger_count_past_the_margin():
    assert padded_sizes([55.8, 92.9, 117.7, 81.2, 75.5, 84.4]) == [1, 5, 5, 5, 5, 6]
    assert padded_sizes([1.0, 0.97, 2.0]) == [1, 2, 3]  # 3% cheaper is noise: no padding
    rng = random.Random(0)
    for _ in range(300):
        costs = [rng.uniform(1, 3) for _ in range(rng.randrange(1, 12))]
        for n, m in enumerate(padded_sizes(costs, margin=0.1), start=1):
            cheapest = min(costs[n - 1 :])
            first = n + costs[n - 1 :].index(cheapest)
            # Naive: the first cheapest count >= n, if it beats n by more than the margin.
            assert m == (first if cheapest < 0.9 * costs[n - 1] else n), (costs, n, m)


def _tree(tiny_target, ids):
    with torch.random.fork_rng():
        torch.manual_seed(3)
        draft = Eagle3Draft(DraftConfig.from_target(tiny_target.config, 256)).eval()
    drafter = Drafter(draft, tiny_target.embed)
    aux = tiny_target.features(ids[None]).aux[0]
    drafter.extend(aux, torch.cat((ids[1:], ids[-1:])), 0)
    tree = drafter.grow(int(ids[-1]), depth=3, top_k=3, total_tokens=7)
    return graft_chain(tree, [11, 12, 13])


def test_a_padded_verify_gives_the_unpadded_rows_and_keeps_the_same_cache(tiny_target):
    ids = torch.tensor(infer_support.random_prompts(n_seq=1)[0].tolist())
    tree = _tree(tiny_target, ids)
    n = tree.size
    padded = pad_tree(tree, n + 5)
    assert padded.size == n + 5 and torch.equal(padded.mask[:n, :n], tree.mask)
    assert not padded.mask[:n, n:].any()  # no real row sees a dummy
    rows = tree.mask[n - 1].nonzero().flatten()  # the grafted chain's root path
    for backend in ("hf", "fast"):
        out = {}
        for name, t in (("plain", tree), ("padded", padded)):
            runner = make_runner(tiny_target, backend)
            runner.prefill(ids)
            logits, aux = runner.verify(t.tokens, t.positions, t.mask)
            runner.keep(rows)
            kv = runner.layer_kv(0)
            out[name] = (logits[:n], aux[:n], kv)
        (lp, ap, kp), (lq, aq, kq) = out["plain"], out["padded"]
        torch.testing.assert_close(lq, lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(aq, ap, rtol=1e-5, atol=1e-5)
        assert torch.equal(lq.argmax(-1), lp.argmax(-1))
        for a, b in zip(kq, kp, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _record_widths(runner) -> list[int]:
    """Wrap runner.verify to log each verify's row count."""
    widths, verify = [], runner.verify

    def logged(tokens, positions, mask):
        widths.append(tokens.numel())
        return verify(tokens, positions, mask)

    runner.verify = logged
    return widths


def test_engine_with_padding_equals_hf_generate(tiny_target, tiny_recipe, tiny_trained_head):
    from test_infer_engine import MAX_NEW, _hf_greedy

    for backend in ("hf", "fast"):
        cfg = tiny_recipe.infer.model_copy(
            update=dict(
                total_tokens=4, depth=2, top_k=2, lookup_tokens=6, backend=backend, pad_verify=True
            )
        )
        engine = SpecEngine(tiny_target, tiny_trained_head, cfg)
        engine.pad_sizes = [n + 3 for n in range(1, engine.max_tree_rows() + 1)]  # always pad
        widths = _record_widths(engine.runner)
        for ids in infer_support.random_prompts(n_seq=3, prompt_len=11, seed=5).tolist():
            ids = ids + ids[:6]
            assert engine.generate(ids, max_new_tokens=MAX_NEW).tokens == _hf_greedy(
                tiny_target, ids, MAX_NEW
            )
        # Every verify ran padded: a tree holds 1 + total_tokens rows, plus the lookup chain.
        assert widths and all(w - 3 in range(5, engine.max_tree_rows() + 1) for w in widths)
        assert len(set(widths)) > 1  # trees with and without a lookup chain


def test_pad_verify_measures_a_table_for_every_tree_size(
    tiny_target, tiny_recipe, tiny_trained_head
):
    from test_infer_engine import MAX_NEW, _hf_greedy

    cfg = tiny_recipe.infer.model_copy(
        update=dict(total_tokens=4, depth=2, top_k=2, lookup_tokens=6, pad_verify=True)
    )
    engine = SpecEngine(tiny_target, tiny_trained_head, cfg)
    ids = infer_support.random_prompts(n_seq=1, prompt_len=11, seed=7)[0].tolist()
    res = engine.generate(ids, max_new_tokens=MAX_NEW)
    assert res.tokens == _hf_greedy(tiny_target, ids, MAX_NEW)
    sizes = engine.pad_sizes
    assert len(sizes) >= engine.max_tree_rows()
    assert all(m >= n for n, m in enumerate(sizes, start=1))
    # A wider tree than the table covers gets a new table.
    engine.cfg = cfg.model_copy(update=dict(lookup_tokens=12))
    engine.generate(ids, max_new_tokens=4)
    assert len(engine.pad_sizes) >= engine.max_tree_rows() > len(sizes)


def test_measuring_costs_leaves_the_runner_empty_and_working(tiny_target):
    ids = torch.tensor(infer_support.random_prompts(n_seq=1)[0].tolist())
    for backend in ("hf", "fast"):
        runner = make_runner(tiny_target, backend)
        costs = verify_costs(runner, tiny_target.device, rows=6, prefix=16, reps=2)
        assert len(costs) == 6 and all(c > 0 for c in costs)
        assert runner.cache_len == 0
        fresh = make_runner(tiny_target, backend)
        torch.testing.assert_close(runner.prefill(ids)[0], fresh.prefill(ids)[0])
    with pytest.raises(ValueError, match="rows must be >= 1"):
        verify_costs(runner, tiny_target.device, rows=0)
