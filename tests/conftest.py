"""Session-wide fixtures shared by every test module: the tiny target and its recipe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: the exactness tests compare floats that a different
    intra-op split could round differently (use: pytest.mark.usefixtures("one_thread"))."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_recipe():
    from eagle3.config import load_recipe

    return load_recipe(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_target(tiny_recipe):
    """The seeded tiny Llama with the SmolLM2 tokenizer (read-only: do not modify it)."""
    from eagle3.models.target import load_target

    return load_target(tiny_recipe.target)


# --- orchestration (issue 6): one SeaweedFS and one Prefect harness per session ----------------------
@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory):
    """A real SeaweedFS S3 on random loopback ports with fresh keys: a `Stack` (s3_url,
    access_key, secret_key). Tests create their own buckets."""
    from eagle3.ops.stack import start_s3, stop_s3

    st = start_s3(tmp_path_factory.mktemp("seaweedfs"))
    yield st
    stop_s3(st)


@pytest.fixture()
def s3_env(seaweed_s3, monkeypatch):
    """The environment pointing at the session's SeaweedFS, with a fresh bucket for this test.
    Returns an `eagle3.ops.storage.S3Settings` for that bucket."""
    import uuid

    from eagle3.ops.storage import S3Settings, ensure_bucket

    bucket = f"t-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", seaweed_s3.s3_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed_s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed_s3.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("EAGLE3_S3_BUCKET", bucket)
    s = S3Settings(bucket=bucket, prefix="eagle3", endpoint_url=seaweed_s3.s3_url)
    ensure_bucket(s)
    return s


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (a temporary server and database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_trained_head(tiny_target):
    """An EAGLE-3 head distilled in-test on the tiny target's own greedy text (a few seconds).

    It accepts long paths on the texts it saw (infer_support.random_prompts(seed=TRAIN_SEED)) and little
    elsewhere, which exercises both long acceptance and rejection.
    """
    import infer_support  # tests/ is on sys.path (rootdir conftest, no package)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is ~10x faster than two on a busy 2-core box
    try:
        return infer_support.train_tiny_head(tiny_target)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mlflow_sqlite(tmp_path_factory):
    """One MLflow sqlite store for the session (creating one costs ~10 s of migrations), with
    EAGLE3_HOME beside it and no developer stack picked up. Tests use unique model names."""
    d = tmp_path_factory.mktemp("mlflow")
    keys = ("MLFLOW_TRACKING_URI", "EAGLE3_HOME", "EAGLE3_STACK_DIR")
    old = {k: os.environ.get(k) for k in keys}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{d}/mlflow.db"
    os.environ["EAGLE3_HOME"] = str(d)
    os.environ["EAGLE3_STACK_DIR"] = str(d / "no-stack")
    yield d
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
