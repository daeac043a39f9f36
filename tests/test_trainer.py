"""The training loop: exact resume, online == offline == hybrid, bad input, best checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from train_support import (
    draft_state,
    feature_samples,
    greedy_samples,
    tiny_train_recipe,
    vocab_for,
)

from eagle3.config import ConfigError
from eagle3.models.checkpoint import check_checkpoint, read_config
from eagle3.train.trainer import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tiny_target):
    samples = greedy_samples(tiny_target, n=24)
    train_s, val_s = samples[:20], samples[20:]
    return train_s, val_s, vocab_for(tiny_target, train_s, 256)


def _train(recipe, corpus, target, **kw):
    train_s, val_s, vocab = corpus
    return train(
        recipe, kw.pop("train_s", train_s), val_s, vocab, target=target, data_digest="d1", **kw
    )


def test_resume_after_a_crash_is_bit_exact(tiny_recipe, tiny_target, corpus, tmp_path):
    r_a = tiny_train_recipe(tiny_recipe, tmp_path / "a", "train.max_steps=6")
    full = _train(r_a, corpus, tiny_target)
    assert full["steps"] == 6 and full["resumed_from"] == 0

    class Crash(Exception):
        pass

    def crash_at_5(step, metrics):
        if step == 5:
            raise Crash

    r_b = tiny_train_recipe(tiny_recipe, tmp_path / "b", "train.max_steps=6")
    with pytest.raises(Crash):
        _train(r_b, corpus, tiny_target, callback=crash_at_5)
    assert torch.load(tmp_path / "b/train_state/state.pt", weights_only=False)["step"] == 3
    resumed = _train(r_b, corpus, tiny_target)
    assert resumed["resumed_from"] == 3
    a, b = draft_state(tmp_path / "a"), draft_state(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full["metrics"] == resumed["metrics"]
    assert full["best"]["step"] == resumed["best"]["step"]
    # A rerun of a finished run does no work and returns the same summary.
    again = _train(r_b, corpus, tiny_target)
    assert again["resumed_from"] == 6 and again["metrics"] == full["metrics"]


def test_checkpoint_outputs(tiny_recipe, tiny_target, corpus, tmp_path):
    seen = []
    r = tiny_train_recipe(tiny_recipe, tmp_path, "train.max_steps=4", "train.best_metric=val/loss")
    out = _train(r, corpus, tiny_target, callback=lambda s, m: seen.append((s, m)))
    draft_dir = tmp_path / "draft"
    assert out["draft_dir"] == str(draft_dir)
    assert check_checkpoint(draft_dir) == []
    cfg = read_config(draft_dir)
    e = cfg["eagle3"]
    assert e["data_digest"] == "d1"
    assert e["tree"] == {k: getattr(r.infer, k) for k in ("mode", "total_tokens", "depth", "top_k")}
    # The exported draft is the best validation step, not the last one.
    vals = [(s, m["val/loss"]) for s, m in seen if "val/loss" in m]
    best_step = min(vals, key=lambda x: x[1])[0]
    assert out["best"]["step"] == best_step == e["train"]["step"]
    keys = {k for _, m in seen for k in m}
    for i in range(3):
        assert {f"train/loss_{i}", f"train/acc_{i}", f"val/acc_{i}", f"val/accept_{i}"} <= keys
    doc = json.loads((tmp_path / "train_metrics.json").read_text())
    assert doc["step"] == 4 and doc["best"]["step"] == best_step
    assert doc["data"]["train"]["kept"] == 20
    # The latest weights are kept in the portable format as well.
    last = tmp_path / "train_state" / "last"
    assert check_checkpoint(last) == [] and read_config(last)["eagle3"]["train"]["step"] == 4


def test_online_offline_hybrid_agree(tiny_recipe, tiny_target, corpus, tmp_path):
    train_s, _, _ = corpus
    feats = feature_samples(tiny_target, train_s)
    losses = {}
    for mode, data in (("online", train_s), ("offline", feats)):
        r = tiny_train_recipe(
            tiny_recipe, tmp_path / mode, "train.max_steps=1", f"train.features={mode}"
        )
        seen = []
        _train(
            r, corpus, tiny_target, train_s=data, callback=lambda s, m, seen=seen: seen.append(m)
        )
        losses[mode] = seen[0]
    for i in range(3):
        assert (
            losses["online"][f"train/positions_{i}"]
            == losses["offline"][f"train/positions_{i}"]
            > 0
        )
        assert losses["online"][f"train/loss_{i}"] == pytest.approx(
            losses["offline"][f"train/loss_{i}"], rel=1e-5
        )
    # hybrid: epoch 0 online, later epochs from the on-disk cache; fp32 cache -> the same weights.
    per_epoch = None
    for mode in ("online", "hybrid"):
        r = tiny_train_recipe(tiny_recipe, tmp_path / f"{mode}2", "train.epochs=2", f"train.features={mode}",
                              "data.feature_dtype=float32")  # fmt: skip
        out = _train(r, corpus, tiny_target)
        per_epoch = out["steps"] // 2
    cached = list((tmp_path / "hybrid2/train_state/feature_cache").glob("*.safetensors"))
    assert len(cached) == per_epoch
    a, b = draft_state(tmp_path / "online2"), draft_state(tmp_path / "hybrid2")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_bad_input_is_named(tiny_recipe, tiny_target, corpus, tmp_path):
    r = tiny_train_recipe(tiny_recipe, tmp_path, "train.best_metric=val/acc_9")
    with pytest.raises(ConfigError, match="train.best_metric"):
        _train(r, corpus, tiny_target)
    r = tiny_train_recipe(tiny_recipe, tmp_path, "train.grad_accum=64")
    with pytest.raises(ConfigError, match="batch_tokens"):
        _train(r, corpus, tiny_target, train_s=corpus[0][:3])
    # Resuming under a changed recipe is refused, naming what changed.
    r = tiny_train_recipe(tiny_recipe, tmp_path, "train.max_steps=1")
    _train(r, corpus, tiny_target)
    r = tiny_train_recipe(tiny_recipe, tmp_path, "train.max_steps=1", "train.lr=1e-3")
    with pytest.raises(ConfigError, match="train.lr"):
        _train(r, corpus, tiny_target)
