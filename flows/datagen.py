"""Data generation flow: conversations -> regenerated answers -> features + draft vocab.

The data task is cached on a hash of the settings that determine the data (target, data section,
seed, run dir) and its own source: a rerun with unchanged data settings reuses the manifest
without touching the target. The cache is refreshed when the manifest file has gone.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from eagle3.io import sha256_json
from flows.common import RETRY_DELAYS, mlflow_run, resolve_recipe, show_progress, tag_flow_run


def data_key(recipe) -> str:
    d = recipe.model_dump(mode="json")
    sub = {k: d.get(k) for k in ("name", "run_dir", "cache_dir", "seed", "target", "data")}
    return sha256_json(sub)


@task(
    name="generate-data",
    tags=["gpu"],
    retries=1,
    retry_delay_seconds=RETRY_DELAYS[:1],
    cache_policy=(INPUTS - "recipe") + TASK_SOURCE,
    persist_result=True,
    result_serializer="json",
)
def data_task(recipe, key: str, data_dir: str | None = None) -> dict:
    from eagle3.data.pipeline import run_data

    manifest = run_data(recipe, progress=show_progress(), data_dir=data_dir)
    return json.loads(json.dumps(manifest, default=str))


@task(name="log-data", retries=3, retry_delay_seconds=RETRY_DELAYS)
def log_data_task(
    recipe, manifest: dict, parent_run_id: str | None, mixed: dict | None = None
) -> str:
    from eagle3.data.manifest import DataManifest
    from eagle3.ops.tracking import manifest_numbers

    path = recipe.run_path / "data" / "manifest.json"
    with mlflow_run(recipe, "data", parent_run_id) as (t, run_id):
        t.log_metrics(run_id, manifest_numbers(manifest))
        for stage, m in (mixed or {}).items():  # data.mix stages: data-<name>/...
            t.log_metrics(run_id, manifest_numbers(m, stage))
            t.log_json(parent_run_id or run_id, m, f"{stage}/manifest.json")
        m = DataManifest.model_validate(manifest)
        tags = {
            "eagle3.data_digest": m.digest,
            "eagle3.target_id": m.target.id,
            "eagle3.target_revision": m.target.revision,
        }
        for rid in {run_id, parent_run_id} - {None}:
            t.set_tags(rid, tags)
        for rid in {run_id, parent_run_id} - {None}:
            if path.is_file():
                t.log_dataset(rid, manifest, path)
        t.log_json(parent_run_id or run_id, manifest, "data/manifest.json")
    return run_id


@flow(name="eagle3-datagen", log_prints=True)
def datagen_flow(
    recipe: Any = "configs/tiny.yaml",
    overrides: list[str] | None = None,
    parent_run_id: str | None = None,
) -> dict:
    from eagle3.data.stages import data_stages

    r = resolve_recipe(recipe, overrides)
    tag_flow_run(r)
    manifests = {}
    stages = data_stages(r)
    for i, stage in enumerate(stages):  # the main stage, then data.mix (each resumes on its own)
        manifest_path = stage.data_dir / "manifest.json"
        print(f"data stage {i + 1}/{len(stages)}: {stage.name} -> {stage.data_dir}")
        task_ = data_task.with_options(refresh_cache=not manifest_path.is_file())
        manifests[stage.name] = m = task_(stage.recipe, data_key(stage.recipe), str(stage.data_dir))
        print(f"{stage.name}: {manifest_path} (digest {str(m.get('digest'))[:12]})")
    manifest = manifests.pop(stages[0].name)
    log_data_task(r, manifest, parent_run_id, manifests)
    return manifest
