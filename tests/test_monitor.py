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
@pytest.mark.parametrize("hours", [1, 3, 24])
def test_windows_match_a_naive_reference(hours):
    from eagle3.traffic.monitor import windows

    recs = random_records(200, seed=hours)
    got = windows(recs, hours)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    naive: dict = {}
    for r in recs:
        t = datetime.fromisoformat(r.time.replace("Z", "+00:00"))
        idx = int((t - epoch).total_seconds()) // (hours * 3600)
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
        assert w.start == epoch + timedelta(hours=w.index * hours)
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

    assert window_start(window_index(T0 + timedelta(minutes=59), 1), 1) == T0
    assert window_index(T0, 1) + 1 == window_index(T0 + timedelta(hours=1), 1)
    assert closed_until(T0 + timedelta(hours=2, minutes=1), 2) == T0 + timedelta(hours=1)
    low = Stats(requests=1, measured=1, drafts=10, accepted=2)
    assert below_floor(low, 1.5) and not below_floor(low, 1.2) and not below_floor(low, 0.0)
    assert not below_floor(Stats(requests=3), 1.5)  # nothing drafted: no acceptance to judge
