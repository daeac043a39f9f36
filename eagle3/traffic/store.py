"""Where traffic records live: a local spool first, then S3, date-partitioned JSONL.

    s3://<bucket>/<prefix>/<model>/traffic/date=YYYY-MM-DD/<first record time>-<batch id>.jsonl

A batch of records is written to the spool atomically (temp file, rename) before anything is sent;
`flush` uploads each spooled batch as a NEW object (If-None-Match) under a key derived from the
batch file's name, and deletes the spool file only after S3 acknowledged it. A lost answer is
recognised on retry (the object is there with the same bytes), a failed upload leaves the file in
the spool for the next flush: no record is lost and none is written twice. The serving recorder
appends to one open batch and seals it before each upload (`append_open`, `seal_open`).
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from eagle3.io import write_atomic
from eagle3.traffic.record import TrafficRecord, parse_time

PARTITION = "date="


def traffic_prefix(s, model: str) -> str:
    return s.key(model, "traffic") + "/"


def batch_name(records: list[TrafficRecord]) -> str:
    """`<first record time, compact>-<random>.jsonl`: sorts by time, unique per batch."""
    first = min(r.when for r in records)
    return f"{first.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:12]}.jsonl"


def object_key(s, model: str, name: str) -> str:
    """The S3 key of a spooled batch file: its date partition comes from its name."""
    day = datetime.strptime(name[:8], "%Y%m%d").strftime("%Y-%m-%d")
    return f"{traffic_prefix(s, model)}{PARTITION}{day}/{name}"


def to_jsonl(records: list[TrafficRecord]) -> bytes:
    return "".join(r.model_dump_json(exclude_none=False) + "\n" for r in records).encode("utf-8")


def spool(records: list[TrafficRecord], spool_dir: str | Path) -> Path | None:
    """Write one batch to the spool (atomically); returns its file (None for no records)."""
    if not records:
        return None
    path = Path(spool_dir) / batch_name(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, to_jsonl(records))
    return path


# The recorder's open batch: appended to every few seconds (so a crash loses at most the records
# still in memory), sealed into one `<time>-<id>.jsonl` batch just before each upload. One object
# per upload period instead of one per append.
OPEN = "open.part"


def append_open(records: list[TrafficRecord], spool_dir: str | Path) -> Path | None:
    """Append records to the spool's open batch, flushed to disk before returning."""
    if not records:
        return None
    path = Path(spool_dir) / OPEN
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(to_jsonl(records))
        f.flush()
        os.fsync(f.fileno())
    return path


def seal_open(spool_dir: str | Path) -> Path | None:
    """Turn the open batch into a spooled batch file (atomic rename); None when there is none.
    A torn last line (a crash mid-append) is cut off: it was never a whole record."""
    path = Path(spool_dir) / OPEN
    if not path.exists():
        return None
    body = path.read_bytes()
    whole = body[: body.rfind(b"\n") + 1]
    if len(whole) < len(body):
        path.write_bytes(whole)
    lines = whole.splitlines()
    if not lines:
        path.unlink()
        return None
    records = [TrafficRecord.model_validate_json(line) for line in lines[:1]]
    sealed = path.with_name(batch_name(records))
    os.replace(path, sealed)
    return sealed


def pending(spool_dir: str | Path) -> list[Path]:
    d = Path(spool_dir)
    return sorted(d.glob("*.jsonl")) if d.is_dir() else []


def flush(
    s, model: str, spool_dir: str | Path, attempts: int = 3, delay: float = 1.0, say=print
) -> tuple[list[str], list[Path]]:
    """Upload every spooled batch; (keys uploaded, files still waiting). Each batch is tried
    `attempts` times with a growing delay; what still fails stays spooled for the next flush."""
    from eagle3.ops import storage

    done, left = [], []
    for path in pending(spool_dir):
        key = object_key(s, model, path.name)
        body = path.read_bytes()
        for attempt in range(attempts):
            try:
                try:
                    storage.put_bytes(s, key, body, "application/x-ndjson", if_none_match=True)
                except storage.PreconditionFailed:
                    if storage.get_bytes(s, key) != body:  # never over another batch
                        raise storage.OutsideScope(
                            f"s3://{s.bucket}/{key} exists with other content; "
                            f"{path} stays in the spool"
                        ) from None
                path.unlink()
                done.append(key)
                break
            except storage.OutsideScope:
                raise
            except Exception as e:  # noqa: BLE001 - every transport error: keep it spooled
                if attempt + 1 == attempts:
                    say(f"traffic: {path.name} stays spooled ({type(e).__name__}: {e})")
                    left.append(path)
                else:
                    time.sleep(delay * 2**attempt)
    return done, left


def list_objects(s, model: str, since: datetime | None, until: datetime | None) -> list[dict]:
    """[{key, etag, size}] of the batches whose date partition can hold records in
    [since, until), in key order (= time order of their first record)."""
    from eagle3.ops import storage

    c = storage.client(s)
    prefix = traffic_prefix(s, model)
    out, token = [], None
    while True:
        kw = {"Bucket": s.bucket, "Prefix": prefix}
        if token:
            kw["ContinuationToken"] = token
        resp = storage._call(s, f"list s3://{s.bucket}/{prefix}", c.list_objects_v2, **kw)
        for o in resp.get("Contents", []):
            day = partition_day(o["Key"][len(prefix) :])
            if day is None:
                continue
            if since is not None and day + timedelta(days=1) <= since:
                continue
            if until is not None and day >= until:
                continue
            out.append({"key": o["Key"], "etag": o.get("ETag", "").strip('"'), "size": o["Size"]})
        if not resp.get("IsTruncated"):
            return sorted(out, key=lambda o: o["key"])
        token = resp.get("NextContinuationToken")


def partition_day(rel: str) -> datetime | None:
    """The day of `date=YYYY-MM-DD/<name>` (None for anything else under the prefix)."""
    head = rel.split("/", 1)[0]
    if not head.startswith(PARTITION):
        return None
    try:
        return parse_time(head[len(PARTITION) :])
    except ValueError:
        return None


def expired_keys(s, model: str, days: int, now: datetime | None = None) -> list[str]:
    """Batches in date partitions wholly older than `days` days."""
    now = now or datetime.now(UTC)
    cutoff = (now - timedelta(days=days)).replace(hour=0, minute=0, second=0, microsecond=0)
    return [o["key"] for o in list_objects(s, model, None, cutoff)]


def enforce_retention(s, model: str, days: int, now: datetime | None = None) -> list[str]:
    """Delete the batches older than the retention; returns the keys deleted."""
    from eagle3.ops import storage

    keys = expired_keys(s, model, days, now)
    for k in keys:
        storage.delete_key(s, k)
    return keys
