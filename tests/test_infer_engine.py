"""The engine end to end: greedy output == HF generate token for token; sampling is lossless."""

from __future__ import annotations

from types import SimpleNamespace

import infer_support
import pytest
import torch
from scipy.stats import chisquare

from eagle3.infer.engine import SpecEngine, draft_dtype
from eagle3.models.checkpoint import load_draft, save_draft
from eagle3.models.draft import DraftConfig, Eagle3Draft
from eagle3.models.target import Target, build_tiny_target

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

MAX_NEW = 40


def _hf_greedy(target, ids: list[int], max_new: int, eos=None) -> list[int]:
    return infer_support.hf_greedy(target.model, ids, max_new, eos or target.eos_token_ids)


@pytest.fixture(scope="module")
def random_head(tiny_target):
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return Eagle3Draft(DraftConfig.from_target(tiny_target.config, 2048)).eval()


def _cfg(recipe, **kw):
    return recipe.infer.model_copy(update=kw)


def test_greedy_trained_head_equals_hf_generate(tiny_target, tiny_recipe, tiny_trained_head):
    engine = SpecEngine(
        tiny_target, tiny_trained_head, _cfg(tiny_recipe, total_tokens=16, depth=4, top_k=4)
    )
    seen = infer_support.random_prompts()[:4].tolist()  # texts the head was trained on
    unseen = infer_support.random_prompts(n_seq=2, seed=99).tolist()
    taus = []
    for i, ids in enumerate(seen + unseen):
        ref = _hf_greedy(tiny_target, ids, MAX_NEW)
        res = engine.generate(ids, max_new_tokens=MAX_NEW)
        assert res.tokens == ref, f"prompt {i}"
        assert res.stop_reason == "length" and len(res.tokens) == MAX_NEW
        assert sum(res.accept_lengths) + 1 >= MAX_NEW  # prefill token + what the cycles emitted
        taus.append(res.tau)
    # The head must actually accept long paths, or this test exercises nothing.
    assert min(taus[:4]) > 2.5, taus


def test_greedy_chain_and_ar_equal_hf_generate(tiny_target, tiny_recipe, tiny_trained_head):
    engine = SpecEngine(tiny_target, tiny_trained_head, _cfg(tiny_recipe, mode="chain", depth=3))
    assert engine.tree_shape() == (3, 1, 3)
    for ids in (
        infer_support.random_prompts(n_seq=2).tolist()
        + infer_support.random_prompts(n_seq=1, seed=7).tolist()
    ):
        ref = _hf_greedy(tiny_target, ids, MAX_NEW)
        res = engine.generate(ids, max_new_tokens=MAX_NEW)
        assert res.tokens == ref
        assert max(res.accept_lengths) <= 4  # a chain of 3 + the bonus
        assert engine.generate_ar(ids, max_new_tokens=MAX_NEW).tokens == ref


def _greedy_taus_equal_to_hf(engine, target) -> list[float]:
    """tau on two seen prompts and one unseen, each output checked against HF generate."""
    taus = []
    for ids in (
        infer_support.random_prompts(n_seq=2).tolist()
        + infer_support.random_prompts(n_seq=1, seed=7).tolist()
    ):
        res = engine.generate(ids, max_new_tokens=MAX_NEW)
        assert res.tokens == _hf_greedy(target, ids, MAX_NEW)
        taus.append(res.tau)
    return taus


def test_fast_backend_is_lossless_too(tiny_target, tiny_recipe, tiny_trained_head):
    """The engine takes any Runner: `infer.backend: fast` gives the same greedy output."""
    engine = SpecEngine(tiny_target, tiny_trained_head, _cfg(tiny_recipe, backend="fast"))
    assert type(engine.runner).__name__ == "FastRunner"
    taus = _greedy_taus_equal_to_hf(engine, tiny_target)
    assert min(taus[:2]) > 2.5, taus  # seen prompts: long paths were accepted and compacted


