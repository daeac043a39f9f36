"""Variants of the EAGLE-3 layer that other trainers write and eagle3 does not compute.

speculators and vLLM read these keys and change the layer they compute; our draft (draft.py) is the
plain EAGLE-3 layer. A checkpoint that sets any of them is refused by name (load_draft) and
reported (eagle3 check), never loaded as a different function.
"""

from __future__ import annotations

from typing import Any

# key -> what a true value changes (vLLM llama_eagle3.py, speculators models/eagle3)
_TRUE_FLAGS = {
    "norm_before_residual": "the attention residual becomes hidden_norm(h) instead of h",
    "norm_before_fc": "an RMSNorm over the concatenated aux features before fc",
    "fc_norm": "an RMSNorm on each aux feature before fc",
    "norm_output": "the hidden state fed back to the next step becomes norm(h) instead of h",
    "embed_requires_grad": "the head trained its own token embedding; eagle3 uses the target's",
    "attention_bias": "q/k/v/o projections with a bias",
    "mlp_bias": "MLP projections with a bias",
}
ROPE_TYPES = ("default", "linear", "llama3")  # what draft.rope_inv_freq computes
_ROPE_KEYS_REFUSED = ("partial_rotary_factor", "mrope_section", "mrope_interleaved")


def _is_one(x: Any) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and x == 1)


def _refuse(key: str, value: Any, why: str) -> str:
    return f"config.json: {key} = {value!r} is a variant eagle3 does not implement ({why})"


def unsupported_variants(cfg: dict[str, Any]) -> list[str]:
    """Named refusals for a LlamaForCausalLMEagle3 config (or the portable view of a speculators
    one); empty when the config describes the layer eagle3 computes."""
    p = []
    for key, why in _TRUE_FLAGS.items():
        if cfg.get(key):
            p.append(_refuse(key, cfg[key], why))
    eagle_config = cfg.get("eagle_config") or {}
    if eagle_config.get("norm_before_fc") and not cfg.get("norm_before_fc"):
        p.append(_refuse("eagle_config.norm_before_fc", True, _TRUE_FLAGS["norm_before_fc"]))
    if eagle_config.get("use_aux_hidden_state") is False:
        p.append(
            _refuse("eagle_config.use_aux_hidden_state", False, "no fc over target aux features")
        )
    if cfg.get("model_type") not in (None, "llama"):
        p.append(_refuse("model_type", cfg["model_type"], "its decoder layer is not Llama's"))
    if cfg.get("num_hidden_layers") not in (None, 1):
        p.append(_refuse("num_hidden_layers", cfg["num_hidden_layers"], "one decoder layer only"))
    if cfg.get("hidden_act") not in (None, "silu"):
        p.append(_refuse("hidden_act", cfg["hidden_act"], "the MLP is SwiGLU"))
    layer_types = cfg.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        p.append(_refuse("layer_types", layer_types, "sliding-window attention"))
    for key in ("logit_scale", "partial_rotary_factor"):
        if not _is_one(cfg.get(key)):
            p.append(_refuse(key, cfg[key], "logits or rotary dims differ"))
    if cfg.get("num_aux_hidden_states") not in (None, 3):
        p.append(_refuse("num_aux_hidden_states", cfg["num_aux_hidden_states"], "fc reads 3"))
    ids = cfg.get("eagle_aux_hidden_state_layer_ids")
    if isinstance(ids, list) and len(ids) != 3:
        p.append(_refuse("eagle_aux_hidden_state_layer_ids", ids, "fc reads 3 aux layers"))
    p += _rope_variants(cfg)
    return p


def _rope_variants(cfg: dict[str, Any]) -> list[str]:
    p = []
    for key in ("rope_scaling", "rope_parameters"):
        rope = cfg.get(key)
        if not isinstance(rope, dict):
            continue
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ROPE_TYPES:
            p.append(_refuse(f"{key}.rope_type", kind, f"eagle3 computes {', '.join(ROPE_TYPES)}"))
        for k in _ROPE_KEYS_REFUSED:
            if k in rope and not (k == "partial_rotary_factor" and _is_one(rope[k])):
                p.append(_refuse(f"{key}.{k}", rope[k], "partial or multimodal rotary"))
    return p
