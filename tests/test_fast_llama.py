"""The fast target forward (FastLlama / FastRunner) computes exactly what the HF model computes.

References are always the HF model itself: full forwards (hidden_states for the aux features) and
its DynamicCache for the KV cache. fp32 throughout.
"""

from __future__ import annotations

import pytest
import torch
from infer_support import hf_greedy

from eagle3.infer.fast_runner import FastRunner
from eagle3.infer.runner import Runner
from eagle3.models.fast_llama import FastLlama

pytestmark = pytest.mark.slow

TOL = dict(rtol=1e-4, atol=1e-4)
# A tree of 8 nodes: parent of each node (-1: the root, which follows the cached prefix).
PARENTS = [-1, 0, 0, 1, 1, 2, 4, 4]


def tree_of(parents: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """(depths [n], ancestor-or-self mask [n, n], root-to-node paths) of a parent list."""
    n = len(parents)
    paths: list[list[int]] = []
    for j, p in enumerate(parents):
        paths.append((paths[p] if p >= 0 else []) + [j])
    mask = torch.zeros(n, n, dtype=torch.bool)
    for j, path in enumerate(paths):
        mask[j, path] = True
    return torch.tensor([len(p) - 1 for p in paths]), mask, paths


def hf_reference(model, ids: torch.Tensor, aux_ids: list[int]):
    """Logits [T, V] and aux [T, 3H] of a full HF forward (no cache) over ids [T]."""
    with torch.no_grad():
        out = model(input_ids=ids[None], output_hidden_states=True, use_cache=False)
    aux = torch.cat([out.hidden_states[i][0] for i in aux_ids], dim=-1)
    return out.logits[0].float(), aux


def hf_cache(model, ids: torch.Tensor):
    """Per layer (K, V) [nkv, T, d] of a plain HF prefill of ids [T]."""
    with torch.no_grad():
        out = model(input_ids=ids[None], use_cache=True)
    return [(layer.keys[0], layer.values[0]) for layer in out.past_key_values.layers]


class _Target:
    """The bits of eagle3.models.target.Target that FastRunner reads, for in-test HF models."""

    def __init__(self, model, aux_layer_ids):
        self.model = model.eval()
        self.aux_layer_ids = aux_layer_ids
        self.device = next(model.parameters()).device


def _randomise(model, seed: int):
    """Random weights everywhere (HF's init zeroes biases and sets norms to 1: too easy a test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "lm_head" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 4 / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model.eval()


def tiny_hf_model(kind: str):
    import transformers as tf

    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if kind == "qwen2":  # qkv bias; linear RoPE scaling
        cfg = tf.Qwen2Config(
            **common, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}
        )
        model = tf.Qwen2ForCausalLM(cfg)
    elif kind == "qwen3":  # q/k norms, head_dim != hidden/heads; YaRN (attention_scaling != 1)
        cfg = tf.Qwen3Config(
            **common,
            head_dim=32,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "rope_theta": 1e6,
                "original_max_position_embeddings": 64,
            },
        )
        model = tf.Qwen3ForCausalLM(cfg)
    else:  # llama with Llama-3.1 RoPE scaling and an MQA-like group of 4
        cfg = tf.LlamaConfig(
            **{**common, "num_key_value_heads": 1},
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "rope_theta": 5e5,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
        model = tf.LlamaForCausalLM(cfg)
    cfg._attn_implementation = "sdpa"
    return _randomise(model, seed=len(kind))


def _ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _check_prefill_and_tree(model, aux_ids, prompt_len=40):
    """Prefill, then verify the PARENTS tree: every row equals HF's full forward of its path.

    One HF forward per leaf covers the prompt and every node on that leaf's path.
    """
    vocab = model.config.vocab_size
    prompt = _ids(prompt_len, vocab)
    runner = FastRunner(_Target(model, aux_ids), capacity=128)
    p_logits, p_aux = runner.prefill(prompt)
    assert runner.cache_len == prompt_len

    depth, mask, paths = tree_of(PARENTS)
    tokens = _ids(len(PARENTS), vocab, seed=1)
    logits, aux = runner.verify(tokens, prompt_len + depth, mask)
    assert runner.cache_len == prompt_len  # verify commits nothing
    leaves = [j for j in range(len(PARENTS)) if j not in PARENTS]
    for leaf in leaves:
        path = paths[leaf]
        ref_logits, ref_aux = hf_reference(model, torch.cat([prompt, tokens[path]]), aux_ids)
        assert ref_logits.std() > 0.5  # the comparison is not between near-zero numbers
        torch.testing.assert_close(logits[path], ref_logits[prompt_len:], **TOL)
        torch.testing.assert_close(aux[path], ref_aux[prompt_len:], **TOL)
        if leaf == leaves[0]:
            torch.testing.assert_close(p_logits, ref_logits[:prompt_len], **TOL)
            torch.testing.assert_close(p_aux, ref_aux[:prompt_len], **TOL)
    return runner


def test_tiny_target_prefill_and_tree_match_hf(tiny_target):
    _check_prefill_and_tree(tiny_target.model, tiny_target.aux_layer_ids)


@pytest.mark.parametrize("kind", ["llama3-rope", "qwen2", "qwen3"])
def test_model_families_match_hf(kind):
    model = tiny_hf_model(kind)
    # Positions beyond original_max_position_embeddings, where the RoPE scalings differ most.
    # Repeated and unordered aux ids, as small targets get ([2, N//2, N-3] with N = 5: [2, 2, 2]).
    _check_prefill_and_tree(model, [3, 1, 3], prompt_len=90)


def test_chunked_prefill_and_last_only(tiny_target):
    prompt = _ids(50, tiny_target.vocab_size)
    ref_logits, ref_aux = hf_reference(tiny_target.model, prompt, tiny_target.aux_layer_ids)
    runner = FastRunner(tiny_target, capacity=64)
    runner.prefill(prompt[:30])
    logits, aux = runner.prefill(prompt[30:], last_only=True)
    assert logits.shape == (1, tiny_target.vocab_size) and aux.shape[0] == 20
    torch.testing.assert_close(logits[0], ref_logits[-1], **TOL)
    torch.testing.assert_close(aux, ref_aux[30:], **TOL)


def test_keep_cycles_leave_the_cache_of_a_plain_prefill(tiny_target):
    """Several verify/keep cycles with different accepted paths == HF's cache of a plain prefill."""
    runner = FastRunner(tiny_target, capacity=32)  # small: the cycles below also make it grow
    committed = _ids(20, tiny_target.vocab_size)
    runner.prefill(committed)
    depth, mask, paths = tree_of(PARENTS)
    for cycle, leaf in enumerate([6, 5, 3, 0, 7]):
        tokens = _ids(len(PARENTS), tiny_target.vocab_size, seed=10 + cycle)
        runner.verify(tokens, runner.cache_len + depth, mask)
        rows = torch.tensor(paths[leaf])
        runner.keep(rows)
        committed = torch.cat([committed, tokens[rows]])
        assert runner.cache_len == committed.numel()
    assert runner.capacity > 32
    ref = hf_cache(tiny_target.model, committed)
    for layer, (k_ref, v_ref) in enumerate(ref):
        k, v = runner.layer_kv(layer)
        torch.testing.assert_close(k, k_ref, **TOL)
        torch.testing.assert_close(v, v_ref, **TOL)
    # And the next forward on top of the compacted cache is the HF forward of the whole sequence.
    nxt = _ids(1, tiny_target.vocab_size, seed=99)
    logits, _ = runner.verify(nxt, torch.tensor([runner.cache_len]), torch.ones(1, 1, dtype=bool))
    ref_logits, _ = hf_reference(tiny_target.model, torch.cat([committed, nxt]), [0, 1, 2])
    torch.testing.assert_close(logits[0], ref_logits[-1], **TOL)


def test_greedy_decoding_equals_hf_generate(tiny_target):
    tok = tiny_target.tokenizer
    eos = set(tiny_target.eos_token_ids)
    runner = FastRunner(tiny_target, capacity=128)
    for text in ["The capital of France is", "def fibonacci(n):", "Once upon a time"]:
        ids = tok(text, return_tensors="pt").input_ids
        ref = hf_greedy(tiny_target.model, ids[0].tolist(), 24, sorted(eos))
        runner.reset()
        logits, _ = runner.prefill(ids[0], last_only=True)
        out: list[int] = []
        while len(out) < 24:
            nxt = int(logits[-1].argmax())
            out.append(nxt)
            if nxt in eos:
                break
            logits, _ = runner.verify(
                torch.tensor([nxt]), torch.tensor([runner.cache_len]), torch.ones(1, 1, dtype=bool)
            )
            runner.keep(torch.tensor([0]))
        assert out == ref, text


def test_runner_protocol_and_errors(tiny_target):
    runner = FastRunner(tiny_target, capacity=16)
    assert isinstance(runner, Runner)
    runner.prefill(_ids(5, tiny_target.vocab_size))
    with pytest.raises(ValueError, match="tree_mask"):
        runner.verify(_ids(3, 100), torch.arange(5, 8), torch.ones(2, 2, dtype=bool))
    runner.verify(_ids(3, 100), torch.arange(5, 8), torch.ones(3, 3, dtype=bool).tril())
    with pytest.raises(ValueError, match="not verified"):
        runner.keep(torch.tensor([0, 3]))
    runner.keep(torch.tensor([0, 2]))
    assert runner.cache_len == 7
    with pytest.raises(ValueError, match="empty"):
        runner.prefill(torch.tensor([], dtype=torch.long))
    runner.reset()
    assert runner.cache_len == 0


def test_unsupported_models_are_refused():
    import transformers as tf

    cfg = tf.Qwen2Config(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=0,
    )
    with pytest.raises(NotImplementedError, match="sliding"):
        FastLlama(tf.Qwen2ForCausalLM(cfg), [0, 0, 1], max_len=64)
    gcfg = tf.GemmaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    with pytest.raises(NotImplementedError, match="gemma"):
        FastLlama(tf.GemmaForCausalLM(gcfg), [0, 0, 1], max_len=64)


@pytest.fixture(scope="module")
def smollm2():
    from eagle3.config import TargetConfig
    from eagle3.models.target import load_target

    return load_target(TargetConfig(kind="embedded", device="cpu"))


def test_smollm2_prefill_and_tree_match_hf(smollm2):
    """The real target: SmolLM2-135M (GQA 9/3, tied embeddings, rope_theta 1e5), 30 layers."""
    _check_prefill_and_tree(smollm2.model, smollm2.aux_layer_ids, prompt_len=24)
