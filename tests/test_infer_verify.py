"""Acceptance rules: greedy against a naive walk, sampling against the exact target distribution."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from eagle3.infer.tree import Tree
from eagle3.infer.verify import accept_greedy, accept_sample, warp_probs

pytestmark = pytest.mark.slow


def _tree(parents: list[int], tokens: list[int]) -> Tree:
    n = len(parents)
    mask = torch.eye(n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.long)
    for j in range(1, n):
        mask[j] |= mask[parents[j]]
        depth[j] = depth[parents[j]] + 1
    return Tree(torch.tensor(tokens), torch.tensor(parents), depth, mask, 10 + depth)


@pytest.mark.parametrize(
    "temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 0.5, 7), (0.5, 1.0, 3)]
)
def test_warp_equals_hf_warpers(temperature, top_p, top_k):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    x = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    torch.testing.assert_close(warp_probs(logits, temperature, top_p, top_k), x.softmax(-1))
    with pytest.raises(ValueError, match="temperature"):
        warp_probs(logits, 0.0)


def test_greedy_equals_naive_walk():
    gen = torch.Generator().manual_seed(1)
    for trial in range(200):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        parents = [-1] + [int(torch.randint(0, j, (1,), generator=gen)) for j in range(1, n)]
        # Distinct sibling tokens from a small vocabulary, so matches are frequent.
        tokens = [0] * n
        for p in range(n):
            kids = [j for j in range(1, n) if parents[j] == p]
            for j, t in zip(kids, torch.randperm(6, generator=gen).tolist(), strict=False):
                tokens[j] = t
        tree = _tree(parents, tokens)
        logits = torch.randn(n, 6, generator=gen)
        rows, bonus = accept_greedy(tree, logits)
        # Naive: walk down while a child carries the target's argmax.
        node, want = 0, [0]
        while True:
            nxt = [
                c
                for c in range(1, n)
                if parents[c] == node and tokens[c] == int(logits[node].argmax())
            ]
            if not nxt:
                break
            node = nxt[0]
            want.append(node)
        assert rows.tolist() == want, trial
        assert bonus == int(logits[node].argmax())


def _emitted(tree, logits, T, top_p, top_k, gen, sampler=accept_sample):
    rows, bonus = sampler(tree, logits, T, top_p, top_k, gen)
    return tree.tokens[rows[1:]].tolist() + [bonus]


# Root (row 0) with children tokens 2, 0, 4; row 1 (token 2) has children 1, 3; row 4 (token 1) has child 0.
PARENTS = [-1, 0, 0, 0, 1, 1, 4]
TOKENS = [9, 2, 0, 4, 1, 3, 0]


@pytest.mark.parametrize("T,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.8, 0), (1.0, 1.0, 3)])
def test_sampling_emits_the_target_distribution(T, top_p, top_k):
    """First emitted token ~ p(root); given the first is child row 1's token, the second ~ p(row 1)."""
    V = 6
    tree = _tree(PARENTS, TOKENS)
    logits = torch.randn(len(PARENTS), V, generator=torch.Generator().manual_seed(2)) * 1.5
    logits[0, TOKENS[1]] = (
        logits[0].max() + 0.5
    )  # row 1 is accepted often enough to test what follows it
    gen = torch.Generator().manual_seed(3)
    n = 6000
    first = torch.zeros(V)
    second = torch.zeros(V)
    for _ in range(n):
        out = _emitted(tree, logits, T, top_p, top_k, gen)
        first[out[0]] += 1
        if out[0] == TOKENS[1]:
            second[out[1]] += 1  # row 1 was accepted, so a second token always follows
    for counts, row in ((first, 0), (second, 1)):
        p = warp_probs(logits[row], T, top_p, top_k)
        assert counts[p == 0].sum() == 0  # never a token the warper removed
        keep = p > 0
        expected = p[keep] * counts.sum()
        assert expected.min() > 5, "too few samples for chi-square"
        stat = chisquare(counts[keep].numpy(), expected.numpy())
        assert stat.pvalue > 1e-3, (row, counts, expected)


def test_sampling_check_has_power():
    """A classic mistake (bonus from the unmodified p after rejections) is caught by the same test."""

    def wrong(tree, logits, T, top_p, top_k, gen):
        p = warp_probs(logits[0], T, top_p, top_k)
        for c in [1, 2, 3]:
            if float(torch.rand((), generator=gen)) < float(p[TOKENS[c]]):
                return torch.tensor([0, c]), 0
        return torch.tensor([0]), int(torch.multinomial(p, 1, generator=gen))

    tree = _tree(PARENTS, TOKENS)
    logits = torch.randn(len(PARENTS), 6, generator=torch.Generator().manual_seed(2)) * 1.5
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros(6)
    for _ in range(3000):
        counts[_emitted(tree, logits, 1.0, 1.0, 0, gen, wrong)[0]] += 1
    p = warp_probs(logits[0], 1.0)
    assert chisquare(counts.numpy(), (p * counts.sum()).numpy()).pvalue < 1e-6
