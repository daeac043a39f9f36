"""Our engine with its prompt-lookup branch and no head: the head-free decoder the gate must beat.

Every cycle the tree is the root alone, with the prompt-lookup chain (eagle3.infer.lookup) grafted
on; the target verifies it in one forward and acceptance keeps the longest matching path plus the
bonus token, exactly as with a head. So the output is the target's own (lossless at temperature 0)
and whatever speed the head adds over this decoder is what the head earns.
"""

from __future__ import annotations

import torch

from eagle3.infer.lookup import graft_chain, prompt_lookup
from eagle3.infer.runner import synced_time
from eagle3.infer.tree import Tree
from eagle3.infer.verify import accept_greedy, accept_sample


def root_tree(root: int, position: int, device) -> Tree:
    """A one-row tree: the root token at `position` (what a chain is grafted onto)."""
    return Tree(
        tokens=torch.tensor([root], dtype=torch.long, device=device),
        parents=torch.tensor([-1], dtype=torch.long, device=device),
        depth=torch.zeros(1, dtype=torch.long, device=device),
        mask=torch.ones(1, 1, dtype=torch.bool, device=device),
        positions=torch.tensor([position], dtype=torch.long, device=device),
    )


@torch.no_grad()
def generate_lookup(
    engine,
    input_ids: list[int],
    lookup_tokens: int,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    seed: int | None = None,
):
    """A GenerationResult of `engine`'s target decoding with prompt lookup alone (no draft)."""
    from eagle3.infer.engine import GenerationResult

    if lookup_tokens < 1:
        raise ValueError(f"lookup decoding needs lookup_tokens >= 1 (got {lookup_tokens})")
    s = engine.start_target_only(input_ids, temperature, max_new_tokens, None, seed)
    temperature, sampler, stopper, t0, t_prefill = (
        s.temperature,
        s.sampler,
        s.stopper,
        s.t0,
        s.t_prefill,
    )
    cfg, runner, dev = engine.cfg, engine.runner, engine.target.device
    root = s.first
    out = [root]
    context = list(input_ids) + out
    lengths: list[int] = []
    keep = stopper.cut(out, 1)
    while keep is None:
        chain = prompt_lookup(context, cfg.lookup_ngram, lookup_tokens)
        tree = graft_chain(root_tree(root, runner.cache_len, dev), chain)
        logits, _ = runner.verify(tree.tokens, tree.positions, tree.mask)
        if temperature > 0:
            rows, bonus = accept_sample(
                tree, logits.cpu(), temperature, cfg.top_p, cfg.top_k_sampling, sampler.generator
            )
            rows = rows.to(dev)
        else:
            rows, bonus = accept_greedy(tree, logits)
        runner.keep(rows)
        new = tree.tokens[rows[1:]].tolist() + [bonus]
        out.extend(new)
        context.extend(new)
        lengths.append(len(new))
        root = bonus
        keep = stopper.cut(out, len(new))
    total = synced_time(dev) - t0
    timings = dict(prefill=t_prefill, draft=0.0, verify=total - t_prefill, accept=0.0, total=total)
    tau = sum(lengths) / len(lengths) if lengths else 0.0
    return GenerationResult(out[:keep], tau, lengths, timings, stopper.reason)
