"""A compact Llama / Qwen2 / Qwen3 forward over a loaded HF model's weights, for speculative decoding.

In the style of gpt-fast: one flat loop over the layers, a preallocated static KV cache (the
KVBuffer of eagle3/models/kv.py, shared with the HF runner and the regeneration decoder), and an
arbitrary boolean attention mask over (cached prefix + new rows), so that one call verifies a whole
draft TREE. It computes what the HF model computes (same RoPE tables, same RMSNorm, same op order
in the residual stream); `tests/test_fast_llama.py` checks logits and aux features against HF.

Why not HF itself: at batch 1 on a CPU, an HF eager decode step of SmolLM2-135M was measured at
~100 ms against ~59 ms for its matmuls alone; the rest is Python and small ops (mask construction,
cache objects, output capture, per-layer kwargs plumbing). Here a layer is ~25 tensor calls and no
Python objects besides the weights. In bf16 the prefill logits are bit-identical to HF's.

Weights are the HF model's own tensors (no copy): fusing QKV and gate/up was measured here and did
not make the matmuls faster on this CPU (2 threads, MKL), so we keep zero extra memory.

Tricks, each visible below:
- RoPE: `rotate_half(x) * sin == roll(x, d/2) * sin_signed` with sin_signed = [-sin, sin]. Negation
  is exact in IEEE arithmetic, so this is bit-identical to HF and saves the neg/slice/cat ops.
- Attention is SDPA on 4-D tensors [1, heads, n, d] with `enable_gqa=True` (K/V never repeated).
  On CPU, 3-D inputs silently take the `math` fallback (bmm + softmax + where), measured ~10x slower
  than the fused flash kernel that 4-D inputs get; stacking the g query heads of a KV group as rows
  of one MQA attention measured no faster than enable_gqa once both were 4-D.
- The prefill of an empty cache passes no mask but `is_causal=True` (the kernel skips masked
  blocks); a single decoded row passes no mask at all (it sees everything).
- RMSNorm in fp32 models is `F.rms_norm` (one fused kernel, the same math); for half dtypes we keep
  HF's exact sequence (normalise in fp32, cast, then multiply by the weight) so rounding matches.
- Logits only for the rows asked for (`logits_rows`): a prefill needs only its last row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eagle3.models.kv import KVBuffer

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# RoPE types whose frequencies depend on the sequence length seen so far: we call the HF rotary
# module on every forward (as HF does) instead of using a precomputed table.
DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


@dataclass
class LayerWeights:
    """Views of one HF decoder layer's parameters (no copies). Biases / q-k norms may be None."""

    ln1: torch.Tensor
    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    wv: torch.Tensor
    bv: torch.Tensor | None
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm over head_dim, before RoPE
    k_norm: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    ln2: torch.Tensor
    wg: torch.Tensor
    bg: torch.Tensor | None
    wu: torch.Tensor
    bu: torch.Tensor | None
    wd: torch.Tensor
    bd: torch.Tensor | None

    @classmethod
    def from_hf(cls, layer) -> LayerWeights:
        a, m = layer.self_attn, layer.mlp

        def w(mod):
            return mod.weight.detach()

        def b(mod):
            return None if getattr(mod, "bias", None) is None else mod.bias.detach()

        qn, kn = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
        return cls(
            ln1=w(layer.input_layernorm),
            wq=w(a.q_proj),
            bq=b(a.q_proj),
            wk=w(a.k_proj),
            bk=b(a.k_proj),
            wv=w(a.v_proj),
            bv=b(a.v_proj),
            q_norm=None if qn is None else w(qn),
            k_norm=None if kn is None else w(kn),
            wo=w(a.o_proj),
            bo=b(a.o_proj),
            ln2=w(layer.post_attention_layernorm),
            wg=w(m.gate_proj),
            bg=b(m.gate_proj),
            wu=w(m.up_proj),
            bu=b(m.up_proj),
            wd=w(m.down_proj),
            bd=b(m.down_proj),
        )


