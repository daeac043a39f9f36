"""S3 storage against a real SeaweedFS: verified, immutable, resumable uploads, conditional writes,
corrupted objects, wrong credentials and an unreachable endpoint (the champion pointer and
promotions: test_flows.py and test_faults.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from eagle3.ops import storage

pytestmark = pytest.mark.integration


def make_draft(path, seed: int = 0):
    """A freshly initialised draft for a small Llama-shaped target, saved as a §3 checkpoint."""
    import torch

    from eagle3.models.checkpoint import save_draft
    from eagle3.models.draft import DraftConfig, Eagle3Draft

    tc = SimpleNamespace(
        hidden_size=64,
        intermediate_size=192,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=8,
        vocab_size=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    return save_draft(Eagle3Draft(DraftConfig.from_target(tc, 256)), path)


@pytest.fixture()
def draft_dir(tmp_path):
    return make_draft(tmp_path / "draft")


ME = {"registry_id": "reg-A", "mlflow_run_id": "run-1"}


def test_upload_verify_and_immutable_versions(s3_env, draft_dir, tmp_path):
    s = s3_env
    up = storage.upload_version(s, "eagle3-m", "1", draft_dir, {**ME, "metrics": {"tau": 1.5}})
    assert up["uri"] == f"s3://{s.bucket}/eagle3/eagle3-m/v1/"
    keys = set(storage.list_keys(s, "eagle3/eagle3-m/v1/"))
    assert keys == {
        f"eagle3/eagle3-m/v1/{n}" for n in ("config.json", "model.safetensors", "manifest.json")
    }
    # every object's bytes hash to the manifest's sha256, which equals the local file's
    man = json.loads(storage.get_bytes(s, "eagle3/eagle3-m/v1/manifest.json"))
    for name, info in man["files"].items():
        data = storage.get_bytes(s, f"eagle3/eagle3-m/v1/{name}")
        assert storage.sha256_bytes(data) == info["sha256"] == storage.sha256_file(draft_dir / name)
    assert man["metrics"] == {"tau": 1.5} and man["version"] == "1"
    assert man["registry_id"] == "reg-A" and man["mlflow_run_id"] == "run-1"

    # the same upload again (a retried task) adopts what is there, byte for byte
    again = storage.upload_version(s, "eagle3-m", "1", draft_dir, {**ME, "metrics": {"tau": 9}})
    assert again["manifest_sha256"] == up["manifest_sha256"]
    # other content, or the same content from another registry or run: refused, nothing changes
    other = make_draft(tmp_path / "other", seed=1)
    with pytest.raises(storage.VersionConflict, match="model.safetensors"):
        storage.upload_version(s, "eagle3-m", "1", other, ME)
    for k, v in (("registry_id", "reg-B"), ("mlflow_run_id", "run-9")):
        with pytest.raises(storage.VersionConflict, match=k):
            storage.upload_version(s, "eagle3-m", "1", draft_dir, {**ME, k: v})
    assert (
        storage.verify_version(s, "eagle3-m", "1", up["manifest_sha256"])["registry_id"] == "reg-A"
    )


def test_an_unfinished_upload_is_completed_by_the_retry(s3_env, draft_dir, tmp_path):
    """An upload cut after its first object leaves no manifest: the version is not committed,
    readers never see it, and the retry writes it whole."""
    s = s3_env
    stale = make_draft(tmp_path / "stale", seed=3)
    storage.put_bytes(s, "eagle3/m/v2/config.json", (stale / "config.json").read_bytes())
    storage.put_bytes(s, "eagle3/m/v2/model.safetensors", b"half of a file")
    assert storage.read_manifest(s, "m", "2") is None
    with pytest.raises(storage.IntegrityError, match="never committed"):
        storage.verify_version(s, "m", "2")
    up = storage.upload_version(s, "m", "2", draft_dir, ME)
    man = storage.verify_version(s, "m", "2", up["manifest_sha256"])
    assert man["files"]["model.safetensors"]["sha256"] == storage.sha256_file(
        draft_dir / "model.safetensors"
    )


def test_conditional_writes_are_honoured(s3_env):
    """What the champion pointer relies on, checked on SeaweedFS 4.48: If-None-Match creates
    once, If-Match on a stale ETag is refused, and of writers racing on one ETag one wins."""
    import threading

    s = s3_env
    tag = storage.put_bytes(s, "cas/k", b"one", if_none_match=True)
    with pytest.raises(storage.PreconditionFailed):
        storage.put_bytes(s, "cas/k", b"two", if_none_match=True)
    new = storage.put_bytes(s, "cas/k", b"three", if_match=tag)
    with pytest.raises(storage.PreconditionFailed):
        storage.put_bytes(s, "cas/k", b"four", if_match=tag)  # stale
    with pytest.raises(storage.PreconditionFailed):
        storage.delete_key(s, "cas/k", if_match=tag)
    assert storage.get_object(s, "cas/k") == (b"three", new)
    for rnd in range(5):
        base = storage.put_bytes(s, "cas/race", f"base{rnd}".encode())
        wins, start = [], threading.Barrier(6)

        def write(i, base=base, wins=wins, start=start):
            start.wait()
            try:
                storage.put_bytes(s, "cas/race", f"w{i}".encode(), if_match=base)
                wins.append(i)
            except storage.PreconditionFailed:
                pass

        threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1, wins
        assert storage.get_bytes(s, "cas/race") == f"w{wins[0]}".encode()


def test_download_verifies_and_detects_corruption(s3_env, draft_dir, tmp_path):
    s = s3_env
    up = storage.upload_version(s, "m", "3", draft_dir, ME)
    out = storage.download_version(s, "m", "3", tmp_path / "dl", up["manifest_sha256"])
    assert (out / "model.safetensors").read_bytes() == (
        draft_dir / "model.safetensors"
    ).read_bytes()
    storage.verify_local(out)

    # flip bytes in the stored weights: the download must refuse, and leave nothing behind
    key = "eagle3/m/v3/model.safetensors"
    data = bytearray(storage.get_bytes(s, key))
    data[-10] ^= 0xFF
    storage.put_bytes(s, key, bytes(data))
    with pytest.raises(storage.IntegrityError, match="model.safetensors"):
        storage.download_version(s, "m", "3", tmp_path / "dl2", up["manifest_sha256"])
    assert not (tmp_path / "dl2").exists()
    assert not list(tmp_path.glob(".dl2.tmp-*"))
    with pytest.raises(storage.IntegrityError):
        storage.verify_version(s, "m", "3")
    # a manifest that does not match the pointer's sha256 is refused too
    with pytest.raises(storage.IntegrityError, match="manifest.json"):
        storage.download_version(s, "m", "3", tmp_path / "dl3", "0" * 64)


def test_wrong_credentials_name_the_endpoint_not_the_keys(seaweed_s3, s3_env):
    bad = storage.S3Settings(
        bucket=s3_env.bucket,
        endpoint_url=seaweed_s3.s3_url,
        access_key=seaweed_s3.access_key,
        secret_key="definitely-not-the-secret",
    )
    with pytest.raises(storage.S3AuthError) as e:
        storage.check_access(bad)
    msg = str(e.value)
    assert seaweed_s3.s3_url in msg and "credentials" in msg
    assert "definitely-not-the-secret" not in msg and seaweed_s3.secret_key not in msg
    assert "definitely-not-the-secret" not in repr(bad)


def test_unreachable_endpoint_is_retryable_error():
    from eagle3.ops.stack import free_port_block

    dead = f"http://127.0.0.1:{free_port_block(1)}"
    s = storage.S3Settings(bucket="b", endpoint_url=dead, access_key="a", secret_key="b")
    with pytest.raises(storage.S3Unavailable, match=dead.replace(".", r"\.")):
        storage.put_bytes(s, "k", b"x")


def test_settings_need_a_bucket(monkeypatch):
    from eagle3.config import StorageConfig

    monkeypatch.delenv("EAGLE3_S3_BUCKET", raising=False)
    with pytest.raises(storage.StorageError, match="storage.bucket"):
        storage.settings_from_recipe(StorageConfig())
    monkeypatch.setenv("EAGLE3_S3_BUCKET", "bkt")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    s = storage.settings_from_recipe(StorageConfig(prefix="p"))
    assert (s.bucket, s.endpoint_url, s.uri("m", "v1")) == (
        "bkt",
        "http://127.0.0.1:1",
        "s3://bkt/p/m/v1",
    )
    with pytest.raises(storage.StorageError, match="not an s3://"):
        storage.parse_s3_uri("http://x/y")
