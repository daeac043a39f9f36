"""What one target verify costs for n = 1 .. N rows, and the row count eagle3 pads it to.

    .venv/bin/python benchmarks/verify_rows.py --config configs/smollm2-135m.yaml --threads 2 \
        --rows 20 infer.backend=fast

Prints ms per verify (best of --reps, row counts interleaved) after a --prefix-token prompt, the
cost relative to one row, and `padded_sizes`' choice (eagle3/infer/padding.py). The defaults are
the engine's own (its prefix, and the rows its tree shape needs), but every call measures anew:
on a noisy machine two tables can differ where two row counts cost nearly the same.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2-135m.yaml"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, help="default: what the recipe's tree shape needs")
    ap.add_argument("--prefix", type=int, help="cached tokens (default: the engine's)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. infer.backend=fast")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from eagle3.config import load_recipe
    from eagle3.infer.engine import PAD_HEADROOM, SpecEngine
    from eagle3.infer.padding import PREFIX, padded_sizes, verify_costs
    from eagle3.models.target import load_target

    recipe = load_recipe(args.config, args.overrides)
    target = load_target(recipe.target, recipe.cache_path)
    engine = SpecEngine(target, None, recipe.infer)
    rows = args.rows or engine.max_tree_rows() + PAD_HEADROOM
    args.prefix = args.prefix or PREFIX
    costs = verify_costs(engine.runner, target.device, rows, prefix=args.prefix, reps=args.reps)
    sizes = padded_sizes(costs)
    print(
        f"target {target.name}, {recipe.target.dtype}, backend {recipe.infer.backend}, "
        f"{args.threads} thread(s), {args.prefix}-token prefix, best of {args.reps}"
    )
    print(f"{'rows':>4} {'ms':>7} {'x 1 row':>8} {'padded to':>10} {'ms padded':>10}")
    for n, (c, m) in enumerate(zip(costs, sizes, strict=True), start=1):
        print(f"{n:4d} {1e3 * c:7.1f} {c / costs[0]:8.2f} {m:10d} {1e3 * costs[m - 1]:10.1f}")


if __name__ == "__main__":
    main()
