"""Promotion and inference flows on real components: Prefect's test harness, MLflow on a temp
sqlite, SeaweedFS on random loopback ports. Faults: S3 down during upload (a TCP fault proxy in
front of SeaweedFS), wrong credentials, a worse candidate, a corrupted object in S3.

Candidates here are registered from a §4-shaped report written in the test and a freshly
initialised draft for the tiny target (the benchmark itself is tested by its own module and by the
end-to-end pipeline test).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("EAGLE3_RETRY_DELAY", "0.05")  # before flows.common is imported

from eagle3.ops import storage  # noqa: E402

pytestmark = pytest.mark.integration


# --- helpers ------------------------------------------------------------------------------------------
def make_report(tau: float, speedup: float, lossless: bool = True) -> dict:
    sp = {"vs_ar": speedup, "vs_hf_generate": speedup, "vs_hf_prompt_lookup": speedup}
    ds = {
        "prompts": 3,
        "new_tokens": 96,
        "tau": tau,
        "alpha": [0.6, 0.4, 0.2, 0.1],
        "tokens_per_s": {
            "eagle3": 10 * speedup,
            "ar": 10.0,
            "hf_generate": 10.0,
            "hf_prompt_lookup": 10.0,
        },
        "speedup": sp,
        "lossless": lossless,
    }
    return {
        "target": "tiny-llama(seed=0)",
        "draft": "draft",
        "device": "cpu",
        "dtype": "float32",
        "threads": 2,
        "decoding": {
            "mode": "tree",
            "total_tokens": 16,
            "depth": 4,
            "top_k": 4,
            "temperature": 0.0,
        },
        "datasets": {"mt_bench": ds},
        "overall": {"tau": tau, "speedup": sp, "lossless": lossless},
    }


class FaultProxy:
    """A loopback TCP proxy in front of SeaweedFS; `policy(i)` says whether connection i passes.
    A refused connection is closed at once, so the client sees the endpoint drop (no S3 mock:
    every request that passes is served by the real server)."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.policy = lambda i: True
        self.count = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = False
        self.active: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def set_policy(self, policy) -> None:
        """New rules from the next connection on; open connections are cut (the server 'went
        down'), so pooled keep-alive connections cannot slip past the policy."""
        self.policy, self.count = policy, 0
        for s in self.active:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.active.clear()

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            i, self.count = self.count, self.count + 1
            if not self.policy(i):
                conn.close()
                continue
            up = socket.create_connection(("127.0.0.1", self.upstream))
            self.active += [conn, up]
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self._stop = True
        self.sock.close()


@pytest.fixture(scope="module")
def tiny_drafts(tmp_path_factory):
    """Three differently seeded, valid §3 checkpoints (the engine never loads them here)."""
    from test_ops_storage import make_draft

    root = tmp_path_factory.mktemp("drafts")
    return [make_draft(root / f"d{seed}", seed=seed) for seed in range(3)]


@pytest.fixture()
def recipe(tiny_recipe, tmp_path, s3_env, mlflow_sqlite, prefect_harness):
    from eagle3.config import build_recipe

    tree = tiny_recipe.model_dump(mode="json")
    model = f"eagle3-test-{uuid.uuid4().hex[:8]}"
    return build_recipe(tree, [f"run_dir={tmp_path / 'run'}", f"tracking.registered_model={model}"])


def register_candidate(recipe, draft_dir: Path, report: dict) -> str:
    """What the evaluate flow does after the benchmark: log, tag, register (alias candidate)."""
    from eagle3.ops.evaluation import version_tags
    from eagle3.ops.tracking import eval_set_signature
    from flows.common import mlflow_run
    from flows.evaluate import log_eval_task, register_task

    with mlflow_run(recipe, "evaluate") as (_t, run_id):
        metrics = log_eval_task.fn(recipe, report, run_id, run_id, str(draft_dir))
        tags = version_tags(draft_dir, report, eval_set_signature(recipe, report), "digest", [])
        return register_task.fn(recipe, run_id, metrics, tags)


