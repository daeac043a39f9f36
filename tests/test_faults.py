"""Faults against the real local stack (SeaweedFS, MLflow on sqlite, Prefect's test harness), with
injection at named points (eagle3.ops.storage.FAULTS) and a TCP fault proxy in front of S3.

After each fault: champion.json and the MLflow alias agree, every version in the pointer's
history verifies against its manifest (and comes from this registry), and the flow's final
state tells the truth. Issue #16.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("EAGLE3_RETRY_DELAY", "0.05")  # before flows.common is imported

from test_flows import (  # noqa: E402
    FaultProxy,
    champion_alias,
    make_report,
    register_candidate,
    task_runs,
)

from eagle3.ops import champion as ch  # noqa: E402
from eagle3.ops import storage  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    from test_ops_storage import make_draft

    root = tmp_path_factory.mktemp("fault-drafts")
    return [make_draft(root / f"d{seed}", seed=seed) for seed in range(6)]


@pytest.fixture()
def recipe(tiny_recipe, tmp_path, s3_env, mlflow_sqlite, prefect_harness):
    from eagle3.config import build_recipe

    model = f"eagle3-fault-{uuid.uuid4().hex[:8]}"
    over = [f"run_dir={tmp_path / 'run'}", f"tracking.registered_model={model}"]
    return build_recipe(tiny_recipe.model_dump(mode="json"), over)


@pytest.fixture()
def proxy(seaweed_s3):
    p = FaultProxy(seaweed_s3.ports["s3"])
    yield p
    p.close()


@pytest.fixture()
def faults(monkeypatch):
    """Set a hook at a named point: faults("after_pointer_write", fn)."""
    return lambda point, fn: monkeypatch.setitem(storage.FAULTS, point, fn)


def via(recipe, proxy):
    from eagle3.config import build_recipe

    return build_recipe(recipe.model_dump(mode="json"), [f"storage.endpoint_url={proxy.url}"])


def place(recipe):
    return ch.place_for(recipe)


def pointer(recipe) -> dict | None:
    return ch.read_pointer(place(recipe))[0]


def assert_consistent(recipe) -> dict | None:
    """Pointer and alias agree; every version the pointer and its history name verifies against
    its manifest, whose identity is this registry's."""
    pl = place(recipe)
    ptr, _ = ch.read_pointer(pl)
    assert ch.alias_version(pl) == (None if ptr is None else str(ptr["version"])), ptr
    rid = ch.registry_id(pl)
    for e in [ptr, *ptr.get("history", [])] if ptr else []:
        man = storage.verify_version(pl.s3, pl.model, e["version"], e["manifest_sha256"])
        assert man["registry_id"] == rid
        assert man["mlflow_run_id"] == pl.tracker.version(pl.model, e["version"]).run_id
    return ptr


def history(ptr: dict) -> list[str]:
    return [h["version"] for h in ptr["history"]]


# --- 1. one champion, moved atomically -----------------------------------------------------------------
def test_two_promotions_cannot_both_replace_the_same_champion(recipe, drafts, faults):
    """A reads champion v1 and passes the gate; B promotes and commits; then A writes. A's
    conditional write loses, A re-reads and is gated against B's champion: rejected when worse,
    committed on top (B kept in the history) when better. Both flows tell what happened."""
    from flows.promote import promote_flow

    v1 = register_candidate(recipe, drafts[0], make_report(1.8, 1.3))
    assert promote_flow(recipe, version=v1)["promoted"]

    def race(held_report, between_report):
        held = register_candidate(recipe, drafts[1], held_report)
        other = register_candidate(recipe, drafts[2], between_report)
        reached, release, result = threading.Event(), threading.Event(), {}

        def hold(model, version):
            if version == held and not reached.is_set():
                reached.set()
                assert release.wait(120)

        faults("before_pointer_write", hold)
        t = threading.Thread(
            target=lambda: result.update(s=promote_flow(recipe, version=held, return_state=True))
        )
        t.start()
        assert reached.wait(120), "A never reached its pointer write"
        out_b = promote_flow(recipe, version=other)  # B commits while A holds its read
        release.set()
        t.join(120)
        assert result["s"].is_completed(), result["s"]
        return held, other, out_b, result["s"]

    # A (tau 2.0) is worse than B (tau 2.3) by more than 5 %: A must not replace B
    a, b, out_b, state = race(make_report(2.0, 1.4), make_report(2.3, 1.5))
    out_a = state.result()
    assert out_b["promoted"] and not out_a["promoted"] and out_a["champion_moved"]
    assert any(f"worse than champion v{b}" in r for r in out_a["decision"]["reasons"])
    (commit,) = task_runs(state)["commit-champion-pointer"]
    assert commit.run_count == 1  # the lost CAS was re-read and re-gated inside one attempt
    ptr = assert_consistent(recipe)
    assert ptr["version"] == b and history(ptr) == [v1]

    # A (tau 3.0) beats D (tau 2.4): A commits on top of D, and D stays in the history
    a2, d, out_d, state = race(make_report(3.0, 2.0), make_report(2.4, 1.6))
    assert out_d["promoted"] and state.result()["promoted"]
    ptr = assert_consistent(recipe)
    assert ptr["version"] == a2 and history(ptr) == [v1, b, d]
    assert state.result()["previous"] == d