def _rms_norm_hf(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm, op for op (matters for the rounding of half dtypes)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


class FastLlama:
    """The decoder stack of an HF LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM."""

    def __init__(self, model, aux_layer_ids: list[int], max_len: int):
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise NotImplementedError(
                f"fast forward supports {SUPPORTED_MODEL_TYPES}, not {cfg.model_type!r}"
            )
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {cfg.hidden_act!r} (only silu)")
        for layer in model.model.layers:
            sw = getattr(layer.self_attn, "sliding_window", None)
            if sw is not None and max_len > sw:
                raise NotImplementedError(f"sliding-window attention ({sw}) with max_len {max_len}")
        self.config = cfg
        self.max_len = max_len
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.aux_layer_ids = list(aux_layer_ids)
        self._aux_at = set(self.aux_layer_ids)  # ids may repeat (small targets: [2, 2, 1])

        self.layers = [LayerWeights.from_hf(layer) for layer in model.model.layers]
        self.embed_w = model.get_input_embeddings().weight.detach()
        self.norm_w = model.model.norm.weight.detach()
        head = model.get_output_embeddings()
        self.lm_w = head.weight.detach()
        self.lm_b = None if getattr(head, "bias", None) is None else head.bias.detach()
        self.dtype, self.device = self.embed_w.dtype, self.embed_w.device
        self.rms = (
            (lambda x, w: F.rms_norm(x, (x.shape[-1],), w, self.eps))
            if self.dtype == torch.float32
            else (lambda x, w: _rms_norm_hf(x, w, self.eps))
        )

        # RoPE: HF's own rotary module computes the table, so every rope_scaling type it knows
        # (llama3, yarn, linear, ...) comes out exactly as HF's, attention_scaling included.
        self.rotary = model.model.rotary_emb
        self.dynamic_rope = getattr(self.rotary, "rope_type", "default") in DYNAMIC_ROPE_TYPES
        self.cos = self.sin = None
        self.extend_rope(max_len)

    def extend_rope(self, max_len: int) -> None:
        """Precompute cos / [-sin, sin] for positions [0, max_len) with HF's rotary module."""
        self.max_len = max_len
        if self.dynamic_rope or (self.cos is not None and self.cos.shape[0] >= max_len):
            return
        pos = torch.arange(max_len, device=self.device)[None]
        with torch.no_grad():  # not inference_mode: torch.compile'd forwards read these tables
            cos, sin = self.rotary(self.embed_w[:1], pos)
        self.cos, self.sin = cos[0].clone(), self._signed(sin[0])

    def _signed(self, sin: torch.Tensor) -> torch.Tensor:
        h = self.head_dim // 2
        return torch.cat((-sin[..., :h], sin[..., h:]), dim=-1)

    def new_cache(self, max_len: int | None = None) -> KVBuffer:
        """The KV buffer this forward writes (eagle3/models/kv.py): batch 1, all layers in one
        tensor, so keeping a tree's accepted rows is a single gather + scatter."""
        return KVBuffer(
            len(self.layers),
            self.n_kv,
            self.head_dim,
            max_len or self.max_len,
            self.dtype,
            self.device,
        )

    def _rope_tables(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dynamic_rope:
            cos, sin = self.rotary(self.embed_w[:1], position_ids[None])
            return cos[0][:, None], self._signed(sin[0])[:, None]
        return self.cos[position_ids][:, None], self.sin[position_ids][:, None]  # [n, 1, d]

    @torch.inference_mode()
    def forward(self, *args, **kwargs) -> tuple[torch.Tensor | None, torch.Tensor]:
        return self.forward_raw(*args, **kwargs)

    __call__ = forward

    def forward_raw(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVBuffer,
        start: int,
        mask: torch.Tensor | None = None,
        logits_rows: slice | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """n new tokens written to cache columns [start, start+n), attending to [0, start+n).

        mask: bool [n, start+n], True where row j may attend to slot i. None means causal over the
        new rows (every row sees the whole cached prefix). Each row must see at least itself.
        Returns (logits [rows, V] float32 for `logits_rows` (all rows if None; none if
        logits_rows is False), aux [n, 3H]: the residual stream entering the aux layers).
        """
        n = input_ids.shape[0]
        end = start + n
        if end > cache.capacity:
            raise ValueError(f"KV cache full: {start} + {n} > capacity {cache.capacity}")
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        gqa = nh != nkv
        cos, sin = self._rope_tables(position_ids)
        half = d // 2

        # One mask [n, start+n] for all layers (broadcast over heads), or none at all.
        causal = mask is None and n > 1 and start == 0
        if mask is None and n > 1 and start > 0:
            mask = torch.ones(n, end, dtype=torch.bool, device=self.device).tril_(start)

        x = F.embedding(input_ids, self.embed_w)
        seen: dict[int, torch.Tensor] = {}
        for i, w in enumerate(self.layers):
            if i in self._aux_at:
                seen[i] = x  # HF hidden_states[i]: the input of layer i
            h = self.rms(x, w.ln1)
            q = F.linear(h, w.wq, w.bq).view(n, nh, d)
            k = F.linear(h, w.wk, w.bk).view(n, nkv, d)
            v = F.linear(h, w.wv, w.bv).view(n, nkv, d)
            if w.q_norm is not None:
                q, k = self.rms(q, w.q_norm), self.rms(k, w.k_norm)
            # rotate_half(x) * sin == roll(x, d/2) * [-sin, sin], exactly.
            q = q * cos + q.roll(half, -1) * sin
            k = k * cos + k.roll(half, -1) * sin
            # In place at [start, end); keys/values come back as views [1, kv_heads, end, d].
            keys, values = cache.write(i, start, k.transpose(0, 1), v.transpose(0, 1))
            # 4-D [1, heads, rows, d]: the fused CPU flash kernel (3-D falls back to `math`).
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                keys,
                values,
                attn_mask=mask,
                is_causal=causal,
                scale=self.scale,
                enable_gqa=gqa,
            )
            o = o[0].transpose(0, 1).reshape(n, nh * d)
            x = x + F.linear(o, w.wo, w.bo)
            h = self.rms(x, w.ln2)
            x = x + F.linear(F.silu(F.linear(h, w.wg, w.bg)) * F.linear(h, w.wu, w.bu), w.wd, w.bd)

        aux_t = torch.cat([seen[i] for i in self.aux_layer_ids], dim=-1)
        if logits_rows is False:
            return None, aux_t
        if logits_rows is not None:
            x = x[logits_rows]
        logits = F.linear(self.rms(x, self.norm_w), self.lm_w, self.lm_b)
        return logits.float(), aux_t
