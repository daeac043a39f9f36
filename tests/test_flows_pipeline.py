"""The pipeline on configs/tiny.yaml end to end, with the real data, training, benchmark and
engine: Prefect's test harness, MLflow on a temp sqlite, SeaweedFS. Then an on-demand inference
run reads the champion, and a rerun of the data flow is served from the task cache.

The recipe is tiny.yaml with smaller counts (16 conversations, one epoch, one eval prompt) so
that the test fits the suite's time budget on 2 CPU cores.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

os.environ.setdefault("EAGLE3_RETRY_DELAY", "0.05")

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "data.sources=[{name: sharegpt, limit: 16}]",
    "data.max_new_tokens=24",
    "train.epochs=1",
    "eval.limit=1",
    "eval.max_new_tokens=16",
    "eval.warmup=0",
    "eval.baselines=[ar, hf_generate]",
]


def test_pipeline_end_to_end_on_tiny(tmp_path, s3_env, mlflow_sqlite, prefect_harness):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter

    from eagle3.config import load_recipe
    from eagle3.ops import storage
    from eagle3.ops.tracking import Tracker
    from flows.datagen import datagen_flow
    from flows.infer import infer_flow
    from flows.pipeline import pipeline_flow

    model = f"eagle3-e2e-{uuid.uuid4().hex[:8]}"
    over = [f"run_dir={tmp_path / 'run'}", f"tracking.registered_model={model}", *SMALL]
    recipe = load_recipe(ROOT / "configs" / "tiny.yaml", over)
    out = pipeline_flow(recipe)

    # the gate promoted the first version (tiny's floors: tau >= 1, lossless, check passes)
    assert out["promoted"], out["decision"]
    v = out["version"]
    assert out["metrics"]["tau"] >= 1.0 and out["metrics"]["lossless"] == 1.0

    # MLflow: a parent run with nested stage runs, params, the dataset, artifacts, tags
    t = Tracker(recipe.tracking)
    parent = t.run(out["mlflow_run_id"])
    assert parent.data.tags["eagle3.target"] == "tiny-llama"
    assert parent.data.tags["prefect.flow_run_id"] and parent.data.tags["git.commit"]
    assert parent.data.params["train.epochs"] == "1"
    assert {"tau", "speedup_vs_hf_generate", "speedup_vs_ar", "alpha_0"} <= set(parent.data.metrics)
    assert parent.inputs.dataset_inputs[0].dataset.digest == out["data_digest"][:36]
    children = t.client.search_runs(
        [t.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"data", "train", "evaluate", "promote"}
    assert all(r.info.status == "FINISHED" for r in children)
    assert t.metric_history(by_name["train"].info.run_id, "train/loss_0")
    arts = {a.path for a in t.client.list_artifacts(parent.info.run_id, "plots")}
    assert arts == {f"plots/{n}.png" for n in ("acceptance_by_depth", "speedup_by_dataset")}
    top = {a.path for a in t.client.list_artifacts(parent.info.run_id)}
    assert {"draft", "eval", "data", "recipe.yaml"} <= top

    # registry: version with aliases candidate and champion, tags with metrics
    assert str(t.alias_version(model, "champion").version) == v
    assert str(t.alias_version(model, "candidate").version) == v
    assert float(t.version(model, v).tags["tau"]) == pytest.approx(out["metrics"]["tau"], abs=1e-5)

    # S3: the objects hash to the local checkpoint's sha256; the pointer names the version
    draft = Path(out["draft_dir"])
    man = storage.verify_version(s3_env, model, v)
    for name, info in man["files"].items():
        assert info["sha256"] == storage.sha256_file(draft / name)
    ptr = storage.read_champion(s3_env, model)
    assert ptr["version"] == v and ptr["uri"] == out["s3_uri"]
    assert man["data_digest"] == out["data_digest"] and man["mlflow_run_id"] == parent.info.run_id

    # Prefect: the evaluation's markdown report and per-dataset table
    with get_client(sync_client=True) as c:
        found = c.read_artifacts(artifact_filter=ArtifactFilter(key={"any_": ["eval-tiny-llama"]}))
        tables = c.read_artifacts(
            artifact_filter=ArtifactFilter(key={"any_": ["eval-tiny-llama-datasets"]})
        )
    assert found and "## Gate: PROMOTE" in found[0].data and "alpha_0" in found[0].data
    assert tables and "mt_bench" in str(tables[0].data)
    # runs carry the target's tag; GPU-bound tasks share the `gpu` concurrency limit
    with get_client(sync_client=True) as c:
        run = c.read_flow_run(parent.data.tags["prefect.flow_run_id"])
        assert "target:tiny-llama" in run.tags
        assert c.read_concurrency_limit_by_tag("gpu").concurrency_limit == 1
        from prefect.client.schemas.filters import FlowRunFilter

        subruns = c.read_task_runs(
            flow_run_filter=FlowRunFilter(tags={"all_": ["target:tiny-llama"]})
        )
    gpu_tasks = {r.name.rsplit("-", 1)[0] for r in subruns if "gpu" in r.tags}
    assert {"generate-data", "train-draft", "benchmark"} <= gpu_tasks

    # on-demand inference: prompts from an S3 JSONL, the champion from S3, outputs in the model's
    # inference/ folder
    prompts_uri = f"s3://{s3_env.bucket}/jobs/prompts.jsonl"
    storage.write_jsonl_uri(prompts_uri, [{"prompt": "Say hello."}, "Name a colour."], s3_env)
    res = infer_flow(prompts_uri, config=recipe, max_new_tokens=8)
    assert (
        res["count"] == 2 and res["champion"]["version"] == v and res["champion"]["source"] == "s3"
    )
    assert res["tau"] >= 1.0 and res["tokens_per_s"] > 0
    assert res["output_uri"].startswith(f"s3://{s3_env.bucket}/eagle3/{model}/inference/")
    rows = storage.read_jsonl_uri(res["output_uri"], s3_env)
    assert [r["prompt"] for r in rows] == ["Say hello.", "Name a colour."]
    assert all(1 <= r["new_tokens"] <= 8 and r["champion_version"] == v for r in rows)

    # a rerun with unchanged data settings reuses the data (a cached task result)
    t0 = time.perf_counter()
    state = datagen_flow(recipe, return_state=True)
    assert state.is_completed()
    assert state.result()["digest"] == out["data_digest"]
    with get_client(sync_client=True) as c:
        from prefect.client.schemas.filters import FlowRunFilter

        runs = c.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [state.state_details.flow_run_id]})
        )
    data_runs = [r for r in runs if r.name.startswith("generate-data")]
    assert data_runs and data_runs[0].state.name == "Cached"
    assert time.perf_counter() - t0 < 60
