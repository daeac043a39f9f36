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
    from eagle3.infer.engine import GenerationResult, _Sampler, _Stopper, check_prompt_fits

    if lookup_tokens < 1:
        raise ValueError(f"lookup decoding needs lookup_tokens >= 1 (got {lookup_tokens})")
    temperature, max_new, stop = engine._args(temperature, max_new_tokens, None)
    check_prompt_fits(engine.target, input_ids, max_new)
    cfg = engine.cfg
    sampler = _Sampler(temperature, cfg.top_p, cfg.top_k_sampling, seed)
    stopper = _Stopper(engine.target.eos_token_ids, stop, engine.target.tokenizer, max_new)
    runner, dev = engine.runner, engine.target.device
    t0 = synced_time(dev)
    runner.reset()
    logits, _ = runner.prefill(
        torch.as_tensor(input_ids, dtype=torch.long, device=dev), last_only=True
    )
    root = sampler(logits[-1])
    out = [root]
    context = list(input_ids) + out
    t_prefill = synced_time(dev) - t0
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