def champion_alias(recipe) -> str | None:
    from eagle3.ops.tracking import registered_model_name
    from flows.common import tracker

    mv = tracker(recipe).alias_version(registered_model_name(recipe), "champion")
    return None if mv is None else str(mv.version)


def task_runs(state) -> dict[str, list]:
    """Task runs of a (failed or finished) flow run, by task name."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    fid = state.state_details.flow_run_id
    with get_client(sync_client=True) as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [fid]}))
    out: dict[str, list] = {}
    for r in runs:
        out.setdefault(r.name.rsplit("-", 1)[0], []).append(r)
    return out


# --- tests ------------------------------------------------------------------------------------------
def test_promote_gate_history_and_rollback(recipe, tiny_drafts, s3_env):
    from eagle3.ops.tracking import registered_model_name
    from flows.promote import promote_flow

    model = registered_model_name(recipe)
    v1 = register_candidate(recipe, tiny_drafts[0], make_report(1.8, 1.3))
    out = promote_flow(recipe, version=v1)
    assert out["promoted"], out["decision"]
    # S3: every object's sha256 matches the local checkpoint; pointer written; alias moved
    base = f"eagle3/{model}/v{v1}"
    man = json.loads(storage.get_bytes(s3_env, f"{base}/manifest.json"))
    assert set(man["files"]) == {"config.json", "model.safetensors"}
    for name, info in man["files"].items():
        got = storage.sha256_bytes(storage.get_bytes(s3_env, f"{base}/{name}"))
        assert got == info["sha256"] == storage.sha256_file(tiny_drafts[0] / name)
    assert man["mlflow_run_id"] and man["recipe"]["name"] == "tiny" and man["metrics"]["tau"] == 1.8
    ptr = storage.read_champion(s3_env, model)
    assert ptr["version"] == v1 and ptr["uri"] == f"s3://{s3_env.bucket}/{base}/"
    assert champion_alias(recipe) == v1

    # a worse candidate (tau 1.2 < 1.8 by more than 5 %) is registered but not promoted
    v2 = register_candidate(recipe, tiny_drafts[1], make_report(1.2, 1.3))
    out = promote_flow(recipe, version=v2)
    assert not out["promoted"]
    assert any("worse than champion" in r and "tau" in r for r in out["decision"]["reasons"])
    assert storage.read_champion(s3_env, model)["version"] == v1 and champion_alias(recipe) == v1
    assert not storage.list_keys(s3_env, f"eagle3/{model}/v{v2}/")

    # a not-lossless candidate is rejected with that reason
    v3 = register_candidate(recipe, tiny_drafts[1], make_report(2.5, 1.5, lossless=False))
    out = promote_flow(recipe, version=v3)
    assert not out["promoted"] and any("not lossless" in r for r in out["decision"]["reasons"])

    # a better one is promoted; the pointer keeps the history; rollback restores v1 in both places
    v4 = register_candidate(recipe, tiny_drafts[2], make_report(2.0, 1.4))
    assert promote_flow(recipe, version=v4)["promoted"]
    ptr = storage.read_champion(s3_env, model)
    assert ptr["version"] == v4 and [h["version"] for h in ptr["history"]] == [v1]
    assert champion_alias(recipe) == v4
    # `eagle3 promote --rollback` (the CLI) points both back to the previous champion
    from eagle3.cli import main

    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    assert (
        main(["promote", "--config", cfg, f"tracking.registered_model={model}", "--rollback"]) == 0
    )
    assert storage.read_champion(s3_env, model)["version"] == v1 and champion_alias(recipe) == v1
    # nothing older is left to roll back to: a clear failure, and v1 stays
    state = promote_flow(recipe, rollback=True, return_state=True)
    assert state.is_failed()
    with pytest.raises(storage.StorageError, match="no previous champion"):
        state.result()
    assert storage.read_champion(s3_env, model)["version"] == v1 and champion_alias(recipe) == v1


def test_s3_down_during_upload_is_retried_and_old_champion_survives(
    recipe, tiny_drafts, s3_env, seaweed_s3, monkeypatch
):
    from eagle3.config import build_recipe
    from eagle3.ops.tracking import registered_model_name
    from flows.promote import promote_flow

    model = registered_model_name(recipe)
    v1 = register_candidate(recipe, tiny_drafts[0], make_report(1.8, 1.3))
    assert promote_flow(recipe, version=v1)["promoted"]
    v2 = register_candidate(recipe, tiny_drafts[1], make_report(2.0, 1.4))

    proxy = FaultProxy(seaweed_s3.ports["s3"])
    try:
        via = build_recipe(recipe.model_dump(mode="json"), [f"storage.endpoint_url={proxy.url}"])
        # S3 goes down after the first object of v2 and stays down: every retry fails, nothing
        # moves, and the flow says FAILED
        monkeypatch.setitem(
            storage.FAULTS, "after_version_object", lambda **_: proxy.set_policy(lambda i: False)
        )
        state = promote_flow(via, version=v2, return_state=True)
        assert state.is_failed()
        with pytest.raises(storage.S3Unavailable, match=proxy.url.replace(".", r"\.")):
            state.result()
        (upload,) = task_runs(state)["upload-to-s3"]
        assert upload.run_count == 4  # 1 + 3 retries
        assert "commit-champion-pointer" not in task_runs(state)
        assert storage.read_champion(s3_env, model)["version"] == v1
        assert champion_alias(recipe) == v1
        assert storage.read_manifest(s3_env, model, v2) is None  # an unfinished upload

        # S3 drops after the first object, and is back when the task is retried: the retry
        # completes the unfinished upload and the promotion
        attempts = []
        monkeypatch.setitem(
            storage.FAULTS,
            "before_version_upload",
            lambda **_: attempts.append(1) or proxy.set_policy(lambda i: True),
        )
        monkeypatch.setitem(
            storage.FAULTS,
            "after_version_object",
            lambda **_: len(attempts) == 1 and proxy.set_policy(lambda i: False),
        )
        proxy.set_policy(lambda i: True)
        state = promote_flow(via, version=v2, return_state=True)
        assert state.is_completed(), state
        (upload,) = task_runs(state)["upload-to-s3"]
        assert upload.run_count == 2
        assert storage.read_champion(s3_env, model)["version"] == v2
        assert champion_alias(recipe) == v2
        storage.verify_version(s3_env, model, v2)
    finally:
        proxy.close()


def test_wrong_credentials_fail_fast_naming_the_endpoint(recipe, tiny_drafts, s3_env, monkeypatch):
    from flows.promote import promote_flow

    v1 = register_candidate(recipe, tiny_drafts[0], make_report(1.8, 1.3))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    state = promote_flow(recipe, version=v1, return_state=True)
    assert state.is_failed()
    with pytest.raises(storage.S3AuthError) as e:
        state.result()
    assert s3_env.endpoint_url in str(e.value) and "wrong-secret-value" not in str(e.value)
    runs = task_runs(state)
    (first,) = runs["fetch-draft"]  # the first stage that reaches S3
    assert first.run_count == 1  # bad keys are not retried
    assert "upload-to-s3" not in runs
    assert champion_alias(recipe) is None


def test_without_s3_the_gate_runs_but_nothing_moves(recipe, tiny_drafts, monkeypatch):
    from flows.promote import promote_flow

    v1 = register_candidate(recipe, tiny_drafts[0], make_report(1.8, 1.3))
    monkeypatch.delenv("EAGLE3_S3_BUCKET")
    out = promote_flow(recipe, version=v1)
    assert not out["promoted"] and out["decision"]["promote"]
    assert "no S3 bucket configured" in out["skipped"]
    assert champion_alias(recipe) is None


def test_inference_detects_a_corrupted_champion_before_loading(recipe, tiny_drafts, s3_env):
    from eagle3.ops.tracking import registered_model_name
    from flows.infer import infer_flow
    from flows.promote import promote_flow

    model = registered_model_name(recipe)
    v1 = register_candidate(recipe, tiny_drafts[0], make_report(1.8, 1.3))
    assert promote_flow(recipe, version=v1)["promoted"]

    # corrupt the champion's weights in S3: detected before anything is loaded
    key = f"eagle3/{model}/v{v1}/model.safetensors"
    data = bytearray(storage.get_bytes(s3_env, key))
    data[len(data) // 2] ^= 0x55
    storage.put_bytes(s3_env, key, bytes(data))
    state = infer_flow(["Hello"], config=recipe, max_new_tokens=4, return_state=True)
    assert state.is_failed()
    with pytest.raises(storage.IntegrityError, match="model.safetensors"):
        state.result()
    runs = task_runs(state)
    assert runs["fetch-champion"][0].run_count == 1  # corruption is not retried
    assert "generate" not in runs  # the engine never ran


def test_serve_fetches_the_champion_verified(recipe, tiny_drafts, s3_env, tmp_path, monkeypatch):
    """`eagle3 serve --draft champion` fetches what champion.json names, every file verified,
    through eagle3.ops alone (no Prefect); a corrupted copy in S3 is refused."""
    from eagle3.cli import _fetch_champion
    from eagle3.ops.champion_fetch import fetch_champion, resolve_champion
    from flows.promote import promote_flow

    v1 = register_candidate(recipe, tiny_drafts[0], make_report(1.8, 1.3))
    assert promote_flow(recipe, version=v1)["promoted"]
    monkeypatch.setenv("EAGLE3_VLLM_DIR", str(tmp_path / "vllm"))
    path, version = _fetch_champion(recipe)
    got = Path(path)
    assert got.parent == tmp_path / "vllm" and got.name.endswith(f"-v{v1}")
    assert version == str(v1)  # what `serve --record` writes as each record's champion_version
    for f in ("config.json", "model.safetensors"):
        assert (got / f).read_bytes() == (tiny_drafts[0] / f).read_bytes()

    champ = resolve_champion(recipe)
    assert (champ["source"], champ["version"]) == ("s3", v1)
    key = f"eagle3/{champ['model']}/v{v1}/model.safetensors"
    data = bytearray(storage.get_bytes(s3_env, key))
    data[len(data) // 2] ^= 0x55
    storage.put_bytes(s3_env, key, bytes(data))
    with pytest.raises(storage.IntegrityError, match="model.safetensors"):
        fetch_champion(recipe, champ, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_prompts_from_a_list_or_s3_jsonl(tiny_recipe, s3_env):
    from eagle3.ops.inference import output_key
    from flows.infer import load_prompts_task

    assert load_prompts_task.fn(tiny_recipe, ["a", {"prompt": "b"}]) == ["a", "b"]
    uri = f"s3://{s3_env.bucket}/in/p.jsonl"
    storage.write_jsonl_uri(uri, ["x", {"prompt": "y", "id": 3}], s3_env)
    assert load_prompts_task.fn(tiny_recipe, uri) == ["x", "y"]
    # outputs go under <prefix>/<model>/inference/, whatever the prompts' location
    assert output_key(tiny_recipe, "m", None, "RUN") == "eagle3/m/inference/RUN.jsonl"
    ok = f"s3://{s3_env.bucket}/eagle3/m/inference/mine.jsonl"
    assert output_key(tiny_recipe, "m", ok, "RUN") == "eagle3/m/inference/mine.jsonl"
    with pytest.raises(ValueError, match="prompt 1"):
        load_prompts_task.fn(tiny_recipe, ["ok", {"text": "no prompt key"}])
    with pytest.raises(ValueError, match="s3:// URI"):
        load_prompts_task.fn(tiny_recipe, "/local/file.jsonl")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts_task.fn(tiny_recipe, [])
