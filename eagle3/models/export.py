"""Exports of a draft checkpoint for serving engines.

- sglang: the portable checkpoint (LlamaForCausalLMEagle3 config.json, `midlayer.*` tensors), which
  SGLang and vLLM (`--speculative-config '{"model": DIR}'`) both load.
- vllm: the speculators format as speculators 0.9.0 writes it (`transformer_layer_config`,
  `speculators_config` naming the verifier, `layers.0.*` tensors), so that `vllm serve DIR` finds
  the verifier on its own and speculators' Eagle3DraftModel loads it.

Both hold the same tensors up to the dtype cast. The dtype defaults to the target's (recorded by the
trainer as `eagle3.target_dtype`), else the checkpoint's; the verifier defaults to the recorded
target (`eagle3.target`, or the older `eagle3.target_id`).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from eagle3.io import atomic_dir
from eagle3.models import speculators as spec
from eagle3.models.checkpoint import (
    CONFIG_FILE,
    DTYPES,
    WEIGHTS_FILE,
    CheckpointError,
    check_checkpoint,
    draft_tensors,
    hf_config,
    load_draft,
    read_config,
    read_raw_config,
    save_draft,
    with_dtype,
    write_checkpoint,
)

FORMATS = ("sglang", "vllm")
DEFAULT_SPECULATIVE_TOKENS = 5  # when the checkpoint records no tree depth
# A hub id (`org/name`, or a bare legacy `name`): what an engine can resolve besides a local path.
_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def export_dtype(cfg: dict[str, Any]) -> str:
    """The target's dtype when the checkpoint records it, else the checkpoint's own."""
    recorded = (cfg.get("eagle3") or {}).get("target_dtype")
    return recorded if recorded in DTYPES else cfg["torch_dtype"]


def recorded_verifier(cfg: dict[str, Any]) -> str:
    """The target the checkpoint names, if an engine can load it by that name."""
    ours = cfg.get("eagle3") or {}
    name = ours.get("target") or ours.get("target_id")  # target_id: older checkpoints
    if not name:
        raise CheckpointError(
            "--verifier is required: the checkpoint does not name its target (eagle3.target)"
        )
    if not (_MODEL_ID.match(str(name)) or Path(str(name)).exists()):
        raise CheckpointError(
            f"--verifier is required: the checkpoint's target {name!r} (eagle3.target) is neither "
            "a local path nor a model id an engine can load"
        )
    return str(name)


def verifier_architectures(verifier: str) -> list[str]:
    """The verifier's `architectures` when it is a local directory (speculators records them)."""
    path = Path(verifier) / CONFIG_FILE
    try:
        return list(json.loads(path.read_text()).get("architectures") or [])
    except (OSError, ValueError, AttributeError):
        return []


def speculative_tokens(cfg: dict[str, Any]) -> int:
    """vLLM drafts a chain: our tree's depth is its number of speculative tokens."""
    depth = ((cfg.get("eagle3") or {}).get("tree") or {}).get("depth")
    return int(depth) if isinstance(depth, int) and depth >= 1 else DEFAULT_SPECULATIVE_TOKENS


def export_checkpoint(
    draft_dir: str | Path,
    fmt: str,
    out_dir: str | Path,
    verifier: str | None = None,
    dtype: str | None = None,
) -> Path:
    """Write `draft_dir` (portable or speculators format) as `fmt` into `out_dir`, atomically."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} ({'|'.join(FORMATS)})")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} ({'|'.join(DTYPES)})")
    problems = check_checkpoint(draft_dir)
    if problems:
        raise CheckpointError(
            f"{draft_dir} is not a valid checkpoint:\n  - " + "\n  - ".join(problems)
        )
    cfg = read_config(draft_dir)
    dtype = dtype or export_dtype(cfg)
    if fmt == "vllm":
        verifier = verifier or recorded_verifier(cfg)
        return _export_speculators(draft_dir, out_dir, verifier, dtype)
    portable = not spec.is_speculators(read_raw_config(draft_dir))
    if portable and dtype == cfg["torch_dtype"]:
        return _copy_files(draft_dir, out_dir)  # byte for byte
    return save_draft(load_draft(draft_dir), out_dir, dtype=dtype)


def _copy_files(draft_dir: str | Path, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(Path(draft_dir) / name, tmp / name)
    return out


def _export_speculators(draft_dir, out_dir, verifier: str, dtype: str) -> Path:
    draft = load_draft(draft_dir)
    cfg = hf_config(with_dtype(draft.config, dtype))
    tensors = {spec.speculators_name(k): v for k, v in draft_tensors(draft, dtype).items()}
    config = spec.speculators_config(
        cfg, verifier, speculative_tokens(cfg), verifier_architectures(verifier)
    )
    # No weights sha256 here: speculators' save_pretrained copies our config block verbatim beside
    # weights it re-writes (with the target's embedding), which would then never match.
    return write_checkpoint(out_dir, tensors, config, record_sha256=False)
