"""Regeneration throughput: one prompt at a time vs batched HF generate vs continuous batching.

    .venv/bin/python benchmarks/regen_throughput.py                       # SmolLM2-135M, batch 8
    .venv/bin/python benchmarks/regen_throughput.py --config configs/tiny.yaml --prompts 8
    .venv/bin/python benchmarks/regen_throughput.py --modes continuous --batch-size 8 16 32 64 \
        --prompts 64 --max-new-tokens 128 --threads 2          # which batch size to regenerate at

Prompts are ShareGPT first turns (the data the pipeline regenerates), rendered with the target's chat
template and sorted by length as the pipeline sorts them. Three ways to answer the same prompts:
- one-at-a-time: HF `generate` on each prompt alone (the baseline);
- static batch: HF `generate` on left-padded batches of `--batch-size` prompts; a batch runs until
  its longest answer ends;
- continuous: what `eagle3 data` runs (`eagle3/data/decode.py`): `--batch-size` answers in flight,
  a finished answer's slot refilled with the next prompt.
Greedy decoding: all three produce the same tokens (checked). tokens/s counts generated tokens up to
and including EOS; times include the prefills (the same work in every mode).

The modes run `--rounds` times, interleaved: each round runs every mode once, in an order rotated
by one per round, and the times add up, so no mode always runs first (cold) or last (warm or
throttled). `--out FILE` writes the numbers with their provenance (commit, recipe, overrides).
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
    ap.add_argument(
        "--batch-size", type=int, nargs="+", default=[8], help="one or more (continuous mode)"
    )
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["continuous", "static batch", "one-at-a-time"],
        choices=["continuous", "static batch", "one-at-a-time"],
    )
    ap.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="default: the recipe's data.max_new_tokens (what the pipeline generates)",
    )
    ap.add_argument("--max-prompt-tokens", type=int, default=384)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every mode")
    ap.add_argument("--out", default=None, help="JSON report")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from eagle3.config import load_recipe
    from eagle3.data.chat import encode_chat
    from eagle3.data.regenerate import answer_prompts, generate_static, user_turns
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
    bs, n = args.batch_size[0], args.max_new_tokens or recipe.data.max_new_tokens
    limits = [n] * len(prompts)
    modes = {}
    for b in args.batch_size if "continuous" in args.modes else []:
        name = "continuous" if len(args.batch_size) == 1 else f"continuous {b}"
        modes[name] = lambda b=b: answer_prompts(target, prompts, limits, b)
    if "static batch" in args.modes:
        modes["static batch"] = lambda: [
            r
            for g in range(0, len(prompts), bs)
            for r in generate_static(target, prompts[g : g + bs], limits[g : g + bs], 0.0, 0)
        ]
    if "one-at-a-time" in args.modes:
        modes["one-at-a-time"] = lambda: [
            generate_static(target, [p], [n], 0.0, 0)[0] for p in prompts
        ]
    from eagle3.eval.bench import rotated

    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: must be >= 1")
    tokens, seconds, outs = dict.fromkeys(modes, 0), dict.fromkeys(modes, 0.0), {}
    for i in range(args.rounds):
        for name in rotated(list(modes), i):
            t = time.perf_counter()
            out = modes[name]()
            dt = time.perf_counter() - t
            seconds[name] += dt
            tokens[name] += sum(len(ids) for ids, _ in out)
            outs.setdefault(name, out)
            print(f"  round {i + 1} {name}: {sum(len(x) for x, _ in out)} tok in {dt:.1f} s")
    first = next(iter(outs.values()))
    same = all(o == first for o in outs.values())

    rate = {k: tokens[k] / seconds[k] for k in tokens}
    lens = [len(p) for p in prompts]
    print(
        f"\n{target.name} on {describe_device(str(target.device))}, {torch.get_num_threads()} "
        f"threads, dtype {target.dtype}; {len(prompts)} prompts of {min(lens)}-{max(lens)} tokens, "
        f"max_new_tokens {n}, batch {' '.join(map(str, args.batch_size))}"
    )
    ref = "one-at-a-time" if "one-at-a-time" in rate else next(iter(rate))
    print(f"{'mode':<16}{'new tokens':>12}{'seconds':>10}{'tokens/s':>10}{'vs ' + ref:>18}")
    for k in reversed(modes):
        x = rate[k] / rate[ref]
        print(f"{k:<16}{tokens[k]:>12}{seconds[k]:>10.1f}{rate[k]:>10.1f}{x:>17.2f}x")
    print(f"same greedy tokens in all modes: {same}")
    if args.out:
        from eagle3.eval.provenance import provenance
        from eagle3.io import write_json_atomic

        report = {
            "target": target.name,
            "device": describe_device(str(target.device)),
            "threads": torch.get_num_threads(),
            "prompts": len(prompts),
            "max_new_tokens": n,
            "rounds": args.rounds,
            "tokens": tokens,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "tokens_per_s": {k: round(v, 3) for k, v in rate.items()},
            "same_tokens": same,
            "provenance": provenance(
                recipe,
                {"recipe": args.config, "overrides": args.overrides},
                args.prompts,
                ["sharegpt"],
                list(modes),
            )
            | {"order": "rotated per round"},
        }
        write_json_atomic(args.out, report)
        print(f"report: {args.out}")


if __name__ == "__main__":
    main()
