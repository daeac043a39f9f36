"""The EAGLE-2 dynamic tree against a naive reference that runs the draft path by path.

The reference expands the same algorithm with one plain, sequential draft forward per node
(`Eagle3Draft.forward` over prefix + the node's root path), so it checks the batched tree
attention, the row/position convention, the scoring and the final selection at once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eagle3.infer.tree import Drafter
from eagle3.models.draft import DraftConfig, Eagle3Draft

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def setup(tiny_target):
    torch.manual_seed(0)
    draft = Eagle3Draft(DraftConfig.from_target(tiny_target.config, 300)).eval()
    # A vocabulary that is not the identity, so d2t matters.
    ids = torch.arange(300) * 7 + 11
    t2d = torch.zeros(tiny_target.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    draft.set_vocab(ids - torch.arange(300), t2d)
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 4000, (10,), generator=gen)
    aux = tiny_target.features(prompt[None]).aux[0]
    root = 77
    return draft, prompt, aux, root


class Naive:
    """Draft distributions by sequential forwards along each path (no tree, no cache reuse)."""

    def __init__(self, draft, target, prompt, aux, root):
        self.d, self.t = draft, target
        nxt = torch.cat((prompt[1:], torch.tensor([root])))
        with torch.no_grad():
            h, self.kv = draft(
                target.embed(nxt)[None], draft.fuse(aux)[None], torch.arange(len(nxt))[None]
            )
        self.h_last, self.P = h[0, -1], len(nxt)

    @torch.no_grad()
    def logp(self, path: list[int]) -> torch.Tensor:
        """log-probs (draft vocab) of the token after `path` (target ids below the root)."""
        h = self.h_last
        kv = self.kv
        for i, tok in enumerate(path):
            # The row for a node: hidden = its parent's output, embed = the node, position P + i.
            out, kv = self.d(
                self.t.embed(torch.tensor([[tok]])), h[None, None], torch.tensor([[self.P + i]]), kv
            )
            h = out[0, -1]
        return F.log_softmax(self.d.logits(h).float(), -1)

    def tree(self, depth, top_k, total):
        to_t = self.d.draft_to_target
        lp = self.logp([])
        top = torch.topk(lp, top_k)
        frontier = [
            ((int(to_t(i)),), float(s)) for s, i in zip(top.values, top.indices, strict=True)
        ]
        cands = list(frontier)
        for _ in range(1, depth):
            level = []
            for path, score in frontier:
                top = torch.topk(self.logp(list(path)), top_k)
                level += [
                    (path + (int(to_t(i)),), score + float(s))
                    for s, i in zip(top.values, top.indices, strict=True)
                ]
            cands += level
            frontier = sorted(level, key=lambda c: -c[1])[:top_k]
        return sorted(cands, key=lambda c: -c[1])[:total]


def _paths(tree) -> set[tuple[int, ...]]:
    return {
        tuple(tree.tokens[tree.mask[j].nonzero().flatten()[1:]].tolist())
        for j in range(1, tree.size)
    }


@pytest.mark.parametrize("depth,top_k,total", [(4, 3, 10), (3, 4, 16), (5, 1, 5), (2, 5, 30)])
def test_tree_equals_naive_reference(setup, tiny_target, depth, top_k, total):
    draft, prompt, aux, root = setup
    drafter = Drafter(draft, tiny_target.embed, capacity=8)  # grows while extending
    nxt = torch.cat((prompt[1:], torch.tensor([root])))
    drafter.extend(aux[:4], nxt[:4], 0)  # in two pieces: the cache must continue correctly
    drafter.extend(aux[4:], nxt[4:], 4)
    tree = drafter.grow(root, depth, top_k, total)
    naive = Naive(draft, tiny_target, prompt, aux, root).tree(depth, top_k, total)
    want = {path for path, _ in naive}
    assert _paths(tree) == want
    assert tree.size == min(total, top_k + (depth - 1) * top_k * top_k) + 1
    # Structure: root first, parents before children, mask = ancestors, positions = P + depth.
    assert int(tree.tokens[0]) == root and int(tree.parents[0]) == -1
    for j in range(1, tree.size):
        p = int(tree.parents[j])
        assert 0 <= p < j and int(tree.depth[j]) == int(tree.depth[p]) + 1
        anc = {j}
        while p >= 0:
            anc.add(p)
            p = int(tree.parents[p])
        assert set(tree.mask[j].nonzero().flatten().tolist()) == anc
    assert torch.equal(tree.positions, len(prompt) + tree.depth)
    # Siblings are distinct tokens (greedy acceptance relies on it).
    for p in range(tree.size):
        kids = tree.tokens[tree.parents == p].tolist()
        assert len(kids) == len(set(kids))
    # paths(): one per leaf, each a root path; together they cover every row.
    paths = tree.paths()
    assert {r for p in paths for r in p} == set(range(tree.size))
    assert all(p[0] == 0 and tree.mask[p[-1]].nonzero().flatten().tolist() == p for p in paths)
    assert drafter.cache.length == len(prompt)  # tree rows are not committed


def test_chain_is_the_greedy_draft_rollout(setup, tiny_target):
    draft, prompt, aux, root = setup
    drafter = Drafter(draft, tiny_target.embed)
    drafter.extend(aux, torch.cat((prompt[1:], torch.tensor([root]))), 0)
    tree = drafter.grow(root, 5, 1, 5)
    naive = Naive(draft, tiny_target, prompt, aux, root)
    path: list[int] = []
    for _ in range(5):
        path.append(int(draft.draft_to_target(naive.logp(path).argmax())))
    assert tree.tokens[1:].tolist() == path
    assert tree.paths() == [list(range(6))]


def test_bad_settings_are_named(setup, tiny_target):
    draft, prompt, aux, root = setup
    drafter = Drafter(draft, tiny_target.embed)
    with pytest.raises(RuntimeError, match="extend"):
        drafter.grow(root, 3, 2, 4)
    drafter.extend(aux, torch.cat((prompt[1:], torch.tensor([root]))), 0)
    with pytest.raises(ValueError, match="depth, top_k, total_tokens"):
        drafter.grow(root, 0, 2, 4)
    with pytest.raises(ValueError, match="draft cache holds"):
        drafter.extend(aux[:1], prompt[:1], 3)
