"""Adaptation (eagle3/traffic/adapt.py, flows/adapt.py): the decision against hand-written cases
(each margin refusing by name), the derived recipe, the kept draft vocabulary and, on the real
stack (SeaweedFS, MLflow, Prefect, the tiny target), the flow promoting only a candidate that the
decision lets through and leaving the champion in place otherwise."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("EAGLE3_RETRY_DELAY", "0.05")

pytestmark = pytest.mark.integration


def numbers(tau: float, speedup: float, lossless: bool = True) -> dict:
    return {"tau": tau, "speedup": speedup, "speedup_baseline": "hf_generate", "lossless": lossless}


def pair(traffic: tuple, general: tuple) -> dict:
    return {"traffic": numbers(*traffic), "general": numbers(*general)}


CHAMPION = pair((1.40, 1.00), (1.50, 1.10))


# --- the decision ------------------------------------------------------------------------------------
@pytest.mark.unit
def test_a_candidate_better_on_traffic_and_keeping_the_general_set_is_promoted():
    from eagle3.config import AdaptConfig
    from eagle3.traffic.adapt import adaptation_decision

    ok, reasons = adaptation_decision(pair((1.60, 1.10), (1.45, 1.05)), CHAMPION, AdaptConfig())
    assert ok
    assert any("+0.200" in r for r in reasons) and any("lossless" in r for r in reasons)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("candidate", "margins", "named"),
    [
        (pair((1.42, 1.10), (1.50, 1.10)), {}, "below min_acceptance_gain 0.05"),
        (pair((1.60, 0.95), (1.50, 1.10)), {}, "below min_speed_gain 1"),
        (pair((1.60, 1.10), (1.40, 1.10)), {}, "more than max_general_loss 5%"),
        (
            pair(
                (1.60, 1.10),
                (1.50, 1.10),
            ),
            {"min_acceptance_gain": 5.0},
            "min_acceptance_gain 5",
        ),
        (pair((1.60, 1.20), (1.50, 1.10)), {"min_speed_gain": 1.5}, "min_speed_gain 1.5"),
        (pair((1.60, 1.20), (1.46, 1.10)), {"max_general_loss": 0.01}, "max_general_loss 1%"),
    ],
)
def test_each_margin_refuses_by_name(candidate, margins, named):
    from eagle3.config import AdaptConfig
    from eagle3.traffic.adapt import adaptation_decision

    ok, reasons = adaptation_decision(candidate, CHAMPION, AdaptConfig(**margins))
    assert not ok
    assert len(reasons) == 1 and named in reasons[0], reasons


@pytest.mark.unit
def test_every_failed_condition_is_a_reason():
    from eagle3.config import AdaptConfig
    from eagle3.traffic.adapt import adaptation_decision

    bad = {"traffic": numbers(1.0, 0.5, lossless=False), "general": numbers(float("nan"), 1.0)}
    ok, reasons = adaptation_decision(bad, CHAMPION, AdaptConfig())
    assert not ok
    text = "\n".join(reasons)
    assert "not lossless on the held-out traffic" in text
    assert "min_acceptance_gain" in text and "min_speed_gain" in text
    assert "acceptance on the general set not measured" in text  # NaN is refused, not compared
    assert len(reasons) == 4


# --- the derived recipe --------------------------------------------------------------------------------
@pytest.mark.unit
def test_adapt_recipe_trains_from_the_champion_on_the_window_plus_replay(tiny_recipe, tmp_path):
    from eagle3.config import build_recipe
    from eagle3.traffic.adapt import adapt_recipe, replay_count

    base = build_recipe(
        tiny_recipe.model_dump(mode="json"),
        [
            f"run_dir={tmp_path / 'run'}",
            "adapt.replay_share=0.25",
            "adapt.max_steps=7",
            "adapt.lr=0.001",
            "data.sources=[{name: sharegpt, limit: 4}, {name: mt_bench}]",
        ],
    )
    r = adapt_recipe(base, tmp_path / "champ", "2026-12-01", "2026-12-02T00:00:00Z", 30, "3")
    assert [s.model_dump(exclude_none=True) for s in r.data.sources] == [
        {
            "name": "traffic",
            "format": "auto",
            "since": "2026-12-01",
            "until": "2026-12-02T00:00:00Z",
        }
    ]
    assert replay_count(0.25, 30) == 10  # a quarter of the mix: 10 replayed beside 30 of traffic
    (mix,) = r.data.mix
    assert mix.name == "replay" and mix.regenerate == base.data.regenerate
    assert [(s.name, s.limit) for s in mix.sources] == [("sharegpt", 4), ("mt_bench", 5)]
    assert r.train.init_from == r.data.vocab_from == str(tmp_path / "champ")
    assert (r.train.max_steps, r.train.lr, r.train.epochs) == (7, 0.001, 1)
    assert r.run_path == tmp_path / "run-adapt" / "2026-12-01--2026-12-02T00-00-00Z-v3"
    assert r.name == base.name and r.target == base.target  # same registered model
    none = adapt_recipe(base.model_copy(update={"adapt": base.adapt.model_copy(
        update={"replay_share": 0.0})}), tmp_path / "c", None, None, 30)  # fmt: skip
    assert none.data.mix == [] and none.run_path.name == "start--now"


@pytest.mark.unit
def test_held_out_prompts_are_the_newest_records_the_data_stage_held_out():
    from test_traffic import T0, record

    from eagle3.traffic.adapt import held_out_prompts

    recs = [record(i, "m", "t", T0) for i in range(4)]
    got = held_out_prompts(recs, ["traffic:r0002", "traffic:r0003", "sharegpt:9"])
    assert got == [
        {"id": "r0002", "turns": ["What is 2 plus 2?"]},
        {"id": "r0003", "turns": ["What is 3 plus 3?"]},
    ]


@pytest.mark.unit
def test_kept_vocab_is_the_checkpoints_with_coverage_of_the_new_data(tmp_path):
    import torch

    from eagle3.data.features import save_tensors
    from eagle3.data.pipeline import kept_vocab

    t2d = torch.zeros(10, dtype=torch.bool)
    t2d[[1, 4, 7]] = True
    d2t = torch.tensor([1, 4, 7]) - torch.arange(3)
    save_tensors({"d2t": d2t, "t2d": t2d}, tmp_path / "model.safetensors", {})
    counts = torch.tensor([0, 5, 0, 3, 2, 0, 0, 0, 0, 0])
    v = kept_vocab(tmp_path, counts)
    assert torch.equal(v.d2t, d2t) and torch.equal(v.t2d, t2d)
    assert v.coverage == pytest.approx(7 / 10) and v.seen == 3
    with pytest.raises(ValueError, match="target vocabulary of 10 tokens, this target has 11"):
        kept_vocab(tmp_path, torch.zeros(11, dtype=torch.long))
