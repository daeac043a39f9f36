"""Recorded traffic as a data source: `data.sources: [{name: traffic, since: ..., until: ...}]`.

The records of <prefix>/<model>/traffic/ in [since, until) become conversations:
- bad records (not JSON, not a record, another model) are skipped by name (object key and line);
- duplicates (same messages and sampling) keep their first occurrence;
- the newest `traffic.held_out_fraction` of them (by time) is held out: future traffic, never
  trained on;
- a recorded completion is the answer when the target produced it under the recipe's
  regeneration settings (same target, temperature, not redacted, not cut shorter than
  data.max_new_tokens); otherwise the user turns are kept and the answer is regenerated.
The source entry lists every object read with its ETag, so a head trained on traffic points back
to exactly what it learned from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from eagle3.io import sha256_json
from eagle3.traffic.record import TrafficRecord, parse_time

NAME = "traffic"


@dataclass
class TrafficLoad:
    conversations: list  # eagle3.data.sources.Conversation, oldest first
    skipped: list  # eagle3.data.sources.Skip
    held_out: set[str]
    entry: Any  # eagle3.data.manifest.SourceEntry
    records: list[TrafficRecord] = field(default_factory=list)


def dedupe_key(r: TrafficRecord) -> str:
    body = {"messages": r.messages, "sampling": r.sampling.to_dict()}
    return sha256_json(body)


def parse_records(key: str, body: bytes, model: str) -> tuple[list[TrafficRecord], list[tuple]]:
    """(records, [(skip id, reason)]) of one batch object."""
    good, bad = [], []
    for n, line in enumerate(body.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        sid = f"traffic:{key}:line{n}"
        try:
            r = TrafficRecord.model_validate(json.loads(line))
        except json.JSONDecodeError as e:
            bad.append((sid, f"malformed JSON: {e.msg}"))
            continue
        except ValidationError as e:
            err = e.errors()[0]
            bad.append(
                (sid, f"not a traffic record: {'.'.join(map(str, err['loc']))}: {err['msg']}")
            )
            continue
        if r.model != model:
            bad.append((sid, f"model {r.model!r}: this source reads {model!r}"))
            continue
        good.append(r)
    return good, bad


def in_window(r: TrafficRecord, since, until) -> bool:
    t = r.when
    return (since is None or t >= since) and (until is None or t < until)


def split_by_time(records: list[TrafficRecord], fraction: float) -> set[str]:
    """Ids of the newest ceil(fraction * n) records (records sorted oldest first); at least one
    record is left to train on."""
    n = len(records)
    k = min(math.ceil(fraction * n), n - 1) if n > 1 else 0
    return {r.id for r in records[n - k :]} if k else set()


def answer_reusable(r: TrafficRecord, target_slug: str, data) -> str | None:
    """None when the recorded completion is the target's answer under the recipe's regeneration
    settings; otherwise why it is regenerated."""
    if r.target != target_slug:
        return f"target {r.target} (recipe's {target_slug})"
    if r.redacted or r.completion.token_ids is None:
        return "redacted"
    if r.sampling.temperature != data.temperature or (
        data.temperature > 0 and r.sampling.top_p != 1.0
    ):
        return f"sampling temperature {r.sampling.temperature} (recipe's {data.temperature})"
    ended = r.completion.finish_reason in ("stop", "eos")
    if not ended and len(r.completion.token_ids) < data.max_new_tokens:
        return f"cut at {len(r.completion.token_ids)} tokens (recipe's {data.max_new_tokens})"
    return None


def to_conversation(r: TrafficRecord, reusable: bool, tokenizer_fn, data):
    from eagle3.data.sources import Conversation

    msgs = [{"role": m["role"], "content": m["content"]} for m in r.messages]
    if not reusable:
        return Conversation(f"{NAME}:{r.id}", msgs, NAME)
    ids = r.completion.token_ids or []
    text = r.completion.text
    if len(ids) > data.max_new_tokens:  # greedy: the first n tokens are what regeneration gives
        text = tokenizer_fn().decode(ids[: data.max_new_tokens], skip_special_tokens=True)
    msgs.append({"role": "assistant", "content": text})
    return Conversation(f"{NAME}:{r.id}", msgs, NAME, recorded_answer=True)


def load_traffic(recipe, spec, settings=None, tokenizer_fn=None) -> TrafficLoad:
    """The traffic source of `spec` (a SourceSpec named traffic) for this recipe."""
    from eagle3.data.manifest import SourceEntry
    from eagle3.data.sources import Skip, SourceError
    from eagle3.models.target import TargetSource
    from eagle3.ops import storage
    from eagle3.ops.tracking import registered_model_name
    from eagle3.traffic.store import list_objects, traffic_prefix

    since = parse_time(spec.since) if spec.since else None
    until = parse_time(spec.until) if spec.until else None
    if since and until and since >= until:
        raise SourceError(
            f"data source traffic: since {spec.since} is not before until {spec.until}"
        )
    s = settings or storage.settings_from_recipe(recipe.storage)
    model = registered_model_name(recipe)
    where = f"s3://{s.bucket}/{traffic_prefix(s, model)}"
    objects = list_objects(s, model, since, until)
    records, skipped = [], []
    for o in objects:
        got, bad = parse_records(o["key"], storage.get_bytes(s, o["key"]), model)
        records += [r for r in got if in_window(r, since, until)]
        skipped += [Skip(i, why) for i, why in bad]
    read = len(records) + len(skipped)
    records.sort(key=lambda r: (r.when, r.id))
    seen, unique = set(), []
    for r in records:
        k = dedupe_key(r)
        if k in seen:
            skipped.append(Skip(f"{NAME}:{r.id}", "duplicate of an earlier request"))
            continue
        seen.add(k)
        unique.append(r)
    if spec.limit is not None:
        unique = unique[: spec.limit]
    if len(unique) < 2:
        raise SourceError(
            f"data source traffic: {len(unique)} usable record(s) in {where} between "
            f"{spec.since or 'the start'} and {spec.until or 'now'} ({len(objects)} objects, "
            f"{len(skipped)} skipped); a time split needs at least 2"
        )
    held = split_by_time(unique, recipe.traffic.held_out_fraction)
    target = TargetSource.of(recipe.target)
    tok = tokenizer_fn or target.tokenizer
    convs, reused, why_regen = [], 0, {}
    for r in unique:
        why = answer_reusable(r, target.slug, recipe.data)
        reused += why is None
        if why is not None:
            why_regen[why.split(" ")[0]] = why_regen.get(why.split(" ")[0], 0) + 1
        convs.append(to_conversation(r, why is None, tok, recipe.data))
    entry = SourceEntry(
        name=NAME,
        path=where,
        format=NAME,
        read=read,
        kept=len(unique),
        bad=sum(1 for sk in skipped if "duplicate" not in sk.reason),
        since=spec.since,
        until=spec.until,
        objects=[{"key": o["key"], "etag": o["etag"]} for o in objects],
        held_out=len(held),
        answers_recorded=reused,
        answers_regenerated=len(unique) - reused,
        regenerated_because=why_regen,
        first_time=unique[0].time,
        last_time=unique[-1].time,
    )
    return TrafficLoad(convs, skipped, {f"{NAME}:{i}" for i in held}, entry, unique)