def test_s3_stops_right_after_the_pointer_write(recipe, drafts, proxy, faults, s3_env):
    """The write landed: the promotion is the truth even though S3 is gone now; the alias
    follows it, and the flow says COMPLETED."""
    from flows.promote import promote_flow

    v1 = register_candidate(recipe, drafts[0], make_report(1.8, 1.3))
    assert promote_flow(recipe, version=v1)["promoted"]
    v2 = register_candidate(recipe, drafts[1], make_report(2.0, 1.4))
    faults("after_pointer_write", lambda **_: proxy.set_policy(lambda i: False))
    state = promote_flow(via(recipe, proxy), version=v2, return_state=True)
    assert state.is_completed(), state
    assert state.result()["promoted"] and champion_alias(recipe) == v2
    ptr = assert_consistent(recipe)  # read directly from SeaweedFS, past the dead proxy
    assert ptr["version"] == v2 and history(ptr) == [v1]


def test_a_lost_answer_to_the_pointer_write(recipe, drafts, proxy, faults):
    """The pointer write reaches S3 but its answer is lost. If S3 answers the retry, the commit
    recognises its own write (COMPLETED). If S3 stays down, the flow FAILS, and the pointer it
    may have left is put back by `eagle3 promote --reconcile` or by the next promotion: a failed
    promotion never stays the champion."""
    from eagle3.cli import main
    from flows.promote import promote_flow

    v1 = register_candidate(recipe, drafts[0], make_report(1.8, 1.3))
    assert promote_flow(recipe, version=v1)["promoted"]
    v2 = register_candidate(recipe, drafts[1], make_report(2.0, 1.4))
    lost = []

    def lose_answer(**_):
        if not lost:
            lost.append(1)
            raise storage.S3Unavailable("injected: the answer to the pointer write was lost")

    faults("after_pointer_write", lose_answer)
    state = promote_flow(via(recipe, proxy), version=v2, return_state=True)
    assert state.is_completed(), state
    (commit,) = task_runs(state)["commit-champion-pointer"]
    assert commit.run_count == 2
    ptr = assert_consistent(recipe)
    assert ptr["version"] == v2 and history(ptr) == [v1]

    # now the answer is lost and S3 stays down for every retry
    v3 = register_candidate(recipe, drafts[2], make_report(2.2, 1.5))

    def lose_and_die(**_):
        proxy.set_policy(lambda i: False)
        raise storage.S3Unavailable("injected: the answer was lost and S3 went down")

    faults("after_pointer_write", lose_and_die)
    state = promote_flow(via(recipe, proxy), version=v3, return_state=True)
    assert state.is_failed()
    with pytest.raises(storage.S3Unavailable):
        state.result()
    ptr = pointer(recipe)
    assert ptr["version"] == v3 and champion_alias(recipe) == v2  # the write had landed: a split
    assert ch.is_aborted(place(recipe), ptr)  # ... from a promotion known to have failed

    # `eagle3 promote --reconcile` (no Prefect) puts v2 back and says so
    faults("after_pointer_write", lambda **_: None)
    model = recipe.tracking.registered_model
    rc, out = run_cli(main, ["promote", "--config", TINY, f"tracking.registered_model={model}"])
    assert rc == 0  # (a plain promote of the candidate v3 would also reconcile first; see below)
    assert f"champion.json: v{v3} -> v{v2}" in out, out
    ptr = assert_consistent(recipe)
    # ... and then promoted v3 again, cleanly this time, on top of v2
    assert ptr["version"] == v3 and history(ptr) == [v1, v2]
    rc, out = run_cli(
        main, ["promote", "--config", TINY, f"tracking.registered_model={model}", "--reconcile"]
    )
    assert rc == 0 and "agree" in out and "nothing changed" in out


