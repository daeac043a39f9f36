"""Where the vLLM venv lives. vLLM pins torch and transformers apart from ours, so it runs from its
own venv (`.venv-vllm` at the repository root, or $EAGLE3_VLLM_VENV): one lookup for every caller."""

from __future__ import annotations

import os
from pathlib import Path

VENV_ENV = "EAGLE3_VLLM_VENV"
MAKE_TARGET = "venv-vllm"  # the make target that creates the venv
REPO_ROOT = Path(__file__).resolve().parents[2]


class VllmEnvMissing(RuntimeError):
    """The vLLM venv is not there; the message says where it was looked for and how to make it."""


def vllm_venv() -> Path:
    return Path(os.environ.get(VENV_ENV) or REPO_ROOT / ".venv-vllm")


def vllm_python() -> Path:
    """The vLLM venv's python; VllmEnvMissing when it does not exist."""
    venv = vllm_venv()
    python = venv / "bin" / "python"
    if not os.access(python, os.X_OK):
        raise VllmEnvMissing(
            f"the vLLM venv {venv} does not exist ({python} is missing): create it with "
            f"`make {MAKE_TARGET}`, or point {VENV_ENV} at one"
        )
    return python