def test_a_bf16_draft_on_an_fp32_target_changes_speed_not_tokens(
    tiny_target, tiny_recipe, tiny_trained_head, tmp_path
):
    """infer.draft_dtype: the draft proposes in bf16, the fp32 target alone decides the tokens."""
    save_draft(tiny_trained_head, tmp_path / "head")
    recipe = tiny_recipe.model_copy(
        update={"infer": _cfg(tiny_recipe, backend="fast", draft_dtype="bfloat16")}
    )
    assert tiny_target.dtype == torch.float32 and draft_dtype(recipe) == "bfloat16"
    head = load_draft(tmp_path / "head", dtype=draft_dtype(recipe))
    assert head.fc.weight.dtype == torch.bfloat16
    engine = SpecEngine(tiny_target, head, recipe.infer)
    taus = _greedy_taus_equal_to_hf(engine, tiny_target)
    assert min(taus[:2]) > 2.5, taus  # the bf16 head still drafts paths that get accepted


def test_greedy_random_head_equals_hf_generate(tiny_target, tiny_recipe, random_head):
    """A bad draft may only make it slower, never different."""
    engine = SpecEngine(
        tiny_target, random_head, _cfg(tiny_recipe, total_tokens=24, depth=5, top_k=5)
    )
    for ids in infer_support.random_prompts(n_seq=3, prompt_len=11, seed=3).tolist():
        assert engine.generate(ids, max_new_tokens=MAX_NEW).tokens == _hf_greedy(
            tiny_target, ids, MAX_NEW
        )


def test_stops_at_eos_stop_strings_and_budget(
    tiny_target, tiny_recipe, tiny_trained_head, monkeypatch
):
    engine = SpecEngine(tiny_target, tiny_trained_head, tiny_recipe.infer)
    ids = infer_support.random_prompts(n_seq=1).tolist()[0]
    ref = _hf_greedy(tiny_target, ids, MAX_NEW)
    for n in (1, 2, 7):
        res = engine.generate(ids, max_new_tokens=n)
        assert res.tokens == ref[:n] and res.stop_reason == "length"
    # EOS: declare a token the greedy text emits mid-way as end of sequence.
    eos = ref[9]
    first = ref.index(eos)
    monkeypatch.setattr(Target, "eos_token_ids", property(lambda self: [eos]))
    res = engine.generate(ids, max_new_tokens=MAX_NEW)
    assert res.tokens == ref[: first + 1] == _hf_greedy(tiny_target, ids, MAX_NEW, eos=[eos])
    assert res.stop_reason == "eos"
    monkeypatch.undo()
    # Stop strings: generation ends on the token that completes the string.
    tok = tiny_target.tokenizer
    cut = next(i for i in range(5, MAX_NEW) if tok.decode(ref[i : i + 1]).strip())
    stop = tok.decode(ref[cut : cut + 1]).strip()
    res = engine.generate(ids, max_new_tokens=MAX_NEW, stop=[stop])
    assert res.stop_reason == "stop" and stop in tok.decode(res.tokens)
    assert res.tokens == ref[: len(res.tokens)] and stop not in tok.decode(res.tokens[:-1])
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(ids, max_new_tokens=0)


# --- sampling: a tiny target with a 32-token vocabulary, where exact distributions are computable ---
V = 32


@pytest.fixture(scope="module")
def small_vocab(tiny_recipe):
    cfg = tiny_recipe.target.model_copy(
        update={
            "tiny": tiny_recipe.target.tiny.model_copy(
                update={"lm_head_scale": 2.0, "num_hidden_layers": 4}
            )
        }
    )
    model = build_tiny_target(cfg, vocab_size=V)
    model.generation_config.eos_token_id = None  # no early stop: every sample has 3 tokens
    target = Target(
        model, SimpleNamespace(eos_token_id=None, decode=lambda ids: ""), None, "tiny-v32", "seeded"
    )
    with torch.random.fork_rng():
        torch.manual_seed(2)
        draft = Eagle3Draft(DraftConfig.from_target(model.config, V)).eval()
    return target, draft


