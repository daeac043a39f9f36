"""`eagle3 stack up|status|down` for real: Prefect, MLflow and SeaweedFS on random loopback ports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from eagle3.ops import stack as st
from eagle3.ops import storage

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def _listening_ports(pgid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket that a process group listens on."""
    found = []
    for pid in _group(pgid):
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        found += [c.laddr[:2] for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def _group(pgid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True).stdout
    return [int(p) for p, g in (line.split() for line in out.splitlines()) if int(g) == pgid]


def test_stack_up_status_down(tmp_path, monkeypatch):
    base = st.free_port_block(3)
    ports = {"prefect": base, "mlflow": base + 1, "s3": base + 2}
    for k in st.ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    state = tmp_path / "stack"
    lines: list[str] = []
    # detach_servers=False: the servers stop with this test session if it is killed
    s = st.stack_up(state, ports=ports, echo=lines.append, detach_servers=False)
    try:
        # healthy, on the ports asked for, loopback only
        rows = {r["component"]: r for r in st.stack_status(state)}
        assert all(r["healthy"] for r in rows.values()), rows
        for name in st.COMPONENTS:
            listen = _listening_ports(s.pids[name])
            assert ("127.0.0.1", ports[name]) in listen, (name, listen)
            assert all(a in ("127.0.0.1", "::1") for a, _ in listen), (name, listen)
        # stack.env holds the contract's keys, private to the user
        env = st.parse_env_file(state / "stack.env")
        assert set(env) == set(st.ENV_KEYS)
        assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{ports['prefect']}/api"
        assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow']}"
        assert env["AWS_ENDPOINT_URL_S3"] == f"http://127.0.0.1:{ports['s3']}"
        assert oct((state / "stack.env").stat().st_mode & 0o777) == "0o600"
        # the bucket (MLflow's artifact destination) exists and takes the generated keys
        s3 = storage.client(s.s3_settings())
        s3.head_bucket(Bucket=env["EAGLE3_S3_BUCKET"])

        # idempotent: a second `up` reuses the same processes
        again = st.stack_up(state, ports=ports, echo=lines.append, detach_servers=False)
        assert again.pids == s.pids
        assert any("already running" in x for x in lines)

        # commands read stack.env as defaults; an explicit environment wins
        monkeypatch.setenv("EAGLE3_S3_BUCKET", "mine")
        applied = st.load_stack_env(state)
        assert os.environ["EAGLE3_S3_BUCKET"] == "mine" and "EAGLE3_S3_BUCKET" not in applied
        assert os.environ["MLFLOW_TRACKING_URI"] == env["MLFLOW_TRACKING_URI"]

        # MLflow proxies artifacts into the bucket, but only under mlflow-artifacts/: a path that
        # climbs out of it (towards the champion pointer's prefix) is refused
        assert not _mlflow_artifact_put(s.mlflow_url, "../eagle3/intruder.txt")
        assert not _mlflow_artifact_put(s.mlflow_url, "%2E%2E/eagle3/intruder.txt")
        keys = [
            o["Key"] for o in s3.list_objects_v2(Bucket=env["EAGLE3_S3_BUCKET"]).get("Contents", [])
        ]
        assert not any(k.startswith("eagle3/") for k in keys), keys

        # the CLI reports the same (exit 0 when all are healthy)
        cli = subprocess.run(
            [sys.executable, "-m", "eagle3.cli", "stack", "status", "--state-dir", str(state)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.count("healthy") == 3
    finally:
        st.stack_down(state, echo=lines.append)
    # exactly the processes it started are gone, and status says so
    for name, pid in s.pids.items():
        assert not st.pid_alive(pid), name
        assert not _group(pid), f"{name}: children of group {pid} survive"
    rows = st.stack_status(state)
    assert not any(r["running"] for r in rows)
    assert not (state / "stack.env").exists()
    assert st.load_stack_env(state) == {}


def test_stack_refuses_a_taken_port(tmp_path):
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        taken = blocker.getsockname()[1]
        with pytest.raises(st.StackError, match=f"port {taken} for prefect is taken"):
            free = st.free_port_block(2)
            st.stack_up(tmp_path / "s", ports={"prefect": taken, "mlflow": free, "s3": free + 1})


def test_a_stack_env_whose_servers_are_gone_is_refused(tmp_path, monkeypatch):
    """A stack that was not brought down (a reboot, a crash) is not silently replaced by another
    Prefect server, registry or bucket: the servers that are gone are named."""
    d = tmp_path / "stale"
    s = st.Stack(dir=d, pids={"s3": 999999, "mlflow": 999998, "prefect": 999997})
    s.access_key, s.secret_key = "k", "s"
    s.save()
    s.write_env()
    for k in st.ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(st.StackError, match="s3 .*mlflow .*prefect .*eagle3 stack up"):
        st.load_stack_env(d)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    # what the environment sets explicitly does not need the stack
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    with pytest.raises(st.StackError) as e:
        st.load_stack_env(d, need=("mlflow", "prefect"))
    assert "mlflow" not in str(e.value) and "prefect" in str(e.value)
    assert st.load_stack_env(d, need=("mlflow",)) == {}
    # after `stack down` there is no stack.env: nothing to use, nothing refused
    st.stack_down(d, echo=lambda *_: None)
    assert st.load_stack_env(d) == {}


def _mlflow_artifact_put(mlflow_url: str, path: str) -> bool:
    """True if MLflow's artifact proxy accepted an unsigned PUT of `path`."""
    import urllib.error
    import urllib.request

    url = f"{mlflow_url}/api/2.0/mlflow-artifacts/artifacts/{path}"
    req = urllib.request.Request(url, data=b"intruder", method="PUT")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 (loopback)
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError):
        return False
