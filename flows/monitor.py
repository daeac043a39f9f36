"""Acceptance drift in MLflow, Prefect events for what should happen next, and traffic retention.

`eagle3-monitor` (hourly in prefect.yaml): the champion's acceptance on served traffic, per closed
window of `traffic.window_minutes` since the last logged one, and on the fixed canary prompt set run
now through the serving engine; logged as MLflow metrics (step = window index, timestamp = window
start) in one run per champion version (eagle3.ops.monitoring). It emits Prefect events, resource
`eagle3.model.<registered model>`:

- `eagle3.acceptance.below-floor` for a window (traffic or canary) whose acceptance length is
  under `traffic.acceptance_floor`;
- `eagle3.traffic.enough` when `traffic.min_records_to_adapt` records (and again for each further
  multiple) have been served since the champion was promoted: the deployment trigger in
  prefect.yaml starts the adaptation deployment on it.

`eagle3-traffic-retention` (daily): deletes the traffic batches older than `traffic.retention_days`.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import (
    RETRY_DELAYS,
    ensure_gpu_limit,
    resolve_recipe,
    s3_retryable,
    tag_flow_run,
    tracker,
    transient,
)

DEFAULT_CONFIG = "configs/tiny.yaml"
BELOW_FLOOR = "eagle3.acceptance.below-floor"
ENOUGH = "eagle3.traffic.enough"


def resource_id(model: str) -> str:
    return f"eagle3.model.{model}"


def emit(event: str, model: str, version: str | None, payload: dict) -> str:
    """One Prefect event about the registered model; returns the event name (also when the
    events client is off, e.g. no API configured: the flow's summary still says it)."""
    from prefect.events import emit_event

    resource = {"prefect.resource.id": resource_id(model), "prefect.resource.name": model}
    if version is not None:
        resource["eagle3.champion_version"] = str(version)
    emit_event(event=event, resource=resource, payload=payload)
    print(f"event {event}: {payload}")
    return event


def s3_settings(recipe):
    from eagle3.ops.inference import settings_or_none

    s = settings_or_none(recipe)
    if s is None:
        raise ValueError("traffic lives in S3: no bucket is configured (storage.bucket)")
    return s


@task(
    name="champion-baseline",
    retries=2,
    retry_delay_seconds=RETRY_DELAYS[:2],
    retry_condition_fn=transient,
    cache_policy=NO_CACHE,
)
def baseline_task(recipe) -> tuple[dict | None, datetime | None]:
    from eagle3.ops.monitoring import champion_baseline

    return champion_baseline(recipe, tracker(recipe))


@task(
    name="read-traffic",
    retries=2,
    retry_delay_seconds=RETRY_DELAYS[:2],
    retry_condition_fn=s3_retryable,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def read_traffic_task(recipe, model: str, since: datetime | None, until: datetime) -> tuple:
    from eagle3.traffic.monitor import read_records

    return read_records(s3_settings(recipe), model, since, until)


@task(
    name="log-windows",
    retries=3,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=transient,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def log_windows_task(recipe, model: str, wins: list) -> dict:
    """Each window's traffic metrics in its champion version's run, unless already there."""
    from eagle3.ops.monitoring import finish, log_window, logged_steps, monitor_run

    t = tracker(recipe)
    runs: dict[str, str] = {}
    done: dict[str, set[int]] = {}
    logged, already = [], 0
    for w in wins:
        v = w.champion_version
        if v not in runs:
            runs[v] = monitor_run(t, recipe, model, v)
            done[v] = logged_steps(t, runs[v], "traffic/requests")
        if w.index in done[v]:
            already += 1
            continue
        log_window(t, runs[v], w.stats.metrics("traffic"), w.index, w.timestamp_ms)
        done[v].add(w.index)
        logged.append(w)
    finish(t, set(runs.values()))
    return {"logged": logged, "already": already, "runs": runs}


def run_canary(recipe, champ: dict) -> list[dict]:
    """The canary prompts through the serving engine (our engine or vLLM, as inference serves
    them), greedy, against the champion downloaded and verified as inference does; never
    captured. A plain function calling the inference flow's tasks, not a task itself: a task
    tagged `gpu` around generate_task (also `gpu`) would wait for the slot it holds."""
    from flows.infer import fetch_task, generate_task

    tmp = tempfile.mkdtemp(prefix="eagle3-canary-")
    try:
        path = fetch_task(recipe, champ, str(Path(tmp) / "draft"))
        return generate_task(recipe, path, list(recipe.traffic.canary_prompts), 0.0, None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@task(
    name="log-canary",
    retries=3,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=transient,
    cache_policy=NO_CACHE,
)
def log_canary_task(recipe, model: str, version: str, index: int, metrics: dict, ts_ms: int):
    from eagle3.ops.monitoring import finish, log_window, monitor_run

    t = tracker(recipe)
    run = monitor_run(t, recipe, model, version)
    log_window(t, run, metrics, index, ts_ms)
    finish(t, {run})
    return run


def canary_due(recipe, model: str, version: str, index: int) -> bool:
    from eagle3.ops.monitoring import logged_steps, monitor_run

    t = tracker(recipe)
    return index not in logged_steps(t, monitor_run(t, recipe, model, version), "canary/requests")


@flow(name="eagle3-monitor", log_prints=True)
def monitor_flow(
    config: Any = DEFAULT_CONFIG,
    overrides: list[str] | None = None,
    now: str | None = None,
    since: str | None = None,
    canary: bool = True,
) -> dict:
    """`now` (ISO 8601, default the clock): windows that closed by then are logged. `since`:
    recompute from there instead of from the last logged window (nothing is logged twice).
    `canary`: False skips the canary prompt set."""
    from eagle3.ops import monitoring as mon
    from eagle3.ops.tracking import registered_model_name
    from eagle3.traffic.monitor import (
        Window,
        below_floor,
        closed_until,
        count_since,
        summed,
        window_index,
        window_start,
        windows,
    )
    from eagle3.traffic.record import parse_time

    r = resolve_recipe(config, overrides)
    tag_flow_run(r)
    ensure_gpu_limit()  # the canary's generate holds a `gpu` slot like every decoding task
    tc = r.traffic
    model = registered_model_name(r)
    t = tracker(r)
    minutes = tc.window_minutes
    now_t = parse_time(now) if now else datetime.now(UTC)
    until = closed_until(now_t, minutes)
    mtags = mon.model_tags(t, model)
    cursor = mtags.get(mon.CURSOR_TAG) if mtags else None
    start = parse_time(since) if since else (parse_time(cursor) if cursor else None)
    champ_ptr, baseline = baseline_task(r)
    read_from = start  # the enough-traffic count may need older records than the windows do
    if tc.min_records_to_adapt and start is not None:
        read_from = None if baseline is None else min(start, baseline)
    records, bad = read_traffic_task(r, model, read_from, now_t)
    in_range = [x for x in records if (start is None or x.when >= start) and x.when < until]
    wins = windows(in_range, minutes)
    got = log_windows_task(r, model, wins)
    events = []
    for w in got["logged"]:
        if below_floor(w.stats, tc.acceptance_floor):
            events.append(
                emit(BELOW_FLOOR, model, w.champion_version, floor_payload(w, tc, "traffic"))
            )
    summary: dict[str, Any] = {
        "model": model,
        "until": mon.iso(until),
        "records": len(in_range),
        "bad_lines": bad,
        "windows": [
            {
                "version": w.champion_version,
                "step": w.index,
                "start": mon.iso(w.start),
                **w.stats.metrics("traffic"),
            }
            for w in got["logged"]
        ],
        "already_logged": got["already"],
        "runs": got["runs"],
    }

    # the canary: the champion now, at the step of the last closed window
    last = window_index(until, minutes) - 1
    if canary and tc.canary_prompts and champ_ptr is not None:
        version = str(champ_ptr["version"])
        if canary_due(r, model, version, last):
            from flows.infer import resolve_champion_task

            champ = resolve_champion_task(r)
            rows = run_canary(r, champ)
            stats = summed(row.get("acceptance") for row in rows)
            ts = int(window_start(last, minutes).timestamp() * 1000)
            m = stats.metrics("canary")
            log_canary_task(r, model, str(champ["version"]), last, m, ts)
            summary["canary"] = {"version": str(champ["version"]), "step": last, **m}
            if below_floor(stats, tc.acceptance_floor):
                w = Window(last, window_start(last, minutes), str(champ["version"]), stats)
                events.append(
                    emit(BELOW_FLOOR, model, champ["version"], floor_payload(w, tc, "canary"))
                )

    # enough new traffic since the champion was promoted
    if mtags is not None and tc.min_records_to_adapt:
        count = count_since(records, baseline)
        k = mon.enough_due(mtags.get(mon.ENOUGH_TAG), baseline, count, tc.min_records_to_adapt)
        if k:
            payload = {
                "records": count,
                "since": mon.iso(baseline) if baseline else None,
                "until": mon.iso(now_t),
                "min_records_to_adapt": tc.min_records_to_adapt,
                "champion_version": str(champ_ptr["version"]) if champ_ptr else None,
            }
            events.append(emit(ENOUGH, model, payload["champion_version"], payload))
            t.set_model_tag(model, mon.ENOUGH_TAG, mon.enough_tag(baseline, k))
        summary["records_since_champion"] = count

    if mtags is not None and (cursor is None or parse_time(cursor) < until):
        t.set_model_tag(model, mon.CURSOR_TAG, mon.iso(until))
    summary["events"] = events
    print(
        f"{model}: {len(got['logged'])} window(s) logged, {got['already']} already there, "
        f"{len(in_range)} records up to {mon.iso(until)}; events: {events or 'none'}"
    )
    return summary


def floor_payload(w, tc, source: str) -> dict:
    from eagle3.ops.monitoring import iso

    return {
        "source": source,
        "step": w.index,
        "window_start": iso(w.start),
        "window_minutes": tc.window_minutes,
        "acceptance_length": w.stats.acceptance_length,
        "floor": tc.acceptance_floor,
        "requests": w.stats.requests,
    }


@task(
    name="enforce-retention",
    retries=2,
    retry_delay_seconds=RETRY_DELAYS[:2],
    retry_condition_fn=s3_retryable,
    cache_policy=NO_CACHE,
)
def retention_task(recipe, model: str, now: datetime | None) -> list[str]:
    from eagle3.traffic.store import enforce_retention

    return enforce_retention(s3_settings(recipe), model, recipe.traffic.retention_days, now)


@flow(name="eagle3-traffic-retention", log_prints=True)
def retention_flow(
    config: Any = DEFAULT_CONFIG, overrides: list[str] | None = None, now: str | None = None
) -> dict:
    """Delete the traffic batches in date partitions wholly older than traffic.retention_days."""
    from eagle3.ops.tracking import registered_model_name
    from eagle3.traffic.record import parse_time

    r = resolve_recipe(config, overrides)
    tag_flow_run(r)
    model = registered_model_name(r)
    gone = retention_task(r, model, parse_time(now) if now else None)
    print(
        f"{model}: {len(gone)} traffic batch(es) older than {r.traffic.retention_days} days deleted"
    )
    return {"model": model, "deleted": gone, "retention_days": r.traffic.retention_days}
