"""DDP (and FSDP2) with 2 gloo processes on CPU == 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_support import draft_state, greedy_samples, tiny_train_recipe, vocab_for

from eagle3.train.trainer import build_draft, train

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def corpus(tiny_target):
    samples = greedy_samples(tiny_target, n=16, seed=1)
    return samples[:13], samples[13:], vocab_for(tiny_target, samples[:13], 256)


def assert_weights_match(a: dict, b: dict, lr: float, steps: int) -> None:
    """Equal up to float reordering of the gradient all-reduce. AdamW's first updates are about
    lr * sign(grad), so an element whose gradient is ~0 may move by up to lr per step either way:
    every element must be within that bound and nearly all within float noise."""
    close = total = 0
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
            continue
        diff = (a[k] - b[k]).abs()
        assert diff.max() <= 2 * lr * steps, (k, diff.max())
        close += int((diff <= 1e-6).sum())
        total += diff.numel()
    assert close >= 0.999 * total, f"{total - close} of {total} weights differ by more than 1e-6"


def test_two_processes_match_one(tiny_recipe, tiny_target, corpus, tmp_path):
    train_s, val_s, vocab = corpus
    steps = ["train.max_steps=2", "train.eval_every=2", "train.save_every=2"]
    one = tiny_train_recipe(tiny_recipe, tmp_path / "one", *steps, "train.grad_accum=2")
    train(one, train_s, val_s, vocab, target=tiny_target, data_digest="d1")

    jobs = []
    for mode in ("ddp", "fsdp"):
        two = tiny_train_recipe(tiny_recipe, tmp_path / mode, *steps, f"train.distributed={mode}")
        jobs.append(tmp_path / f"{mode}.pt")
        data = {"train": train_s, "val": val_s, "vocab": vocab}
        torch.save({"tree": two.model_dump(mode="json"), **data}, jobs[-1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "train_ddp_worker.py"), *map(str, jobs)]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        (tmp_path / "stderr.txt").write_text(res.stderr)
    assert res.returncode == 0, res.stderr[-3000:]

    a = draft_state(tmp_path / "one")
    init = build_draft(one, tiny_target, vocab).state_dict()
    assert not torch.equal(init["fc.weight"], a["draft.fc.weight"]), (
        "training must move the weights"
    )
    va = json.loads((tmp_path / "one/train_metrics.json").read_text())["final"]
    for mode in ("ddp", "fsdp"):
        b = draft_state(tmp_path / mode)
        assert a.keys() == b.keys(), mode
        assert_weights_match(a, b, one.train.lr, one.train.max_steps)
        # The same validation: split across ranks, then summed.
        vb = json.loads((tmp_path / mode / "train_metrics.json").read_text())["final"]
        assert va["val/positions_0"] == vb["val/positions_0"] > 0
        assert vb["val/loss"] == pytest.approx(va["val/loss"], rel=1e-5)
        assert vb["train/loss"] == pytest.approx(va["train/loss"], rel=1e-5)
