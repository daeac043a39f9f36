"""vLLM eager vs torch.compile on this machine: start-up seconds and batch-1 tokens/s.

    .venv/bin/python benchmarks/vllm_eager.py --prompts 4 --max-new-tokens 128
    .venv/bin/python benchmarks/vllm_eager.py --draft DIR     # with the head (3 speculative tokens)

One server at a time (eager, then compiled, then eager again so that drift in the machine's load
shows), each on the same MT-bench first turns, greedy, one request at a time after one untimed
warm-up request. This decides `vllm.enforce_eager`'s default.
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
    ap.add_argument("--draft", default=None)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--order", default="eager,compiled,eager")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from eagle3.config import load_recipe
    from eagle3.data.sources import load_eval_prompts
    from eagle3.infer.engine import encode_prompt
    from eagle3.infer.vllm_client import VLLMClient
    from eagle3.ops.vllm_server import spec_from_recipe, start_vllm

    recipe = load_recipe(args.config, [f"vllm.speculative_tokens={args.k}", *args.overrides])
    spec = spec_from_recipe(recipe, args.draft)
    tok = AutoTokenizer.from_pretrained(spec.model)
    prompts = [
        encode_prompt(tok, [{"role": "user", "content": p.turns[0]}])
        for p in load_eval_prompts("mt_bench", args.prompts, recipe)
    ]
    rows = []
    outputs = {}
    for mode in args.order.split(","):
        spec.enforce_eager = mode == "eager"
        t = time.perf_counter()
        with start_vllm(spec, f"eager-bench-{mode}", timeout=1800) as srv:
            started = time.perf_counter() - t
            c = VLLMClient(srv.url)
            c.complete(prompts[0], 16)
            before = c.counters()
            n, secs, outs = 0, 0.0, []
            for ids in prompts:
                r = c.complete(ids, args.max_new_tokens)
                n, secs = n + len(r.tokens), secs + r.seconds
                outs.append(r.tokens)
            al = (c.counters() - before).acceptance_length
        same = outputs.setdefault("first", outs) == outs
        rows.append((mode, started, n / secs, al, same))
        print(f"{mode}: started in {started:.0f} s, {n / secs:.2f} tok/s, AL {al:.2f}", flush=True)
    head = f"with head {args.draft} (k={args.k})" if args.draft else "without head"
    print(f"\n{spec.model} {head}, {len(prompts)} prompts x {args.max_new_tokens} tokens")
    print(f"{'mode':<10}{'start s':>9}{'tok/s':>9}{'accept len':>12}{'same tokens':>13}")
    for mode, started, tps, al, same in rows:
        print(f"{mode:<10}{started:>9.0f}{tps:>9.2f}{al:>12.2f}{same!s:>13}")


if __name__ == "__main__":
    main()
