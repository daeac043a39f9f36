"""Where vLLM's own venv lives: it pins torch and transformers apart from the project's venv.

`make vllm` creates `<repo>/.venv-vllm`; `EAGLE3_VLLM_VENV` points elsewhere (a venv dir).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO_ROOT / ".venv-vllm"


def vllm_venv() -> Path:
    return Path(os.environ.get("EAGLE3_VLLM_VENV") or DEFAULT_VENV)


def vllm_python() -> Path:
    """The python of the vLLM venv (it may not exist: callers check and say how to create it)."""
    return vllm_venv() / "bin" / "python"