def test_the_alias_cannot_follow(recipe, drafts, faults):
    """MLflow fails around the alias write on every retry: champion.json is put back by
    compare-and-swap, the alias follows it back, and the flow says FAILED."""
    from flows.promote import promote_flow

    v1 = register_candidate(recipe, drafts[0], make_report(1.8, 1.3))
    assert promote_flow(recipe, version=v1)["promoted"]
    v2 = register_candidate(recipe, drafts[1], make_report(2.0, 1.4))
    calls = []

    def mlflow_fails(model, version):
        if version == v2:
            calls.append(version)
            raise ConnectionError("injected: MLflow unreachable after the alias write")

    faults("after_alias_write", mlflow_fails)
    state = promote_flow(recipe, version=v2, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=f"put back to v{v1}"):
        state.result()
    runs = task_runs(state)
    assert runs["follow-champion-alias"][0].run_count == 4 and len(calls) == 4  # retried
    assert runs["undo-champion-pointer"][0].state.is_completed()
    ptr = assert_consistent(recipe)
    assert ptr["version"] == v1 and history(ptr) == []


def run_cli(main, argv) -> tuple[int, str]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main(argv)
    return rc, buf.getvalue()


def test_a_split_after_a_crash_is_repaired_by_reconcile(recipe, drafts):
    """A crash between the pointer write and the alias (simulated by moving the pointer alone):
    reconcile makes the alias follow the pointer, and says what it changed."""
    from eagle3.cli import main
    from flows.promote import promote_flow

    v1 = register_candidate(recipe, drafts[0], make_report(1.8, 1.3))
    v2 = register_candidate(recipe, drafts[1], make_report(2.0, 1.4))
    assert promote_flow(recipe, version=v1)["promoted"]
    assert promote_flow(recipe, version=v2)["promoted"]
    pl = place(recipe)
    pl.tracker.set_alias(pl.model, ch.ALIAS, v1)  # the alias lags the pointer
    model = recipe.tracking.registered_model
    rc, out = run_cli(
        main, ["promote", "--config", TINY, f"tracking.registered_model={model}", "--reconcile"]
    )
    assert rc == 0 and f"alias champion: v{v1} -> v{v2}" in out, out
    assert assert_consistent(recipe)["version"] == v2


