"""The portable draft checkpoint (docs/CONTRACTS.md §3): save, load, check.

A directory with config.json (LlamaConfig-shaped, architectures LlamaForCausalLMEagle3) and
model.safetensors. It loads unchanged in SGLang and vLLM; `check_checkpoint` lists every way a
directory departs from the contract. A speculators-format directory (speculators.py) is read and
checked as well; layer variants we do not compute (variants.py) are refused by name.

One file over 400 lines because save, load and check read the same contract (§3) and must not
drift apart; the export formats are speculators.py and export.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from eagle3.io import atomic_dir, sha256_file
from eagle3.models import speculators as spec
from eagle3.models.draft import ARCHITECTURE, DraftConfig, Eagle3Draft, default_aux_layer_ids
from eagle3.models.variants import unsupported_variants

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# config.json["eagle3"][WEIGHTS_SHA256]: the sha256 of model.safetensors, written by save_draft and
# checked by check_checkpoint (a flipped byte in the weights is found before anything loads them).
WEIGHTS_SHA256 = "weights_sha256"
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
    rope = spec.rope_fields(cfg)
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
        rope_theta=rope.get("rope_theta", 10000.0),
        rope_scaling=rope.get("rope_scaling"),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        torch_dtype=dtype if dtype in DTYPES else "float32",
        aux_layer_ids=list(aux) if aux is not None else None,
        # the weights' sha256 belongs to the file it was written with, not to the model
        eagle3={k: v for k, v in (cfg.get("eagle3") or {}).items() if k != WEIGHTS_SHA256},
    )


def expected_tensors(
    c: DraftConfig, layer_prefix: str = spec.LEGACY_PREFIX
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype); the decoder layer under `midlayer.` (portable) or `layers.0.`
    (speculators format)."""
    H, Ht, I = c.hidden_size, c.target_hidden_size, c.intermediate_size  # noqa: E741
    n, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    f = DTYPES[c.torch_dtype]
    p = layer_prefix
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


def draft_tensors(draft: Eagle3Draft, dtype: str) -> dict[str, torch.Tensor]:
    """The state dict on the CPU in `dtype` (d2t stays int64, t2d bool), contiguous."""
    f = DTYPES[dtype]
    out = {}
    for k, v in draft.state_dict().items():
        v = v.detach().to("cpu")
        out[k] = v.to(torch.int64 if k == "d2t" else torch.bool if k == "t2d" else f).contiguous()
    return out


def write_checkpoint(
    out_dir: str | Path, tensors: dict[str, torch.Tensor], cfg: dict, record_sha256: bool = True
) -> Path:
    """config.json + model.safetensors, written to a temp dir and swapped into place; with
    `record_sha256`, config.json's eagle3 block carries the weight file's sha256."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if record_sha256:
            sha = sha256_file(tmp / WEIGHTS_FILE)
            cfg = {**cfg, "eagle3": {**cfg.get("eagle3", {}), WEIGHTS_SHA256: sha}}
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def with_dtype(c: DraftConfig, dtype: str | None = None, extra: dict | None = None) -> DraftConfig:
    """A copy of the config in another dtype, with `extra` merged into its `eagle3` block."""
    eagle3 = {**c.eagle3, **(extra or {})}
    return DraftConfig(**{**c.to_dict(), "torch_dtype": dtype or c.torch_dtype, "eagle3": eagle3})


def save_draft(
    draft: Eagle3Draft, out_dir: str | Path, dtype: str | None = None, extra: dict | None = None
) -> Path:
    """Write the portable checkpoint atomically; `extra` merges into the config's `eagle3` block."""
    cfg = with_dtype(draft.config, dtype, extra)
    return write_checkpoint(out_dir, draft_tensors(draft, cfg.torch_dtype), hf_config(cfg))


# --- reading ------------------------------------------------------------------------------------
def read_raw_config(ckpt_dir: str | Path) -> dict[str, Any]:
    """config.json as written, in either format."""
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return cfg


def read_config(ckpt_dir: str | Path) -> dict[str, Any]:
    """The LlamaForCausalLMEagle3 config: config.json itself, or the portable view of a
    speculators-format one (speculators.portable_view)."""
    raw = read_raw_config(ckpt_dir)
    return spec.portable_view(raw) if spec.is_speculators(raw) else raw


def refusals(raw: dict[str, Any]) -> list[str]:
    """Why a config cannot be loaded as the layer eagle3 computes (named; empty when it can)."""
    if spec.is_speculators(raw):
        return spec.refusals(raw) + unsupported_variants(spec.portable_view(raw))
    return unsupported_variants(raw)


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
    # speculators and some exports name the decoder layer `layers.0.` or prefix `model.`.
    out = {}
    for k, v in raw.items():
        k = k.removeprefix("model.")
        if k.startswith(spec.LAYER_PREFIX):
            k = spec.LEGACY_PREFIX + k.removeprefix(spec.LAYER_PREFIX)
        out[k] = v
    return out


# Tensors a checkpoint may carry that are not part of the head: the target's embedding (a frozen
# copy), and the verifier's norm and lm_head that speculators keeps for training.
_NOT_THE_HEAD = ("embed_tokens.weight", "verifier_norm.weight", "verifier_lm_head.weight")


