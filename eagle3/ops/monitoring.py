"""The acceptance-drift monitor's MLflow side (flows/monitor.py orchestrates, eagle3.traffic.monitor
computes).

One MLflow run per (registered model, champion version), tagged `eagle3.stage=monitor`,
`eagle3.model`, `eagle3.champion_version`: found again on every pass, so the UI charts one line
per champion version over time. A window is logged at step = its index and timestamp = its start,
and never twice: a step already in the run's history is skipped (a rerun, or a pass that died
half-way, adds nothing twice). The registered model's tag `eagle3.monitor.until` says up to where
closed windows were logged, so the next pass reads only newer traffic.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

STAGE = "monitor"
CURSOR_TAG = "eagle3.monitor.until"
ENOUGH_TAG = "eagle3.monitor.enough"  # "<baseline> <k>": enough-traffic events sent since baseline


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def monitor_run(tracker, recipe, model: str, version: str) -> str:
    """The monitor's run for this champion version (the oldest, should two exist), else a new
    one."""
    from eagle3.models.target import TargetSource
    from eagle3.ops.tracking import git_commit

    found = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=(
            f"tags.`eagle3.stage` = '{STAGE}' and tags.`eagle3.model` = '{model}' "
            f"and tags.`eagle3.champion_version` = '{version}'"
        ),
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run_id = tracker.start_run(
        f"monitor-{model}-v{version}",
        tags={
            "eagle3.stage": STAGE,
            "eagle3.model": model,
            "eagle3.champion_version": version,
            "eagle3.target": TargetSource.of(recipe.target).slug,
            "eagle3.recipe": recipe.name,
            "git.commit": git_commit(),
        },
    )
    tracker.client.log_param(run_id, "traffic.window_minutes", recipe.traffic.window_minutes)
    return run_id


def logged_steps(tracker, run_id: str, key: str) -> set[int]:
    return {m.step for m in tracker.client.get_metric_history(run_id, key)}


def log_window(tracker, run_id: str, metrics: dict[str, float], step: int, ts_ms: int) -> None:
    """The window's metrics at step = its index, timestamp = its start (ms since the epoch)."""
    from mlflow.entities import Metric

    items = [Metric(k, float(v), ts_ms, int(step)) for k, v in sorted(metrics.items())]
    for i in range(0, len(items), 500):
        tracker.client.log_batch(run_id, metrics=items[i : i + 500])


def finish(tracker, run_ids: set[str]) -> None:
    for r in run_ids:
        tracker.end_run(r, "FINISHED")


def model_tags(tracker, model: str) -> dict[str, str] | None:
    """The registered model's tags; None when it is not registered (nothing to tag)."""
    from mlflow.exceptions import MlflowException

    try:
        return tracker.model_tags(model)
    except MlflowException:
        return None


def champion_baseline(recipe, tracker) -> tuple[dict[str, Any] | None, datetime | None]:
    """(the champion {version, uri, ...} or None, when it became champion). Traffic newer than
    that is what the champion has not learned from yet."""
    from eagle3.ops import champion as ch
    from eagle3.traffic.record import parse_time

    place = ch.place_for(recipe, tracker)
    if place.s3 is None:
        mv = tracker.alias_version(place.model, ch.ALIAS)
        return ({"version": str(mv.version)} if mv else None), None
    ptr, _ = ch.read_pointer(place)
    if ptr is None:
        return None, None
    when = ptr.get("rolled_back_at") or ptr.get("promoted_at")
    return ptr, parse_time(when) if when else None


def enough_due(tag: str | None, baseline: datetime | None, count: int, every: int) -> int:
    """How many multiples of `every` records since `baseline` have arrived and not been
    announced yet (0: nothing to emit). A refused adaptation gets another chance after another
    `every` records; a new champion starts the count afresh."""
    if every <= 0 or count < every:
        return 0
    k = count // every
    base = iso(baseline) if baseline else "-"
    sent = 0
    if tag:
        tag_base, _, n = tag.rpartition(" ")
        if tag_base == base and n.isdigit():
            sent = int(n)
    return k if k > sent else 0


def enough_tag(baseline: datetime | None, k: int) -> str:
    return f"{iso(baseline) if baseline else '-'} {k}"