def test_rollback_repairs_a_champion_whose_manifest_is_gone(recipe, drafts):
    """Issue #26 case 2: the champion's manifest is deleted (and the champion before it has a
    damaged file). Reconcile and promote refuse, naming the rollback; the rollback used to
    deadlock on the same check. Now `eagle3 promote --rollback` replaces the champion with the
    newest earlier one that verifies, says what it repaired and skipped, and deletes nothing."""
    from eagle3.cli import main
    from flows.promote import promote_flow

    vs = [
        register_candidate(recipe, drafts[i], make_report(1.8 + 0.2 * i, 1.3 + 0.1 * i))
        for i in range(3)
    ]
    for v in vs:
        assert promote_flow(recipe, version=v)["promoted"]
    v1, v2, v3 = vs
    pl = place(recipe)
    man3 = f"{storage.version_key(pl.s3, pl.model, v3)}/{storage.MANIFEST}"
    storage.delete_key(pl.s3, man3)
    w2 = f"{storage.version_key(pl.s3, pl.model, v2)}/model.safetensors"
    data = bytearray(storage.get_bytes(pl.s3, w2))
    data[len(data) // 2] ^= 0x55
    storage.put_bytes(pl.s3, w2, bytes(data))
    kept = set(storage.list_keys(pl.s3, pl.s3.key(pl.model))) - {
        storage.pointer_key(pl.s3, pl.model)
    }

    cli = ["promote", "--config", TINY, f"tracking.registered_model={pl.model}"]
    rc, out = run_cli(main, [*cli, "--reconcile"])
    assert rc != 0 and f"names v{v3}, whose manifest" in out and "--rollback" in out, out
    rc, out = run_cli(main, [*cli, "--rollback"])
    assert rc == 0, out
    assert f"repaired: champion.json named v{v3}, whose manifest s3://" in out, out
    assert "is missing; it is no longer served" in out, out
    assert f"repaired: skipped the earlier champion v{v2}:" in out and "model.safetensors" in out
    assert f"rolled back: champion is v{v1} again (was v{v3})" in out, out
    ptr = assert_consistent(recipe)  # pointer and alias agree on v1, which verifies
    assert ptr["version"] == v1 and ptr["rolled_back_from"] == v3
    assert champion_alias(recipe) == v1
    after = set(storage.list_keys(pl.s3, pl.s3.key(pl.model)))
    assert kept <= after  # nothing deleted: the damaged versions stay for inspection
    rc, out = run_cli(main, [*cli, "--reconcile"])
    assert rc == 0 and "nothing changed" in out, out


# --- 2. immutable versions -------------------------------------------------------------------------------
def test_partial_upload_then_cli_retry(recipe, drafts, proxy, faults, monkeypatch, s3_env):
    """S3 stops after the first object of v2: the flow FAILS, nothing moves; the unfinished v2/
    does not block `eagle3 promote --version 2`, which completes it."""
    from eagle3.cli import main
    from flows.promote import promote_flow

    v1 = register_candidate(recipe, drafts[0], make_report(1.8, 1.3))
    assert promote_flow(recipe, version=v1)["promoted"]
    v2 = register_candidate(recipe, drafts[1], make_report(2.0, 1.4))
    faults("after_version_object", lambda **_: proxy.set_policy(lambda i: False))
    state = promote_flow(via(recipe, proxy), version=v2, return_state=True)
    assert state.is_failed()
    assert assert_consistent(recipe)["version"] == v1
    pl = place(recipe)
    assert storage.list_keys(pl.s3, storage.version_key(pl.s3, pl.model, v2) + "/")  # a leftover
    assert storage.read_manifest(pl.s3, pl.model, v2) is None

    faults("after_version_object", lambda **_: None)
    model = recipe.tracking.registered_model
    rc, out = run_cli(
        main, ["promote", "--config", TINY, f"tracking.registered_model={model}", "--version", v2]
    )
    assert rc == 0, out
    ptr = assert_consistent(recipe)
    assert ptr["version"] == v2 and history(ptr) == [v1]


def test_a_second_registry_cannot_touch_this_one(recipe, drafts, tmp_path, s3_env):
    """A fresh MLflow registry (another sqlite) with the same model name, sharing the bucket:
    its "v1" is refused before anything is written; the real v1 still verifies."""
    from eagle3.config import build_recipe
    from flows.promote import promote_flow

    v1 = register_candidate(recipe, drafts[0], make_report(1.8, 1.3))
    assert promote_flow(recipe, version=v1)["promoted"]
    pl = place(recipe)
    before = {k: storage.get_bytes(pl.s3, k) for k in storage.list_keys(pl.s3, pl.s3.key(pl.model))}

    other = build_recipe(
        recipe.model_dump(mode="json"), [f"tracking.uri=sqlite:///{tmp_path / 'other.db'}"]
    )
    w1 = register_candidate(other, drafts[3], make_report(2.5, 1.6))
    assert w1 == v1  # the same version number in another registry
    state = promote_flow(other, version=w1, return_state=True)
    assert state.is_failed()
    # refused when it fetches its draft (S3's v1 is another run's) or when it would claim the prefix
    with pytest.raises(ch.RegistryMismatch, match="another MLflow registry|not this registry's"):
        state.result()
    after = {k: storage.get_bytes(pl.s3, k) for k in storage.list_keys(pl.s3, pl.s3.key(pl.model))}
    assert after == before  # not one object written or changed
    assert assert_consistent(recipe)["version"] == v1
    assert champion_alias(other) is None


# --- 3. inference confined --------------------------------------------------------------------------------
def test_inference_cannot_write_outside_its_folder(recipe, drafts, s3_env):
    """An output_uri aimed at the champion pointer (or another bucket, or out of inference/ with
    ..), prompts from another bucket, overrides of storage/tracking/promote: all refused before
    any work; the pointer is untouched."""
    from eagle3.ops.inference import check_request, output_key
    from flows.infer import infer_flow
    from flows.promote import promote_flow

    v1 = register_candidate(recipe, drafts[0], make_report(1.8, 1.3))
    assert promote_flow(recipe, version=v1)["promoted"]
    pl = place(recipe)
    key = storage.pointer_key(pl.s3, pl.model)
    before = storage.get_bytes(pl.s3, key)
    inference = f"s3://{s3_env.bucket}/{storage.inference_prefix(pl.s3, pl.model)}"
    # the flow refuses before any work (three cases run as flows) ...
    for kw in (
        dict(output_uri=f"s3://{s3_env.bucket}/{key}"),
        dict(prompts="s3://another-bucket/prompts.jsonl"),
        dict(overrides=["storage.bucket=another-bucket"]),
    ):
        args = {"prompts": ["Hello"], "config": recipe, "max_new_tokens": 4, **kw}
        state = infer_flow(**args, return_state=True)
        assert state.is_failed(), kw
        with pytest.raises((ValueError, PermissionError)):
            state.result()
        runs = task_runs(state)
        assert "generate" not in runs and "write-outputs" not in runs, (kw, runs)
    # ... with the checks it runs first
    for uri in (
        f"{inference}../champion.json",
        f"{inference}a/../../champion.json",
        f"s3://another-bucket/{storage.inference_prefix(pl.s3, pl.model)}x.jsonl",
        f"{inference}x.txt",
        f"s3://{s3_env.bucket}/eagle3/other-model/inference/x.jsonl",
        f"{inference}a\\..\\..\\champion.jsonl",  # a backslash may become / in SeaweedFS
        f"{inference}a..b.jsonl",
        f"{inference}my outputs.jsonl",
        f"{inference}r%2F..%2Fx.jsonl",
        f"{inference}caf\u00e9.jsonl",
    ):
        with pytest.raises(storage.OutsideScope):
            output_key(recipe, pl.model, uri, "RUN")
    assert output_key(recipe, pl.model, f"{inference}mine.jsonl", "RUN").endswith("/mine.jsonl")
    assert output_key(recipe, pl.model, f"{inference}a/B-2_x.v1.jsonl", "RUN").endswith(
        "x.v1.jsonl"
    )
    for over in ("tracking.uri=sqlite:///elsewhere.db", "promote.min_tau=0", "profile=full"):
        with pytest.raises(PermissionError, match="may not change"):
            check_request(recipe, [over], None)
    check_request(recipe, ["infer.max_new_tokens=8"], None)  # decoding settings are the run's
    assert storage.get_bytes(pl.s3, key) == before
    assert assert_consistent(recipe)["version"] == v1


def test_a_request_sets_only_sampling_and_its_token_budget(recipe, drafts, s3_env):
    """Issue #26 case 1: a request that tries to change what is served or how (free-form vLLM
    arguments, another target, another cache directory, the engine) is refused by name before
    any work; sampling, seed and max_new_tokens overrides still run, and nothing else moved."""
    from eagle3.ops.inference import REQUEST_KEYS, check_request
    from flows.infer import infer_flow
    from flows.promote import promote_flow

    v1 = register_candidate(recipe, drafts[0], make_report(1.8, 1.3))
    assert promote_flow(recipe, version=v1)["promoted"]
    pl = place(recipe)
    before = storage.get_bytes(pl.s3, storage.pointer_key(pl.s3, pl.model))
    for over, key in (
        ('vllm.extra_args=["--host", "0.0.0.0", "--trust-remote-code"]', "vllm.extra_args"),
        ("target.path=/tmp/unverified-model", "target.path"),
        ("cache_dir=/tmp/elsewhere", "cache_dir"),
        ("infer.engine=vllm", "infer.engine"),
        ("vllm={port: 80}", "vllm"),
        ("storage.bucket=another-bucket", "storage.bucket"),
    ):
        state = infer_flow(["Hello"], config=recipe, overrides=[over], return_state=True)
        assert state.is_failed(), over
        with pytest.raises(PermissionError, match=rf"override {key}: an inference request may"):
            state.result()
        runs = task_runs(state)
        assert not runs, (over, runs)  # refused before the first task
    assert "vllm.extra_args" not in REQUEST_KEYS
    allowed = ["infer.temperature=0.7", "infer.top_p=0.9", "seed=3", "infer.max_new_tokens=3"]
    check_request(recipe, allowed, None)
    out = infer_flow(["Hello"], config=recipe, overrides=allowed)
    assert out["count"] == 1 and out["outputs"][0]["new_tokens"] <= 3
    assert out["output_uri"].startswith(f"s3://{s3_env.bucket}/")
    assert storage.get_bytes(pl.s3, storage.pointer_key(pl.s3, pl.model)) == before


def test_redaction_hides_secret_keys_urls_and_key_shaped_values():
    from eagle3.names import is_secret_key, redact, redact_mapping

    for key in ("aws_secret_access_key", "AWS_ACCESS_KEY_ID", "hf_token", "apiKey", "db.password"):
        assert is_secret_key(key), key
    for key in ("infer.max_new_tokens", "train.batch_tokens", "data.catalog.monkey.path", "seed"):
        assert not is_secret_key(key), key
    got = redact_mapping(
        {
            "storage.secret_access_key": "wJalrXUtnFEMI",
            "data.endpoint": "http://bob:pw1@h:1/v1?api_key=abc&x=1",
            "note": "sk-live1234567890abcdefgh",
            "data.sources": [{"name": "a", "token": "tk"}],
            "infer.max_new_tokens": 8,
        }
    )
    assert got == {
        "storage.secret_access_key": "***",
        "data.endpoint": "http://***@h:1/v1?api_key=***&x=1",
        "note": "***",
        "data.sources": [{"name": "a", "token": "***"}],
        "infer.max_new_tokens": 8,
    }
    assert redact("token_classification_set") == "token_classification_set"


def test_a_secret_in_the_recipe_reaches_no_manifest_and_no_mlflow_param(recipe, drafts, s3_env):
    """Issue #26 case 4: a recipe whose endpoint carries a password and an API key is trained,
    registered and promoted; the version manifest in S3 (immutable) and the run's MLflow params
    and tags hold neither, and the endpoint is still recognisable."""
    from eagle3.config import build_recipe
    from flows.common import tracker
    from flows.promote import promote_flow

    pw, key = "hunter2pw", "sk-live1234567890abcdefgh"
    r = build_recipe(
        recipe.model_dump(mode="json"),
        [f"data.endpoint=http://alice:{pw}@127.0.0.1:9/v1?api_key={key}"],
    )
    v1 = register_candidate(r, drafts[1], make_report(1.8, 1.3))
    assert promote_flow(r, version=v1)["promoted"]
    pl = place(r)
    man = storage.get_bytes(pl.s3, f"{storage.version_key(pl.s3, pl.model, v1)}/manifest.json")
    run = tracker(r).run(tracker(r).version(pl.model, v1).run_id)
    logged = json.dumps({"params": run.data.params, "tags": run.data.tags})
    for text in (man.decode(), logged):
        assert pw not in text and key not in text
        assert "http://***@127.0.0.1:9/v1?api_key=***" in text
    assert json.loads(man)["recipe"]["data.endpoint"].startswith("http://***@")


def test_a_deployment_run_cannot_swap_the_recipe(recipe, prefect_harness):
    """A run of the on-demand deployment that passes another `config` is refused."""
    from prefect import get_client
    from prefect.flow_engine import run_flow

    from flows.infer import infer_flow

    dep = infer_flow.to_deployment(
        name=f"on-demand-{uuid.uuid4().hex[:6]}", parameters={"config": "configs/tiny.yaml"}
    )
    dep_id = dep.apply()
    with get_client(sync_client=True) as c:
        fr = c.create_flow_run_from_deployment(
            dep_id, parameters={"prompts": ["hi"], "config": "configs/smollm2-135m.yaml"}
        )
    state = run_flow(infer_flow, flow_run=fr, parameters=fr.parameters, return_type="state")
    assert state.is_failed()
    with pytest.raises(PermissionError, match="this deployment serves 'configs/tiny.yaml'"):
        state.result()


def test_unsigned_writes_to_every_seaweedfs_port_are_refused(seaweed_s3, s3_env, tmp_path):
    """Every TCP port the S3 server opens (S3, master, volume, filer, admin and their gRPC
    ports): HTTP writes without a signature and weed's own clients without the stack's
    certificate are refused; nothing reads back through signed S3. The same clients with the
    stack's credentials succeed (so the refusals are the locks, not broken commands)."""
    import urllib.error
    import urllib.request

    from test_ops_stack import _listening_ports

    from eagle3.ops.procs import find_bin

    ports = sorted({p for _, p in _listening_ports(seaweed_s3.pids["s3"])})
    assert len(ports) >= 6, ports  # S3 + master, volume, filer, admin + their gRPC
    b = s3_env.bucket

    def http(method, url, data=b"intruder", headers=None):
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310 (loopback)
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return "refused"

    form = b'--x\r\nContent-Disposition: form-data; name="file"; filename="i"\r\n\r\nI\r\n--x--\r\n'
    accepted = []
    for port in ports:
        for method, path, data, hdr in (
            ("PUT", f"/{b}/intruder-{port}", b"intruder", None),
            ("PUT", f"/buckets/{b}/intruder-{port}", b"intruder", None),
            ("POST", f"/buckets/{b}/", form, {"Content-Type": "multipart/form-data; boundary=x"}),
            ("POST", "/1,01637037d6", form, {"Content-Type": "multipart/form-data; boundary=x"}),
        ):
            status = http(method, f"http://127.0.0.1:{port}{path}", data, hdr)
            if isinstance(status, int) and 200 <= status < 300:
                accepted.append((port, method, path, status))
    assert not accepted, accepted

    weed = find_bin("weed")
    base = seaweed_s3.weed_base
    intruder = tmp_path / "intruder.txt"
    intruder.write_text("intruder")
    clients = {
        "filer.copy": [
            weed,
            "filer.copy",
            str(intruder),
            f"http://127.0.0.1:{base + 2}/buckets/{b}/",
        ],
        "upload": [weed, "upload", f"-master=127.0.0.1:{base}", str(intruder)],
    }
    bare = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}  # no security.toml, no certificate
    for name, cmd in clients.items():
        r = subprocess.run(cmd, cwd=tmp_path, env=bare, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0, (name, r.stdout[-300:], r.stderr[-300:])
    keys = storage.list_keys(s3_env, "")
    assert not any("intruder" in k for k in keys), keys
    # the positive control: the stack's own certificate (its security.toml) lets them in
    r = subprocess.run(
        clients["filer.copy"],
        cwd=seaweed_s3.dir,
        env=bare,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-500:]
    assert storage.get_bytes(s3_env, "intruder.txt") == b"intruder"


# --- 4. clear errors before any work -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, key",
    [
        ("promote.tolerance=5", "promote.tolerance"),
        ("promote.tolerance=-1", "promote.tolerance"),
        ("promote.min_tau=-3", "promote.min_tau"),
        ("promote.min_speedup=-1", "promote.min_speedup"),
        ("target.tiny.hidden_size=-64", "target.tiny.hidden_size"),
        ("target.aux_layers=[0,1,99]", "target.aux_layers"),
        ("data.batch_size=0", "data.batch_size"),
    ],
)
def test_out_of_range_recipe_values_exit_2_naming_the_key(override, key):
    from eagle3.cli import main

    rc, out = run_cli(main, ["train", "--config", TINY, override])
    assert rc == 2 and key in out, out


