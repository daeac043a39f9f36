"""Continuous batching (eagle3/data/decode.py) against plain one-at-a-time HF generate."""

from __future__ import annotations

from types import SimpleNamespace

import infer_support
import pytest
import torch

from eagle3.data import decode
from eagle3.data.decode import decode_continuous
from eagle3.data.regenerate import answer_prompts

pytestmark = pytest.mark.slow


def hf_greedy(model, ids: list[int], n: int, eos: list[int]) -> tuple[list[int], bool]:
    """(the reference answer, truncated: no EOS within n tokens)."""
    new = infer_support.hf_greedy(model, ids, n, eos)
    return new, not (new and new[-1] in eos)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lens = [1, 9, 3, 30, 2, 17, 5, 44, 4]  # a 1-token prompt, and longer ones arriving late
    return [torch.randint(10, 400, (n,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module")
def stopping_target(tiny_target):
    """The tiny target, with an 'EOS' it actually emits, so answers end at different steps and
    finished slots get refilled (the random tiny model never emits its real EOS)."""
    ref = [hf_greedy(tiny_target.model, p, 12, [0]) for p in _prompts()]
    eos = [ids[3] for ids, _ in ref[:3]]
    return SimpleNamespace(model=tiny_target.model, eos_token_ids=eos)


@pytest.mark.parametrize("batch_size", [1, 2, 4, 16])
def test_greedy_equals_one_at_a_time_generate(stopping_target, batch_size, monkeypatch):
    # Tiny buffer growth and trim thresholds: every realloc / trim path runs many times.
    monkeypatch.setattr(decode, "HEADROOM", 2)
    monkeypatch.setattr(decode, "TRIM_AT", 1)
    prompts = _prompts()
    limits = [12, 7, 12, 1, 12, 9, 12, 12, 3]
    eos = stopping_target.eos_token_ids
    ref = [
        hf_greedy(stopping_target.model, p, n, eos) for p, n in zip(prompts, limits, strict=True)
    ]
    assert {cut for _, cut in ref} == {True, False}  # both endings occur
    ended: list[int] = []
    got = decode_continuous(
        stopping_target, prompts, limits, batch_size, on_done=lambda i, ids, cut: ended.append(i)
    )
    assert got == ref
    assert sorted(ended) == list(range(len(prompts)))  # every answer reported once


def test_default_thresholds_and_zero_limits(stopping_target):
    prompts = _prompts()
    limits = [0, 140, 5, 0, 140, 5, 140, 140, 140]  # past HEADROOM: the buffer grows
    eos = stopping_target.eos_token_ids
    got = decode_continuous(stopping_target, prompts, limits, 3)
    for p, n, g in zip(prompts, limits, got, strict=True):
        assert g == (([], True) if n == 0 else hf_greedy(stopping_target.model, p, n, eos))


def test_sampling_does_not_depend_on_the_batch(tiny_target):
    prompts = _prompts()
    limits = [8] * len(prompts)
    seeds = [100 + i for i in range(len(prompts))]
    alone = [
        decode_continuous(tiny_target, [p], [8], 1, temperature=1.5, seeds=[s])[0]
        for p, s in zip(prompts, seeds, strict=True)
    ]
    together = decode_continuous(tiny_target, prompts, limits, 4, temperature=1.5, seeds=seeds)
    assert together == alone
    other = decode_continuous(tiny_target, prompts, limits, 4, temperature=1.5, seeds=[7] * 9)
    assert other != together
    greedy = decode_continuous(tiny_target, prompts, limits, 4)
    assert together != greedy  # it did sample


def test_sliding_window_models_fall_back_to_generate():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).eval()
    tok = SimpleNamespace(pad_token_id=None)
    target = SimpleNamespace(model=model, eos_token_ids=[0], tokenizer=tok, device=model.device)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
    assert decode_continuous(target, prompts, [6, 6], 2) is None  # sliding cache: not ours
    got = answer_prompts(target, prompts, [6, 6], 2)
    assert got == [hf_greedy(model, p, 6, [0]) for p in prompts]
