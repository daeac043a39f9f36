"""The target adapter: aux capture, the tiny target's shape, the embedded SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch

from eagle3.config import TargetConfig
from eagle3.models.checkpoint import check_checkpoint, save_draft
from eagle3.models.draft import DraftConfig, Eagle3Draft
from eagle3.models.target import Target, load_target
from eagle3.models.target_weights import build_tiny_target

pytestmark = pytest.mark.slow


def _prompt_ids(target, text: str) -> torch.Tensor:
    enc = target.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
    )
    return torch.tensor([enc["input_ids"]])


def test_aux_hooks_equal_output_hidden_states(tiny_target):
    ids = _prompt_ids(tiny_target, "Tell me about rivers and lakes.")
    feats = tiny_target.features(ids)
    with torch.no_grad():
        out = tiny_target.model(ids, output_hidden_states=True)
    hs = out.hidden_states
    n = tiny_target.num_layers
    assert tiny_target.aux_layer_ids == [2, n // 2, n - 3]
    want = torch.cat([hs[i] for i in tiny_target.aux_layer_ids], dim=-1)
    assert torch.equal(feats.aux, want)
    assert torch.allclose(feats.logits, out.logits.float(), atol=1e-5)
    assert torch.equal(feats.last_hidden, hs[-1])


def test_custom_aux_layers(tiny_recipe):
    cfg = tiny_recipe.target.model_copy(update={"aux_layers": [1, 3, 6]})
    t = load_target(cfg)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    hs = t.model(ids, output_hidden_states=True).hidden_states
    assert torch.equal(t.features(ids).aux, torch.cat([hs[1], hs[3], hs[6]], -1))
    with pytest.raises(ValueError, match="out of range"):
        Target(t.model, t.tokenizer, [1, 2, 8], "x", "y")


def test_tiny_target_is_deterministic_peaked_and_context_dependent(tiny_recipe, tiny_target):
    again = build_tiny_target(tiny_recipe.target)
    for (k, a), b in zip(
        tiny_target.model.state_dict().items(), again.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k
    ids = _prompt_ids(tiny_target, "Write a short poem about the sea and the wind.")
    probs = tiny_target.features(ids).logits[0].softmax(-1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    # Near-uniform over 49k tokens would be ~10.8 nats; we want confident predictions.
    assert entropy.mean() < 0.25 * math.log(tiny_target.vocab_size)
    # Context dependence: the same token in two contexts gets different next-token distributions.
    tok = int(ids[0, -1])
    other = torch.cat([torch.tensor([[500, 900, 1300, 77]]), torch.tensor([[tok]])], dim=1)
    p_other = tiny_target.features(other).logits[0, -1].softmax(-1)
    tv = 0.5 * (probs[-1] - p_other).abs().sum()
    assert tv > 0.05


def test_fresh_tiny_head_passes_check(tiny_target, tmp_path):
    c = DraftConfig.from_target(tiny_target.config, 2048, tiny_target.aux_layer_ids)
    out = save_draft(Eagle3Draft(c), tmp_path / "head")
    assert check_checkpoint(out) == []


@pytest.fixture(scope="session")
def smollm2():
    return load_target(TargetConfig(kind="embedded", device="cpu"))


def test_embedded_smollm2_answers_paris(smollm2):
    t = smollm2
    assert t.num_layers == 30 and t.hidden_size == 576 and t.vocab_size == 49152
    assert t.aux_layer_ids == [2, 15, 27]
    ids = _prompt_ids(t, "What is the capital of France?")
    out = t.model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = t.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_fresh_smollm2_head_passes_check(smollm2, tmp_path):
    c = DraftConfig.from_target(smollm2.config, 16384, smollm2.aux_layer_ids)
    assert c.hidden_size == 576 and c.num_key_value_heads == 3 and c.head_dim == 64
    out = save_draft(Eagle3Draft(c), tmp_path / "head")
    assert check_checkpoint(out) == []