@pytest.mark.parametrize(
    "content, reasons",
    [
        ("", "the files are empty"),
        ('{"conversations": []}\nnot json\n{"x": 1}\n', "empty conversation"),
    ],
)
def test_a_data_source_without_usable_records_exits_2(tmp_path, content, reasons):
    from eagle3.cli import main

    f = tmp_path / "convs.jsonl"
    f.write_text(content)
    rc, out = run_cli(
        main,
        [
            "data",
            "--config",
            TINY,
            f"run_dir={tmp_path / 'run'}",
            f"data.sources=[{{name: mine, path: {f}}}]",
        ],
    )
    assert rc == 2, out
    assert str(f) in out and reasons in out and "Traceback" not in out, out
    if content:
        assert "3 records, 3 bad" in out and "malformed JSON" in out, out


def test_checkpoint_sha256_generate_and_prompt_length(tiny_target, tmp_path):
    """A flipped byte in the weights: `eagle3 check` names the sha256 and `generate` refuses
    before loading anything; a prompt longer than the context is refused with a message."""
    import torch

    from eagle3.cli import main
    from eagle3.models.checkpoint import WEIGHTS_SHA256, read_config, save_draft
    from eagle3.models.draft import DraftConfig, Eagle3Draft

    torch.manual_seed(0)
    good = save_draft(Eagle3Draft(DraftConfig.from_target(tiny_target.config, 256)), tmp_path / "g")
    cfg = read_config(good)
    assert cfg["eagle3"][WEIGHTS_SHA256] == storage.sha256_file(good / "model.safetensors")
    assert run_cli(main, ["check", str(good)])[0] == 0

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((good / "config.json").read_bytes())
    data = bytearray((good / "model.safetensors").read_bytes())
    data[-100] ^= 0x01  # inside a tensor: the file still parses
    (bad / "model.safetensors").write_bytes(bytes(data))
    rc, out = run_cli(main, ["check", str(bad)])
    assert rc == 1 and "sha256" in out and WEIGHTS_SHA256 in out, out
    t0 = time.perf_counter()
    rc, out = run_cli(main, ["generate", "--config", TINY, "--draft", str(bad), "--prompt", "hi"])
    assert rc == 2 and "not a valid checkpoint" in out and "sha256" in out, out
    assert time.perf_counter() - t0 < 5  # refused before any model was built

    long = "hello " * 4600  # > 4,096 positions of the tiny target
    rc, out = run_cli(main, ["generate", "--config", TINY, "--draft", str(good), "--prompt", long])
    assert rc == 2 and "target's context is 4,096" in out and "Traceback" not in out, out


