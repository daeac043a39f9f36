"""The draft head against a naive implementation written here from docs/CONTRACTS.md §3."""

from __future__ import annotations

import math

import pytest
import torch

from eagle3.models.draft import DraftConfig, Eagle3Draft, default_aux_layer_ids, rope_inv_freq

pytestmark = pytest.mark.unit


def small_config(**kw) -> DraftConfig:
    base = dict(
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=50,
        draft_vocab_size=20,
        target_hidden_size=24,
        rms_norm_eps=1e-6,
        rope_theta=500.0,
    )
    base.update(kw)
    return DraftConfig(**base)


def random_draft(c: DraftConfig, seed: int = 0) -> Eagle3Draft:
    torch.manual_seed(seed)
    d = Eagle3Draft(c).double()
    with torch.no_grad():  # norms away from 1 so that a missing norm shows
        for n, p in d.named_parameters():
            if n.endswith("norm.weight") or "layernorm" in n:
                p.uniform_(0.5, 1.5)
    return d


# --- the naive reference: scalar loops over rows and heads, straight from the contract -------------
def naive_rmsnorm(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def naive_rope(vec, pos, theta, d):
    """Rotate pairs (i, i + d/2) by pos * theta^(-2i/d) (HF Llama's rotate_half convention)."""
    out = vec.clone()
    for i in range(d // 2):
        ang = pos * theta ** (-2 * i / d)
        a, b = vec[i], vec[i + d // 2]
        out[i] = a * math.cos(ang) - b * math.sin(ang)
        out[i + d // 2] = b * math.cos(ang) + a * math.sin(ang)
    return out


def naive_layer(sd, c, embeds, hidden, positions, allowed):
    """embeds/hidden [T,H]; allowed[t][s]: row t attends to row s. Returns pre-norm outputs [T,H]."""
    T = embeds.shape[0]
    n, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    p = "midlayer."
    x = torch.cat(
        [
            naive_rmsnorm(embeds, sd[p + "input_layernorm.weight"], c.rms_norm_eps),
            naive_rmsnorm(hidden, sd[p + "hidden_norm.weight"], c.rms_norm_eps),
        ],
        dim=-1,
    )
    q = x @ sd[p + "self_attn.q_proj.weight"].T
    k = x @ sd[p + "self_attn.k_proj.weight"].T
    v = x @ sd[p + "self_attn.v_proj.weight"].T
    out = torch.zeros(T, n * d, dtype=x.dtype)
    for t in range(T):
        for h in range(n):
            g = h // (n // nkv)  # GQA: query head h reads kv head g
            qh = naive_rope(q[t, h * d : (h + 1) * d], positions[t], c.rope_theta, d)
            scores, values = [], []
            for s in range(T):
                if allowed[t][s]:
                    ks = naive_rope(k[s, g * d : (g + 1) * d], positions[s], c.rope_theta, d)
                    scores.append(float(qh @ ks) / math.sqrt(d))
                    values.append(v[s, g * d : (g + 1) * d])
            w = torch.softmax(torch.tensor(scores, dtype=x.dtype), 0)
            out[t, h * d : (h + 1) * d] = sum(wi * vi for wi, vi in zip(w, values, strict=True))
    h1 = hidden + out @ sd[p + "self_attn.o_proj.weight"].T
    m = naive_rmsnorm(h1, sd[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
    gate, up = m @ sd[p + "mlp.gate_proj.weight"].T, m @ sd[p + "mlp.up_proj.weight"].T
    return h1 + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T


def test_draft_forward_matches_naive_reference():
    c = small_config()
    d = random_draft(c)
    sd = {k: v.double() for k, v in d.state_dict().items()}
    T = 6
    torch.manual_seed(1)
    aux = torch.randn(T, 3 * c.target_hidden_size, dtype=torch.double)
    embeds = torch.randn(T, c.hidden_size, dtype=torch.double)
    positions = list(range(3, 3 + T))

    fused = aux @ sd["fc.weight"].T
    causal = [[s <= t for s in range(T)] for t in range(T)]
    want = naive_layer(sd, c, embeds, fused, positions, causal)
    want_logits = naive_rmsnorm(want, sd["norm.weight"], c.rms_norm_eps) @ sd["lm_head.weight"].T

    got, (k, v) = d(embeds[None], d.fuse(aux[None]), torch.tensor([positions]))
    assert torch.allclose(got[0], want, atol=1e-6)  # RoPE angles are float32, as in HF
    assert torch.allclose(
        d.logits(got)[0], want_logits, atol=1e-6
    )  # RoPE angles are float32, as in HF
    assert k.shape == (1, c.num_key_value_heads, T, c.head_dim)


def test_draft_tree_mask_and_kv_prefix_match_naive_reference():
    """A KV prefix plus an arbitrary (tree) mask: what the drafter and TTT rely on."""
    c = small_config()
    d = random_draft(c, seed=3)
    sd = {k: v.double() for k, v in d.state_dict().items()}
    torch.manual_seed(2)
    P, T = 4, 5
    embeds = torch.randn(P + T, c.hidden_size, dtype=torch.double)
    hidden = torch.randn(P + T, c.hidden_size, dtype=torch.double)
    positions = [0, 1, 2, 3, 4, 4, 5, 5, 6]
    parent = {4: None, 5: None, 6: 4, 7: 4, 8: 6}  # a small tree on top of the prefix
    allowed = [[False] * (P + T) for _ in range(P + T)]
    for t in range(P):
        for s in range(t + 1):
            allowed[t][s] = True
    for t in range(P, P + T):
        for s in range(P):
            allowed[t][s] = True
        node = t
        while node is not None:
            allowed[t][node] = True
            node = parent[node]
    want = naive_layer(sd, c, embeds, hidden, positions, allowed)

    _, past = d(embeds[None, :P], hidden[None, :P], torch.tensor([positions[:P]]))
    mask = torch.tensor(allowed)[P:]
    got, (k, _) = d(
        embeds[None, P:],
        hidden[None, P:],
        torch.tensor([positions[P:]]),
        past_kv=past,
        attn_mask=mask,
    )
    assert torch.allclose(got[0], want[P:], atol=1e-6)  # RoPE angles are float32, as in HF
    assert k.shape[2] == P + T


def test_draft_ids_map_through_d2t():
    c = small_config()
    d = Eagle3Draft(c)
    ids = torch.tensor(sorted(torch.randperm(c.vocab_size)[: c.draft_vocab_size].tolist()))
    t2d = torch.zeros(c.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    d.set_vocab(ids - torch.arange(c.draft_vocab_size), t2d)
    assert torch.equal(d.draft_to_target(torch.arange(c.draft_vocab_size)), ids)
    assert torch.equal(d.draft_token_ids, ids)


def test_default_aux_layers_and_llama3_rope():
    assert default_aux_layer_ids(32) == [2, 16, 29]
    assert default_aux_layer_ids(30) == [2, 15, 27]
    plain = rope_inv_freq(64, 500000.0, None)
    scaled = rope_inv_freq(
        64,
        500000.0,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    assert torch.allclose(scaled[:4], plain[:4])  # high frequencies untouched
    assert torch.allclose(scaled[-1], plain[-1] / 8.0)  # lowest frequency divided by the factor
    with pytest.raises(NotImplementedError, match="yarn"):
        rope_inv_freq(64, 1e4, {"rope_type": "yarn", "factor": 4.0})


def test_llama3_rope_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        rope_theta=500000.0,
        rope_scaling=scaling,
        max_position_embeddings=131072,
    )
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_inv_freq(128, 500000.0, scaling)
    assert torch.allclose(ours, theirs.float(), rtol=1e-6)
