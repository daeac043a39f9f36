"""Traffic capture and the traffic data source (eagle3/traffic/), on the real SeaweedFS and, for
the inference flow, Prefect's harness and MLflow: records written as new objects, redaction and
opt-out, an S3 outage during capture (nothing lost once S3 is back), a lost upload answer (no
duplicate), the source's time split, dedupe and refusals."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime, timedelta

import pytest

os.environ.setdefault("EAGLE3_RETRY_DELAY", "0.05")

pytestmark = pytest.mark.integration

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def record(i: int, model: str, target: str, when: datetime, **kw):
    from eagle3.traffic.record import TrafficRecord

    fields = {
        "id": f"r{i:04d}",
        "time": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "model": model,
        "champion_version": "1",
        "engine": "vllm",
        "target": target,
        "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}],
        "completion": {
            "text": f"{i} plus {i} is {2 * i}.",
            "token_ids": [1, 2, 3],
            "finish_reason": "stop",
        },
        "sampling": {"temperature": 0.0, "max_tokens": 64},
        "acceptance": {"drafts": 10, "accepted": 12, "per_pos": [7, 5], "source": "vllm-counters"},
    }
    fields.update(kw)
    return TrafficRecord.model_validate(fields)


@pytest.fixture()
def traffic_recipe(tiny_recipe, tmp_path, s3_env):
    from eagle3.config import build_recipe

    tree = tiny_recipe.model_dump(mode="json")
    model = f"eagle3-traffic-{uuid.uuid4().hex[:8]}"
    return build_recipe(
        tree,
        [
            f"run_dir={tmp_path / 'run'}",
            f"tracking.registered_model={model}",
            "traffic.capture=true",
            f"traffic.spool_dir={tmp_path / 'spool'}",
        ],
    )


def target_slug(recipe) -> str:
    from eagle3.models.target import TargetSource

    return TargetSource.of(recipe.target).slug


def stored_records(s, model: str) -> list[dict]:
    from eagle3.ops import storage
    from eagle3.traffic.store import list_objects

    out = []
    for o in list_objects(s, model, None, None):
        out += storage.read_jsonl(s, o["key"])
    return out


# --- pure pieces ------------------------------------------------------------------------------------
@pytest.mark.unit
def test_acceptance_of_cycle_gains_matches_a_naive_count():
    from eagle3.traffic.record import acceptance_of_lengths

    gains = [1, 3, 2, 4, 1, 3]  # tokens per verify: accepted drafts + 1
    a = acceptance_of_lengths(gains)
    accepted = [g - 1 for g in gains]
    naive_pos = [sum(1 for x in accepted if x >= d) for d in range(1, max(accepted) + 1)]
    assert (a.drafts, a.accepted, a.per_pos) == (6, sum(accepted), naive_pos)
    assert a.length == pytest.approx(sum(gains) / len(gains))


@pytest.mark.unit
def test_serve_recorder_credits_counters_only_to_a_request_alone_since_an_idle_read():
    """eagle3/serve/recorder.py's Exclusive against a naive reading of the rule: a request gets
    the counters diffed around it only if it ran alone and its "before" was read while the
    server was idle after everything that started before it."""
    from eagle3.serve.recorder import Exclusive

    g = Exclusive()
    assert g.begin() == (1, None)  # no idle read yet: no base
    assert g.end(1) and g.idle_since(1)
    g.keep("c1", 1)
    t, base = g.begin()
    assert (t, base) == (2, "c1")
    t3, base3 = g.begin()  # overlaps 2
    assert base3 is None and not g.end(t) and not g.idle_since(t)
    assert not g.end(t3)  # 3 started while 2 ran: neither was alone
    assert g.idle_since(t3)
    g.keep("c3", t3)
    t4, base4 = g.begin()
    assert base4 == "c3" and g.end(t4)
    g.keep("stale", 1)  # a read tagged before request 4 started is never a base
    assert g.begin()[1] is None


@pytest.mark.unit
def test_serve_recorder_assembles_streamed_and_plain_answers():
    import json as _json

    from eagle3.serve.recorder import StreamParser, answer_of_body, sampling_of, wants_capture

    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant"}, "token_ids": []}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}, "token_ids": [5, 6]}]},
        {
            "choices": [
                {"index": 0, "delta": {"content": "lo"}, "token_ids": [7], "finish_reason": "stop"}
            ]
        },  # fmt: skip
    ]
    raw = b"".join(b"data: " + _json.dumps(c).encode() + b"\n\n" for c in chunks)
    raw += b"data: [DONE]\n\n"
    p = StreamParser()
    for i in range(0, len(raw), 7):  # events split anywhere across network chunks
        p.feed(raw[i : i + 7])
    a = p.answer
    assert (a.text, a.token_ids, a.has_ids, a.finish_reason, a.choices) == (
        "Hello", [5, 6, 7], True, "stop", 1)  # fmt: skip
    body = {"choices": [{"index": 0, "message": {"content": "Hi"}, "finish_reason": "length"}]}
    b = answer_of_body(_json.dumps(body).encode())
    assert (b.text, b.has_ids, b.finish_reason) == ("Hi", False, "length")
    assert sampling_of({"max_tokens": 9}) == {
        "temperature": 1.0, "top_p": 1.0, "max_tokens": 9, "seed": None}  # fmt: skip
    assert not wants_capture({"x-eagle3-capture": " OFF "}) and wants_capture({})


@pytest.mark.unit
def test_redaction_removes_the_secret_and_the_token_ids():
    from eagle3.config import TrafficConfig
    from eagle3.traffic.record import compile_patterns, redact_record

    pats = compile_patterns(TrafficConfig().redact)
    base = record(1, "m", "t", T0).to_dict()
    base.pop("id"), base.pop("time")
    base["messages"] = [
        {"role": "user", "content": "mail bob@example.com key sk-ABCDEFGHIJKLMNOPQRST"}
    ]
    r = redact_record(base, pats)
    text = json.dumps(r.to_dict())
    assert "bob@example.com" not in text and "ABCDEFGHIJKLMNOP" not in text
    assert r.redacted and r.completion.token_ids is None
    clean = redact_record({**base, "messages": [{"role": "user", "content": "2+2?"}]}, pats)
    assert not clean.redacted and clean.completion.token_ids == [1, 2, 3]
    with pytest.raises(ValueError, match=r"traffic.redact: pattern '\('"):
        compile_patterns(["("])


@pytest.mark.unit
def test_time_split_holds_out_the_newest_and_keeps_one_to_train():
    from eagle3.traffic.source import split_by_time

    recs = [record(i, "m", "t", T0 + timedelta(minutes=i)) for i in range(10)]
    assert split_by_time(recs, 0.2) == {"r0008", "r0009"}
    assert split_by_time(recs[:2], 0.9) == {"r0001"}
    assert split_by_time(recs[:1], 0.5) == set()


# --- capture to S3 ----------------------------------------------------------------------------------
def test_s3_outage_during_capture_loses_nothing(traffic_recipe, s3_env, tmp_path):
    from eagle3.ops.storage import S3Settings
    from eagle3.traffic.store import flush, pending, spool

    model = "eagle3-outage"
    slug = target_slug(traffic_recipe)
    spool_dir = tmp_path / "spool-outage"
    first = [record(i, model, slug, T0 + timedelta(seconds=i)) for i in range(3)]
    spool(first, spool_dir)
    down = S3Settings(bucket=s3_env.bucket, prefix="eagle3", endpoint_url="http://127.0.0.1:9")
    said = []
    done, left = flush(down, model, spool_dir, attempts=2, delay=0.01, say=said.append)
    assert done == [] and len(left) == 1 and "stays spooled" in said[0]
    second = [record(i, model, slug, T0 + timedelta(seconds=i)) for i in range(3, 5)]
    spool(second, spool_dir)  # traffic goes on while S3 is down
    assert len(pending(spool_dir)) == 2
    done, left = flush(s3_env, model, spool_dir)  # S3 is back
    assert len(done) == 2 and left == [] and pending(spool_dir) == []
    got = sorted(r["id"] for r in stored_records(s3_env, model))
    assert got == [f"r{i:04d}" for i in range(5)]  # every record, once
    assert all("/traffic/date=2026-12-01/" in k for k in done)


def test_open_batch_appends_seal_into_one_upload_and_drop_a_torn_line(s3_env, tmp_path):
    from eagle3.traffic.store import OPEN, append_open, flush, pending, seal_open

    model = "eagle3-open"
    spool_dir = tmp_path / "spool-open"
    for i in range(3):  # three recorder passes between two uploads
        append_open([record(i, model, "t", T0 + timedelta(seconds=i))], spool_dir)
    assert pending(spool_dir) == [] and (spool_dir / OPEN).exists()  # open: not uploadable yet
    sealed = seal_open(spool_dir)
    assert sealed.name.startswith("20261201T") and not (spool_dir / OPEN).exists()
    (key,), left = flush(s3_env, model, spool_dir)
    assert left == [] and key.endswith(sealed.name)
    assert [r["id"] for r in stored_records(s3_env, model)] == ["r0000", "r0001", "r0002"]
    append_open([record(3, model, "t", T0)], spool_dir)
    with open(spool_dir / OPEN, "ab") as f:
        f.write(b'{"id": "r0004", "when": ')  # a crash in the middle of an append
    torn = seal_open(spool_dir)
    assert [json.loads(line)["id"] for line in torn.read_text().splitlines()] == ["r0003"]
    assert seal_open(spool_dir) is None  # nothing open


def test_a_lost_upload_answer_is_recognised_not_duplicated(traffic_recipe, s3_env, tmp_path):
    from eagle3.traffic.store import flush, spool

    model = "eagle3-lost"
    spool_dir = tmp_path / "spool-lost"
    path = spool([record(1, model, "t", T0)], spool_dir)
    body = path.read_bytes()
    (done,), _ = flush(s3_env, model, spool_dir)
    path.write_bytes(body)  # S3 took it, but the answer was lost: the batch is still spooled
    again, left = flush(s3_env, model, spool_dir)
    assert again == [done] and left == [] and not path.exists()
    assert len(stored_records(s3_env, model)) == 1
    path.write_bytes(body.replace(b"r0001", b"r0002"))  # another batch under the same key
    with pytest.raises(Exception, match="exists with other content"):
        flush(s3_env, model, spool_dir)
    assert path.exists()  # kept, never written over the stored one


def test_retention_deletes_only_expired_partitions(s3_env, tmp_path):
    from eagle3.traffic.store import enforce_retention, flush, spool

    model = "eagle3-retention"
    for day in (0, 5, 40):
        spool([record(day, model, "t", T0 - timedelta(days=day))], tmp_path / "sp")
    flush(s3_env, model, tmp_path / "sp")
    gone = enforce_retention(s3_env, model, days=30, now=T0)
    assert len(gone) == 1 and "date=2026-10-22" in gone[0]
    assert sorted(r["id"] for r in stored_records(s3_env, model)) == ["r0000", "r0005"]


# --- the traffic source --------------------------------------------------------------------------------
def seed_traffic(recipe, s3_env, tmp_path, n: int = 10) -> list:
    from eagle3.ops import storage
    from eagle3.ops.tracking import registered_model_name
    from eagle3.traffic.store import flush, object_key, spool, traffic_prefix

    model = registered_model_name(recipe)
    slug = target_slug(recipe)
    recs = [record(i, model, slug, T0 + timedelta(hours=i)) for i in range(n)]
    recs.append(
        record(99, model, slug, T0 + timedelta(hours=1, minutes=5), messages=recs[0].messages)
    )  # a repeat of r0000's request
    recs.append(
        record(
            98,
            model,
            slug,
            T0 + timedelta(hours=2),
            redacted=True,
            completion={"text": "[REDACTED]", "finish_reason": "stop"},
        )
    )
    recs.append(
        record(
            97,
            model,
            slug,
            T0 + timedelta(hours=3),
            completion={"text": "cut", "token_ids": [5], "finish_reason": "length"},
        )
    )
    sp = tmp_path / "seed"
    spool(recs[: n // 2], sp)
    spool(recs[n // 2 :], sp)
    flush(s3_env, model, sp)
    bad = (
        "not json\n"
        + json.dumps({"id": "x"})
        + "\n"
        + record(50, "other-model", slug, T0).model_dump_json()
        + "\n"
    )
    storage.put_bytes(
        s3_env, object_key(s3_env, model, "20261201T120000000000Z-bad.jsonl"), bad.encode()
    )
    storage.put_bytes(s3_env, traffic_prefix(s3_env, model) + "stray.txt", b"ignored: no partition")
    return recs


def with_traffic_source(recipe, since=None, until=None, extra=()):
    from eagle3.config import build_recipe

    src = (
        {"name": "traffic"}
        | ({"since": since} if since else {})
        | ({"until": until} if until else {})
    )
    tree = recipe.model_dump(mode="json")
    tree["data"]["sources"] = [src]
    return build_recipe(tree, list(extra))


def test_traffic_source_splits_by_time_dedupes_and_names_bad_records(
    traffic_recipe, s3_env, tmp_path
):
    from eagle3.data.sources import load_conversations

    seed_traffic(traffic_recipe, s3_env, tmp_path)
    r = with_traffic_source(traffic_recipe, extra=["data.max_new_tokens=8"])
    loaded = load_conversations(r)
    ids = [c.id for c in loaded.conversations]
    assert "traffic:r0099" not in ids  # the later repeat of r0000 is dropped
    assert ids[:3] == ["traffic:r0000", "traffic:r0001", "traffic:r0002"]  # oldest first
    assert len(ids) == 12
    assert loaded.held_out == {"traffic:r0008", "traffic:r0009", "traffic:r0007"}  # newest 20%
    skips = {s.id: s.reason for s in loaded.skipped}
    bad = [k for k in skips if "-bad.jsonl" in k]
    assert len(bad) == 3 and any("line1" in k and "malformed JSON" in skips[k] for k in bad)
    assert any("other-model" in skips[k] for k in bad)
    assert skips["traffic:r0099"] == "duplicate of an earlier request"
    entry = loaded.sources[0]
    assert entry.held_out == 3 and len(entry.objects) == 3
    assert all(o["etag"] for o in entry.objects)
    by_id = {c.id: c for c in loaded.conversations}
    assert by_id["traffic:r0001"].recorded_answer  # the target's answer, reused
    assert by_id["traffic:r0001"].messages[-1] == {"role": "assistant", "content": "1 plus 1 is 2."}
    assert not by_id["traffic:r0098"].recorded_answer  # redacted: regenerated
    assert by_id["traffic:r0098"].messages[-1]["role"] == "user"
    assert not by_id[
        "traffic:r0097"
    ].recorded_answer  # cut shorter than the recipe's max_new_tokens
    assert entry.answers_regenerated == 2 and entry.answers_recorded == 10

    window = with_traffic_source(
        traffic_recipe, since="2026-12-01T12:00:00Z", until="2026-12-01T16:00:00Z"
    )
    assert [c.id for c in load_conversations(window).conversations] == [
        f"traffic:r{i:04d}" for i in (3, 97, 4, 5, 6)
    ]


def test_traffic_source_refusals(traffic_recipe, s3_env):
    from eagle3.config import ConfigError
    from eagle3.data.sources import SourceError, load_conversations

    with pytest.raises(SourceError, match=r"0 usable record\(s\) in s3://.*/traffic/"):
        load_conversations(with_traffic_source(traffic_recipe))
    with pytest.raises(SourceError, match="is not before until"):
        load_conversations(with_traffic_source(traffic_recipe, "2026-12-02", "2026-12-01"))
    with pytest.raises(ConfigError, match="since/until apply to name: traffic only"):
        from eagle3.config import build_recipe

        tree = traffic_recipe.model_dump(mode="json")
        tree["data"]["sources"] = [{"name": "sharegpt", "since": "2026-12-01"}]
        build_recipe(tree)


@pytest.mark.slow
def test_data_stage_on_traffic_never_trains_on_the_newest(traffic_recipe, s3_env, tmp_path):
    """The data stage on the traffic source: held-out = the newest records; recorded answers are
    kept as they are, the others regenerated by the target; the manifest names the objects."""
    from eagle3.data.pipeline import run_data
    from eagle3.data.reader import load_token_samples

    seed_traffic(traffic_recipe, s3_env, tmp_path)
    r = with_traffic_source(traffic_recipe, extra=["data.max_new_tokens=8", "data.features=false"])
    m = run_data(r, progress=False)
    assert set(m["split"]["val_ids"]) == {"traffic:r0007", "traffic:r0008", "traffic:r0009"}
    src = m["sources"][0]
    assert src["name"] == "traffic" and len(src["objects"]) == 3
    assert src["answers_recorded"] == 10 and src["answers_regenerated"] == 2
    train, val = load_token_samples(r.run_path / "data")
    assert {s.sample_id for s in val} == set(m["split"]["val_ids"])
    assert not {s.sample_id for s in train} & set(m["split"]["val_ids"])


# --- the inference flow records what it served ---------------------------------------------------------
def test_inference_flow_captures_redacts_and_honours_opt_out(
    traffic_recipe, s3_env, mlflow_sqlite, prefect_harness
):
    from test_flows import make_report, register_candidate
    from test_ops_storage import make_draft

    from eagle3.ops.tracking import registered_model_name
    from flows.infer import infer_flow
    from flows.promote import promote_flow

    r = traffic_recipe
    model = registered_model_name(r)
    v1 = register_candidate(r, make_draft(r.run_path / "d0", seed=0), make_report(1.8, 1.3))
    assert promote_flow(r, version=v1)["promoted"]

    out = infer_flow(["Hello there", "write to alice@example.org"], config=r, max_new_tokens=5)
    assert out["traffic"]["spooled"] == 2 and out["traffic"]["waiting"] == 0
    recs = stored_records(s3_env, model)
    assert len(recs) == 2
    first, second = sorted(recs, key=lambda x: x["messages"][0]["content"])
    assert first["champion_version"] == str(v1) and first["engine"] == "eagle3"
    assert first["completion"]["token_ids"] and first["acceptance"]["source"] == "engine"
    gen = out["outputs"][0]
    assert first["completion"]["text"] == gen["text"]
    assert first["acceptance"]["drafts"] == gen["verify_steps"]
    assert 1 + first["acceptance"]["accepted"] / first["acceptance"]["drafts"] == pytest.approx(
        gen["tau"]
    )
    assert second["redacted"] and "alice@example.org" not in json.dumps(recs)

    out = infer_flow(["Hello again"], config=r, max_new_tokens=5, capture=False)
    assert "traffic" not in out and len(stored_records(s3_env, model)) == 2