def load_draft(
    ckpt_dir: str | Path, device: str | torch.device = "cpu", dtype: str | None = None
) -> Eagle3Draft:
    """The head in `ckpt_dir` (portable or speculators format); CheckpointError naming every
    variant it would compute that eagle3 does not."""
    raw = read_raw_config(ckpt_dir)
    refused = refusals(raw)
    if refused:
        raise CheckpointError(
            f"{ckpt_dir}: refused, not the EAGLE-3 layer eagle3 computes:\n  - "
            + "\n  - ".join(refused)
        )
    view = spec.portable_view(raw) if spec.is_speculators(raw) else raw
    verify_weights(ckpt_dir, view)
    c = draft_config_from_hf(view)
    tensors = read_tensors(ckpt_dir)
    for name in _NOT_THE_HEAD:
        tensors.pop(name, None)
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


def verify_weights(ckpt_dir: str | Path, cfg: dict[str, Any]) -> None:
    """CheckpointError when config.json records the weights' sha256 and the file differs (a
    damaged or replaced model.safetensors is refused before it is loaded, not only by check)."""
    want = (cfg.get("eagle3") or {}).get(WEIGHTS_SHA256)
    path = Path(ckpt_dir) / WEIGHTS_FILE
    if want is None or not path.is_file():  # the hash is of model.safetensors; other layouts
        return  # (pytorch_model.bin, public checkpoints) carry none of ours
    got = sha256_file(path)
    if got != want:
        raise CheckpointError(
            f"{ckpt_dir}: {WEIGHTS_FILE} sha256 {got[:16]}… does not match config.json's "
            f"eagle3.{WEIGHTS_SHA256} {str(want)[:16]}… (damaged or replaced after saving)"
        )


# --- validation ---------------------------------------------------------------------------------
def check_checkpoint(ckpt_dir: str | Path) -> list[str]:
    """Every departure from docs/CONTRACTS.md §3 (or from the speculators format, for such a
    directory), as readable lines; empty when the checkpoint is valid."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return [f"{d}: not a directory"]
    from eagle3.heads import verify_sums

    problems = verify_sums(d)  # a shipped head's SHA256SUMS (none in a training run's draft/)
    try:
        raw = read_raw_config(d)
    except CheckpointError as e:
        return problems + [str(e)]
    speculators = spec.is_speculators(raw)
    cfg = spec.portable_view(raw) if speculators else raw
    if speculators:
        problems += spec.refusals(raw) + spec.structure_problems(raw)
    problems += _check_config(cfg) + unsupported_variants(cfg)
    if not (d / WEIGHTS_FILE).is_file():
        return problems + [f"{WEIGHTS_FILE}: missing"]
    want = (cfg.get("eagle3") or {}).get(WEIGHTS_SHA256)
    got = sha256_file(d / WEIGHTS_FILE) if want is not None else None
    if got != want:
        problems.append(
            f"{WEIGHTS_FILE}: sha256 {got[:16]}… does not match config.json's "
            f"eagle3.{WEIGHTS_SHA256} {str(want)[:16]}… (damaged or replaced after saving)"
        )
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
    if speculators:
        problems += _legacy_names(tensors)
        tensors = {spec.speculators_name(k): v for k, v in tensors.items()}
        emb = tensors.pop("embed_tokens.weight", None)  # speculators may keep a frozen copy
        if emb is not None and tuple(emb.shape) != (c.vocab_size, c.hidden_size):
            problems.append(
                f"{WEIGHTS_FILE}: tensor embed_tokens.weight has shape {list(emb.shape)}"
            )
    prefix = spec.LAYER_PREFIX if speculators else spec.LEGACY_PREFIX
    problems += _check_tensors(c, tensors, prefix)
    return problems


def _legacy_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    legacy = sorted(k for k in tensors if k.startswith(spec.LEGACY_PREFIX))
    if not legacy:
        return []
    return [
        f"{WEIGHTS_FILE}: {len(legacy)} tensors named {spec.LEGACY_PREFIX}* (e.g. {legacy[0]}); "
        f"speculators {spec.VERSION} names the decoder layer {spec.LAYER_PREFIX}* and its "
        "Eagle3DraftModel would initialise that layer afresh (vLLM reads both): export it again"
    ]


def _check_config(cfg: dict[str, Any]) -> list[str]:
    p = []
    if cfg.get("architectures") != [ARCHITECTURE]:
        p.append(
            f"config.json: architectures must be [{ARCHITECTURE!r}], got {cfg.get('architectures')!r}"
        )
    # Other values of these three are variants (variants.py), reported there by name.
    for key in ("model_type", "num_hidden_layers", "hidden_act"):
        if key not in cfg:
            p.append(f"config.json: {key} is missing")
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
    ok = all(isinstance(x, list) and all(isinstance(i, int) for i in x) for x in (top, sgl))
    if not ok:  # a count other than 3 is a variant (variants.py)
        return ["config.json: aux layer id lists must hold integers"]
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


def _check_tensors(
    c: DraftConfig, tensors: dict[str, torch.Tensor], layer_prefix: str = spec.LEGACY_PREFIX
) -> list[str]:
    p = []
    expected = expected_tensors(c, layer_prefix)
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
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            p.append(f"{WEIGHTS_FILE}: tensor {name} holds {bad} NaN or Inf values")
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
