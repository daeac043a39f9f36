"""Training flow: TTT training of the draft head, per-step metrics streamed to MLflow.

The training task is cached on the train/target settings plus the data digest: a rerun with
nothing changed reuses the checkpoint (refreshed when the draft dir has gone). An interrupted run
leaves no cache record, and the trainer resumes from its own checkpoint in the run dir.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from eagle3.io import sha256_json
from eagle3.ops.tracking import contract_names
from flows.common import (
    RETRY_DELAYS,
    mlflow_run,
    resolve_recipe,
    show_progress,
    tag_flow_run,
    tracker,
)


def train_key(recipe, data_digest: str | None) -> str:
    d = recipe.model_dump(mode="json")
    sub = {k: d.get(k) for k in ("name", "run_dir", "seed", "target", "train")}
    sub["data_digest"] = data_digest
    return sha256_json(sub)


@task(
    name="train-draft",
    tags=["gpu"],
    cache_policy=(INPUTS - "recipe" - "mlflow_run_id") + TASK_SOURCE,
    persist_result=True,
    result_serializer="json",
)
def train_task(recipe, key: str, mlflow_run_id: str | None = None) -> dict:
    from eagle3.train.trainer import run_training

    t = tracker(recipe) if mlflow_run_id else None
    warned = []

    def callback(step: int, metrics: dict[str, float]) -> None:
        m = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if t is None:
            return
        try:
            t.log_metrics(mlflow_run_id, contract_names(m), step=int(step))
        except Exception as e:  # tracking trouble must not kill hours of training
            if not warned:
                warned.append(e)
                print(f"warning: MLflow metric logging failed ({e}); training goes on")

    summary = run_training(recipe, progress=show_progress(), callback=callback)
    return json.loads(json.dumps(summary, default=str))


@task(name="log-training", retries=3, retry_delay_seconds=RETRY_DELAYS)
def log_train_task(recipe, summary: dict, run_id: str, art_run: str) -> None:
    """The final metrics on the train run (and the pipeline's), train_metrics.json as an artifact.
    The per-step curves are the train run's metric history: MLflow's charts draw them."""
    t = tracker(recipe)
    final = {k: v for k, v in (summary.get("metrics") or {}).items() if isinstance(v, (int, float))}
    if final:
        t.log_metrics(run_id, contract_names(final))
        if art_run != run_id:
            t.log_metrics(art_run, contract_names(final))
    metrics_file = recipe.run_path / "train_metrics.json"
    if metrics_file.is_file():
        t.log_artifact(art_run, metrics_file, "train")


@flow(name="eagle3-train", log_prints=True)
def train_flow(
    recipe: Any = "configs/tiny.yaml",
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
    data_digest: str | None = None,
) -> dict:
    r = resolve_recipe(recipe, overrides)
    tag_flow_run(r)
    if data_digest is None and (r.run_path / "data" / "manifest.json").is_file():
        from eagle3.data.stages import training_digest

        data_digest = training_digest(r)
    draft_dir = r.run_path / "draft"
    with mlflow_run(r, "train", parent_run_id) as (t, run_id):
        t.set_tags(run_id, {"eagle3.data_digest": data_digest})
        task_ = train_task.with_options(refresh_cache=not (draft_dir / "config.json").is_file())
        summary = task_(r, train_key(r, data_digest), run_id)
        log_train_task(r, summary, run_id, parent_run_id or run_id)
    summary["mlflow_run_id"] = run_id
    print(f"draft: {summary.get('draft_dir')}")
    return summary
