"""Verify-row padding: run each verification at the cheapest row count that holds the tree.

On a CPU the cost of a target forward over n rows is not monotone in n. BLAS picks its kernel and
its thread split by shape: on this project's 2-core box, a SmolLM2 fp32 verify costs 118 ms for 3
rows, 76 ms for 5, 100 ms for 11 and 81 ms for 12 (benchmarks/verify_rows.py). So a tree of n rows
is verified as m >= n rows when m is measurably cheaper; the extra rows are dummies that see only
the prefix and themselves, their logits are dropped, and their cache rows are never kept, so the
real rows' logits are those of an unpadded verify (up to BLAS rounding for the other shape, the
same freedom every batched verify already takes against one-row decoding).

The cost table is measured on the runner itself, on the engine's first generation with padding on
(a few seconds on a CPU: every row count, 5 times), because it belongs to the machine, the thread
count and the dtype. Padding applies only where a wider verify measured cheaper; whether that
ever happens on a GPU has not been measured.
"""

from __future__ import annotations

import torch

from eagle3.infer.runner import synced_time
from eagle3.infer.tree import Tree

PREFIX = 128  # cached tokens under the timed verifies: a short chat prompt


def verify_costs(runner, device, rows: int, prefix: int = PREFIX, reps: int = 5) -> list[float]:
    """Seconds of one verify over n = 1 .. rows causal rows after a `prefix`-token prompt.

    Row counts are interleaved across repetitions (so load on the machine hits them alike) and
    the minimum is kept. The runner is reset afterwards.
    """
    if rows < 1:
        raise ValueError(f"verify_costs: rows must be >= 1 (got {rows})")
    dev = torch.device(device)
    runner.reset()
    # Token ids do not change what a dense forward costs; id 0 exists in every vocabulary.
    runner.prefill(torch.zeros(prefix, dtype=torch.long, device=dev), last_only=True)
    best = [float("inf")] * rows
    for _ in range(reps):
        for n in range(1, rows + 1):
            tokens = torch.zeros(n, dtype=torch.long, device=dev)
            pos = torch.arange(prefix, prefix + n, device=dev)
            mask = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
            t0 = synced_time(dev)
            runner.verify(tokens, pos, mask)
            best[n - 1] = min(best[n - 1], synced_time(dev) - t0)
            runner.keep(torch.zeros(0, dtype=torch.long, device=dev))
    runner.reset()
    return best


def padded_sizes(costs: list[float], margin: float = 0.05) -> list[int]:
    """For each n = 1 .. len(costs), the row count to verify at: the cheapest m >= n, taken only
    when it saves more than `margin` of n's own cost (measurement noise must not pick it)."""
    sizes = []
    for n in range(1, len(costs) + 1):
        m = min(range(n, len(costs) + 1), key=lambda r: (costs[r - 1], r))
        sizes.append(m if costs[m - 1] < (1 - margin) * costs[n - 1] else n)
    return sizes


def pad_tree(tree: Tree, m: int) -> Tree:
    """The tree with m - n dummy rows appended, for the verify only (acceptance reads the
    unpadded tree): token and position of the root, each row seeing only itself and the prefix,
    so that no real row sees a dummy."""
    n = tree.size
    if m <= n:
        return tree
    dev = tree.tokens.device
    k = m - n
    mask = torch.zeros(m, m, dtype=torch.bool, device=dev)
    mask[:n, :n] = tree.mask
    mask[n:, n:] = torch.eye(k, dtype=torch.bool, device=dev)
    return Tree(
        tokens=torch.cat((tree.tokens, tree.tokens[:1].expand(k))),
        parents=torch.cat((tree.parents, tree.parents.new_full((k,), -1))),
        depth=torch.cat((tree.depth, tree.depth.new_zeros(k))),
        mask=mask,
        positions=torch.cat((tree.positions, tree.positions[:1].expand(k))),
    )
