"""Servers as processes: ports, liveness, starting one under a keeper, stopping its whole tree.

A server we start leads its own process group (its keeper, eagle3/ops/keeper.py, with the server
as its child). Liveness and stopping go through psutil; a pid is only trusted together with a
marker its command line contains, so a recycled pid is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

KEEPER = Path(__file__).with_name("keeper.py")
# Owner ends of the keepers' pipes, by keeper pid: closing one (or this process dying) stops
# that server unless it was detached.
_OWNED: dict[int, object] = {}


# --- ports and health -------------------------------------------------------------------------------
def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether we could bind the port now (a bind is the one check that sees every holder,
    listening or not, without privileges)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_block(count: int, lo: int = 20000, hi: int = 45000) -> int:
    """A base port b such that b .. b+count-1 and b+10000 .. b+10000+count-1 are free."""
    import random

    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(lo, hi - count)
        ports = [base + i for i in range(count)] + [base + 10000 + i for i in range(count)]
        if all(port_free(p) for p in ports):
            return base
    raise OSError("no block of free loopback ports found")


def loopback_url(port: int) -> str:
    """Every server we start listens on 127.0.0.1 only."""
    return f"http://127.0.0.1:{port}"


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


# --- liveness ---------------------------------------------------------------------------------------
def pid_alive(pid: int | None, must_contain: str | None = None) -> bool:
    """True if pid runs (a zombie does not) and, when given, its command line contains
    `must_contain`. A process we may not inspect is not ours: False."""
    if not pid:
        return False
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return not must_contain or must_contain in " ".join(p.cmdline())
    except psutil.Error:  # NoSuchProcess, ZombieProcess, AccessDenied
        return False


def _reap(pid: int) -> None:
    """Collect the exit status of our own dead child (tests start servers in-process)."""
    with contextlib.suppress(psutil.Error, ChildProcessError):
        psutil.Process(pid).wait(timeout=0)


def _group(pgid: int) -> list[psutil.Process]:
    """Every process whose process group is `pgid`, even those re-parented to init."""
    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(p.pid) == pgid:
                out.append(p)
    return out


def _family(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        family = {root, *root.children(recursive=True)}
    except psutil.Error:
        family = set()
    return list(family | set(_group(pid)))


def _signal_all(procs: list[psutil.Process], kill: bool) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill() if kill else p.terminate()


def _running(p: psutil.Process) -> bool:
    """A zombie has ended (reaped here if it is our child): an init that does not reap (some
    containers) must not make a stop wait out its grace."""
    try:
        if not p.is_running():  # gone, or its pid reused by another process
            return False
        if p.status() != psutil.STATUS_ZOMBIE:
            return True
    except psutil.Error:
        return False
    _reap(p.pid)
    return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of `procs` still running after at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in procs if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def stop_pid(pid: int, marker: str | None, grace: float = 15.0) -> bool:
    """Stop a server we started: SIGTERM to the leader `pid`, its descendants and its process
    group, SIGKILL to whatever is left after `grace` seconds. False if it was not running."""
    _release(pid)
    if not pid_alive(pid, marker):
        _reap(pid)
        return False
    family = _family(pid)
    _signal_all(family, kill=False)
    alive = _wait_gone(family, grace)
    _signal_all(alive, kill=True)
    _wait_gone(alive, 5)
    # Children that a dying server forked meanwhile (uvicorn workers) are still in its group.
    late = [p for p in _group(pid) if _running(p)]
    _signal_all(late, kill=True)
    _wait_gone(late, 5)
    return True


def exited(pid: int | None) -> bool:
    """Whether a process we just started has ended (its command line may not show yet)."""
    return not pid_alive(pid)


# --- starting under a keeper --------------------------------------------------------------------------
def find_bin(name: str) -> str | None:
    """An executable of this venv, else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def spawn_kept(name: str, cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> int:
    """Start server `name` (`cmd`) under a keeper owned by this process, output appended to
    `log`; returns the keeper's pid, which leads the server's process group."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            [sys.executable, str(KEEPER), "--", *cmd],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE,
            env=env,
            cwd=str(cwd),
            start_new_session=True,  # its own process group: stopping it stops exactly this group
        )
    _OWNED[proc.pid] = proc.stdin
    return proc.pid


def detach(pid: int) -> None:
    """Let a server we started outlive this process (`stack up` once the stack is healthy)."""
    pipe = _OWNED.pop(pid, None)
    if pipe is not None:
        with contextlib.suppress(OSError):
            pipe.write(b"detach\n")
            pipe.close()


def _release(pid: int) -> None:
    pipe = _OWNED.pop(pid, None)
    if pipe is not None:
        with contextlib.suppress(OSError):
            pipe.close()


# --- files ------------------------------------------------------------------------------------------
def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600 (the file may hold S3 keys)."""
    from eagle3.io import write_atomic

    write_atomic(path, text, mode=0o600)
