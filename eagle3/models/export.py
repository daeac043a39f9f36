"""Exports of the portable checkpoint for serving engines.

- sglang: the portable checkpoint as it is (SGLang reads LlamaForCausalLMEagle3 configs, and custom
  aux layers from `eagle_config.eagle_aux_hidden_state_layer_ids`), optionally cast to another dtype.
- vllm: the same weights with a speculators-format config.json, so that `vllm serve DIR` finds the
  verifier (target) and the EAGLE-3 settings on its own; `--speculative-config` with the sglang/portable
  directory works as well.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from eagle3.models.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    _replace_dir,
    check_checkpoint,
    load_draft,
    read_config,
    save_draft,
)

SPECULATORS_VERSION = "0.3.0"


def speculators_config(
    cfg: dict[str, Any], verifier: str, speculative_tokens: int
) -> dict[str, Any]:
    """vLLM's speculators format around our LlamaForCausalLMEagle3 config."""
    layer = {
        k: v for k, v in cfg.items() if k not in ("eagle3", "eagle_config", "draft_vocab_size")
    }
    layer["architectures"] = ["LlamaForCausalLM"]
    layer.pop("eagle_aux_hidden_state_layer_ids", None)
    out: dict[str, Any] = {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "draft_vocab_size": cfg["draft_vocab_size"],
        # Our layer keeps the un-normed hidden as the attention residual; the speculators default
        # (norm_before_residual=true) would compute a different function.
        "norm_before_residual": False,
        "target_hidden_size": cfg.get("target_hidden_size", cfg["hidden_size"]),
        "torch_dtype": cfg["torch_dtype"],
        "transformer_layer_config": layer,
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": speculative_tokens,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "verifier": {"name_or_path": verifier, "architectures": []},
        },
    }
    if "eagle_aux_hidden_state_layer_ids" in cfg:
        out["eagle_aux_hidden_state_layer_ids"] = cfg["eagle_aux_hidden_state_layer_ids"]
    if cfg.get("eagle3"):
        out["eagle3"] = cfg["eagle3"]
    return out


def export_checkpoint(
    draft_dir: str | Path,
    fmt: str,
    out_dir: str | Path,
    verifier: str | None = None,
    dtype: str | None = None,
) -> Path:
    problems = check_checkpoint(draft_dir)
    if problems:
        raise CheckpointError(
            f"{draft_dir} is not a valid checkpoint:\n  - " + "\n  - ".join(problems)
        )
    out = Path(out_dir)
    if dtype:
        save_draft(load_draft(draft_dir), out, dtype=dtype)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(Path(draft_dir) / name, tmp / name)
        _replace_dir(tmp, out)
    if fmt == "sglang":
        return out
    if fmt != "vllm":
        raise ValueError(f"unknown export format {fmt!r} (sglang|vllm)")
    cfg = read_config(out)
    ours = cfg.get("eagle3") or {}
    verifier = verifier or ours.get("target_id")
    if not verifier:
        raise CheckpointError(
            "--verifier is required: the checkpoint does not name its target model"
        )
    tree = ours.get("tree") or {}
    tokens = int(tree.get("depth", 5))
    spec = speculators_config(cfg, verifier, tokens)
    # Keep the engine-neutral config beside it for tools that want LlamaForCausalLMEagle3.
    (out / "config.eagle3.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tmp_cfg = out / f".{CONFIG_FILE}.tmp"
    tmp_cfg.write_text(json.dumps(spec, indent=2) + "\n")
    tmp_cfg.replace(out / CONFIG_FILE)
    return out
