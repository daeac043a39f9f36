"""Acceptance drift (eagle3/traffic/monitor.py, flows/monitor.py): windowing and acceptance against
a naive reference; the monitor flow on the real stack (SeaweedFS, MLflow on sqlite, Prefect's
harness): metrics per window and champion version read back from MLflow, the canary through our
engine, the below-floor and enough-traffic events read back from Prefect's events API, a rerun
that logs no window twice, and the retention flow."""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime, timedelta

import pytest

os.environ.setdefault("EAGLE3_RETRY_DELAY", "0.05")

from test_traffic import record  # noqa: E402

pytestmark = pytest.mark.integration

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def acceptance(drafts: int, accepted: int, per_pos: list[int]) -> dict:
    return {"drafts": drafts, "accepted": accepted, "per_pos": per_pos, "source": "engine"}


def random_records(n: int, seed: int = 0) -> list:
    """Records over ~10 hours, two champion versions, some without acceptance."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        when = T0 + timedelta(minutes=rng.randrange(0, 600))
        if rng.random() < 0.15:
            acc = None
        else:
            drafts = rng.randrange(0, 20)
            gains = [rng.randrange(0, 4) for _ in range(drafts)]  # accepted drafts per cycle
            acc = acceptance(
                drafts,
                sum(gains),
                [sum(1 for g in gains if g > p) for p in range(max(gains, default=0))],
            )
        out.append(
            record(i, "m", "t", when, champion_version=rng.choice(["1", "2"]), acceptance=acc)
        )
    return out


# --- pure pieces ------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("minutes", [15, 60, 180, 1440])
def test_windows_match_a_naive_reference(minutes):
    from eagle3.traffic.monitor import windows

    recs = random_records(200, seed=minutes)
    got = windows(recs, minutes)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    naive: dict = {}
    for r in recs:
        t = datetime.fromisoformat(r.time.replace("Z", "+00:00"))
        idx = int((t - epoch).total_seconds()) // (minutes * 60)
        d = naive.setdefault((r.champion_version, idx), {"n": 0, "drafts": 0, "acc": 0, "pos": {}})
        d["n"] += 1
        if r.acceptance:
            d["drafts"] += r.acceptance.drafts
            d["acc"] += r.acceptance.accepted
            for p, k in enumerate(r.acceptance.per_pos):
                d["pos"][p] = d["pos"].get(p, 0) + k
    assert {(w.champion_version, w.index) for w in got} == set(naive)
    assert sum(w.stats.requests for w in got) == len(recs)
    for w in got:
        d = naive[(w.champion_version, w.index)]
        assert w.start == epoch + timedelta(minutes=w.index * minutes)
        assert w.stats.requests == d["n"]
        if d["drafts"]:
            # tokens per verify cycle: every cycle yields its accepted drafts + 1
            assert w.stats.acceptance_length == pytest.approx(
                (d["acc"] + d["drafts"]) / d["drafts"]
            )
            assert w.stats.accept_rates == pytest.approx(
                [d["pos"].get(p, 0) / d["drafts"] for p in range(len(w.stats.per_pos))]
            )
        else:
            assert w.stats.acceptance_length is None
    order = [(int(w.champion_version), w.index) for w in got]
    assert order == sorted(order)


@pytest.mark.unit
def test_acceptance_length_is_the_engines_tau():
    """Summing engine rows gives the inference summary's tau (weighted by verify steps)."""
    from eagle3.traffic.monitor import summed
    from eagle3.traffic.record import acceptance_of_lengths

    per_request = [[1, 3, 2], [4, 1], [2, 2, 2, 1]]  # tokens per verify cycle
    s = summed(acceptance_of_lengths(g) for g in per_request)
    cycles = sum(len(g) for g in per_request)
    assert s.acceptance_length == pytest.approx(sum(map(sum, per_request)) / cycles)
    m = s.metrics("traffic")
    assert m["traffic/requests"] == 3 and m["traffic/drafts"] == cycles
    assert m["traffic/accept_pos_0"] == pytest.approx(6 / 9)  # cycles that gained >= 2 tokens
    assert m["traffic/accept_pos_2"] == pytest.approx(1 / 9)
    assert set(summed([None]).metrics("x")) == {"x/requests", "x/drafts"}


