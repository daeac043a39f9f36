"""Promotion flow: eagle3.ops.promotion's stages as Prefect tasks with retries, plus an artifact.

reconcile -> gate -> upload (immutable, resumable) -> compare-and-swap champion.json, gated again
against the champion it replaces -> the MLflow alias follows. `rollback` points both back to the
previous champion; `reconcile` alone repairs a split and says what it changed.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import flow_run_id, prefect_step, resolve_recipe, tag_flow_run


@flow(name="eagle3-promote", log_prints=True)
def promote_flow(
    recipe: Any = "configs/tiny.yaml",
    overrides: list[str] | None = None,
    version: str | None = None,
    decision: dict | None = None,
    draft_dir: str | None = None,
    parent_run_id: str | None = None,
    rollback: bool = False,
    reconcile: bool = False,
) -> dict:
    """Promote `version` (default: the `candidate` alias) if the gate allows, or roll back, or
    reconcile."""
    from eagle3.ops import promotion
    from eagle3.ops.promotion import describe_promotion, describe_reconcile

    r = resolve_recipe(recipe, overrides)
    tag_flow_run(r)
    if rollback:
        out = promotion.rollback_recipe(r, step=prefect_step)
        for c in out["repaired"]:
            print(f"repaired: {c}")
        print(f"rolled back: champion is v{out['champion']} again (was v{out['rolled_back_from']})")
        notes = [f"rolled back to v{out['champion']}", *out["reconciled"], *out["repaired"]]
        _artifact(out["model"], notes)
        return {"promoted": False, "rollback": out, "model": out["model"]}
    if reconcile:
        out = promotion.reconcile_recipe(r, step=prefect_step)
        print(describe_reconcile(out))
        _artifact(out["model"], out["changes"] or ["pointer and alias agree"])
        return out
    out = promotion.promote_recipe(
        r,
        version=version,
        decision=decision,
        draft_dir=draft_dir,
        parent_run_id=parent_run_id,
        step=prefect_step,
        run_tags={"prefect.flow_run_id": flow_run_id()},
    )
    print(describe_promotion(out))
    _artifact(out["model"], [describe_promotion(out), *out.get("reconciled", [])])
    return out


def _artifact(model: str, lines: list[str]) -> None:
    from prefect.artifacts import create_markdown_artifact

    from eagle3.names import slugify

    md = f"# Champion of {model}\n\n" + "\n".join(f"- {x}" for x in lines) + "\n"
    create_markdown_artifact(markdown=md, key=slugify(f"promote-{model}"), description="promotion")
