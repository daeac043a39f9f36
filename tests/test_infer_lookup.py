"""Prompt-lookup branch: the n-gram lookup and the graft against naive references, and the engine
stays exactly the target's with the branch on (greedy here; sampling in test_infer_engine)."""

from __future__ import annotations

import random

import infer_support
import pytest
import torch

from eagle3.infer.engine import SpecEngine
from eagle3.infer.lookup import graft_chain, prompt_lookup
from eagle3.infer.tree import Drafter
from eagle3.models.draft import DraftConfig, Eagle3Draft

pytestmark = pytest.mark.slow


def _naive_lookup(ctx, max_ngram, k):
    """Every (n, start) with ctx[start:start+n] == ctx[-n:], start + n < len(ctx): longest n wins,
    then the latest start."""
    best = None
    for n in range(1, max_ngram + 1):
        for s in range(len(ctx) - n):
            if ctx[s : s + n] == ctx[len(ctx) - n :]:
                if best is None or (n, s) > best:
                    best = (n, s)
    return [] if best is None else ctx[best[1] + best[0] : best[1] + best[0] + k]


def test_prompt_lookup_equals_a_naive_search():
    rng = random.Random(0)
    for _ in range(500):
        ctx = [rng.randrange(4) for _ in range(rng.randrange(0, 30))]
        n, k = rng.randrange(1, 5), rng.randrange(0, 7)
        assert prompt_lookup(ctx, n, k) == _naive_lookup(ctx, n, k), (ctx, n, k)
    assert prompt_lookup([5, 6, 7, 9, 5, 6], 3, 4) == [7, 9, 5, 6]
    assert prompt_lookup([1, 2, 3], 3, 4) == []  # the suffix never occurred before


def _ancestors(parents, r):
    out = {r}
    while parents[r] >= 0:
        r = parents[r]
        out.add(r)
    return out


def _check_tree(tree):
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    n = len(tokens)
    assert parents[0] == -1 and all(0 <= parents[r] < r for r in range(1, n))
    for r in range(n):
        anc = _ancestors(parents, r)
        assert set(tree.mask[r].nonzero().flatten().tolist()) == anc
        assert int(tree.depth[r]) == len(anc) - 1
        assert int(tree.positions[r]) == int(tree.positions[0]) + len(anc) - 1
    kids = [(parents[r], tokens[r]) for r in range(1, n)]
    assert len(kids) == len(set(kids)), "two siblings carry the same token"


def _path_tokens(tree, row):
    rows = tree.mask[row].nonzero().flatten().tolist()
    return [int(tree.tokens[r]) for r in rows[1:]]


@pytest.fixture(scope="module")
def drafted_tree(tiny_target):
    with torch.random.fork_rng():
        torch.manual_seed(3)
        draft = Eagle3Draft(DraftConfig.from_target(tiny_target.config, 256)).eval()
    drafter = Drafter(draft, tiny_target.embed)
    ids = torch.tensor(infer_support.random_prompts(n_seq=1)[0].tolist())
    aux = tiny_target.features(ids[None]).aux[0]
    drafter.extend(aux, torch.cat((ids[1:], ids[-1:])), 0)
    return drafter.grow(int(ids[-1]), depth=3, top_k=3, total_tokens=9)


def test_graft_chain_follows_existing_rows_then_appends(drafted_tree):
    tree = drafted_tree
    _check_tree(tree)
    n = tree.size
    deep = int(tree.depth.argmax())
    existing = _path_tokens(tree, deep)
    in_tree = set(tree.tokens.tolist())
    fresh = [t for t in range(10, 10_000) if t not in in_tree][:3]  # tokens no row carries
    for chain in ([], existing[:1], existing, existing[:2] + fresh, fresh, existing + fresh[:1]):
        out = graft_chain(tree, chain)
        _check_tree(out)
        # The old rows are untouched, and exactly the unmatched tail is new.
        assert torch.equal(out.tokens[:n], tree.tokens) and torch.equal(out.mask[:n, :n], tree.mask)
        matched = next((i for i, t in enumerate(chain) if t in fresh), len(chain))
        assert out.size == n + len(chain) - matched
        # The chain is now a root path of the tree.
        if chain:
            assert any(_path_tokens(out, r) == chain for r in range(out.size))


def test_engine_with_lookup_equals_hf_generate_and_accepts_past_the_draft(
    tiny_target, tiny_recipe, tiny_trained_head
):
    from test_infer_engine import MAX_NEW, _hf_greedy

    with torch.random.fork_rng():
        torch.manual_seed(1)
        bad = Eagle3Draft(DraftConfig.from_target(tiny_target.config, 2048)).eval()
    for head, backend in ((bad, "hf"), (bad, "fast"), (tiny_trained_head, "fast")):
        longest = 0
        cfg = tiny_recipe.infer.model_copy(
            update=dict(total_tokens=4, depth=2, top_k=2, lookup_tokens=6, backend=backend)
        )
        engine = SpecEngine(tiny_target, head, cfg)
        for ids in infer_support.random_prompts(n_seq=3, prompt_len=11, seed=5).tolist():
            # A prompt that repeats itself gives the lookup something to find.
            ids = ids + ids[:6]
            res = engine.generate(ids, max_new_tokens=MAX_NEW)
            assert res.tokens == _hf_greedy(tiny_target, ids, MAX_NEW)
            longest = max(longest, max(res.accept_lengths))
        # A depth-2 draft gives at most 3 tokens a cycle: more means a lookup branch was accepted.
        assert longest > 3, (backend, longest)