@pytest.mark.unit
def test_window_bounds_and_floor():
    from eagle3.traffic.monitor import Stats, below_floor, closed_until, window_index, window_start

    assert window_start(window_index(T0 + timedelta(minutes=59), 60), 60) == T0
    assert window_index(T0, 60) + 1 == window_index(T0 + timedelta(hours=1), 60)
    assert window_index(T0, 15) + 4 == window_index(T0 + timedelta(hours=1), 15)
    assert closed_until(T0 + timedelta(hours=2, minutes=1), 120) == T0 + timedelta(hours=1)
    low = Stats(requests=1, measured=1, drafts=10, accepted=2)
    assert below_floor(low, 1.5) and not below_floor(low, 1.2) and not below_floor(low, 0.0)
    assert not below_floor(Stats(requests=3), 1.5)  # nothing drafted: no acceptance to judge


# --- the monitor flow on the real stack ------------------------------------------------------------
@pytest.fixture()
def base_recipe(tiny_recipe, tmp_path, s3_env):
    """The tiny recipe, capturing, with a registered model of its own."""
    import uuid

    from eagle3.config import build_recipe

    tree = tiny_recipe.model_dump(mode="json")
    return build_recipe(
        tree,
        [
            f"run_dir={tmp_path / 'run'}",
            f"tracking.registered_model=eagle3-monitor-{uuid.uuid4().hex[:8]}",
            "traffic.capture=true",
            f"traffic.spool_dir={tmp_path / 'spool'}",
        ],
    )


@pytest.fixture()
def monitor_recipe(base_recipe, mlflow_sqlite, prefect_harness):
    from eagle3.config import build_recipe

    tree = base_recipe.model_dump(mode="json")
    return build_recipe(
        tree,
        [
            "traffic.window_minutes=60",
            "traffic.acceptance_floor=1.5",
            "traffic.min_records_to_adapt=8",
            'traffic.canary_prompts=["Hello there", "Count to five"]',
            "infer.max_new_tokens=6",
        ],
    )


def seed(recipe, s3_env, tmp_path, rows: list[tuple]) -> None:
    """rows: (when, champion_version, acceptance or None), uploaded as one batch per row."""
    from eagle3.ops.tracking import registered_model_name
    from eagle3.traffic.store import flush, spool

    model = registered_model_name(recipe)
    for i, (when, v, acc) in enumerate(rows):
        spool([record(i, model, "t", when, champion_version=v, acceptance=acc)], tmp_path / "sp")
    flush(s3_env, model, tmp_path / "sp")


def read_events(model: str, names: list[str], want: int, timeout: float = 30.0) -> list:
    """The events about `model` the test Prefect server has stored (its events API), waiting
    for `want` of them: the events worker sends asynchronously and the server persists in
    batches."""
    import time

    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()
    flt = EventFilter(
        event=EventNameFilter(name=names),
        resource=EventResourceFilter(id=[f"eagle3.model.{model}"]),
    )
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as c:
            got = c.read_events(filter=flt, limit=50).events
        if len(got) >= want or time.monotonic() > deadline:
            return sorted(got, key=lambda e: e.occurred)
        time.sleep(1.0)


def history(recipe, run_id: str, key: str) -> list[tuple[int, float, int]]:
    from flows.common import tracker

    h = tracker(recipe).client.get_metric_history(run_id, key)
    return sorted((m.step, m.value, m.timestamp) for m in h)


