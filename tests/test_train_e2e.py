"""`eagle3 data` then `eagle3 train --config configs/tiny.yaml`: the draft beats a unigram baseline.

Depends on the data stage (eagle3.data.pipeline.run_data). Its source is swapped for 96 short
single-turn prompts written here (regenerating ShareGPT's long multi-turn chats takes minutes on
2 cores); everything else, the whole train section included, is tiny.yaml's own.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from eagle3.cli import main as cli_main
from eagle3.config import load_recipe
from eagle3.models.checkpoint import check_checkpoint, load_draft, read_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def write_prompts(path: Path, n: int = 96) -> None:
    rnd = random.Random(0)
    words = ("river mountain engine garden violin planet recipe window market winter coffee bridge "
             "forest island rocket castle ocean desert library museum").split()  # fmt: skip
    verbs = [
        "Describe",
        "Explain",
        "Write a poem about",
        "List facts about",
        "Tell a story about",
        "Compare",
    ]
    with open(path, "w") as f:
        for i in range(n):
            q = f"{rnd.choice(verbs)} the {rnd.choice(words)} and the {rnd.choice(words)}."
            f.write(
                json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": q}]}) + "\n"
            )


@pytest.fixture(scope="module")
def trained(tiny_target, tmp_path_factory):
    from eagle3.data.pipeline import run_data

    run_dir = tmp_path_factory.mktemp("tiny-run")
    prompts = run_dir / "prompts.jsonl"
    write_prompts(prompts)
    overrides = [
        f"run_dir={run_dir}",
        "data.sources=[{name: prompts}]",
        f"data.catalog={{prompts: {{path: {prompts}}}}}",
        "data.batch_size=48",
        "data.shard_size=96",
        "data.val_fraction=0.15",
        # fp32: the test recomputes val/acc_0 exactly; bf16 autocast (auto: on wherever the CPU has
        # bf16) moves an argmax near a tie, 1 of ~580 positions on this machine.
        "train.autocast=off",
    ]
    recipe = load_recipe(TINY, overrides)
    run_data(recipe, progress=False, target=tiny_target)
    assert cli_main(["train", "--config", TINY, *overrides]) == 0
    return recipe


@torch.no_grad()
def labels(target, samples, t2d) -> list[int]:
    """The target's argmax at every position whose next token is a loss token, where the
    argmax is a draft token: exactly the positions step 0 counts."""
    out = []
    for s in samples:
        am = target.features(s.input_ids[None]).logits[0].argmax(-1)
        out += [
            int(am[p]) for p in range(1, len(s.input_ids) - 1) if s.loss_mask[p + 1] and t2d[am[p]]
        ]
    return out


def test_tiny_training_beats_unigram(trained, tiny_target):
    from eagle3.data.reader import load_token_samples
    from eagle3.train.batching import collate
    from eagle3.train.inputs import step_inputs, target_hidden
    from eagle3.train.ttt import TTT, summarize

    run = trained.run_path
    draft_dir = run / "draft"
    assert check_checkpoint(draft_dir) == []
    assert cli_main(["check", str(draft_dir)]) == 0
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    extra = read_config(draft_dir)["eagle3"]
    assert extra["data_digest"] == manifest["digest"]
    assert extra["tree"]["depth"] == trained.infer.depth

    train_s, val_s = load_token_samples(run / "data")
    draft = load_draft(draft_dir)
    unigram = Counter(labels(tiny_target, train_s, draft.t2d)).most_common(1)[0][0]
    val_labels = labels(tiny_target, val_s, draft.t2d)
    assert len(val_labels) >= 50, "too few held-out positions to judge"
    baseline = sum(y == unigram for y in val_labels) / len(val_labels)

    # acc_0 of the exported checkpoint, recomputed here on the held-out samples, one at a time.
    stats = 0
    for s in val_s:
        batch = collate([[s]])
        aux, last = target_hidden(tiny_target, batch)
        stats = stats + TTT(draft, 1)(*step_inputs(tiny_target, draft, batch, aux, last).args())[1]
    acc0 = summarize(stats, "val")["val/acc_0"]
    assert summarize(stats, "val")["val/positions_0"] == len(val_labels)
    doc = json.loads((run / "train_metrics.json").read_text())
    assert acc0 == pytest.approx(doc["best"]["metrics"]["val/acc_0"], abs=1e-6)
    # ~580 held-out positions: 0.1 is about five standard errors.
    assert acc0 > baseline + 0.1, (acc0, baseline)
