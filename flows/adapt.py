"""Adaptation flow: the champion fine-tuned on a window of served traffic, promoted only when it
is better on the newest traffic it never saw (eagle3/traffic/adapt.py holds the logic).

resolve + fetch the champion (verified) -> the adapted recipe (traffic window + replay share,
init from the champion, short schedule) -> data -> train -> bench the candidate AND the champion
in this run on the held-out newest traffic and on the general set -> adaptation_decision ->
register the candidate -> promote (the gate again, compare-and-swap) only when the decision says
so. The MLflow run records the parent (champion) version, the traffic window and the data digest.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, tags, task

from flows.common import (
    RETRY_DELAYS,
    ensure_gpu_limit,
    flow_run_url,
    mlflow_run,
    recipe_tags,
    resolve_recipe,
    s3_retryable,
    tag_flow_run,
)
from flows.datagen import datagen_flow
from flows.evaluate import bench_task, check_task, log_eval_task, register_task
from flows.infer import fetch_task, resolve_champion_task
from flows.promote import promote_flow
from flows.train import train_flow

WHO = ("candidate", "champion")
WHERE = ("traffic", "general")


@task(
    name="count-traffic",
    retries=2,
    retry_delay_seconds=RETRY_DELAYS[:2],
    retry_condition_fn=s3_retryable,
)
def count_task(recipe, since: str | None, until: str | None) -> dict:
    """The window's records, held out and trained on; a window too small is refused, not retried."""
    from eagle3.traffic.adapt import window_counts

    return window_counts(recipe, since, until)


@task(
    name="held-out-traffic-prompts",
    retries=2,
    retry_delay_seconds=RETRY_DELAYS[:2],
    retry_condition_fn=s3_retryable,
)
def held_out_task(recipe) -> str:
    from eagle3.data.manifest import read_manifest
    from eagle3.traffic.adapt import write_held_out

    path = recipe.run_path / "held_out_traffic.jsonl"
    n = write_held_out(recipe, read_manifest(recipe.run_path / "data").split.val_ids, path)
    print(f"held-out traffic: {n} prompts -> {path}")
    return str(path)


def adapt_tags(version: str, since: str | None, until: str | None, digest: str, share) -> dict:
    """What the adaptation's MLflow run (eagle3.*) and the registry version record."""
    return {
        "parent_version": version,
        "traffic_since": since or "",
        "traffic_until": until or "",
        "data_digest": digest,
        "replay_share": share,
    }


