"""Process supervision (eagle3/ops/procs.py) and the stack.env file, without any server:
liveness by pid and marker, zombies, stopping a whole process tree, the env file's format."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from eagle3.ops import procs
from eagle3.ops.stack import ENV_KEYS, Stack, parse_env_file

pytestmark = pytest.mark.unit


def _group_pids(pgid: int) -> list[int]:
    """The naive reference: `ps` lists every process of the group, whoever its parent is."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True).stdout
    return [int(p) for p, g in (line.split() for line in out.splitlines()) if int(g) == pgid]


def _orphans(members: list[int], leader: int) -> list[int]:
    """Members of the group besides its leader whose parent is outside it (re-parented to init
    or a subreaper)."""
    out = []
    for pid in members:
        try:
            if pid != leader and psutil.Process(pid).ppid() not in members:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def _settled(members: list[int], leader: int) -> bool:
    """The leader, its background sleep and the orphaned one; the subshell gone (not a zombie)."""
    try:
        zombies = [p for p in members if psutil.Process(p).status() == psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return False
    return len(members) == 3 and not zombies and len(_orphans(members, leader)) == 1


def test_pid_alive_checks_the_marker_and_sees_through_zombies():
    assert procs.pid_alive(os.getpid())
    assert not procs.pid_alive(None) and not procs.pid_alive(0)
    code = "import time; print('ready', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code, "marker-42"], stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"ready\n"  # exec'd: its own command line shows
    try:
        assert procs.pid_alive(child.pid, "marker-42")
        assert not procs.pid_alive(child.pid, "marker-43")  # a recycled pid is not ours
    finally:
        child.kill()
    deadline = time.monotonic() + 10
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # killed, not reaped yet: kill(pid, 0) still succeeds, but it is not alive
    assert not procs.pid_alive(child.pid)
    assert procs.exited(child.pid)
    child.wait()
    child.stdout.close()


def test_stop_pid_stops_the_tree_and_the_orphans_of_its_group():
    # A leader with a child, and a grandchild whose parent exited (re-parented, same group):
    # the shape of a server whose workers outlive the process that forked them.
    script = "(sleep 300 &) ; sleep 300 & wait"
    leader = subprocess.Popen(["bash", "-c", script, "tree-marker"], start_new_session=True)
    deadline = time.monotonic() + 10
    while not _settled(members := _group_pids(leader.pid), leader.pid):
        assert time.monotonic() < deadline, members  # the test really has a re-parented member
        time.sleep(0.05)

    assert not procs.stop_pid(leader.pid, "not-this-one")  # wrong marker: nothing signalled
    assert sorted(_group_pids(leader.pid)) == sorted(members)

    assert procs.stop_pid(leader.pid, "tree-marker", grace=5)
    deadline = time.monotonic() + 10
    while _group_pids(leader.pid):
        assert time.monotonic() < deadline, _group_pids(leader.pid)
        time.sleep(0.05)
    assert not psutil.pid_exists(leader.pid)  # reaped: no zombie left behind
    assert not procs.stop_pid(leader.pid, "tree-marker")  # a second stop finds nothing


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace():
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(300)"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, "stubborn"], start_new_session=True, stdout=subprocess.PIPE
    )
    assert p.stdout.readline() == b"ready\n"  # SIGTERM is ignored from here on
    t0 = time.monotonic()
    assert procs.stop_pid(p.pid, "stubborn", grace=1)
    assert 1 <= time.monotonic() - t0 < 8
    assert not psutil.pid_exists(p.pid)
    p.stdout.close()


def test_port_free_and_a_block_of_free_ports():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert not procs.port_free(s.getsockname()[1])
    base = procs.free_port_block(3)
    assert all(procs.port_free(p) for p in (base, base + 2, base + 10000, base + 10002))


def test_stack_env_format_is_plain_key_value_lines_and_private(tmp_path):
    st = Stack(dir=tmp_path, access_key="eagle3abc", secret_key="s3cr-et_X")
    st.ports = {"prefect": 4201, "mlflow": 5001, "s3": 8334}
    path = st.write_env()
    lines = path.read_text().splitlines()
    # the contract (docs/CONTRACTS.md §1): a comment line, then KEY=value a shell can source
    assert lines[0].startswith("# ")
    assert lines[1:] == [f"{k}={v}" for k, v in st.env().items()]
    assert [line.split("=")[0] for line in lines[1:]] == list(ENV_KEYS)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert parse_env_file(path) == st.env()
    out = subprocess.run(
        ["bash", "-c", f"set -a; . {path}; echo $AWS_SECRET_ACCESS_KEY $PREFECT_API_URL"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert out == ["s3cr-et_X", "http://127.0.0.1:4201/api"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack.env"]  # no temp file left


def test_a_hand_edited_env_file_still_reads(tmp_path):
    path = tmp_path / "stack.env"
    path.write_text("# c\nexport A=1\nB='two words'\nC=\"x#y\"  # note\n\nD=\n")
    assert parse_env_file(path) == {"A": "1", "B": "two words", "C": "x#y", "D": ""}


def test_the_keys_stay_out_of_the_repr(tmp_path):
    st = Stack(dir=tmp_path, access_key="AKIDSECRET", secret_key="VERYSECRET")
    assert "SECRET" not in repr(st) and "SECRET" not in repr(st.s3_settings())
