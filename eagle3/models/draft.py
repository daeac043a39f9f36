"""The EAGLE-3 draft head (docs/CONTRACTS.md §3).

One Llama decoder layer whose attention reads cat(input_layernorm(embed(token)), hidden_norm(h))
(width 2H, embedding first); the residual around attention is the un-normed h. At the first draft
step h = fc(cat(aux_low, aux_mid, aux_high)); later steps feed back the layer's own pre-norm output.
logits = lm_head(norm(h)) over the draft vocabulary; draft id -> target id is id + d2t[id].

The embedding is the target's and is not part of this module: callers pass embeddings in.
The pieces (fuse, qkv, finish, logits) are public so that training-time test and the tree drafter
can arrange attention their own way while computing exactly this layer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE = "LlamaForCausalLMEagle3"


def default_aux_layer_ids(num_target_layers: int) -> list[int]:
    """The residual stream ENTERING layers 2, N//2 and N-3 (HF hidden_states indices)."""
    n = num_target_layers
    return [2, n // 2, n - 3]


@dataclass
class DraftConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the TARGET vocabulary
    draft_vocab_size: int
    target_hidden_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    torch_dtype: str = "float32"
    # vLLM convention: HF hidden_states indices (layer-input ids). None means the default.
    aux_layer_ids: list[int] | None = None
    # Our own keys (tree settings, data digest, target id, number of target layers, ...).
    eagle3: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_target(
        cls, target_config: Any, draft_vocab_size: int, aux_layer_ids: list[int] | None = None
    ) -> DraftConfig:
        """Sizes follow the target's HF config (as the EAGLE-3 authors do)."""
        tc = target_config
        heads = tc.num_attention_heads
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
        n_layers = tc.num_hidden_layers
        if aux_layer_ids is not None and list(aux_layer_ids) == default_aux_layer_ids(n_layers):
            aux_layer_ids = None
        rope_theta, rope_scaling = rope_settings(tc)
        return cls(
            hidden_size=tc.hidden_size,
            intermediate_size=tc.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab_size=tc.vocab_size,
            draft_vocab_size=min(draft_vocab_size, tc.vocab_size),
            target_hidden_size=tc.hidden_size,
            rms_norm_eps=getattr(tc, "rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=getattr(tc, "max_position_embeddings", 2048),
            aux_layer_ids=list(aux_layer_ids) if aux_layer_ids is not None else None,
            eagle3={"target_num_hidden_layers": n_layers},
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rope_settings(tc: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from an HF config of transformers 4.x or 5.x."""
    params = getattr(tc, "rope_parameters", None)
    scaling = getattr(tc, "rope_scaling", None)
    theta = getattr(tc, "rope_theta", None)
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(theta or 10000.0), (dict(scaling) if scaling else None)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return (inv_freq / factor).float()
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        return torch.where(is_mid, mid, scaled).float()
    raise NotImplementedError(f"rope_scaling type {kind!r} is not supported by the draft head")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, c: DraftConfig):
        super().__init__()
        self.n, self.nkv, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(2 * c.hidden_size, self.n * self.d, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, self.nkv * self.d, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, self.nkv * self.d, bias=False)
        self.o_proj = nn.Linear(self.n * self.d, c.hidden_size, bias=False)


class MLP(nn.Module):
    def __init__(self, c: DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    def __init__(self, c: DraftConfig):
        super().__init__()
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.mlp = MLP(c)


class Eagle3Draft(nn.Module):
    def __init__(self, config: DraftConfig):
        super().__init__()
        c = self.config = config
        self.fc = nn.Linear(3 * c.target_hidden_size, c.hidden_size, bias=False)
        self.midlayer = MidLayer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        t2d = torch.zeros(c.vocab_size, dtype=torch.bool)
        t2d[: c.draft_vocab_size] = True  # identity until a vocabulary is set
        self.register_buffer("t2d", t2d)
        inv = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        self.register_buffer("inv_freq", inv, persistent=False)

    # --- vocabulary -------------------------------------------------------------------------
    def set_vocab(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        self.d2t.copy_(d2t.to(self.d2t))
        self.t2d.copy_(t2d.to(self.t2d))

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    @property
    def draft_token_ids(self) -> torch.Tensor:
        """Target ids of the draft vocabulary, ascending (index = draft id)."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    # --- the layer, in pieces -------------------------------------------------------------------
    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """[..., 3*Ht] target features -> [..., H] first-step hidden state."""
        return self.fc(aux.to(self.fc.weight.dtype))

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape [B, 1, T, d] for position_ids [B, T]."""
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.fc.weight.dtype
        return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)

    def qkv(
        self, embeds: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [B,n,T,d], keys and values [B,nkv,T,d] (RoPE applied)."""
        layer, attn = self.midlayer, self.midlayer.self_attn
        x = torch.cat(
            (layer.input_layernorm(embeds.to(hidden.dtype)), layer.hidden_norm(hidden)), dim=-1
        )
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, attn.n, attn.d).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, attn.nkv, attn.d).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, attn.nkv, attn.d).transpose(1, 2)
        cos, sin = self.rope(position_ids)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish(self, attn_out: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """attention output [B,n,T,d] + residual -> the layer's pre-norm output [B,T,H]."""
        layer = self.midlayer
        b, _, t, _ = attn_out.shape
        h = hidden + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(b, t, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits from the pre-norm hidden state."""
        return self.lm_head(self.norm(h))

    # --- the plain forward ----------------------------------------------------------------------
    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One pass of the layer over T new rows on top of an optional KV prefix.

        embeds [B,T,H] (target embedding of each row's input token), hidden [B,T,H], position_ids
        [B,T]; attn_mask: bool [T, S] or [B,1,T,S] (True = may attend) over S = past + T keys, or
        None for causal. Returns the pre-norm hidden [B,T,H] and the full (k, v) [B,nkv,S,d].
        """
        q, k, v = self.qkv(embeds, hidden, position_ids)
        if past_kv is not None:
            k = torch.cat((past_kv[0], k), dim=2)
            v = torch.cat((past_kv[1], v), dim=2)
        out = attend(q, k, v, attn_mask)
        return self.finish(out, hidden), (k, v)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Scaled dot-product attention with GQA; mask None = causal aligned to the last rows."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    t, s = q.shape[2], k.shape[2]
    if mask is None:
        if t == 1:
            return F.scaled_dot_product_attention(q, k, v)
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
