"""The speculators format (vLLM's native EAGLE-3 layout, as speculators 0.9.0 writes it).

config.json nests the Llama layer under `transformer_layer_config` and names the verifier under
`speculators_config`; model.safetensors names the decoder layer `layers.0.*` (we also read the
legacy `midlayer.*`). Pure dict and name functions: checkpoint.py reads through `portable_view`,
export.py writes through `speculators_config`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from eagle3.models.draft import ARCHITECTURE, default_aux_layer_ids, rope_settings

VERSION = "0.9.0"  # the speculators release whose Eagle3DraftModel loads what we write
LAYER_PREFIX = "layers.0."  # speculators 0.9.0 and vLLM
LEGACY_PREFIX = "midlayer."  # EAGLE-3's own name, our portable format
# speculators' top-level keys that carry over to the portable view as they are
_TOP_KEYS = (
    "draft_vocab_size",
    "target_hidden_size",
    "norm_before_residual",
    "norm_before_fc",
    "fc_norm",
    "norm_output",
    "embed_requires_grad",
)
_LAYER_DROP = (
    "architectures",
    "dtype",
    "torch_dtype",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
)
_VIEW_DROP = ("architectures", "dtype", "torch_dtype", "transformers_version")


def is_speculators(cfg: dict[str, Any]) -> bool:
    """vLLM treats a config with `speculators_config` as this format."""
    return "speculators_config" in cfg or "speculators_model_type" in cfg


def rope_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """`rope_theta` (and `rope_scaling`) from legacy keys or a transformers-5 `rope_parameters`;
    empty when the config states neither."""
    if "rope_theta" not in cfg and not isinstance(cfg.get("rope_parameters"), dict):
        return {}
    keys = ("rope_theta", "rope_scaling", "rope_parameters")
    theta, scaling = rope_settings(SimpleNamespace(**{k: cfg.get(k) for k in keys}))
    return {"rope_theta": theta, **({"rope_scaling": scaling} if scaling else {})}


def portable_view(spec: dict[str, Any]) -> dict[str, Any]:
    """A speculators config as our LlamaForCausalLMEagle3 config.json would state it (variant
    flags kept, so that variants.unsupported_variants sees them)."""
    layer = spec.get("transformer_layer_config")
    layer = layer if isinstance(layer, dict) else {}
    # rope_parameters stays beside the legacy keys: variants.py looks for partial rotary in it.
    out = {k: v for k, v in layer.items() if k not in _VIEW_DROP}
    out.update(rope_fields(layer))
    out["architectures"] = [ARCHITECTURE]
    out.setdefault("tie_word_embeddings", False)  # LlamaConfig's default
    dtype = spec.get("torch_dtype") or spec.get("dtype") or layer.get("torch_dtype")
    dtype = dtype or layer.get("dtype")
    if dtype:
        out["torch_dtype"] = dtype
    for key in _TOP_KEYS:
        if spec.get(key) is not None:
            out[key] = spec[key]
    ours = dict(spec.get("eagle3") or {})
    ids = spec.get("eagle_aux_hidden_state_layer_ids")
    n = ours.get("target_num_hidden_layers")
    is_default = isinstance(n, int) and ids == default_aux_layer_ids(n)
    if isinstance(ids, list) and not is_default:
        out["eagle_aux_hidden_state_layer_ids"] = list(ids)
        if all(isinstance(i, int) for i in ids):
            out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in ids]}
    if ours:
        out["eagle3"] = ours
    return out


def refusals(spec: dict[str, Any]) -> list[str]:
    """What makes a speculators config unreadable as the EAGLE-3 layer, besides the variants."""
    p = []
    kind = spec.get("speculators_model_type")
    if kind != "eagle3":
        p.append(f"config.json: speculators_model_type must be 'eagle3', got {kind!r}")
    layer = spec.get("transformer_layer_config")
    if not isinstance(layer, dict):
        p.append("config.json: transformer_layer_config is missing")
        layer = {}
    # Unstated, speculators builds a Qwen3 layer (and LlamaConfig 32 layers) where vLLM
    # builds one Llama layer: two different heads.
    for key in ("model_type", "num_hidden_layers"):
        if key not in layer:
            p.append(f"config.json: transformer_layer_config.{key} is missing; state it")
    if "norm_before_residual" not in spec:
        # speculators reads a missing key as false, vLLM (update_eagle3) as true: two layers.
        p.append(
            "config.json: norm_before_residual is missing (vLLM reads it as true, speculators as "
            "false); state it"
        )
    return p


def structure_problems(spec: dict[str, Any]) -> list[str]:
    """What vLLM needs to serve the directory as `--model DIR` (validate_speculators_config)."""
    p = []
    sc = spec.get("speculators_config")
    sc = sc if isinstance(sc, dict) else {}
    methods = sc.get("proposal_methods")
    if not (isinstance(methods, list) and methods and isinstance(methods[0], dict)):
        p.append("config.json: speculators_config.proposal_methods is missing")
    elif not isinstance(methods[0].get("speculative_tokens"), int):
        p.append(
            "config.json: speculators_config.proposal_methods[0].speculative_tokens is missing"
        )
    if not (sc.get("verifier") or {}).get("name_or_path"):
        p.append("config.json: speculators_config.verifier.name_or_path is missing")
    return p


def speculators_name(name: str) -> str:
    return (
        LAYER_PREFIX + name.removeprefix(LEGACY_PREFIX) if name.startswith(LEGACY_PREFIX) else name
    )


def speculators_config(
    cfg: dict[str, Any],
    verifier: str,
    speculative_tokens: int,
    verifier_architectures: list[str] | None = None,
) -> dict[str, Any]:
    """Our LlamaForCausalLMEagle3 config in the speculators format (the fields speculators 0.9.0
    writes, rope in both the legacy and the transformers-5 form, the variant flags all false)."""
    top = ("eagle3", "eagle_config", "eagle_aux_hidden_state_layer_ids", "draft_vocab_size")
    top += ("target_hidden_size", "norm_before_residual", "torch_dtype", "architectures")
    layer = {k: v for k, v in cfg.items() if k not in top and k not in _LAYER_DROP}
    theta, scaling = cfg["rope_theta"], cfg.get("rope_scaling")
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    layer.update(
        architectures=["LlamaForCausalLM"],
        rope_theta=theta,
        rope_parameters={**(scaling or {}), "rope_type": rope_type, "rope_theta": theta},
        dtype=cfg["torch_dtype"],
        torch_dtype=cfg["torch_dtype"],
    )
    if scaling:
        layer["rope_scaling"] = scaling
    ours = cfg.get("eagle3") or {}
    ids = cfg.get("eagle_aux_hidden_state_layer_ids")
    n = ours.get("target_num_hidden_layers")
    if ids is None and isinstance(n, int):
        ids = default_aux_layer_ids(n)  # explicit: speculators warns when it has to guess
    hidden = cfg.get("target_hidden_size")
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": VERSION,
        "draft_vocab_size": cfg["draft_vocab_size"],
        # vLLM reads a missing norm_before_residual as true: state every flag.
        "norm_before_residual": False,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "embed_requires_grad": False,
        "target_hidden_size": hidden if hidden not in (None, cfg["hidden_size"]) else None,
        "eagle_aux_hidden_state_layer_ids": ids,
        "dtype": cfg["torch_dtype"],
        "torch_dtype": cfg["torch_dtype"],
        "tie_word_embeddings": False,
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
            "verifier": {
                "name_or_path": verifier,
                "architectures": list(verifier_architectures or []),
            },
        },
        "eagle3": ours,
    }
