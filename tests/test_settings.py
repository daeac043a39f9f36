"""The EAGLE3_* variables (eagle3/settings.py): read on access, typed, documented, named on error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from eagle3.settings import Settings, SettingsError, env_name, settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def test_every_variable_is_documented_in_the_contracts():
    doc = (ROOT / "docs" / "CONTRACTS.md").read_text()
    for name in Settings.model_fields:
        assert f"`{env_name(name)}`" in doc, env_name(name)


def test_no_module_reads_an_eagle3_variable_itself():
    """One place reads them: a new os.environ read of EAGLE3_* would bypass types and docs."""
    pattern = re.compile(r"(environ(\.get)?|getenv)[\[(]\s*f?['\"]EAGLE3_")
    offenders = [
        str(p.relative_to(ROOT))
        for folder in ("eagle3", "flows")
        for p in (ROOT / folder).rglob("*.py")
        if pattern.search(p.read_text())
    ]
    assert offenders == []


def test_read_on_access_not_at_import(monkeypatch, tmp_path):
    from eagle3.heads import heads_dir
    from eagle3.ops.tracking import home

    monkeypatch.setenv("EAGLE3_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("EAGLE3_HEADS_DIR", str(tmp_path / "heads"))
    assert home() == (tmp_path / "a").resolve()
    assert heads_dir() == tmp_path / "heads"
    monkeypatch.setenv("EAGLE3_HOME", str(tmp_path / "b"))
    monkeypatch.delenv("EAGLE3_HEADS_DIR")
    assert home() == (tmp_path / "b").resolve()
    assert heads_dir() == ROOT / "heads"


def test_defaults_and_empty_means_unset(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(env_name(name), raising=False)
    s = settings()
    assert (s.home, s.stack_dir, s.vllm_dir) == (
        Path(".eagle3"),
        Path(".eagle3/stack"),
        Path(".eagle3/vllm"),
    )
    assert (s.retry_delay, s.gpu_slots, s.progress, s.s3_bucket) == (1.0, 1, None, None)
    monkeypatch.setenv("EAGLE3_HOME", "")
    monkeypatch.setenv("EAGLE3_S3_BUCKET", "")
    assert settings().home == Path(".eagle3") and settings().s3_bucket is None


def test_typed_values(monkeypatch):
    monkeypatch.setenv("EAGLE3_S3_PORT", "9001")
    monkeypatch.setenv("EAGLE3_RETRY_DELAY", "0.05")
    monkeypatch.setenv("EAGLE3_PROGRESS", "no")
    monkeypatch.setenv("EAGLE3_GPU_SLOTS", "2")
    s = settings()
    assert (s.s3_port, s.retry_delay, s.progress, s.gpu_slots) == (9001, 0.05, False, 2)
    monkeypatch.setenv("EAGLE3_PROGRESS", "1")
    assert settings().progress is True


@pytest.mark.parametrize(
    "name,value",
    [("EAGLE3_S3_PORT", "abc"), ("EAGLE3_MLFLOW_PORT", "70000"), ("EAGLE3_GPU_SLOTS", "0")],
)
def test_a_malformed_value_is_named(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=rf"^{name}='{value}': "):
        settings()


def test_stack_up_refuses_a_bad_port_variable_before_starting_anything(
    monkeypatch, tmp_path, capsys
):
    from eagle3.ops.stack import stack_command

    monkeypatch.setenv("EAGLE3_PREFECT_PORT", "http")
    assert stack_command("up", tmp_path / "stack") == 1
    assert "EAGLE3_PREFECT_PORT='http'" in capsys.readouterr().err
    assert not (tmp_path / "stack").exists()


def test_the_cli_exits_2_on_a_malformed_variable(monkeypatch, capsys):
    from eagle3.cli import run_command

    monkeypatch.setenv("EAGLE3_GPU_SLOTS", "many")
    assert run_command("eagle3 x", lambda _args: settings(), None) == 2
    assert "eagle3 x: EAGLE3_GPU_SLOTS='many'" in capsys.readouterr().err
