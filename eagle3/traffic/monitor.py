"""Acceptance drift: served traffic cut into fixed time windows, per champion version.

A window is `traffic.window_minutes` long and aligned to the Unix epoch; its index (minutes since
the epoch // window_minutes) is the MLflow step the monitor logs it at, its start the metric's
timestamp. Per window and champion version:

- acceptance length = (accepted + drafts) / drafts = 1 + accepted / drafts: tokens per verify
  cycle, summed over the window's records (each record weighted by its verify steps, as the
  inference summary weights `tau`);
- acceptance at draft position i = steps whose position i was accepted / drafts;
- requests: every record of the window (a record without acceptance counts here only).

The canary (a fixed prompt set run through the serving engine) is summed the same way, so a drop
on both says the server or head broke, a drop on traffic alone that the traffic shifted.
Pure functions here; the S3 reader reuses the traffic source's; flows/monitor.py logs and emits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from eagle3.traffic.record import Acceptance, TrafficRecord

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def window_index(t: datetime, minutes: int) -> int:
    """The window holding time `t` (windows are `minutes` long, counted from the Unix epoch)."""
    return math.floor((t - EPOCH).total_seconds() / (minutes * 60))


def window_start(index: int, minutes: int) -> datetime:
    return EPOCH + timedelta(minutes=index * minutes)


def closed_until(now: datetime, minutes: int) -> datetime:
    """The end of the last window that has closed by `now` (= the start of the open one)."""
    return window_start(window_index(now, minutes), minutes)


@dataclass
class Stats:
    """Acceptance summed over some requests: `requests` of them, `measured` with acceptance."""

    requests: int = 0
    measured: int = 0
    drafts: int = 0
    accepted: int = 0
    per_pos: list[int] = field(default_factory=list)

    def add(self, a: Acceptance | dict | None) -> None:
        self.requests += 1
        if a is None:
            return
        if isinstance(a, dict):
            a = Acceptance.model_validate(a)
        self.measured += 1
        self.drafts += a.drafts
        self.accepted += a.accepted
        if len(a.per_pos) > len(self.per_pos):
            self.per_pos += [0] * (len(a.per_pos) - len(self.per_pos))
        for i, n in enumerate(a.per_pos):
            self.per_pos[i] += n

    @property
    def acceptance_length(self) -> float | None:
        """Tokens per verify cycle; None when no verify step carried drafts."""
        return (self.accepted + self.drafts) / self.drafts if self.drafts else None

    @property
    def accept_rates(self) -> list[float]:
        """Share of draft-carrying verify steps whose position i was accepted."""
        return [n / self.drafts for n in self.per_pos] if self.drafts else []

    def metrics(self, prefix: str) -> dict[str, float]:
        """`<prefix>/requests`, `<prefix>/drafts`, and when drafts were made
        `<prefix>/acceptance_length` and `<prefix>/accept_pos_<i>` (i from 0)."""
        out = {f"{prefix}/requests": float(self.requests), f"{prefix}/drafts": float(self.drafts)}
        if self.acceptance_length is not None:
            out[f"{prefix}/acceptance_length"] = self.acceptance_length
            for i, r in enumerate(self.accept_rates):
                out[f"{prefix}/accept_pos_{i}"] = r
        return out


def summed(acceptances: Iterable[Acceptance | dict | None]) -> Stats:
    s = Stats()
    for a in acceptances:
        s.add(a)
    return s


@dataclass
class Window:
    index: int
    start: datetime
    champion_version: str
    stats: Stats

    @property
    def timestamp_ms(self) -> int:
        return int(self.start.timestamp() * 1000)


def windows(records: Iterable[TrafficRecord], minutes: int) -> list[Window]:
    """The windows that hold at least one record, one per (champion version, window), ordered
    by version then time."""
    groups: dict[tuple[str, int], Stats] = {}
    for r in records:
        key = (str(r.champion_version), window_index(r.when, minutes))
        groups.setdefault(key, Stats()).add(r.acceptance)
    return [
        Window(i, window_start(i, minutes), v, st)
        for (v, i), st in sorted(groups.items(), key=lambda kv: (version_key(kv[0][0]), kv[0][1]))
    ]


def version_key(v: str) -> tuple:
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


def below_floor(stats: Stats, floor: float) -> bool:
    """The floor is on (> 0), drafts were made, and the acceptance length is under it."""
    length = stats.acceptance_length
    return floor > 0 and length is not None and length < floor


def read_records(
    s, model: str, since: datetime | None, until: datetime | None
) -> tuple[list[TrafficRecord], int]:
    """(the model's records in [since, until), oldest first, each id once; lines skipped as
    bad), read with the traffic source's readers."""
    from eagle3.ops import storage
    from eagle3.traffic.source import in_window, parse_records
    from eagle3.traffic.store import list_objects

    seen: set[str] = set()
    out, bad = [], 0
    for o in list_objects(s, model, since, until):
        got, skipped = parse_records(o["key"], storage.get_bytes(s, o["key"]), model)
        bad += len(skipped)
        for r in got:
            if in_window(r, since, until) and r.id not in seen:
                seen.add(r.id)
                out.append(r)
    out.sort(key=lambda r: (r.when, r.id))
    return out, bad


def count_since(records: Iterable[TrafficRecord], since: datetime | None) -> int:
    return sum(1 for r in records if since is None or r.when >= since)
