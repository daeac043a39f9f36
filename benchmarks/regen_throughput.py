"""Regeneration throughput: batched HF generate vs one prompt at a time, on the same target.

    .venv/bin/python benchmarks/regen_throughput.py                       # SmolLM2-135M, batch 8
    .venv/bin/python benchmarks/regen_throughput.py --config configs/tiny.yaml --prompts 8

Prompts are ShareGPT first turns (the data the pipeline regenerates), rendered with the target's chat
template and sorted by length as the pipeline sorts a shard's prompts, so a batch wastes little on
padding. The two modes are interleaved group by group (one batch, then the same prompts one at a
time), so that a noisy, shared machine slows both alike and the ratio holds. Greedy decoding: both
modes produce the same tokens; tokens/s counts generated tokens up to and including EOS, and the
time includes each mode's prefill (the same work in both modes, so long prompts and short answers
pull the ratio down: it is the decode steps that batching shares).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/smollm2-135m.yaml")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="default: the recipe's data.max_new_tokens (what the pipeline generates)",
    )
    ap.add_argument("--max-prompt-tokens", type=int, default=384)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from eagle3.config import load_recipe
    from eagle3.data.chat import encode_chat
    from eagle3.data.regenerate import generate_batch, user_turns
    from eagle3.data.sources import Conversation, iter_conversations, resolve_source
    from eagle3.env import describe_device
    from eagle3.models.target import load_target

    recipe = load_recipe(args.config, args.overrides)
    t0 = time.perf_counter()
    target = load_target(recipe.target, recipe.cache_path)
    print(f"target {target.name} loaded in {time.perf_counter() - t0:.1f} s")

    prompts: list[list[int]] = []
    for item in iter_conversations(resolve_source("sharegpt", recipe=recipe)):
        if not isinstance(item, Conversation):
            continue
        ids = encode_chat(
            target.tokenizer, user_turns(item.messages)[0], add_generation_prompt=True
        )
        if len(ids) <= args.max_prompt_tokens:
            prompts.append(ids)
        if len(prompts) == args.prompts:
            break
    prompts.sort(key=len)
    bs, n = args.batch_size, args.max_new_tokens or recipe.data.max_new_tokens
    tokens = {"batched": 0, "one-at-a-time": 0}
    seconds = {"batched": 0.0, "one-at-a-time": 0.0}
    same = True
    for g in range(0, len(prompts), bs):
        group = prompts[g : g + bs]
        t = time.perf_counter()
        batched = generate_batch(target, group, n)
        seconds["batched"] += time.perf_counter() - t
        t = time.perf_counter()
        single = [generate_batch(target, [p], n)[0] for p in group]
        seconds["one-at-a-time"] += time.perf_counter() - t
        tokens["batched"] += sum(len(ids) for ids, _ in batched)
        tokens["one-at-a-time"] += sum(len(ids) for ids, _ in single)
        same &= [ids for ids, _ in batched] == [ids for ids, _ in single]
        print(
            f"  group {g // bs}: {len(group)} prompts, batched {tokens['batched']} tok "
            f"/ {seconds['batched']:.1f} s, single {tokens['one-at-a-time']} tok "
            f"/ {seconds['one-at-a-time']:.1f} s",
            flush=True,
        )

    rate = {k: tokens[k] / seconds[k] for k in tokens}
    lens = [len(p) for p in prompts]
    print(
        f"\n{target.name} on {describe_device(str(target.device))}, {torch.get_num_threads()} "
        f"threads, dtype {target.dtype}; {len(prompts)} prompts of {min(lens)}-{max(lens)} tokens, "
        f"max_new_tokens {n}, batch {bs}"
    )
    print(f"{'mode':<15}{'new tokens':>12}{'seconds':>10}{'tokens/s':>10}")
    for k in ("one-at-a-time", "batched"):
        print(f"{k:<15}{tokens[k]:>12}{seconds[k]:>10.1f}{rate[k]:>10.1f}")
    print(
        f"batched / one-at-a-time: {rate['batched'] / rate['one-at-a-time']:.2f}x"
        f"  (same greedy tokens: {same})"
    )


if __name__ == "__main__":
    main()
