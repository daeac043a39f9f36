"""Run by tests/test_interop.py with the vLLM venv's python (speculators 0.9.0, vLLM 0.32,
transformers 5.19), not collected by pytest: reads our speculators-format exports with speculators'
own classes and vLLM's config reader, and writes down what they see.

    python speculators_interop.py JOB.json   (JOB: {"exports": {name: dir}, "forward": {...},
                                              "convert": {...}, "out": dir})
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LAYER_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "vocab_size",
    "max_position_embeddings",
    "attention_bias",
    "mlp_bias",
    "rope_parameters",
)
FLAGS = ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")
NOT_SAVED = ("embed_tokens.weight", "verifier_norm.weight", "verifier_lm_head.weight")


def speculators_view(d: str, out: Path, name: str) -> dict:
    """HF's loading report, the official from_pretrained, and the model's tensors."""
    from safetensors.torch import save_file
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
    from transformers import PreTrainedModel

    cfg = Eagle3SpeculatorConfig.from_pretrained(d)
    # Eagle3DraftModel.from_pretrained goes through this loader, but returns no report.
    _, info = PreTrainedModel.from_pretrained.__func__(
        Eagle3DraftModel, d, config=cfg, output_loading_info=True
    )
    model = Eagle3DraftModel.from_pretrained(d)  # also loads the verifier's embedding
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k not in NOT_SAVED}
    save_file(sd, str(out / f"{name}.speculators.safetensors"))
    layer = model.config.transformer_layer_config
    return {
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
        "model_keys": sorted(model.state_dict()),
        "ignored_when_missing": list(Eagle3DraftModel._keys_to_ignore_on_load_missing),
        "aux_layer_ids": model.config.eagle_aux_hidden_state_layer_ids,
        "draft_vocab_size": model.config.draft_vocab_size,
        "flags": {k: getattr(model.config, k) for k in FLAGS},
        "layer": {k: getattr(layer, k, None) for k in LAYER_FIELDS},
        "verifier": model.config.speculators_config.verifier.name_or_path,
    }


def vllm_view(d: str) -> dict:
    """What vLLM builds from the directory: the draft's hf_config and the speculative config."""
    from vllm.transformers_utils.config import patch_rope_parameters
    from vllm.transformers_utils.configs.speculators.base import SpeculatorsConfig

    c = SpeculatorsConfig.from_pretrained(d)
    patch_rope_parameters(c)
    raw = json.loads((Path(d) / "config.json").read_text())
    keys = FLAGS + ("architectures", "draft_vocab_size", "eagle_aux_hidden_state_layer_ids")
    keys += ("rope_parameters", "head_dim", "hidden_size", "num_hidden_layers", "vocab_size")
    return {
        **{k: getattr(c, k, None) for k in keys},
        "target_hidden_size": getattr(c, "target_hidden_size", None),
        "speculative_config": SpeculatorsConfig.extract_vllm_speculative_config(raw),
        "verifier": raw["speculators_config"]["verifier"]["name_or_path"],
    }


def forward_logits(job: dict, out: Path) -> None:
    """Step-0 draft logits of speculators' own forward on the inputs the test wrote."""
    import torch
    from safetensors.torch import load_file, save_file
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig

    cfg = Eagle3SpeculatorConfig.from_pretrained(job["dir"])
    cfg.transformer_layer_config._attn_implementation = "eager"  # plain math, no flex attention
    model = Eagle3DraftModel.from_pretrained(job["dir"], config=cfg).eval()
    # speculators 0.9.0 on transformers 5.19 leaves embed_tokens as uninitialised memory and
    # loads the verifier's only when that memory happens to hold a NaN (its "not loaded" mark):
    # load it outright, as vLLM shares the target's.
    model._load_verifier_weights(overwrite_embed_tokens=True)
    x = load_file(job["inputs"])
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        model(
            hidden_states=x["aux"],
            input_ids=x["ids"],
            document_ids=torch.zeros_like(x["ids"]),
            position_ids=x["positions"],
            ttt_steps=1,
        )
    model.save_pretrained(out / "resaved")  # a head as speculators itself writes one
    embed = model.embed_tokens.weight.detach().contiguous()
    save_file({"logits": seen[0].contiguous(), "embed": embed}, str(out / "logits.safetensors"))


def convert(job: dict) -> None:
    """speculators' own converter on our portable (SGLang) export."""
    from speculators.convert.eagle.eagle3_converter import Eagle3Converter

    Eagle3Converter().convert(job["src"], job["out"], base_model=job["verifier"], validate=False)


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    result = {"speculators": {}, "vllm": {}}
    for name, d in job["exports"].items():
        result["speculators"][name] = speculators_view(d, out, name)
        result["vllm"][name] = vllm_view(d)
    forward_logits(job["forward"], out)
    convert(job["convert"])
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
