"""The local stack on loopback: a Prefect server, an MLflow server and SeaweedFS S3.

`eagle3 stack up` starts what is not running yet, waits for each to be healthy, creates the bucket
and writes `<state>/stack.env` (docs/CONTRACTS.md §1); it is idempotent. `down` stops exactly the
processes it started (pids recorded in `<state>/stack.json`, checked against their command line
so that a recycled pid is never signalled). `status` reports each component.

Each server runs under a keeper (eagle3/ops/keeper.py, started by eagle3/ops/procs.py) that kills
it when the keeper dies and stops it when its owner goes away: a test session, or a `stack up`
killed before the stack was healthy, leaves no server behind; a `stack up` that finished
detaches, and `stack down` stops the stack. How each server is run: eagle3/ops/stack_services.py.
SeaweedFS takes writes only with the S3 keys (eagle3/ops/weed_security.py).

Everything binds 127.0.0.1. State (pids, logs, data, credentials) lives under `.eagle3/stack/`.
boto3 (through eagle3/ops/storage.py) and python-dotenv are imported lazily.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path

from eagle3.ops import storage
from eagle3.ops.procs import (
    detach,
    exited,
    free_port_block,
    http_ok,
    pid_alive,
    port_free,
    spawn_kept,
    stop_pid,
    tail,
)
from eagle3.ops.stack_services import (
    COMPONENTS,
    ENV_KEYS,
    SERVES,
    WEED_SERVICES,
    Stack,
    StackError,
    command,
    environment,
    parse_env_file,
    prepare,
)

# What callers and tests use from here, besides the lifecycle below.
__all__ = [
    "COMPONENTS",
    "ENV_KEYS",
    "Stack",
    "StackError",
    "detach",
    "free_port_block",
    "parse_env_file",
    "pid_alive",
    "stop_pid",
]


def state_dir(path: str | Path | None = None) -> Path:
    from eagle3.settings import settings

    return Path(path or settings().stack_dir).resolve()


# --- starting and stopping -----------------------------------------------------------------------
def _spawn(st: Stack, name: str) -> int:
    """Start a component under a keeper owned by this process; returns the keeper's pid."""
    cmd = command(st, name)
    prepare(st, name)
    return spawn_kept(name, cmd, st.log_path(name), environment(st, name), st.dir)


def _wait_healthy(st: Stack, names: list[str], timeout: float, echo) -> None:
    deadline = time.monotonic() + timeout
    pending = list(names)
    while pending:
        for name in list(pending):
            if st.healthy(name):
                pending.remove(name)
                echo(f"  {name:8s} healthy at {st.url(name)}")
            elif exited(st.pids.get(name)):
                log = st.log_path(name)
                raise StackError(f"{name} exited during start-up; log {log}:\n{tail(log)}")
        if pending and time.monotonic() > deadline:
            raise StackError(
                f"{', '.join(pending)} not healthy after {timeout:.0f}s; see "
                + ", ".join(str(st.log_path(n)) for n in pending)
            )
        if pending:
            time.sleep(0.5)


def _quiet(*_a, **_k) -> None:
    pass


def _weed_block(extra: int) -> int:
    try:
        return free_port_block(len(WEED_SERVICES) + extra)
    except OSError as e:
        raise StackError(str(e)) from None


def _env_ports() -> dict[str, int]:
    from eagle3.settings import settings

    s = settings()
    ports = {name: getattr(s, f"{name}_port") for name in COMPONENTS}
    return {name: port for name, port in ports.items() if port}


def _ensure_bucket(st: Stack) -> None:
    try:
        storage.ensure_bucket(st.s3_settings())
    except storage.StorageError as e:
        raise StackError(f"s3: {e}") from None


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
    d, env_ports = state_dir(dir), _env_ports()  # a malformed variable stops it before any work
    d.mkdir(parents=True, exist_ok=True)
    st = Stack.load(d)
    want_ports = {**st.ports, **env_ports, **{k: int(v) for k, v in (ports or {}).items() if v}}
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
        st.weed_base = _weed_block(1)
    if not to_start:
        echo(f"stack already running (state {d})")
    started: list[str] = []
    try:
        # S3 first: MLflow's artifact destination needs the bucket.
        for name in COMPONENTS:
            if name in to_start:
                st.pids[name] = _spawn(st, name)
                started.append(name)
                st.save()
                echo(f"  {name:8s} started (pid {st.pids[name]})")
            if name == "s3":
                _wait_healthy(st, ["s3"], timeout, echo if "s3" in to_start else _quiet)
                _ensure_bucket(st)
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
    st.env_path.unlink(missing_ok=True)
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
        if k in SERVES and k not in os.environ and SERVES[k] in need
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


def stack_command(action: str, dir: Path | None = None, ports: dict[str, int] | None = None) -> int:
    from eagle3.settings import SettingsError

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
    except (StackError, SettingsError) as e:
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
        st.weed_base = _weed_block(2)
        st.ports["s3"] = port or st.weed_base + len(WEED_SERVICES) + 1
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