def test_a_stack_server_down_is_named_and_nothing_runs(tmp_path, monkeypatch):
    """With a stack.env whose servers are gone, or an MLflow URI that does not answer, the CLI
    names the server and stops (exit 2); it never falls back to another registry."""
    from eagle3.cli import main
    from eagle3.ops import stack as st

    d = tmp_path / "stack"
    s = st.Stack(dir=d, pids={"s3": 999999, "mlflow": 999998, "prefect": 999997})
    s.access_key, s.secret_key = "k", "s"
    s.save()
    s.write_env()
    for k in st.ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("EAGLE3_STACK_DIR", str(d))
    rc, out = run_cli(main, ["promote", "--config", TINY, "--reconcile"])
    assert rc == 2 and "s3 (pid 999999" in out and "mlflow (pid 999998" in out, out
    assert "prefect" not in out.split("down:")[1]  # promote does not need Prefect
    assert "MLFLOW_TRACKING_URI" not in os.environ  # nothing was taken from the dead stack

    monkeypatch.setenv("EAGLE3_STACK_DIR", str(tmp_path / "none"))
    dead = f"http://127.0.0.1:{st.free_port_block(1)}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    rc, out = run_cli(main, ["pipeline", "--config", TINY])
    assert rc == 2 and f"MLflow at {dead} does not answer" in out, out


