"""The plots a reviewer looks at first: training curves per TTT step, acceptance by depth,
speedup by dataset. matplotlib with the Agg backend (no display); each returns a Figure."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eagle3.eval.report import BenchReport


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def training_curves(history: list[tuple[int, dict[str, float]]]):
    """history: (step, metrics) with keys train/loss_<i>, train/acc_<i> (and val/...)."""
    plt = _plt()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for step, m in history:
        for k, v in m.items():
            series.setdefault(k, []).append((step, float(v)))

    def idx(k: str) -> int:
        m = re.search(r"_(\d+)$", k)
        return int(m.group(1)) if m else 0

    for ax, kind in ((ax_l, "loss"), (ax_a, "acc")):
        keys = sorted((k for k in series if re.match(rf"^(train|val)/{kind}_\d+$", k)), key=idx)
        for k in keys:
            pts = sorted(series[k])
            style = "-" if k.startswith("train/") else "--o"
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], style, ms=4, label=f"{k} (step {idx(k)})"
            )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(kind)
        ax.set_title(f"TTT {kind} per unroll step i")
        if keys:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no training metrics logged", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def acceptance_by_depth(report: dict[str, Any] | BenchReport):
    from eagle3.eval.report import as_report

    r = as_report(report)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for ds, s in r.datasets.items():
        ax.plot(range(1, len(s.alpha) + 1), s.alpha, "o-", label=f"{ds} (tau {s.tau:.2f})")
    depth = r.max_depth()
    ax.set_xticks(range(1, depth + 1))
    ax.set_xlabel("draft depth")
    ax.set_ylabel("acceptance rate alpha")
    ax.set_ylim(0, 1.05)
    ax.set_title("Acceptance by depth")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def speedup_by_dataset(report: dict[str, Any] | BenchReport):
    from eagle3.eval.report import as_report

    r = as_report(report)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    datasets = list(r.datasets)
    baselines = sorted({b for s in r.datasets.values() for b in s.speedup})
    width = 0.8 / max(len(baselines), 1)
    for j, b in enumerate(baselines):
        vals = [r.datasets[d].speedup.get(b, 0.0) for d in datasets]
        ax.bar([i + j * width for i in range(len(datasets))], vals, width, label=b)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([i + width * (len(baselines) - 1) / 2 for i in range(len(datasets))])
    ax.set_xticklabels(datasets)
    ax.set_ylabel("speedup (x)")
    ax.set_title("EAGLE-3 speedup by dataset")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
