"""Recipes: loading, overrides, profiles, and bad input rejected with the key named (exit 2)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from eagle3.config import ConfigError, flatten, load_recipe

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_recipe_and_profile_loads(path):
    r = load_recipe(path)
    assert r.name == path.stem
    for profile in r.profiles:
        assert load_recipe(path, profile=profile).profile == profile


def test_overrides_are_typed_and_win_over_profiles():
    r = load_recipe(
        ROOT / "configs/smollm2-135m.yaml", ["train.lr=0.01", "data.limit=32"], profile="demo"
    )
    assert r.train.lr == 0.01 and r.data.limit == 32
    assert r.data.max_new_tokens == 64  # from the demo profile
    assert str(r.run_path) == "runs/smollm2-135m-demo"
    r2 = load_recipe(ROOT / "configs/tiny.yaml", ["infer.top_k=2"])
    assert r2.infer.top_k == 2
    assert flatten(r2)["infer.top_k"] == 2


def _write(tmp_path, tree) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


@pytest.mark.parametrize(
    "tree, overrides, key",
    [
        ({"target": {"kind": "tiny"}, "train": {"lrr": 1}}, [], "train.lrr: unknown key"),
        ({"target": {"kind": "tiny"}}, ["train.ttt_steps=many"], "train.ttt_steps"),
        ({"train": {"lr": 1e-4}}, [], "target: Field required"),
        ({"target": {"kind": "hf"}}, [], "target.path is required"),
        ({"target": {"kind": "tiny"}}, ["infer.nope=1"], "infer.nope: unknown key"),
        ({"target": {"kind": "tiny"}}, ["profile=fast"], "profile 'fast' not defined"),
        (
            {"target": {"kind": "tiny"}, "vllm": {"extra_args": ["--host", "0.0.0.0"]}},
            [],
            "vllm.extra_args: removed: free-form vLLM arguments are not accepted",
        ),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, tree, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        load_recipe(_write(tmp_path, tree), overrides)


def test_cli_exits_2_and_names_the_key(tmp_path):
    p = _write(tmp_path, {"target": {"kind": "tiny"}, "data": {"max_lenn": 3}})
    res = subprocess.run(
        [sys.executable, "-m", "eagle3.cli", "train", "--config", str(p)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2, res.stderr
    assert "data.max_lenn: unknown key" in res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "eagle3.cli", "data", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_help_is_fast_and_imports_nothing_heavy():
    exe = Path(sys.executable).with_name("eagle3")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "eagle3.cli"]
    t0 = time.perf_counter()
    res = subprocess.run([*cmd, "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "bench" in res.stdout
    assert time.perf_counter() - t0 < 2.0
    probe = "import sys, eagle3.cli; print(sorted(m for m in ('torch','transformers','prefect','mlflow','boto3') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True
    ).stdout.strip()
    assert out == "[]"