# --- 5. servers die with their owner ----------------------------------------------------------------------
def _gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    from eagle3.ops.stack import pid_alive

    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if pid_alive(p)]
        time.sleep(0.2)
    return alive


def test_a_killed_pytest_leaves_no_weed_behind(tmp_path):
    hold = tmp_path / "pids.json"
    env = {**os.environ, "EAGLE3_HOLD_FILE": str(hold), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/fault_session.py"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not hold.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert hold.exists(), "the inner session never started SeaweedFS"
        pids = json.loads(hold.read_text())
        servers = [pids["keeper"], *pids["weed"]]
        assert pids["weed"], pids
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert _gone(servers) == [], f"left behind: {servers}"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_server_dies_with_its_keeper(tmp_path):
    """The keeper itself SIGKILLed (nothing can catch that): the parent-death signal stops weed."""
    from eagle3.ops.stack import start_s3, stop_s3

    st = start_s3(tmp_path / "s3")
    try:
        keeper = st.pids["s3"]
        ps = ["ps", "-o", "pid=", "--ppid", str(keeper)]
        weed = [int(p) for p in subprocess.run(ps, capture_output=True, text=True).stdout.split()]
        assert weed
        os.kill(keeper, signal.SIGKILL)
        assert _gone(weed) == [], f"left behind: {weed}"
    finally:
        stop_s3(st)


def test_a_detached_server_outlives_its_owner_until_stopped(tmp_path):
    """What a finished `stack up` does: once detached, the server outlives the process that
    started it, and stop_pid (`stack down`) still stops exactly it."""
    from eagle3.ops import stack as st

    code = (
        "import sys; from eagle3.ops.stack import start_s3, detach; "
        "s = start_s3(sys.argv[1]); detach(s.pids['s3'])"
    )
    d = tmp_path / "s3"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code, str(d)], env=env, check=True, timeout=120)
    s = st.Stack.load(d)
    members = _group_members(s.pids["s3"])
    try:
        time.sleep(1.0)
        assert s.running("s3") and s.healthy("s3")
    finally:
        assert st.stop_pid(s.pids["s3"], s.marker("s3"))
    assert _gone(members) == []