@torch.no_grad()
def _exact(target, prompt, T, top_p):
    """p(x1), p(x2 | x1) [V, V], p(x3 | x1, x2) [V, V, V] under the warped target."""
    from eagle3.infer.verify import warp_probs

    m = target.model
    p1 = warp_probs(m(torch.tensor([prompt])).logits[0, -1], T, top_p)
    seq2 = torch.cat((torch.tensor(prompt).expand(V, -1), torch.arange(V)[:, None]), 1)
    p2 = warp_probs(m(seq2).logits[:, -1], T, top_p)
    x12 = torch.cartesian_prod(torch.arange(V), torch.arange(V))
    seq3 = torch.cat((torch.tensor(prompt).expand(V * V, -1), x12), 1)
    p3 = warp_probs(m(seq3).logits[:, -1], T, top_p).view(V, V, V)
    return p1, p2, p3


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value, pooling the cells expected below 5 into one."""
    n = counts.sum()
    exp = probs * n
    assert counts[probs == 0].sum() == 0, "a token of probability 0 was emitted"
    big = exp >= 5
    obs = torch.cat((counts[big], counts[~big].sum()[None]))
    exp = torch.cat((exp[big], exp[~big].sum()[None]))
    if exp[-1] < 5:  # fold a small pooled cell into the largest one
        obs[exp.argmax()] += obs[-1]
        exp[exp.argmax()] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


@pytest.mark.parametrize(
    "T,top_p,lookup",
    [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.0, 1.0, 3)],  # lookup: a prompt-lookup branch in each tree
)
def test_sampling_matches_the_target_distribution(small_vocab, tiny_recipe, T, top_p, lookup):
    target, draft = small_vocab
    # With lookup, a depth-1 draft: a cycle that gains 3+ tokens accepted the lookup branch.
    shape = (
        dict(total_tokens=2, depth=1, top_k=2) if lookup else dict(total_tokens=6, depth=2, top_k=3)
    )
    cfg = _cfg(tiny_recipe, **shape, temperature=T, top_p=top_p, lookup_tokens=lookup)
    engine = SpecEngine(target, draft, cfg)
    prompt = [3, 17, 9, 25, 11]
    # With lookup: prompt + its likeliest continuation + prompt, so the lookup proposes that.
    if lookup:
        likely = target.model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=6, pad_token_id=0
        )
        prompt = likely[0].tolist() + prompt
    p1, p2, p3 = _exact(target, prompt, T, top_p)
    n = 1000
    joint12 = torch.zeros(V, V)
    third = torch.zeros(V)
    accepted = via_lookup = 0
    for seed in range(n):
        res = engine.generate(prompt, max_new_tokens=3, seed=seed)
        x1, x2, x3 = res.tokens
        joint12[x1, x2] += 1
        third[x3] += 1
        accepted += sum(res.accept_lengths) - res.cycles
        via_lookup += lookup and max(res.accept_lengths) >= 3
    # The draft must be accepted sometimes, or only the bonus path was tested.
    assert accepted > 0.1 * n, accepted
    if lookup:
        assert via_lookup > 0.05 * n, via_lookup
    p12 = p1[:, None] * p2
    p_x3 = (p12[..., None] * p3).sum((0, 1))
    assert _chi2(joint12.flatten(), p12.flatten()) > 1e-3
    assert _chi2(third, p_x3) > 1e-3


def test_both_caches_hold_exactly_the_accepted_sequence(
    tiny_target, tiny_recipe, tiny_trained_head
):
    """After a generation, the target KV and the draft KV equal fresh prefills of the final text."""
    from eagle3.infer.runner import HFRunner
    from eagle3.infer.tree import Drafter

    engine = SpecEngine(tiny_target, tiny_trained_head, tiny_recipe.infer)
    ids = infer_support.random_prompts(n_seq=1).tolist()[0]
    res = engine.generate(ids, max_new_tokens=30)
    assert max(res.accept_lengths) > 2  # several multi-token cycles were compacted
    seq = ids + res.tokens
    # Target: every committed row (the last emitted token is not in the cache yet).
    n = engine.runner.cache_len
    assert seq[:n] == (ids + res.tokens)[:n] and n >= len(seq) - max(res.accept_lengths)
    fresh = HFRunner(tiny_target)
    fresh.prefill(torch.tensor(seq[:n]))
    for layer in range(tiny_target.num_layers):
        for got, want in zip(engine.runner.layer_kv(layer), fresh.layer_kv(layer), strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # Draft: rows 0..L-1 pair aux(t) with token t + 1, exactly as one extend over the whole text.
    m = engine.drafter.cache.length
    aux = tiny_target.features(torch.tensor([seq])).aux[0]
    ref = Drafter(tiny_trained_head, tiny_target.embed)
    ref.extend(aux[:m], torch.tensor(seq[1 : m + 1]), 0)
    torch.testing.assert_close(
        engine.drafter.cache.buf[..., :m, :], ref.cache.buf[..., :m, :], atol=1e-4, rtol=0
    )
