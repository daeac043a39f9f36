"""Auto-tuning of the draft tree: a short sweep on calibration prompts, on THIS hardware.

The best tree depends on what one target forward over n tokens costs relative to one token (on a
2-core CPU a 16-token verify costs ~2x a 1-token step; on a GPU it is ~1x up to a few dozen), and
on how far the head's acceptance reaches. So the sweep measures tokens/s end to end instead of
modelling it. Candidates run interleaved, prompt by prompt, so machine noise hits them alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

# (mode, total_tokens, depth, top_k): small to large trees plus two chains, the vLLM-style baseline.
DEFAULT_GRID: list[tuple[str, int, int, int]] = [
    ("chain", 3, 3, 1),
    ("chain", 5, 5, 1),
    ("tree", 8, 4, 2),
    ("tree", 12, 4, 4),
    ("tree", 16, 5, 4),
    ("tree", 24, 6, 6),
    ("tree", 32, 6, 8),
    ("tree", 48, 7, 8),
]


def settings(mode: str, total: int, depth: int, top_k: int) -> dict:
    return {"mode": mode, "total_tokens": total, "depth": depth, "top_k": top_k}


def autotune(
    engine,
    prompts: list[list[int]],
    grid: list[tuple[str, int, int, int]] | None = None,
    max_new_tokens: int = 64,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Measure every grid point on the prompts (greedy); return {"best": settings, "results": [...]}.

    The engine's infer settings are restored afterwards; callers apply the best one.
    """
    if not prompts:
        raise ValueError("autotune: no calibration prompts")
    grid = grid or DEFAULT_GRID
    base = engine.cfg
    stats = {g: {"tokens": 0, "seconds": 0.0, "cycles": 0, "emitted": 0} for g in grid}
    try:
        # Warm-up once (allocations, kernels), untimed.
        engine.cfg = base.model_copy(update=settings(*grid[0]))
        engine.generate(prompts[0], temperature=0.0, max_new_tokens=min(8, max_new_tokens))
        for ids in prompts:
            for g in grid:
                engine.cfg = base.model_copy(update=settings(*g))
                t0 = time.perf_counter()
                res = engine.generate(ids, temperature=0.0, max_new_tokens=max_new_tokens)
                s = stats[g]
                s["seconds"] += time.perf_counter() - t0
                s["tokens"] += len(res.tokens)
                s["cycles"] += res.cycles
                s["emitted"] += sum(res.accept_lengths)
            if progress:
                progress(f"autotune: {len(grid)} settings on a prompt")
    finally:
        engine.cfg = base
    results = []
    for g, s in stats.items():
        tps = s["tokens"] / s["seconds"] if s["seconds"] > 0 else 0.0
        tau = s["emitted"] / s["cycles"] if s["cycles"] else 0.0
        results.append({**settings(*g), "tokens_per_s": round(tps, 3), "tau": round(tau, 3)})
    best = max(results, key=lambda r: r["tokens_per_s"])
    keys = ("mode", "total_tokens", "depth", "top_k")
    return {"best": {k: best[k] for k in keys}, "results": results}


def save_tuned(draft, draft_dir: str | Path, tuned: dict, device_desc: str, threads: int) -> Path:
    """Write the chosen tree into the checkpoint's `eagle3` block (atomic rewrite of the dir)."""
    from eagle3.models.checkpoint import save_draft

    block = {**tuned["best"], "tuned_on": device_desc, "threads": threads}
    draft.config.eagle3 = {**(draft.config.eagle3 or {}), "tree": block}
    return save_draft(draft, draft_dir, extra={"tree": block})
