"""A test session that holds the session's SeaweedFS until it is killed (test_faults.py runs this
file in a pytest subprocess, SIGKILLs it, and checks that no `weed` is left behind). Not
collected by the suite (no test_ prefix); it only runs when named and EAGLE3_HOLD_FILE is set."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path


def test_hold_seaweedfs_until_killed(seaweed_s3):
    out = Path(os.environ["EAGLE3_HOLD_FILE"])
    keeper = seaweed_s3.pids["s3"]
    ps = ["ps", "-o", "pid=", "--ppid", str(keeper)]
    children = subprocess.run(ps, capture_output=True, text=True).stdout.split()
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keeper": keeper, "weed": [int(c) for c in children]}))
    tmp.replace(out)
    time.sleep(300)
