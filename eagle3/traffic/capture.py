"""Recording what inference served: rows of an inference run -> redacted records -> spool -> S3.

The inference flow (either engine) calls `records_of_rows` and `capture`; recording is on only
when the recipe says `traffic.capture: true` and the request did not opt out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eagle3.traffic.record import TrafficRecord, compile_patterns, redact_record


def spool_dir(recipe, model: str) -> Path:
    from eagle3.settings import settings

    if recipe.traffic.spool_dir:
        return Path(recipe.traffic.spool_dir)
    return Path(settings().home) / "traffic-spool" / model


def records_of_rows(
    recipe, model: str, champion_version: str, rows: list[dict[str, Any]], sampling: dict
) -> list[TrafficRecord]:
    """One record per generated row (each row carries `messages`, `text`, `token_ids`,
    `finish_reason`, `engine` and `acceptance`), redacted with the recipe's patterns."""
    from eagle3.models.target import TargetSource

    patterns = compile_patterns(recipe.traffic.redact)
    target = TargetSource.of(recipe.target).slug
    out = []
    for row in rows:
        out.append(
            redact_record(
                {
                    "model": model,
                    "champion_version": str(champion_version),
                    "engine": row.get("engine", "eagle3"),
                    "target": target,
                    "messages": row["messages"],
                    "completion": {
                        "text": row["text"],
                        "token_ids": row.get("token_ids"),
                        "finish_reason": row.get("finish_reason"),
                    },
                    "sampling": sampling,
                    "acceptance": row.get("acceptance"),
                },
                patterns,
            )
        )
    return out


def capture(recipe, s, model: str, records: list[TrafficRecord], say=print) -> dict[str, Any]:
    """Spool the records, then upload everything spooled (this run's and any left before).
    Returns {spooled, uploaded: [keys], waiting: n}; an upload that fails leaves its batch
    spooled (the next capture or `flush` sends it) instead of failing the inference."""
    from eagle3.traffic.store import flush, spool

    d = spool_dir(recipe, model)
    path = spool(records, d)
    uploaded, left = flush(s, model, d, say=say)
    return {
        "spooled": len(records),
        "batch": path.name if path else None,
        "uploaded": uploaded,
        "waiting": len(left),
    }
