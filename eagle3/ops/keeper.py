"""Keeps one stack server tied to its owner: `python -m eagle3.ops.keeper -- CMD...`.

The keeper starts CMD as its child with a parent-death signal (Linux prctl PR_SET_PDEATHSIG), so
the server dies whenever the keeper does, however it dies. The keeper itself watches its stdin, a
pipe from the owner (a test session, `eagle3 stack up`): at EOF - the owner exited or was killed -
it stops the server, unless the owner wrote `detach` first (`stack up` does once every server is
healthy, so that the stack outlives the command; `stack down` stops it). SIGTERM/SIGINT/SIGHUP to
the keeper stop the server too. Standard library only: it starts in ~50 ms.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading

GRACE_S = 10.0
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM):
    """A preexec_fn: the child gets `sig` when the process that forked it exits (Linux)."""
    parent = os.getpid()

    def arm() -> None:
        if not sys.platform.startswith("linux"):
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            os._exit(70)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(71)

    return arm


def stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("usage: python -m eagle3.ops.keeper -- CMD [ARGS...]", file=sys.stderr)
        return 2
    cmd = argv[argv.index("--") + 1 :]
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent())
    detached = threading.Event()

    def on_signal(signum, frame) -> None:
        threading.Thread(target=stop, args=(child,), daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    def watch_owner() -> None:
        for line in sys.stdin:
            if line.strip() == "detach":
                detached.set()
                return
        if not detached.is_set():  # EOF: the owner is gone without detaching
            stop(child)

    threading.Thread(target=watch_owner, daemon=True).start()
    while True:
        try:
            return child.wait()
        except InterruptedError:
            continue


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
