"""The evaluation as people read it: a markdown report (tau, speedups, alpha per depth, vLLM's
numbers, the gate's decision) and one table row per dataset (the Prefect artifacts of the
evaluation flow, and eval/report.md in MLflow)."""

from __future__ import annotations

import json


def markdown_report(
    recipe, report: dict, metrics: dict, decision: dict | None, version, model
) -> str:
    from eagle3.eval.report import as_report
    from eagle3.ops.gate import as_decision

    rep = as_report(report)
    o, depth = rep.overall, rep.max_depth()
    lines = [
        f"# EAGLE-3 evaluation: {model} v{version}",
        "",
        f"target `{rep.target}` on {rep.device}, {rep.dtype}, "
        f"decoding {json.dumps(rep.decoding.to_dict())}",
        "",
        f"**tau {o.tau:.3f}**, lossless **{o.lossless}**; speedups "
        + ", ".join(f"{k} {v:.2f}x" for k, v in o.speedup.items()),
        "",
        *_headfree(o),
        "| dataset | prompts | tau | "
        + " | ".join(f"alpha_{i}" for i in range(depth))
        + " | speedup vs ar | vs hf_generate | lossless |",
        "|---" * (6 + depth) + "|",
    ]
    for ds, r in rep.datasets.items():
        al = list(r.alpha) + [float("nan")] * (depth - len(r.alpha))
        sp = r.speedup
        lines.append(
            f"| {ds} | {r.prompts} | {r.tau:.3f} | "
            + " | ".join(f"{a:.3f}" for a in al)
            + f" | {sp.get('vs_ar', float('nan')):.2f} | {sp.get('vs_hf_generate', float('nan')):.2f}"
            f" | {r.lossless} |"
        )
    v = rep.vllm
    if v:
        lines += [
            "",
            f"## Through {v.version} ({v.speculative_tokens} speculative tokens)",
            "",
            f"acceptance length {v.acceptance_length:.3f}, per position "
            + ", ".join(f"{a:.3f}" for a in v.per_position_acceptance)
            + f"; greedy outputs with the head equal those without it: {v.lossless}",
            "",
            "| in flight | with head tok/s | without tok/s | ngram tok/s | speedup | vs best "
            "head-free |",
            "|---|---|---|---|---|---|",
        ]
        for lv in v.concurrency.values():
            t = lv.tokens_per_s
            ng = f"{t['ngram']:.1f}" if "ngram" in t else "-"
            best = (
                f"{lv.speedup_vs_best_headfree:.2f} ({lv.best_headfree})"
                if lv.speedup_vs_best_headfree is not None
                else "-"
            )
            lines.append(
                f"| {lv.in_flight} | {t['eagle3']:.1f} | {t['vllm']:.1f} | {ng} | "
                f"{lv.speedup:.2f} | {best} |"
            )
        lines += [f"ngram not measured: {why}" for why in (v.headfree_skipped or {}).values()]
    if decision is not None:
        gate = as_decision(decision)
        lines += ["", f"## Gate: {gate.verdict}", ""]
        lines += [f"- {x}" for x in gate.reasons]
        champ = gate.champion
        if champ:
            lines += [
                "",
                f"champion v{champ.version} ({champ.source}): tau "
                f"{champ.tau}, speedup {champ.speedup}",
            ]
    return "\n".join(lines) + "\n"


def _headfree(o) -> list[str]:
    """The gate's ratio, said in words: the head over the fastest head-free decoder."""
    if not o.best_headfree:
        return []
    line = (
        f"vs the best head-free decoder (**{o.best_headfree}**): "
        f"**{o.speedup['vs_best_headfree']:.2f}x**"
    )
    if o.best_headfree_concurrent:
        line += (
            f"; at concurrency, the lowest ({o.best_headfree_concurrent}): "
            f"**{o.speedup['vs_best_headfree_concurrent']:.2f}x**"
        )
    return [line, ""]


def table_rows(report: dict) -> list[dict]:
    from eagle3.eval.report import as_report

    rows = []
    for ds, r in as_report(report).datasets.items():
        row = {
            "dataset": ds,
            "prompts": r.prompts,
            "new_tokens": r.new_tokens,
            "tau": round(float(r.tau), 4),
            "lossless": r.lossless,
        }
        for k, v in r.speedup.items():
            row[f"speedup_{k}"] = round(float(v), 3)
        for k, v in r.tokens_per_s.items():
            row[f"tok_s_{k}"] = round(float(v), 2)
        for i, a in enumerate(r.alpha):
            row[f"alpha_{i}"] = round(float(a), 4)
        rows.append(row)
    return rows
