"""Is HF's own prompt-lookup decoding token-identical to HF generate? A check of the dtype, not of
eagle3: a multi-token verify forward may round differently from 1-token steps, and any speculative
decoder then parts from greedy HF generate at a near-tied logit.

    .venv/bin/python benchmarks/pld_vs_generate.py --dtypes bfloat16 float32 --limit 3
"""

import argparse

import torch

from eagle3.config import load_recipe
from eagle3.data.sources import load_eval_prompts
from eagle3.eval.bench import _hf_generate
from eagle3.infer.engine import encode_prompt
from eagle3.models.target import load_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smollm2-135m.yaml")
    ap.add_argument("--dataset", default="gsm8k")
    ap.add_argument("--limit", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for dtype in args.dtypes:
        recipe = load_recipe(args.config, [f"target.dtype={dtype}"])
        target = load_target(recipe.target, recipe.cache_path)
        for p in load_eval_prompts(args.dataset, args.limit, recipe):
            ids = encode_prompt(target.tokenizer, [{"role": "user", "content": p.turns[0]}])
            ref, _ = _hf_generate(target, ids, args.max_new_tokens, 0.0, recipe.infer, None)
            pld, _ = _hf_generate(target, ids, args.max_new_tokens, 0.0, recipe.infer, 10)
            first = next(
                (i for i, (a, b) in enumerate(zip(ref, pld, strict=False)) if a != b), None
            )
            same = ref == pld
            print(f"{dtype} {p.id}: " + ("identical" if same else f"parts at token {first}"))


if __name__ == "__main__":
    main()
