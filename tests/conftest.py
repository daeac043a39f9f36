"""Session-wide fixtures shared by every test module: the tiny target and its recipe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_recipe():
    from eagle3.config import load_recipe

    return load_recipe(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_target(tiny_recipe):
    """The seeded tiny Llama with the SmolLM2 tokenizer (read-only: do not modify it)."""
    from eagle3.models.target import load_target

    return load_target(tiny_recipe.target)
