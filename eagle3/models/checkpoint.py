"""The portable draft checkpoint (CONTRACTS.md §3): save, load, check.

A directory with config.json (LlamaConfig-shaped, architectures LlamaForCausalLMEagle3) and
model.safetensors. It loads unchanged in SGLang and vLLM; `check_checkpoint` lists every way a
directory departs from the contract.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from eagle3.models.draft import ARCHITECTURE, DraftConfig, Eagle3Draft, default_aux_layer_ids

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CONFIG_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "vocab_size",
    "draft_vocab_size",
    "torch_dtype",
)


class CheckpointError(ValueError):
    pass


# --- config.json ----------------------------------------------------------------------------------
def hf_config(c: DraftConfig) -> dict[str, Any]:
    """The LlamaConfig-shaped dict that SGLang and vLLM read."""
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        # The attention residual is the un-normed hidden state (engines that read this key agree).
        "norm_before_residual": False,
        "torch_dtype": c.torch_dtype,
        "vocab_size": c.vocab_size,
        "draft_vocab_size": c.draft_vocab_size,
    }
    if c.rope_scaling:
        out["rope_scaling"] = c.rope_scaling
    if c.target_hidden_size != c.hidden_size:
        out["target_hidden_size"] = c.target_hidden_size
    if c.aux_layer_ids is not None:
        ids = [int(i) for i in c.aux_layer_ids]
        out["eagle_aux_hidden_state_layer_ids"] = ids  # vLLM: layer-input ids
        out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in ids]}  # SGLang
    if c.eagle3:
        out["eagle3"] = c.eagle3
    return out


def draft_config_from_hf(cfg: dict[str, Any]) -> DraftConfig:
    """Reads our config.json or a public EAGLE-3 one (missing optional fields get Llama defaults)."""
    missing = [k for k in ("hidden_size", "num_attention_heads", "vocab_size") if k not in cfg]
    if missing:
        raise CheckpointError(f"config.json lacks {', '.join(missing)}")
    heads = cfg["num_attention_heads"]
    aux = cfg.get("eagle_aux_hidden_state_layer_ids")
    if aux is None:
        sgl = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        aux = [i + 1 for i in sgl] if sgl is not None else None
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return DraftConfig(
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg.get("intermediate_size", 4 * cfg["hidden_size"]),
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        draft_vocab_size=cfg.get("draft_vocab_size") or cfg["vocab_size"],
        target_hidden_size=cfg.get("target_hidden_size") or cfg["hidden_size"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", 10000.0),
        rope_scaling=cfg.get("rope_scaling"),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        torch_dtype=dtype if dtype in DTYPES else "float32",
        aux_layer_ids=list(aux) if aux is not None else None,
        eagle3=dict(cfg.get("eagle3") or {}),
    )


def expected_tensors(c: DraftConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    H, Ht, I = c.hidden_size, c.target_hidden_size, c.intermediate_size  # noqa: E741
    n, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    f = DTYPES[c.torch_dtype]
    p = "midlayer."
    return {
        "fc.weight": ((H, 3 * Ht), f),
        p + "hidden_norm.weight": ((H,), f),
        p + "input_layernorm.weight": ((H,), f),
        p + "post_attention_layernorm.weight": ((H,), f),
        p + "self_attn.q_proj.weight": ((n * d, 2 * H), f),
        p + "self_attn.k_proj.weight": ((nkv * d, 2 * H), f),
        p + "self_attn.v_proj.weight": ((nkv * d, 2 * H), f),
        p + "self_attn.o_proj.weight": ((H, n * d), f),
        p + "mlp.gate_proj.weight": ((I, H), f),
        p + "mlp.up_proj.weight": ((I, H), f),
        p + "mlp.down_proj.weight": ((H, I), f),
        "norm.weight": ((H,), f),
        "lm_head.weight": ((c.draft_vocab_size, H), f),
        "d2t": ((c.draft_vocab_size,), torch.int64),
        "t2d": ((c.vocab_size,), torch.bool),
    }


# --- atomic writes -------------------------------------------------------------------------------
def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written temp dir into place; the old one disappears only after the swap."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_draft(
    draft: Eagle3Draft, out_dir: str | Path, dtype: str | None = None, extra: dict | None = None
) -> Path:
    """Write the portable checkpoint atomically; `extra` merges into the config's `eagle3` block."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    c = draft.config
    dtype = dtype or c.torch_dtype
    cfg = DraftConfig(
        **{**c.to_dict(), "torch_dtype": dtype, "eagle3": {**c.eagle3, **(extra or {})}}
    )
    f = DTYPES[dtype]
    tensors = {}
    for k, v in draft.state_dict().items():
        v = v.detach().to("cpu")
        tensors[k] = v.to(torch.int64 if k == "d2t" else torch.bool if k == "t2d" else f)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --- reading ------------------------------------------------------------------------------------
