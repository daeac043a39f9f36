"""Where vLLM's own venv lives: vLLM pins torch and transformers apart from the project's venv.

`make vllm` creates `<repo>/.venv-vllm`; `EAGLE3_VLLM_VENV` points elsewhere (a venv dir). One
lookup for every caller.
"""

from __future__ import annotations

import os
from pathlib import Path

VENV_ENV = "EAGLE3_VLLM_VENV"
MAKE_TARGET = "vllm"  # the make target that creates the venv
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO_ROOT / ".venv-vllm"


class VllmEnvMissing(RuntimeError):
    """The vLLM venv is not there; the message says where it was looked for and how to make it."""


def vllm_venv() -> Path:
    from eagle3.settings import settings

    return settings().vllm_venv or DEFAULT_VENV


def vllm_python() -> Path:
    """The python of the vLLM venv (it may not exist: `require_vllm_python` checks)."""
    return vllm_venv() / "bin" / "python"


def require_vllm_python() -> Path:
    """The vLLM venv's python; VllmEnvMissing, saying how to create it, when it does not exist."""
    venv, python = vllm_venv(), vllm_python()
    if not os.access(python, os.X_OK):
        raise VllmEnvMissing(
            f"the vLLM venv {venv} does not exist ({python} is missing): create it with "
            f"`make {MAKE_TARGET}`, or point {VENV_ENV} at one"
        )
    return python
