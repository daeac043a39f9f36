"""Training switches for A/B runs: train.autocast (bf16 where the CPU has it) and train.loss_style.

The loss styles themselves are checked against a naive reference in test_ttt.py.
"""

from __future__ import annotations

import pytest
import torch
from train_support import greedy_samples, tiny_train_recipe, vocab_for

from eagle3.env import cpu_flags, cpu_has_bf16
from eagle3.train.trainer import autocast_enabled, train

pytestmark = pytest.mark.slow

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx avx2 fma
processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 fma
"""


def test_cpu_flags_are_read_from_cpuinfo():
    flags = cpu_flags(CPUINFO)
    assert {"avx", "avx2", "fma"} <= flags and "avx512_bf16" not in flags
    assert not cpu_has_bf16(flags)
    assert cpu_has_bf16(flags | {"avx512_bf16"}) and cpu_has_bf16(flags | {"amx_bf16"})
    assert cpu_flags("no flags line here") == set()


def test_autocast_resolution():
    plain, bf16 = {"avx2"}, {"avx2", "avx512_bf16"}
    assert not autocast_enabled("auto", "cpu", plain)
    assert autocast_enabled("auto", "cpu", bf16)
    assert autocast_enabled("auto", "cuda:0", plain)
    assert autocast_enabled("on", "cpu", plain) and not autocast_enabled("off", "cuda", bf16)


def test_auto_follows_this_machines_cpu():
    """auto is on exactly when /proc/cpuinfo shows bf16 hardware (off on an AVX2-only box)."""
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this machine")
    assert autocast_enabled("auto", "cpu") == bool({"avx512_bf16", "amx_bf16"} & flags)


@pytest.fixture(scope="module")
def corpus(tiny_target):
    samples = greedy_samples(tiny_target, n=16, seed=3)
    return samples[:13], samples[13:], vocab_for(tiny_target, samples[:13], 256)


def test_bf16_autocast_trains_close_to_fp32(tiny_recipe, tiny_target, corpus, tmp_path):
    """autocast=on runs the draft in bf16 on a CPU: its losses track the fp32 run's (the
    reference), its state records the switch, and a run without it refuses to resume it."""
    train_s, val_s, vocab = corpus
    runs = {}
    for mode in ("off", "on"):
        r = tiny_train_recipe(tiny_recipe, tmp_path / mode, "train.max_steps=3",
                              f"train.autocast={mode}")  # fmt: skip
        seen = []
        out = train(r, train_s, val_s, vocab, target=tiny_target, data_digest="d",
                    callback=lambda s, m, seen=seen: seen.append(m))  # fmt: skip
        runs[mode] = ([m["train/loss"] for m in seen if "train/loss" in m], out)
    fp32, bf16 = runs["off"][0], runs["on"][0]
    assert len(fp32) == len(bf16) == 3
    assert fp32 != bf16, "autocast=on must change the arithmetic"
    for a, b in zip(fp32, bf16, strict=True):
        assert b == pytest.approx(a, rel=0.05)
    state = torch.load(tmp_path / "on/train_state/state.pt", weights_only=False)
    assert state["fingerprint"]["train.autocast"] is True
    r = tiny_train_recipe(tiny_recipe, tmp_path / "on", "train.max_steps=4", "train.autocast=off")
    from eagle3.config import ConfigError

    with pytest.raises(ConfigError, match="train.autocast"):
        train(r, train_s, val_s, vocab, target=tiny_target, data_digest="d")


def test_specforge_style_trains_and_validates_the_eagle3_way(
    tiny_recipe, tiny_target, corpus, tmp_path
):
    """Training losses differ between the styles; validation counts the same rows in both."""
    train_s, val_s, vocab = corpus
    seen = {}
    for style in ("eagle3", "specforge"):
        r = tiny_train_recipe(tiny_recipe, tmp_path / style, "train.max_steps=2",
                              f"train.loss_style={style}")  # fmt: skip
        ms = []
        train(r, train_s, val_s, vocab, target=tiny_target, data_digest="d",
              callback=lambda s, m, ms=ms: ms.append(m))  # fmt: skip
        seen[style] = ms
    val = {k: [m for m in v if "val/positions_0" in m][-1] for k, v in seen.items()}
    trn = {k: [m for m in v if "train/positions_0" in m][0] for k, v in seen.items()}
    for i in range(3):
        assert val["eagle3"][f"val/positions_{i}"] == val["specforge"][f"val/positions_{i}"]
    assert trn["eagle3"]["train/positions_0"] != trn["specforge"]["train/positions_0"]
