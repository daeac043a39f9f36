"""The evaluation as people read it: a markdown report (tau, speedups, alpha per depth, vLLM's
numbers, the gate's decision) and one table row per dataset (the Prefect artifacts of the
evaluation flow, and eval/report.md in MLflow)."""

from __future__ import annotations

import json


def markdown_report(
    recipe, report: dict, metrics: dict, decision: dict | None, version, model
) -> str:
    o = report.get("overall", {})
    lines = [
        f"# EAGLE-3 evaluation: {model} v{version}",
        "",
        f"target `{report.get('target')}` on {report.get('device')}, {report.get('dtype')}, "
        f"decoding {json.dumps(report.get('decoding', {}))}",
        "",
        f"**tau {o.get('tau', 0):.3f}**, lossless **{o.get('lossless')}**; speedups "
        + ", ".join(f"{k} {v:.2f}x" for k, v in (o.get("speedup") or {}).items()),
        "",
        "| dataset | prompts | tau | "
        + " | ".join(f"alpha_{i}" for i in range(_depth(report)))
        + " | speedup vs ar | vs hf_generate | lossless |",
        "|---" * (6 + _depth(report)) + "|",
    ]
    for ds, r in report.get("datasets", {}).items():
        al = list(r.get("alpha") or []) + [float("nan")] * (
            _depth(report) - len(r.get("alpha") or [])
        )
        sp = r.get("speedup") or {}
        lines.append(
            f"| {ds} | {r.get('prompts')} | {r.get('tau', 0):.3f} | "
            + " | ".join(f"{a:.3f}" for a in al)
            + f" | {sp.get('vs_ar', float('nan')):.2f} | {sp.get('vs_hf_generate', float('nan')):.2f}"
            f" | {r.get('lossless')} |"
        )
    v = report.get("vllm")
    if v:
        lines += [
            "",
            f"## Through {v['version']} ({v['speculative_tokens']} speculative tokens)",
            "",
            f"acceptance length {v['acceptance_length']:.3f}, per position "
            + ", ".join(f"{a:.3f}" for a in v["per_position_acceptance"])
            + f"; greedy outputs with the head equal those without it: {v['lossless']}",
            "",
            "| in flight | with head tok/s | without tok/s | speedup |",
            "|---|---|---|---|",
        ]
        for lv in v["concurrency"].values():
            t = lv["tokens_per_s"]
            lines.append(
                f"| {lv['in_flight']} | {t['eagle3']:.1f} | {t['vllm']:.1f} | {lv['speedup']:.2f} |"
            )
    if decision is not None:
        lines += ["", f"## Gate: {'PROMOTE' if decision['promote'] else 'REJECT'}", ""]
        lines += [f"- {x}" for x in decision["reasons"]]
        champ = decision.get("champion")
        if champ:
            lines += [
                "",
                f"champion v{champ.get('version')} ({champ.get('source')}): tau "
                f"{champ.get('tau')}, speedup {champ.get('speedup')}",
            ]
    return "\n".join(lines) + "\n"


def _depth(report: dict) -> int:
    return max((len(r.get("alpha") or []) for r in report.get("datasets", {}).values()), default=0)


def table_rows(report: dict) -> list[dict]:
    rows = []
    for ds, r in report.get("datasets", {}).items():
        row = {
            "dataset": ds,
            "prompts": r.get("prompts"),
            "new_tokens": r.get("new_tokens"),
            "tau": round(float(r.get("tau", 0)), 4),
            "lossless": r.get("lossless"),
        }
        for k, v in (r.get("speedup") or {}).items():
            row[f"speedup_{k}"] = round(float(v), 3)
        for k, v in (r.get("tokens_per_s") or {}).items():
            row[f"tok_s_{k}"] = round(float(v), 2)
        for i, a in enumerate(r.get("alpha") or []):
            row[f"alpha_{i}"] = round(float(a), 4)
        rows.append(row)
    return rows