@flow(name="eagle3-adapt", log_prints=True)
def adapt_flow(
    config: Any = "configs/tiny.yaml",
    since: str | None = None,
    until: str | None = None,
    overrides: list[str] | None = None,
    profile: str | None = None,
    promote: bool = True,
) -> dict:
    """Adapt the champion to the traffic recorded in [since, until) (until None: now, fixed at the
    start so that the run's window is what it says)."""
    import yaml

    from eagle3.data.stages import training_digest
    from eagle3.ops.evaluation import report_numbers, version_tags
    from eagle3.ops.gate import decide
    from eagle3.ops.tracking import registered_model_name
    from eagle3.traffic.adapt import adapt_recipe, adaptation_decision, bench_recipes
    from eagle3.traffic.record import now_iso

    base = resolve_recipe(config, overrides, profile)
    tag_flow_run(base)
    ensure_gpu_limit()
    since = since or None  # an automation renders an absent `since` as ""
    until = until or now_iso()
    model = registered_model_name(base)
    with tags(*recipe_tags(base), "adapt"):
        champ = resolve_champion_task(base)
        v = champ["version"]
        dest = f"{base.run_path}-adapt/champion-v{v}"
        champ_dir = fetch_task(base, champ, dest)
        counts = count_task(base, since, until)
        print(f"adapt: champion v{v}; traffic [{since or 'start'}, {until}): {counts}")
        r = adapt_recipe(base, champ_dir, since, until, counts["train"], v)
        with mlflow_run(r, f"adapt-{r.name}") as (t, parent):
            t.log_text(
                parent, yaml.safe_dump(r.model_dump(mode="json"), sort_keys=False), "recipe.yaml"
            )
            datagen_flow(r, parent_run_id=parent)
            digest = training_digest(r)
            recorded = adapt_tags(v, since, until, digest, r.adapt.replay_share)
            t.set_tags(parent, {f"eagle3.{k}": val for k, val in recorded.items()})
            trained = train_flow(r, parent_run_id=parent, data_digest=digest)
            cand_dir = trained.get("draft_dir") or str(r.run_path / "draft")

            on_traffic, general = bench_recipes(r, held_out_task(r))
            dirs = {"candidate": cand_dir, "champion": champ_dir}
            recipes = {"traffic": on_traffic, "general": general}
            reports, nums = {}, {w: {} for w in WHO}
            for where in WHERE:  # both heads back to back on each set: same machine state
                for who in WHO:
                    rep = bench_task.with_options(name=f"benchmark-{who}-{where}")(
                        recipes[where], dirs[who]
                    )
                    reports[who, where] = rep
                    nums[who][where] = report_numbers(
                        recipes[where], rep, v if who == "champion" else None, "this adaptation"
                    )
            ok, reasons = adaptation_decision(nums["candidate"], nums["champion"], r.adapt)
            verdict = "PROMOTE" if ok else "REJECT"
            print(f"adapt: {verdict}: " + "; ".join(reasons))
            t.log_metrics(
                parent,
                {
                    f"adapt/{where}/{who}/{k}": float(nums[who][where][k])
                    for who in WHO
                    for where in WHERE
                    for k in ("tau", "speedup")
                    if nums[who][where].get(k) is not None
                },
            )

            with mlflow_run(r, "evaluate", parent, params=False) as (_t, ev_run):
                problems = check_task(cand_dir)
                metrics = log_eval_task(
                    general, reports["candidate", "general"], ev_run, parent, cand_dir
                )
                for who in WHO:
                    t.log_json(parent, reports[who, "traffic"], f"eval/held_out_traffic_{who}.json")
                t.log_json(parent, reports["champion", "general"], "eval/general_champion.json")
                vtags = version_tags(
                    cand_dir,
                    reports["candidate", "general"],
                    nums["candidate"]["general"]["eval_set"],
                    digest,
                    problems,
                )
                vtags |= recorded | {"adapt": verdict, "adapt_reasons": "; ".join(reasons)[:4000]}
                version = register_task(general, parent, metrics, vtags)
            # The usual gate on the general set, against the champion benchmarked here; promotion
            # gates again under its compare-and-swap, against whatever champion it replaces.
            gate = decide(
                nums["candidate"]["general"], nums["champion"]["general"], r.promote, problems
            )
            promoted = {"promoted": False, "decision": gate.to_dict()}
            if ok and promote:
                promoted = promote_flow(
                    r,
                    version=version,
                    decision=gate.to_dict(),
                    draft_dir=cand_dir,
                    parent_run_id=parent,
                )
            t.set_tags(
                parent,
                {
                    "eagle3.adapt": verdict,
                    "eagle3.adapt_reasons": "; ".join(reasons)[:4000],
                    "eagle3.version": version,
                    "eagle3.promoted": str(bool(promoted.get("promoted"))).lower(),
                },
            )
    return {
        "model": model,
        "version": version,
        "parent_version": v,
        "since": since,
        "until": until,
        "traffic": counts,
        "adapt": {"promote": ok, "reasons": reasons},
        "numbers": nums,
        "gate": promoted.get("decision", gate.to_dict()),
        "promoted": bool(promoted.get("promoted")),
        "s3_uri": promoted.get("uri"),
        "data_digest": digest,
        "draft_dir": cand_dir,
        "mlflow_run_id": parent,
        "prefect_flow_run_url": flow_run_url(),
    }
