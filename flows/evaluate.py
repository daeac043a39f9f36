"""Evaluation flow: benchmark the draft, log it, register it (alias `candidate`), run the gate.

The gate compares against the champion on the SAME eval set: when the champion's numbers were
measured on another one, the champion is benchmarked again here with the current settings.
Prefect artifacts: a markdown report (tau, speedups, alpha per depth, the gate's decision) and a
table of the per-dataset numbers.
"""

from __future__ import annotations

import json
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
    from eagle3.ops.evaluation import registry_tags
    from eagle3.ops.tracking import registered_model_name

    return tracker(recipe).register(
        registered_model_name(recipe), art_run, "draft", registry_tags(metrics, tags)
    )


@task(name="champion-on-eval-set", tags=["gpu"], retries=1, retry_delay_seconds=RETRY_DELAYS[:1])
def champion_task(recipe, eval_set: str, exclude_version: str | None) -> dict | None:
    from eagle3.ops.evaluation import champion_on_eval_set

    return champion_on_eval_set(recipe, tracker(recipe), eval_set, exclude_version, show_progress())


@task(name="publish-evaluation")
def artifacts_task(recipe, md: str, rows: list[dict]) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from eagle3.models.target import TargetSource
    from eagle3.names import slugify

    key = slugify(f"eval-{TargetSource.of(recipe.target).slug}")
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
    from eagle3.eval.render import markdown_report, table_rows
    from eagle3.ops.evaluation import headfree_names, version_tags
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
        # + the name of the head-free decoder the head was measured against (not a metric)
        named = metrics | headfree_names(report)
        cand = gate_metrics(named, r.promote.speedup_baseline, eval_set)
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
