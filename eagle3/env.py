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
    from eagle3.settings import settings

    path = settings().cache or Path(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "eagle3"
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_device(name: str = "auto") -> str:
    import torch

    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags Linux reports (/proc/cpuinfo `flags`); empty where it cannot say."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_has_bf16(flags: set[str] | None = None) -> bool:
    """Whether the CPU does bf16 arithmetic in hardware (AVX-512 bf16 or AMX). Only there is bf16
    autocast expected to pay on a CPU; elsewhere oneDNN converts to fp32 around each matmul."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_CPU_FLAGS)


def describe_device(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        return f"cuda:{idx} ({torch.cuda.get_device_name(idx)})"
    return "cpu"


disable_telemetry()
