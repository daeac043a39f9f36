"""Process-wide environment: telemetry off, cache location, device and thread choice."""

from __future__ import annotations

import os
from pathlib import Path

TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def disable_telemetry() -> None:
    for k, v in TELEMETRY_OFF.items():
        os.environ.setdefault(k, v)


def cache_dir() -> Path:
    """Where downloaded wheels, converted models and data sets live (never in git)."""
    root = os.environ.get("EAGLE3_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "eagle3"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_device(name: str = "auto") -> str:
    import torch

    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def describe_device(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        return f"cuda:{idx} ({torch.cuda.get_device_name(idx)})"
    return "cpu"


disable_telemetry()