def read_config(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e


def read_tensors(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or a public checkpoint's pytorch_model.bin; names normalised."""
    d = Path(ckpt_dir)
    if (d / WEIGHTS_FILE).is_file():
        from safetensors.torch import load_file

        raw = load_file(str(d / WEIGHTS_FILE))
    elif (d / "pytorch_model.bin").is_file():
        raw = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CheckpointError(f"{d} holds neither {WEIGHTS_FILE} nor pytorch_model.bin")
    # Some exports name the decoder layer `layers.0.` or prefix `model.`.
    out = {}
    for k, v in raw.items():
        k = k.removeprefix("model.")
        if k.startswith("layers.0."):
            k = "midlayer." + k.removeprefix("layers.0.")
        out[k] = v
    return out


def load_draft(
    ckpt_dir: str | Path, device: str | torch.device = "cpu", dtype: str | None = None
) -> Eagle3Draft:
    cfg = read_config(ckpt_dir)
    c = draft_config_from_hf(cfg)
    tensors = read_tensors(ckpt_dir)
    tensors.pop("embed_tokens.weight", None)  # public checkpoints may carry the target's embedding
    if "t2d" not in tensors and c.draft_vocab_size == c.vocab_size:
        tensors["t2d"] = torch.ones(c.vocab_size, dtype=torch.bool)
        tensors["d2t"] = torch.zeros(c.vocab_size, dtype=torch.long)
    if dtype:
        c.torch_dtype = dtype
    draft = Eagle3Draft(c)
    missing, unexpected = draft.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt_dir}: missing tensors {sorted(missing)}; unexpected tensors {sorted(unexpected)}"
        )
    f = DTYPES[c.torch_dtype]
    draft.to(device)
    for p in draft.parameters():
        p.data = p.data.to(f)
    draft.inv_freq = draft.inv_freq.float()
    return draft.eval()


# --- validation ---------------------------------------------------------------------------------
def check_checkpoint(ckpt_dir: str | Path) -> list[str]:
    """Every departure from CONTRACTS.md §3, as readable lines; empty when the checkpoint is valid."""
    d = Path(ckpt_dir)
    problems: list[str] = []
    if not d.is_dir():
        return [f"{d}: not a directory"]
    from eagle3.heads import verify_sums

    problems += verify_sums(d)  # a shipped head's SHA256SUMS (none in a training run's draft/)
    try:
        cfg = read_config(d)
    except CheckpointError as e:
        return problems + [str(e)]
    problems += _check_config(cfg)
    if not (d / WEIGHTS_FILE).is_file():
        return problems + [f"{WEIGHTS_FILE}: missing"]
    try:
        c = draft_config_from_hf(cfg)
    except (CheckpointError, KeyError, TypeError) as e:
        return problems + [f"config.json: {e}"]
    if c.torch_dtype not in DTYPES:
        return problems
    from safetensors import safe_open

    try:
        with safe_open(str(d / WEIGHTS_FILE), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises several types for a damaged file
        return problems + [f"{WEIGHTS_FILE}: cannot be read: {e}"]
    problems += _check_tensors(c, tensors)
    return problems


def _check_config(cfg: dict[str, Any]) -> list[str]:
    p = []
    if cfg.get("architectures") != [ARCHITECTURE]:
        p.append(
            f"config.json: architectures must be [{ARCHITECTURE!r}], got {cfg.get('architectures')!r}"
        )
    if cfg.get("model_type") != "llama":
        p.append(f"config.json: model_type must be 'llama', got {cfg.get('model_type')!r}")
    if cfg.get("num_hidden_layers") != 1:
        p.append(f"config.json: num_hidden_layers must be 1, got {cfg.get('num_hidden_layers')!r}")
    if cfg.get("hidden_act") != "silu":
        p.append(f"config.json: hidden_act must be 'silu', got {cfg.get('hidden_act')!r}")
    if cfg.get("tie_word_embeddings") is not False:
        p.append("config.json: tie_word_embeddings must be false")
    for key in _CONFIG_FIELDS:
        if key not in cfg:
            p.append(f"config.json: {key} is missing")
    for key in _CONFIG_FIELDS:
        if key in cfg and key not in ("torch_dtype", "rms_norm_eps", "rope_theta"):
            if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] <= 0:
                p.append(f"config.json: {key} must be a positive integer, got {cfg[key]!r}")
    for key in ("rms_norm_eps", "rope_theta"):
        if key in cfg and (not isinstance(cfg[key], (int, float)) or cfg[key] <= 0):
            p.append(f"config.json: {key} must be a positive number, got {cfg[key]!r}")
    if "torch_dtype" in cfg and cfg["torch_dtype"] not in DTYPES:
        p.append(
            f"config.json: torch_dtype must be one of {sorted(DTYPES)}, got {cfg['torch_dtype']!r}"
        )
    if isinstance(cfg.get("draft_vocab_size"), int) and isinstance(cfg.get("vocab_size"), int):
        if cfg["draft_vocab_size"] > cfg["vocab_size"]:
            p.append("config.json: draft_vocab_size exceeds vocab_size")
    p += _check_aux_fields(cfg)
    return p


