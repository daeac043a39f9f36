"""`eagle3 pipeline` hands over to the orchestration layer's own entry, `python -m flows`, in a
child process (eagle3/ never imports flows/): the arguments travel unchanged, the child's exit
status comes back, and the child checks its input as the CLI does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")

pytestmark = pytest.mark.unit


def test_pipeline_runs_python_m_flows_with_the_same_arguments(monkeypatch, tmp_path):
    from eagle3 import cli

    for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "EAGLE3_S3_BUCKET"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("EAGLE3_STACK_DIR", str(tmp_path / "no-stack"))
    seen = []
    monkeypatch.setattr(cli, "run_child", lambda argv: seen.append(argv) or 7)
    rc = cli.main(["pipeline", "--config", TINY, "--profile", "vllm", "train.lr=0.01"])
    assert rc == 7
    assert seen == [
        [sys.executable, "-m", "flows", "--config", TINY, "--profile", "vllm", "train.lr=0.01"]
    ]


def test_bad_input_stops_before_the_child(monkeypatch):
    from eagle3 import cli

    monkeypatch.setattr(cli, "run_child", lambda argv: pytest.fail(f"child started: {argv}"))
    assert cli.main(["pipeline", "--config", TINY, "nosuchsection.x=1"]) == 2


def test_run_child_returns_the_child_status():
    from eagle3.cli import run_child

    assert run_child([sys.executable, "-c", "import sys; sys.exit(3)"]) == 3
    assert run_child([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"]) == 128 + 9


def test_python_m_flows_refuses_bad_input_with_exit_2():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "flows", "--config", TINY, "--profile", "nosuchprofile"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert "eagle3 pipeline:" in res.stderr and "nosuchprofile" in res.stderr
