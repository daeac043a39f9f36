"""The resumable training state in `<run_dir>/train_state/`: weights, optimizer, scheduler, RNG,
the step (which is the data position: the batch order is a function of seed and epoch), the best
validation result and the metric history. Written atomically (temp file + rename)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"


def rng_state() -> dict[str, Any]:
    out = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(state_dir: Path, state: dict[str, Any]) -> Path:
    from eagle3.io import atomic_path

    path = state_dir / STATE_FILE
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        # Our own file: it holds python objects (RNG state, history), so not weights_only.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(
            f"{path}: cannot read the training state ({e}); delete it to start over"
        ) from e


def fingerprint_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between the saved run and this one (resuming would be wrong)."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]