def test_monitor_logs_windows_per_champion_emits_events_and_resumes(
    monitor_recipe, s3_env, tmp_path
):
    from test_flows import make_report, register_candidate
    from test_ops_storage import make_draft

    from eagle3.ops.tracking import registered_model_name
    from eagle3.traffic.monitor import closed_until, window_index
    from flows.monitor import BELOW_FLOOR, ENOUGH, monitor_flow
    from flows.promote import promote_flow

    r = monitor_recipe
    model = registered_model_name(r)
    v1 = register_candidate(r, make_draft(r.run_path / "d0", seed=0), make_report(1.8, 1.3))
    assert promote_flow(r, version=v1)["promoted"]

    # windows after the promotion (the monitor's clock is its `now` parameter)
    w0 = closed_until(datetime.now(UTC), 60) + timedelta(hours=1)
    rows = [
        (w0 - timedelta(days=2), "0", acceptance(4, 2, [2])),  # before the promotion
        (w0 + timedelta(minutes=5), v1, acceptance(10, 10, [6, 4])),  # window 0
        (w0 + timedelta(minutes=50), v1, acceptance(10, 12, [7, 5])),  # window 0: 42/20 = 2.1
        (w0 + timedelta(minutes=59), v1, None),  # counted as a request only
        (w0 + timedelta(hours=1, minutes=1), v1, acceptance(10, 2, [2])),  # window 1
        (w0 + timedelta(hours=1, minutes=2), v1, acceptance(5, 1, [1])),  # window 1: 18/15 = 1.2
        (w0 + timedelta(hours=3, minutes=7), "0", acceptance(4, 4, [3, 1])),  # an older head
        (w0 + timedelta(hours=3, minutes=9), v1, acceptance(4, 6, [4, 2])),  # window 3: 2.5
        (w0 + timedelta(hours=4, minutes=1), v1, acceptance(4, 0, [])),  # open window: not yet
    ]
    seed(r, s3_env, tmp_path, rows)
    now = w0 + timedelta(hours=4, minutes=30)
    out = monitor_flow(config=r, now=now.isoformat())

    i0 = window_index(w0, 60)
    run = out["runs"][v1]
    got = history(r, run, "traffic/acceptance_length")
    start_ms = int(w0.timestamp() * 1000)
    assert [(s, round(v, 6), ts) for s, v, ts in got] == [
        (i0, 2.1, start_ms),
        (i0 + 1, 1.2, start_ms + 3600_000),
        (i0 + 3, 2.5, start_ms + 3 * 3600_000),
    ]
    assert [v for _, v, _ in history(r, run, "traffic/requests")] == [3, 2, 1]
    assert [round(v, 6) for _, v, _ in history(r, run, "traffic/accept_pos_0")] == [
        0.65,
        0.2,
        1.0,
    ]
    old = out["runs"]["0"]
    assert [(s, v) for s, v, _ in history(r, old, "traffic/acceptance_length")] == [
        (i0 - 48, 1.5),
        (i0 + 3, 2.0),
    ]
    from flows.common import tracker

    tags = tracker(r).run(run).data.tags
    assert tags["eagle3.champion_version"] == v1 and tags["eagle3.model"] == model

    # the canary ran now through our engine, logged at the last closed window
    canary = history(r, run, "canary/requests")
    assert [(s, v) for s, v, _ in canary] == [(i0 + 3, 2)]
    assert out["canary"]["canary/drafts"] > 0 and "canary/acceptance_length" in out["canary"]

    # events: window 1 is under the floor; 8 records since the promotion are enough
    assert ENOUGH in out["events"] and BELOW_FLOOR in out["events"]
    evs = read_events(model, [BELOW_FLOOR, ENOUGH], want=len(out["events"]))
    assert sorted(e.event for e in evs) == sorted(out["events"])
    traffic_low = [e for e in evs if e.event == BELOW_FLOOR and e.payload["source"] == "traffic"]
    assert [e.payload["step"] for e in traffic_low] == [i0 + 1]
    assert traffic_low[0].payload["acceptance_length"] == pytest.approx(1.2)
    assert traffic_low[0].resource["eagle3.champion_version"] == v1
    enough = [e for e in evs if e.event == ENOUGH]
    assert len(enough) == 1 and enough[0].payload["records"] == 8  # since the promotion
    n_events = len(evs)

    # a rerun logs nothing twice and announces nothing again
    again = monitor_flow(config=r, now=now.isoformat())
    assert again["windows"] == [] and "canary" not in again and again["events"] == []
    redo = monitor_flow(config=r, now=now.isoformat(), since=w0.isoformat(), canary=False)
    assert redo["windows"] == [] and redo["already_logged"] == 4  # since w0: not the older one
    assert len(history(r, run, "traffic/acceptance_length")) == 3
    assert len(history(r, run, "canary/requests")) == 1

    # an hour later the open window has closed: it alone is logged
    later = monitor_flow(config=r, now=(now + timedelta(hours=1)).isoformat(), canary=False)
    assert [(w["version"], w["step"]) for w in later["windows"]] == [(v1, i0 + 4)]
    assert later["windows"][0]["traffic/acceptance_length"] == pytest.approx(1.0)
    assert len(read_events(model, [BELOW_FLOOR, ENOUGH], want=n_events + 1)) == n_events + 1


def test_retention_flow_deletes_only_expired_batches(
    base_recipe, s3_env, tmp_path, prefect_harness
):
    from test_traffic import stored_records

    from eagle3.ops.tracking import registered_model_name
    from flows.monitor import retention_flow

    r = base_recipe  # traffic.retention_days: 90 (the default)
    model = registered_model_name(r)
    seed(r, s3_env, tmp_path, [(T0 - timedelta(days=d), "1", None) for d in (0, 89, 91, 200)])
    out = retention_flow(config=r, now=T0.isoformat())
    assert len(out["deleted"]) == 2 and out["retention_days"] == 90
    assert sorted(x["id"] for x in stored_records(s3_env, model)) == ["r0000", "r0001"]
    assert retention_flow(config=r, now=T0.isoformat())["deleted"] == []
