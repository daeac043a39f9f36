"""The bench report's plots: acceptance by depth, speedup by dataset (the training curves are the
train run's metric history, which MLflow charts itself). matplotlib with the Agg backend (no
display); each returns a Figure."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eagle3.eval.report import BenchReport


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


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
