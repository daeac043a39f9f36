"""Promotion flow: gate -> S3 upload -> read back and verify every sha256 -> champion.json ->
MLflow alias `champion`. A failure at any point leaves the old champion intact in both places
(the pointer is restored if the alias cannot follow). `rollback` points both back to the
previous champion recorded in champion.json's history.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, task

from flows.common import (
    RETRY_DELAYS,
    mlflow_run,
    resolve_recipe,
    s3_retryable,
    tag_flow_run,
    tracker,
)


@task(
    name="upload-to-s3",
    retries=3,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=s3_retryable,
)
def upload_task(settings, model: str, version: str, draft_dir: str, meta: dict) -> dict:
    from eagle3.ops import storage

    storage.check_access(settings)  # wrong keys: fail at once (not retried), naming the endpoint
    return storage.upload_version(settings, model, version, draft_dir, meta)


@task(
    name="write-champion-pointer",
    retries=3,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=s3_retryable,
)
def pointer_task(settings, model: str, version: str, uploaded: dict, extra: dict) -> dict:
    from eagle3.ops import storage

    new, old = storage.write_champion(settings, model, version, uploaded, extra)
    return {"new": new, "old": old}


@task(name="move-champion-alias", retries=3, retry_delay_seconds=RETRY_DELAYS)
def alias_task(recipe, model: str, version: str) -> None:
    tracker(recipe).set_alias(model, "champion", version)


@task(
    name="restore-champion-pointer",
    retries=3,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=s3_retryable,
)
def restore_pointer_task(settings, model: str, old: dict | None) -> None:
    from eagle3.ops import storage

    storage.restore_champion(settings, model, old)


def _verify_against_registry(t, model: str, version: str, draft_dir: Path) -> None:
    from eagle3.ops.storage import IntegrityError, sha256_file

    tags = dict(t.version(model, version).tags)
    for k, v in tags.items():
        if k.startswith("sha256."):
            f = draft_dir / k.removeprefix("sha256.")
            if not f.is_file() or sha256_file(f) != v:
                raise IntegrityError(
                    f"{f}: differs from what registry version {model} v{version} recorded; "
                    "refusing to promote it"
                )


def execute_promotion(
    r, model: str, version: str, draft_dir: Path, decision: dict, run_id: str | None
) -> dict:
    """Upload, verify, point, alias (the order that keeps the old champion intact on failure)."""
    from eagle3.config import flatten as flatten_recipe
    from eagle3.ops import storage

    t = tracker(r)
    settings = storage.settings_from_recipe(r.storage)
    _verify_against_registry(t, model, version, draft_dir)
    mv = t.version(model, version)
    tags = dict(mv.tags)
    meta = {
        "mlflow_run_id": mv.run_id,
        "metrics": decision.get("candidate", {}),
        "data_digest": tags.get("data_digest"),
        "target": {
            "id": tags.get("target"),
            "kind": r.target.kind,
            "revision": tags.get("target_revision") or r.target.revision,
        },
        "eval_set": tags.get("eval_set"),
        "recipe": flatten_recipe(r),
    }
    uploaded = upload_task(settings, model, version, str(draft_dir), meta)
    extra = {"mlflow_run_id": mv.run_id, "metrics": decision.get("candidate", {})}
    ptr = pointer_task(settings, model, version, uploaded, extra)
    try:
        alias_task(r, model, version)
    except BaseException:
        restore_pointer_task(settings, model, ptr["old"])
        raise
    t.set_version_tags(model, version, {"s3_uri": uploaded["uri"], "promoted": "true"})
    if run_id:
        t.set_tags(run_id, {"eagle3.promoted_version": version, "eagle3.s3_uri": uploaded["uri"]})
    return {
        "uri": uploaded["uri"],
        "pointer": storage.pointer_key(settings, model),
        "manifest_sha256": uploaded["manifest_sha256"],
        "previous": (ptr["old"] or {}).get("version"),
    }


def execute_rollback(r) -> dict:
    from eagle3.ops import storage
    from eagle3.ops.tracking import registered_model_name

    model = registered_model_name(r)
    settings = storage.settings_from_recipe(r.storage)
    new, cur = storage.rollback_champion(settings, model)
    try:
        alias_task(r, model, new["version"])
    except BaseException:
        restore_pointer_task(settings, model, cur)
        raise
    return {"champion": new["version"], "rolled_back_from": cur["version"], "uri": new["uri"]}


@flow(name="eagle3-promote", log_prints=True)
def promote_flow(
    recipe: Any = "configs/tiny.yaml",
    overrides: list[str] | None = None,
    version: str | None = None,
    decision: dict | None = None,
    draft_dir: str | None = None,
    parent_run_id: str | None = None,
    rollback: bool = False,
) -> dict:
    """Promote `version` (default: the `candidate` alias) if the gate allows, or roll back."""
    from eagle3.ops import storage
    from eagle3.ops.gate import decide, gate_metrics
    from eagle3.ops.tracking import registered_model_name

    r = resolve_recipe(recipe, overrides)
    tag_flow_run(r)
    model = registered_model_name(r)
    if rollback:
        out = execute_rollback(r)
        print(f"rolled back: champion is v{out['champion']} again (was v{out['rolled_back_from']})")
        return {"promoted": False, "rollback": out, "model": model}
    t = tracker(r)
    if version is None:
        mv = t.alias_version(model, "candidate")
        if mv is None:
            raise ValueError(
                f"registered model {model} has no `candidate` version; run the pipeline or pass --version"
            )
        version = str(mv.version)
    with mlflow_run(r, "promote", parent_run_id, params=parent_run_id is None) as (t, run_id):
        with tempfile.TemporaryDirectory(prefix="eagle3-promote-") as tmp:
            if draft_dir is None:
                from flows.evaluate import fetch_draft

                draft = fetch_draft(r, model, version, Path(tmp) / "draft")
            else:
                draft = Path(draft_dir)
            if decision is None:
                from eagle3.models.checkpoint import check_checkpoint
                from flows.evaluate import champion_task

                tags = dict(t.version(model, version).tags)
                cand = gate_metrics(tags, r.promote.speedup_baseline, tags.get("eval_set"))
                champ = champion_task(r, tags.get("eval_set"), version)
                decision = decide(cand, champ, r.promote, check_checkpoint(draft)).to_dict()
            t.set_tags(
                run_id,
                {
                    "eagle3.gate": "PROMOTE" if decision["promote"] else "REJECT",
                    "eagle3.gate_reasons": "; ".join(decision["reasons"])[:4000],
                    "eagle3.version": version,
                },
            )
            if not decision["promote"]:
                print(f"not promoted: {model} v{version}: " + "; ".join(decision["reasons"]))
                return {"promoted": False, "model": model, "version": version, "decision": decision}
            try:
                storage.settings_from_recipe(r.storage)
            except storage.StorageError as e:
                # The gate passed, but there is nowhere to ship it: say so, move nothing.
                print(f"not promoted (the gate passed): {e}")
                t.set_tags(run_id, {"eagle3.promotion_skipped": str(e)[:4000]})
                return {
                    "promoted": False,
                    "model": model,
                    "version": version,
                    "decision": decision,
                    "skipped": str(e),
                }
            out = execute_promotion(r, model, version, draft, decision, parent_run_id or run_id)
    print(f"promoted {model} v{version} -> {out['uri']} (champion.json, alias champion)")
    return {"promoted": True, "model": model, "version": version, "decision": decision, **out}


def promote_from_cli(recipe, args) -> int:
    from prefect import tags

    from flows.common import recipe_tags

    with tags(*recipe_tags(recipe)):
        out = promote_flow(recipe, version=args.version, rollback=args.rollback)
    if args.rollback:
        return 0
    return 0 if out.get("promoted") else 1
