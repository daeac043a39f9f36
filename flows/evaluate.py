"""Evaluation flow: benchmark the draft, log it, register it (alias `candidate`), run the gate.

The gate compares against the champion on the SAME eval set: when the champion's numbers were
measured on another one, the champion is benchmarked again here with the current settings.
Prefect artifacts: a markdown report (tau, speedups, alpha per depth, the gate's decision) and a
table of the per-dataset numbers.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, task

from flows.common import (
    RETRY_DELAYS,
    mlflow_run,
    resolve_recipe,
    show_progress,
    tag_flow_run,
    tracker,
    write_json,
)


@task(name="benchmark", tags=["gpu"])
def bench_task(
    recipe,
    draft_dir: str,
    datasets: list[str] | None = None,
    limit: int | None = None,
    journal: str | None = None,
):
    from eagle3.eval.bench import run_bench

    report = run_bench(
        recipe,
        draft_dir,
        datasets=datasets,
        limit=limit,
        progress=show_progress(),
        journal=journal,
    )
    return json.loads(json.dumps(report, default=str))


@task(name="check-checkpoint")
def check_task(draft_dir: str) -> list[str]:
    from eagle3.models.checkpoint import check_checkpoint

    return check_checkpoint(draft_dir)


@task(name="log-evaluation", retries=3, retry_delay_seconds=RETRY_DELAYS)
def log_eval_task(recipe, report: dict, run_id: str, art_run: str, draft_dir: str) -> dict:
    from eagle3.ops.plots import acceptance_by_depth, speedup_by_dataset
    from eagle3.ops.tracking import report_metrics

    t = tracker(recipe)
    metrics = report_metrics(report)
    for rid in {run_id, art_run}:
        t.log_metrics(rid, metrics)
    t.log_json(art_run, report, "eval/bench_report.json")
    t.log_figure(art_run, acceptance_by_depth(report), "plots/acceptance_by_depth.png")
    t.log_figure(art_run, speedup_by_dataset(report), "plots/speedup_by_dataset.png")
    t.log_artifact(art_run, draft_dir, "draft")
    return metrics


@task(name="register-version", retries=3, retry_delay_seconds=RETRY_DELAYS)
def register_task(recipe, art_run: str, metrics: dict, tags: dict) -> str:
    from eagle3.ops.tracking import registered_model_name

    t = tracker(recipe)
    keep = (
        "tau",
        "speedup_vs_hf_generate",
        "speedup_vs_ar",
        "speedup_vs_hf_prompt_lookup",
        "speedup_vs_vllm",
        "lossless",
        "vllm/acceptance_length",
        "vllm/speedup_bs1",
    )
    all_tags = {k: round(metrics[k], 6) for k in keep if k in metrics} | tags
    return t.register(registered_model_name(recipe), art_run, "draft", all_tags)


def version_tags(draft: Path, report: dict, eval_set: str, data_digest, problems) -> dict:
    """Registry version tags: what the gate and the promotion check later (sha256 per file)."""
    from eagle3.data.manifest import MANIFEST, read_manifest
    from eagle3.eval.report import as_report
    from eagle3.ops.storage import sha256_file

    tags = {
        "eval_set": eval_set,
        "data_digest": data_digest or "",
        "check": "ok" if not problems else "; ".join(problems)[:4000],
        "target": as_report(report).target,
    }
    data = Path(draft).parent / "data"
    if (data / MANIFEST).is_file():  # the target's revision (file sha256 or seed)
        tags["target_revision"] = str(read_manifest(data).target.revision)
    for f in sorted(Path(draft).iterdir()):
        if f.is_file():
            tags[f"sha256.{f.name}"] = sha256_file(f)
    return tags


@task(name="champion-on-eval-set", tags=["gpu"], retries=1, retry_delay_seconds=RETRY_DELAYS[:1])
def champion_task(recipe, eval_set: str, exclude_version: str | None) -> dict | None:
    """The numbers of the champion (champion.json when S3 is configured, else the MLflow alias)
    on this eval set: from its tags, or benchmarked again. The promotion gates again, under its
    compare-and-swap, against the champion it actually replaces."""
    from eagle3.ops.champion import place_for
    from eagle3.ops.gate import gate_metrics
    from eagle3.ops.promotion import current_champion, fetch_version
    from eagle3.ops.tracking import report_metrics

    place = place_for(recipe, tracker(recipe))
    version, _ = current_champion(place)
    if version is None or version == str(exclude_version):
        return None
    baseline = recipe.promote.speedup_baseline
    tags = dict(place.tracker.version(place.model, version).tags)
    if tags.get("eval_set") == eval_set:
        out = gate_metrics(tags, baseline, eval_set)
        out["version"] = version
        out["source"] = "registry tags"
        return out
    # Measured elsewhere: benchmark the champion now, under the same settings as the candidate.
    with tempfile.TemporaryDirectory(prefix="eagle3-champion-") as tmp:
        d = fetch_version(place, version, Path(tmp) / "draft")
        from eagle3.eval.bench import run_bench

        report = run_bench(recipe, str(d), progress=show_progress())
    out = gate_metrics(report_metrics(report), baseline, eval_set)
    out["version"] = version
    out["source"] = "re-benchmarked on this eval set"
    return out


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
            "| in flight | with head tok/s | without tok/s | speedup |",
            "|---|---|---|---|",
        ]
        for lv in v.concurrency.values():
            t = lv.tokens_per_s
            lines.append(
                f"| {lv.in_flight} | {t['eagle3']:.1f} | {t['vllm']:.1f} | {lv.speedup:.2f} |"
            )
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


@task(name="publish-evaluation")
def artifacts_task(recipe, md: str, rows: list[dict]) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from eagle3.ops.tracking import slugify, target_slug

    key = slugify(f"eval-{target_slug(recipe)}")
    create_markdown_artifact(
        markdown=md, key=key, description="EAGLE-3 evaluation and gate decision"
    )
    create_table_artifact(table=rows, key=f"{key}-datasets", description="per-dataset numbers")


@flow(name="eagle3-evaluate", log_prints=True)
def evaluate_flow(
    recipe: Any = "configs/tiny.yaml",
    overrides: list[str] | None = None,
    draft_dir: str | None = None,
    parent_run_id: str | None = None,
    data_digest: str | None = None,
    register_version: bool = True,
) -> dict:
    from eagle3.ops.gate import decide, gate_metrics
    from eagle3.ops.tracking import eval_set_signature, registered_model_name

    r = resolve_recipe(recipe, overrides)
    tag_flow_run(r)
    draft = Path(draft_dir or r.run_path / "draft")
    if not draft.is_dir():
        raise FileNotFoundError(f"draft checkpoint {draft} does not exist; run training first")
    model = registered_model_name(r)
    with mlflow_run(r, "evaluate", parent_run_id) as (t, run_id):
        art_run = parent_run_id or run_id
        problems = check_task(str(draft))
        # Every finished prompt is kept in the journal: a stopped pipeline resumes the bench.
        report = bench_task(r, str(draft), journal=str(r.run_path / "bench_report.prompts.json"))
        write_json(r.run_path / "bench_report.json", report)
        metrics = log_eval_task(r, report, run_id, art_run, str(draft))
        eval_set = eval_set_signature(r, report)
        cand = gate_metrics(metrics, r.promote.speedup_baseline, eval_set)
        version = None
        if register_version:
            tags = version_tags(draft, report, eval_set, data_digest, problems)
            version = register_task(r, art_run, metrics, tags)
        champion = champion_task(r, eval_set, version)
        gate = decide(cand, champion, r.promote, problems)
        decision = gate.to_dict()
        t.set_tags(
            art_run,
            {
                "eagle3.gate": gate.verdict,
                "eagle3.gate_reasons": "; ".join(gate.reasons)[:4000],
            },
        )
        if version:
            t.set_version_tags(
                model,
                version,
                {"gate": gate.verdict, "gate_reasons": "; ".join(gate.reasons)[:4000]},
            )
        md = markdown_report(r, report, metrics, decision, version, model)
        t.log_text(art_run, md, "eval/report.md")
        artifacts_task(r, md, table_rows(report))
    print(md)
    return {
        "report": report,
        "metrics": metrics,
        "version": version,
        "model": model,
        "decision": decision,
        "problems": problems,
        "eval_set": eval_set,
        "draft_dir": str(draft),
        "mlflow_run_id": run_id,
    }
