"""The pipeline flow: datagen -> train -> evaluate (register, gate) -> promote.

One MLflow parent run per pipeline run (recipe, manifest, checkpoint, report and plots), nested
runs per stage. Each stage is a subflow; all runs carry the target's tag.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, tags

from flows.common import (
    ensure_gpu_limit,
    flow_run_url,
    mlflow_run,
    recipe_tags,
    resolve_recipe,
    tag_flow_run,
)
from flows.datagen import datagen_flow
from flows.evaluate import evaluate_flow
from flows.promote import promote_flow
from flows.train import train_flow


@flow(name="eagle3-pipeline", log_prints=True)
def pipeline_flow(
    config: Any = "configs/tiny.yaml",
    overrides: list[str] | None = None,
    profile: str | None = None,
    promote: bool = True,
) -> dict:
    import yaml

    from eagle3.data.stages import training_digest
    from eagle3.ops.tracking import registered_model_name

    r = resolve_recipe(config, overrides, profile)
    tag_flow_run(r)
    ensure_gpu_limit()
    with tags(*recipe_tags(r)), mlflow_run(r, f"pipeline-{r.name}") as (t, parent):
        t.log_text(
            parent, yaml.safe_dump(r.model_dump(mode="json"), sort_keys=False), "recipe.yaml"
        )
        # Each stage resumes on a rerun: data shards, the train state, the bench's journal.
        print(f"pipeline 1/4: data ({r.run_path})")
        datagen_flow(r, parent_run_id=parent)
        digest = training_digest(r)  # the main stage's, or combined with the mixed stages'
        print("pipeline 2/4: train")
        trained = train_flow(r, parent_run_id=parent, data_digest=digest)
        print("pipeline 3/4: evaluate (bench, register, gate)")
        ev = evaluate_flow(
            r,
            draft_dir=trained.get("draft_dir"),
            parent_run_id=parent,
            data_digest=digest,
        )
        promoted = {"promoted": False, "decision": ev["decision"]}
        print("pipeline 4/4: promote")
        if promote and ev["version"]:
            promoted = promote_flow(
                r,
                version=ev["version"],
                decision=ev["decision"],
                draft_dir=ev["draft_dir"],
                parent_run_id=parent,
            )
        t.set_tags(parent, {"eagle3.promoted": str(bool(promoted.get("promoted"))).lower()})
    return {
        "promotion_skipped": promoted.get("skipped"),
        "recipe": r.name,
        "model": registered_model_name(r),
        "version": ev["version"],
        "metrics": {k: v for k, v in ev["metrics"].items() if "/" not in k},
        "decision": promoted.get("decision", ev["decision"]),
        "promoted": bool(promoted.get("promoted")),
        "s3_uri": promoted.get("uri"),
        "mlflow_run_id": parent,
        "mlflow_run_url": t.run_url(parent),
        "mlflow_model_url": t.model_url(registered_model_name(r), ev["version"]),
        "prefect_flow_run_url": flow_run_url(),
        "data_digest": digest,
        "draft_dir": ev["draft_dir"],
    }


def print_summary(out: dict) -> None:
    from eagle3.ops.gate import as_decision

    m = out["metrics"]
    d = as_decision(out["decision"])
    print()
    print(f"pipeline {out['recipe']}: {out['model']} v{out['version']}")
    print(
        f"  tau {m.get('tau', float('nan')):.3f}  "
        + "  ".join(f"{k} {v:.2f}x" for k, v in m.items() if k.startswith("speedup_"))
        + f"  lossless {bool(m.get('lossless'))}"
    )
    print(f"  gate: {d.summary}")
    print(f"  promoted: {out['promoted']}" + (f" -> {out['s3_uri']}" if out.get("s3_uri") else ""))
    if out.get("promotion_skipped"):
        print(f"  promotion skipped: {out['promotion_skipped']}")
    for k in ("mlflow_run_url", "mlflow_model_url", "prefect_flow_run_url"):
        if out.get(k):
            print(f"  {k.replace('_', ' ')}: {out[k]}")


def pipeline_from_cli(recipe, args) -> int:
    with tags(*recipe_tags(recipe)):
        out = pipeline_flow(recipe)
    print_summary(out)
    return 0
