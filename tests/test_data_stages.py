"""data.mix: the recipe declares a teacher-forced stage, `eagle3 data` makes it beside the main
one, and training mixes it in, online and with offline features over several epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_data_pipeline import make_recipe, source  # noqa: F401  (the source fixture)

from eagle3.cli import main as cli_main
from eagle3.config import ConfigError, build_recipe
from eagle3.data.manifest import read_manifest
from eagle3.data.pipeline import load_token_samples
from eagle3.data.stages import combined_digest, data_stages, mixed_dirs, training_digest
from eagle3.models.checkpoint import read_config
from eagle3.train.trainer import conversation_id, run_training

MIX = "data.mix=[{name: tf, sources: [{name: chats}], regenerate: false}]"
TRAIN = ["train.batch_tokens=256", "train.max_len=160", "train.ttt_steps=2", "train.save_every=2"]


@pytest.fixture(scope="module")
def stages(tiny_recipe, source, tmp_path_factory):  # noqa: F811
    """`eagle3 data` on a recipe with a data.mix stage, feature shards on (a recipe file)."""
    run = tmp_path_factory.mktemp("mixrun")
    recipe = make_recipe(tiny_recipe, source, run, MIX, "data.features=true")
    cfg = run / "recipe.yaml"
    cfg.write_text(json.dumps(recipe.model_dump(mode="json", exclude_none=True)))
    assert cli_main(["data", "--config", str(cfg)]) == 0
    return recipe, cfg


def test_data_makes_every_declared_stage(stages, tiny_target):
    recipe, cfg = stages
    names = [s.name for s in data_stages(recipe)]
    assert names == ["data", "data-tf"]
    run = recipe.run_path
    main, tf = read_manifest(run / "data"), read_manifest(run / "data-tf")
    assert main["regeneration"]["enabled"] and not tf["regeneration"]["enabled"]
    assert tf["samples"]["val"] == 0  # validation is the main stage's held-out samples
    assert tf["features"]["written"] and main["features"]["written"]
    text = tiny_target.tokenizer.decode(load_token_samples(run / "data-tf")[0][0].input_ids)
    assert "An original answer that must be replaced." in text  # teacher-forced text
    assert mixed_dirs(recipe) == [run / "data-tf"]
    assert training_digest(recipe) == combined_digest(main["digest"], [tf["digest"]])
    # A rerun finds every shard done and rewrites none.
    shards = lambda: {p: p.stat().st_mtime_ns for p in run.glob("data*/[tf]*/*.safetensors")}  # noqa: E731
    before = shards()
    assert {p.parent.relative_to(run) for p in before} == {
        Path(d, k) for d in ("data", "data-tf") for k in ("tokens", "features")
    }
    assert cli_main(["data", "--config", str(cfg)]) == 0
    assert shards() == before


def test_mix_stage_names_are_checked(tiny_recipe, source, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="unique"):
        make_recipe(
            tiny_recipe,
            source,
            tmp_path,
            "data.mix=[{name: a, sources: [{name: chats}]}, {name: a, sources: [{name: chats}]}]",
        )
    with pytest.raises(ConfigError, match="data.mix.0.name"):
        make_recipe(tiny_recipe, source, tmp_path, "data.mix=[{name: ../x, sources: []}]")


def _mixed_counts(run: Path) -> tuple[int, int]:
    """(training samples the trainer should see, held-out samples): the main stage's training
    samples plus the teacher-forced ones whose conversation is not held out."""
    own_train, own_val = load_token_samples(run / "data")
    tf_train, _ = load_token_samples(run / "data-tf")
    held = {conversation_id(s.sample_id) for s in own_val}
    return len(own_train) + sum(conversation_id(s.sample_id) not in held for s in tf_train), len(
        own_val
    )


def test_offline_multi_epoch_training_with_a_mixed_stage(stages, tmp_path):
    """Offline features of both stages, three epochs, resumed after a stop, and the same samples
    and digest as online training."""
    recipe, _ = stages
    run = recipe.run_path
    tree = recipe.model_dump(mode="json", exclude_none=True)
    off = build_recipe(tree, [*TRAIN, "train.features=offline", "train.epochs=3"])
    n_train, n_val = _mixed_counts(run)

    class Stop(Exception):
        pass

    def stop_after_epoch_one(step, metrics):
        if metrics.get("train/epoch", 0) > 1.0:
            raise Stop

    with pytest.raises(Stop):
        run_training(off, progress=False, callback=stop_after_epoch_one)
    out = run_training(off, progress=False)  # resumes from the saved state
    assert out["resumed_from"] > 0
    doc = json.loads(Path(out["train_metrics"]).read_text())
    assert doc["features"] == "offline"
    assert doc["data"]["train"]["samples"] == n_train and doc["data"]["val"]["samples"] == n_val
    epochs = [h["train/epoch"] for h in doc["history"] if "train/epoch" in h]
    assert out["steps"] == 3 * doc["steps_per_epoch"] and epochs[-1] == 3.0
    assert read_config(out["draft_dir"])["eagle3"]["data_digest"] == training_digest(recipe)
    val = [h for h in doc["history"] if "val/loss" in h]
    assert val and all(torch.isfinite(torch.tensor(h["val/loss"])) for h in val)

    on = build_recipe(tree, [*TRAIN, "train.max_steps=1", f"run_dir={tmp_path / 'online'}"])
    (tmp_path / "online").mkdir()
    for d in ("data", "data-tf"):
        (tmp_path / "online" / d).symlink_to(run / d)
    out_on = run_training(on, progress=False)
    doc_on = json.loads(Path(out_on["train_metrics"]).read_text())
    assert doc_on["data"]["train"]["samples"] == n_train
    assert doc_on["data"]["train"]["tokens"] == doc["data"]["train"]["tokens"]


def test_offline_mixing_needs_features_in_every_stage(stages, tiny_recipe, source, tmp_path):  # noqa: F811
    recipe, _ = stages
    tokens_only = make_recipe(tiny_recipe, source, tmp_path / "tok", "data.regenerate=false",
                              "data.features=false")  # fmt: skip
    from eagle3.data.pipeline import run_data

    run_data(tokens_only, progress=False)
    tree = recipe.model_dump(mode="json", exclude_none=True)
    r = build_recipe(tree, [*TRAIN, "train.features=offline", "train.max_steps=1",
                            f"train.mix_data=[{tokens_only.run_path / 'data'}]"])  # fmt: skip
    with pytest.raises(ConfigError, match="holds no feature shards"):
        run_training(r, progress=False)
