"""Prompt-lookup candidates grafted onto the draft tree (one extra branch, verified in the same pass).

Small chat models repeat themselves and their prompts: on SmolLM2-135M's own ShareGPT answers a
prompt-lookup chain alone gets tau ~2.1 where the CPU-trained head gets ~1.6. The chain is just
more candidate rows in the tree that the target verifies, so the output stays exactly the
target's; only the verify gets wider (`infer.lookup_tokens` rows at most, and only when the
context holds a match).
"""

from __future__ import annotations

import torch

from eagle3.infer.tree import Tree


def prompt_lookup(context: list[int], max_ngram: int, num_tokens: int) -> list[int]:
    """Up to num_tokens tokens that followed the most recent earlier occurrence of the context's
    longest suffix n-gram (n = max_ngram down to 1); [] when no suffix n-gram occurs before."""
    if num_tokens < 1:
        return []
    size = len(context)
    for n in range(min(max_ngram, size - 1), 0, -1):
        tail = context[-n:]
        first = tail[0]
        # Most recent first: the nearest repetition predicts the continuation best.
        for s in range(size - n - 1, -1, -1):
            if context[s] == first and context[s : s + n] == tail:
                return context[s + n : s + n + num_tokens]
    return []


def graft_chain(tree: Tree, chain: list[int]) -> Tree:
    """The tree with `chain` (the tokens after the root) as a root path: existing rows are
    followed while they match, the rest is appended as new rows after all others, so parents
    still come before children and no two siblings carry the same token."""
    if not chain:
        return tree
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    node, rest = 0, list(chain)
    while rest:
        child = next(
            (r for r in range(1, len(tokens)) if parents[r] == node and tokens[r] == rest[0]), None
        )
        if child is None:
            break
        node, rest = child, rest[1:]
    if not rest:
        return tree
    n, m = len(tokens), len(rest)
    dev = tree.tokens.device
    new_parents = torch.arange(n - 1, n + m - 1, device=dev)
    new_parents[0] = node
    depth0 = int(tree.depth[node])
    new_depth = torch.arange(depth0 + 1, depth0 + 1 + m, device=dev)
    mask = torch.zeros(n + m, n + m, dtype=torch.bool, device=dev)
    mask[:n, :n] = tree.mask
    mask[n:, :n] = tree.mask[node]  # the graft point's ancestors (and itself)
    mask[n:, n:] = torch.ones(m, m, dtype=torch.bool, device=dev).tril()
    root_pos = int(tree.positions[0])
    return Tree(
        tokens=torch.cat((tree.tokens, torch.tensor(rest, dtype=torch.long, device=dev))),
        parents=torch.cat((tree.parents, new_parents)),
        depth=torch.cat((tree.depth, new_depth)),
        mask=mask,
        positions=torch.cat((tree.positions, root_pos + new_depth)),
    )