def _check_aux_fields(cfg: dict[str, Any]) -> list[str]:
    top = cfg.get("eagle_aux_hidden_state_layer_ids")
    sgl = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if top is None and sgl is None:
        return []
    if top is None or sgl is None:
        which = (
            "eagle_config.eagle_aux_hidden_state_layer_ids"
            if sgl is None
            else "eagle_aux_hidden_state_layer_ids"
        )
        return [f"config.json: custom aux layers need both id lists; {which} is missing"]
    p = []
    ok = all(
        isinstance(x, list) and len(x) == 3 and all(isinstance(i, int) for i in x)
        for x in (top, sgl)
    )
    if not ok:
        return ["config.json: aux layer id lists must hold 3 integers each"]
    if [i - 1 for i in top] != list(sgl):
        p.append(
            f"config.json: eagle_config.eagle_aux_hidden_state_layer_ids {sgl} must equal "
            f"eagle_aux_hidden_state_layer_ids {top} minus 1 (SGLang counts layer outputs)"
        )
    n = (cfg.get("eagle3") or {}).get("target_num_hidden_layers")
    if isinstance(n, int):
        if any(i < 1 or i >= n for i in top):
            p.append(
                f"config.json: eagle_aux_hidden_state_layer_ids {top} out of range for {n} target layers"
            )
        elif list(top) == default_aux_layer_ids(n):
            p.append("config.json: aux layer ids equal the default; omit them (contract §3)")
    return p


def _check_tensors(c: DraftConfig, tensors: dict[str, torch.Tensor]) -> list[str]:
    p = []
    expected = expected_tensors(c)
    for name, (shape, dtype) in expected.items():
        if name not in tensors:
            p.append(f"{WEIGHTS_FILE}: tensor {name} is missing")
            continue
        t = tensors[name]
        if tuple(t.shape) != shape:
            p.append(
                f"{WEIGHTS_FILE}: tensor {name} has shape {list(t.shape)}, expected {list(shape)}"
            )
        if t.dtype != dtype:
            p.append(f"{WEIGHTS_FILE}: tensor {name} has dtype {t.dtype}, expected {dtype}")
    for name in sorted(set(tensors) - set(expected)):
        why = " (the draft uses the target's embedding)" if "embed_tokens" in name else ""
        p.append(f"{WEIGHTS_FILE}: unexpected tensor {name}{why}")
    d2t, t2d = tensors.get("d2t"), tensors.get("t2d")
    if (
        d2t is not None
        and t2d is not None
        and d2t.dtype == torch.int64
        and t2d.dtype == torch.bool
        and d2t.shape == (c.draft_vocab_size,)
        and t2d.shape == (c.vocab_size,)
    ):
        p += _check_vocab_maps(d2t, t2d)
    return p


def _check_vocab_maps(d2t: torch.Tensor, t2d: torch.Tensor) -> list[str]:
    target_ids = torch.arange(len(d2t)) + d2t
    p = []
    if target_ids.min() < 0 or target_ids.max() >= len(t2d):
        return ["d2t: maps draft ids outside the target vocabulary"]
    if len(target_ids) > 1 and not bool((target_ids[1:] > target_ids[:-1]).all()):
        p.append("d2t: target ids of the draft vocabulary must be strictly ascending")
    if int(t2d.sum()) != len(d2t):
        p.append(f"t2d: marks {int(t2d.sum())} tokens, but the draft vocabulary has {len(d2t)}")
    elif not bool(t2d[target_ids].all()):
        p.append("t2d: disagrees with d2t (a draft token's target id is not marked)")
    return p
