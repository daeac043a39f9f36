"""Where an engine cycle's time goes: draft / verify / accept+compaction, against `ar`.

    .venv/bin/python benchmarks/engine_split.py                      # tiny target, head distilled here
    .venv/bin/python benchmarks/engine_split.py --config configs/smollm2-135m.yaml --draft runs/.../draft

Without --draft it distils the tiny test head (tests/infer_support.py) and decodes the prompts it
was trained on (high acceptance) and unseen ones (low acceptance). Prints ms per cycle and shares.
The goal of the engine issue: accept+compaction under 10% of a cycle.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--draft", help="checkpoint dir (default: distil the tiny test head)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf", action="store_true", help="also time HF generate (the bench baseline)")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. infer.backend=fast")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from eagle3.config import load_recipe
    from eagle3.eval.bench import _hf_generate
    from eagle3.infer.engine import SpecEngine, draft_dtype, encode_prompt
    from eagle3.models.checkpoint import load_draft
    from eagle3.models.target import load_target

    recipe = load_recipe(args.config, args.overrides)
    target = load_target(recipe.target, recipe.cache_path)
    if args.draft:
        draft = load_draft(args.draft, device=target.device, dtype=draft_dtype(recipe))
        chat = ["Write a short poem about the sea.", "Explain what a hash map is, briefly."]
        sets = {
            "chat": [
                encode_prompt(target.tokenizer, [{"role": "user", "content": c}]) for c in chat
            ]
        }
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        import infer_support

        t0 = time.perf_counter()
        draft = infer_support.train_tiny_head(target)
        print(f"distilled the tiny head in {time.perf_counter() - t0:.1f} s")
        sets = {
            "seen (high acceptance)": infer_support.random_prompts(n_seq=3).tolist(),
            "unseen (low acceptance)": infer_support.random_prompts(n_seq=3, seed=99).tolist(),
        }
    print(
        f"target {target.name}, {recipe.target.dtype}, {args.threads} thread(s), backend {recipe.infer.backend}, "
        f"{args.max_new_tokens} new tokens, best of {args.repeats}"
    )
    variants = {
        "tree": recipe.infer.model_copy(update={"pad_verify": False}),
        "tree padded": recipe.infer.model_copy(update={"pad_verify": True}),
        "chain": recipe.infer.model_copy(update={"mode": "chain", "pad_verify": False}),
    }
    header = f"{'prompts':<24} {'decoder':<26} {'tok/s':>7} {'tau':>5} {'ms/cycle':>9} {'draft':>6} {'verify':>7} {'accept':>7}"
    print(header)
    print("-" * len(header))
    for name, prompts in sets.items():
        engine = SpecEngine(target, draft, recipe.infer)
        engine.generate(prompts[0], max_new_tokens=8)  # warm-up
        ar_best = 0.0
        for _ in range(args.repeats):
            tok = sec = 0.0
            for ids in prompts:
                r = engine.generate_ar(ids, max_new_tokens=args.max_new_tokens)
                tok += len(r.tokens)
                sec += r.timings["total"]
            ar_best = max(ar_best, tok / sec)
        ms = 1000 / ar_best
        print(
            f"{name:<24} {'ar':<26} {ar_best:7.1f} {1.0:5.2f} {ms:9.2f} {'':>6} {'100%':>7} {'':>7}"
        )
        if args.hf:  # HF generate on the same prompts: what `eagle3 bench` divides by
            hf_best = 0.0
            for _ in range(args.repeats):
                tok = sec = 0.0
                for ids in prompts:
                    out, s = _hf_generate(target, ids, args.max_new_tokens, 0.0, recipe.infer, None)
                    tok += len(out)
                    sec += s
                hf_best = max(hf_best, tok / sec)
            print(f"{name:<24} {'hf generate':<26} {hf_best:7.1f} {1.0:5.2f} {1000 / hf_best:9.2f}")
        for label, cfg in variants.items():
            engine.cfg = cfg
            depth, top_k, total = engine.tree_shape()
            best = None
            for _ in range(args.repeats):
                agg = {
                    "tok": 0,
                    "total": 0.0,
                    "cycles": 0,
                    "emitted": 0,
                    "draft": 0.0,
                    "verify": 0.0,
                    "accept": 0.0,
                }
                for ids in prompts:
                    r = engine.generate(ids, max_new_tokens=args.max_new_tokens)
                    agg["tok"] += len(r.tokens)
                    agg["total"] += r.timings["total"]
                    agg["cycles"] += r.cycles
                    agg["emitted"] += sum(r.accept_lengths)
                    for k in ("draft", "verify", "accept"):
                        agg[k] += r.timings[k]
                if best is None or agg["tok"] / agg["total"] > best["tok"] / best["total"]:
                    best = agg
            cyc = best["draft"] + best["verify"] + best["accept"]
            shares = [100 * best[k] / cyc for k in ("draft", "verify", "accept")]
            desc = f"eagle3 {label} {total}/{depth}/{top_k}"
            print(
                f"{name:<24} {desc:<26} {best['tok'] / best['total']:7.1f} {best['emitted'] / best['cycles']:5.2f} "
                f"{1000 * cyc / best['cycles']:9.2f} {shares[0]:5.0f}% {shares[1]:6.0f}% {shares[2]:6.0f}%"
            )


if __name__ == "__main__":
    main()