def test_a_killed_stack_up_leaves_no_server_behind(tmp_path):
    from eagle3.ops import stack as st

    state = tmp_path / "stack"
    base = st.free_port_block(3)
    cmd = [sys.executable, "-m", "eagle3.cli", "stack", "up", "--state-dir", str(state)]
    cmd += ["--prefect-port", str(base), "--mlflow-port", str(base + 1), "--s3-port", str(base + 2)]
    env = {k: v for k, v in os.environ.items() if k not in st.ENV_KEYS}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        pids: dict = {}
        while time.monotonic() < deadline and proc.poll() is None:
            if (state / "stack.json").exists():
                pids = st.Stack.load(state).pids
                if {"s3", "mlflow"} <= set(pids):
                    break
            time.sleep(0.2)
        assert {"s3", "mlflow"} <= set(pids), "stack up never got as far as MLflow"
        proc.send_signal(signal.SIGKILL)  # mid start-up: Prefect is not healthy yet
        proc.wait(30)
        pids = st.Stack.load(state).pids
        groups = [p for pid in pids.values() for p in _group_members(pid)]
        assert groups, pids
        assert _gone(groups) == [], f"left behind: {groups}"
    finally:
        if proc.poll() is None:
            proc.kill()
        st.stack_down(state, echo=lambda *_: None)


def _group_members(pgid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True).stdout
    return [int(p) for p, g in (line.split() for line in out.splitlines()) if int(g) == pgid]
