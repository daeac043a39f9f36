"""Decoder settings side by side on one target + head: tok/s, x the first setting (ar), tau,
draft ms per cycle.

    .venv/bin/python benchmarks/decode_sweep.py --config configs/smollm2-135m.yaml --profile full \
        --draft runs/smollm2-135m/draft --datasets mt_bench,gsm8k --skip 8 --limit 2 \
        --setting ar --setting "infer.total_tokens=8 infer.depth=4 infer.top_k=4" \
        --setting "infer.lookup_tokens=6" --setting "infer.draft_dtype=float32"

Each --setting is a list of `infer.*` recipe overrides applied on top of the recipe (`ar`: plain
decoding on the same runner). Settings run interleaved, prompt by prompt, so that machine noise
hits them alike, and every one must give the same greedy tokens (the script stops if not).
--skip leaves out the first prompts of each set (the ones `eagle3 bench --limit` measures).
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--profile")
    ap.add_argument("--draft", required=True)
    ap.add_argument("--datasets", default="mt_bench")
    ap.add_argument("--skip", type=int, default=0)
    ap.add_argument("--limit", type=int, default=2, help="prompts per data set (first turns)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--setting", action="append", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from eagle3.config import load_recipe
    from eagle3.data.sources import load_eval_prompts
    from eagle3.infer.engine import SpecEngine, draft_dtype, encode_prompt
    from eagle3.models.checkpoint import load_draft
    from eagle3.models.target import load_target

    base = load_recipe(args.config, [], args.profile)
    target = load_target(base.target, base.cache_path)
    runner = None
    drafts: dict[str, object] = {}  # one copy of the head per draft dtype
    engines = {}
    for s in args.setting:
        recipe = load_recipe(args.config, [] if s == "ar" else s.split(), args.profile)
        dt = draft_dtype(recipe)
        if dt not in drafts:
            drafts[dt] = load_draft(args.draft, device=target.device, dtype=dt)
        engines[s] = SpecEngine(target, drafts[dt], recipe.infer, runner=runner)
        runner = engines[s].runner  # one KV cache for all settings

    stats = {s: [0, 0.0, 0, 0, 0.0] for s in engines}  # tokens, s, cycles, emitted, draft s
    tok = target.tokenizer
    for name in args.datasets.split(","):
        for p in load_eval_prompts(name, args.skip + args.limit, base)[args.skip :]:
            ids = encode_prompt(tok, [{"role": "user", "content": p.turns[0]}])
            ref = None
            for s, engine in engines.items():
                decode = engine.generate_ar if s == "ar" else engine.generate
                res = decode(ids, temperature=0.0, max_new_tokens=args.max_new_tokens)
                st = stats[s]
                # The engine's own clock: prefill and decoding, not a one-off pad_verify table.
                st[1] += res.timings["total"]
                ref = res.tokens if ref is None else ref
                if res.tokens != ref:
                    raise SystemExit(f"{p.id}: setting {s!r} gave other tokens than the first")
                st[0] += len(res.tokens)
                st[2] += res.cycles
                st[3] += sum(res.accept_lengths)
                st[4] += res.timings["draft"]
            print(f"{p.id}: done", flush=True)

    first = next(iter(stats.values()))
    ref_tps = first[0] / first[1]
    print(f"\n{target.name}, {args.threads} thread(s), {args.max_new_tokens} new tokens a prompt")
    print(f"{'setting':60s} {'tok/s':>7s} {'x first':>8s} {'tau':>5s} {'draft ms/cycle':>15s}")
    for s, (n, secs, cycles, emitted, draft_s) in stats.items():
        tau = emitted / cycles if cycles else 1.0
        draft_ms = 1000 * draft_s / cycles if cycles else 0.0
        print(f"{s:60s} {n / secs:7.2f} {n / secs / ref_tps:8.2f} {tau:5.2f} {draft_ms:15.1f}")


if __name__ == "__main__":
    main()
