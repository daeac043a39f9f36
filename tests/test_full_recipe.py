"""What `eagle3 pipeline --profile full` chains, on the tiny recipe: a declared teacher-forced
data stage (data.mix) made beside the main one and mixed into offline multi-epoch training, a
bench that resumes per prompt and measures the head with and without the lookup branch, and the
release of the head (bf16, card, SHA256SUMS) that the commands then take by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_data_pipeline import make_recipe, source  # noqa: F401  (the source fixture)

from eagle3.cli import main as cli_main
from eagle3.config import ConfigError, build_recipe
from eagle3.data.manifest import read_manifest
from eagle3.data.reader import load_token_samples
from eagle3.data.stages import combined_digest, data_stages, mixed_dirs, training_digest
from eagle3.models.checkpoint import read_config
from eagle3.train.trainer import conversation_id, run_training

pytestmark = pytest.mark.integration

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
    assert main.regeneration.enabled and not tf.regeneration.enabled
    assert tf.samples.val == 0  # validation is the main stage's held-out samples
    assert tf.features.written and main.features.written
    text = tiny_target.tokenizer.decode(load_token_samples(run / "data-tf")[0][0].input_ids)
    assert "An original answer that must be replaced." in text  # teacher-forced text
    assert mixed_dirs(recipe) == [run / "data-tf"]
    assert training_digest(recipe) == combined_digest(main.digest, [tf.digest])
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


@pytest.fixture(scope="module")
def trained(stages):
    """Offline features of both stages, three epochs, stopped after the first and resumed."""
    recipe, _ = stages
    off = build_recipe(
        recipe.model_dump(mode="json", exclude_none=True),
        [*TRAIN, "train.features=offline", "train.epochs=3"],
    )

    class Stop(Exception):
        pass

    def stop_after_epoch_one(step, metrics):
        if metrics.get("train/epoch", 0) > 1.0:
            raise Stop

    with pytest.raises(Stop):
        run_training(off, progress=False, callback=stop_after_epoch_one)
    return off, run_training(off, progress=False)  # resumes from the saved state


def test_offline_multi_epoch_training_with_a_mixed_stage(stages, trained, tmp_path):
    """The resumed offline run saw every mixed sample for three epochs; online training reads the
    same samples and the checkpoint names the combined digest."""
    recipe, _ = stages
    run = recipe.run_path
    tree = recipe.model_dump(mode="json", exclude_none=True)
    _, out = trained
    n_train, n_val = _mixed_counts(run)
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


# --- the bench: per-prompt resume, the head with and without the lookup branch ----------------------
BENCH = ["eval.limit=2", "eval.max_new_tokens=24", "eval.baselines=[hf_generate]",
         "infer.lookup_tokens=3", "eval.tree_only=true"]  # fmt: skip
SAME = ("prompts", "new_tokens", "tau", "alpha", "lossless")  # what timing does not change


def test_bench_resumes_per_prompt_and_measures_the_tree_alone(trained, tmp_path):
    from eagle3.eval.bench import run_bench

    recipe, out = trained
    tree = recipe.model_dump(mode="json", exclude_none=True)
    r = build_recipe(tree, BENCH)
    draft = out["draft_dir"]
    fresh = run_bench(r, draft, progress=False)
    assert fresh["resumed_prompts"] == 0
    journal = tmp_path / "bench.prompts.json"

    class Stop(Exception):
        pass

    def stop_at_the_second_prompt(event):
        if not event["id"].startswith(f"mt_bench/{first}/"):
            raise Stop

    from eagle3.data.sources import load_eval_prompts

    first = load_eval_prompts("mt_bench", 1, r)[0].id
    with pytest.raises(Stop):
        run_bench(r, draft, progress=False, journal=journal, on_prompt=stop_at_the_second_prompt)
    assert len(json.loads(journal.read_text())["prompts"]) == 1
    resumed = run_bench(r, draft, progress=False, journal=journal)
    assert resumed["resumed_prompts"] == 1
    for part in ("datasets", "tree_only"):
        a = fresh[part]["mt_bench"] if part == "datasets" else fresh["datasets"]["mt_bench"][part]
        b = (
            resumed[part]["mt_bench"]
            if part == "datasets"
            else resumed["datasets"]["mt_bench"][part]
        )
        assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}, part
    assert resumed["tree_only"]["tau"] == fresh["tree_only"]["tau"]

    # The tree-only numbers are those of a bench with the lookup branch off (the reference).
    alone = run_bench(build_recipe(tree, [*BENCH, "infer.lookup_tokens=0"]), draft, progress=False)
    a, b = alone["datasets"]["mt_bench"], fresh["datasets"]["mt_bench"]["tree_only"]
    assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}
    assert "tree_only" not in alone  # nothing to compare without a lookup branch
    from eagle3.ops.tracking import report_metrics

    assert report_metrics(fresh)["tau_tree_only"] == fresh["tree_only"]["tau"]

    # Other settings: the journal is set aside and every prompt measured again.
    other = run_bench(build_recipe(tree, [*BENCH, "infer.total_tokens=4"]), draft, progress=False,
                      journal=journal)  # fmt: skip
    assert other["resumed_prompts"] == 0
    assert (tmp_path / "bench.prompts.json.old").is_file()


# --- the release and heads by name ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    mp = pytest.MonkeyPatch()
    mp.setenv("EAGLE3_HEADS_DIR", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def released(stages, trained, heads, tmp_path_factory):
    """`eagle3 bench` on the trained draft, then `eagle3 release` of it with that report."""
    _, cfg = stages
    _, out = trained
    work = tmp_path_factory.mktemp("release")
    report = work / "bench.json"
    args = ["--config", str(cfg), "eval.limit=1", "eval.max_new_tokens=16"]
    assert cli_main(["bench", *args, "--draft", out["draft_dir"], "--out", str(report)]) == 0
    assert (work / "bench.prompts.json").is_file()  # the journal beside the report
    rc = cli_main(["release", "--draft", out["draft_dir"], "--name", "tiny-head",
                   "--bench", str(report), "--note", "Made by the test suite."])  # fmt: skip
    assert rc == 0
    return heads / "tiny-head", report, cfg, out


def test_release_writes_a_bf16_head_with_card_and_sums(released):
    import hashlib

    from safetensors import safe_open

    from eagle3.heads import verify_sums
    from eagle3.models.checkpoint import check_checkpoint

    head, report, _, out = released
    names = sorted(p.name for p in head.iterdir())
    assert names == sorted(["CARD.md", "SHA256SUMS", "config.json", "model.safetensors",
                            "bench-mt_bench-1.json"])  # fmt: skip
    assert read_config(head)["torch_dtype"] == "bfloat16"
    with safe_open(str(head / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("fc.weight").dtype == torch.bfloat16
        assert f.get_tensor("d2t").dtype == torch.int64
    assert (head / "model.safetensors").stat().st_size <= 25e6
    sums = {}
    for line in (head / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        sums[name] = digest
    assert sums == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in head.iterdir()
        if p.name != "SHA256SUMS"
    }
    assert check_checkpoint(head) == [] and verify_sums(head) == []
    assert cli_main(["check", str(head)]) == 0

    card = (head / "CARD.md").read_text()
    doc = json.loads(Path(out["train_metrics"]).read_text())
    best = doc["best"]["metrics"]
    acc = " | ".join(f"{best[f'val/acc_{i}']:.3f}" for i in range(2))
    assert f"| acc | {acc} |" in card
    rep = json.loads(report.read_text())["datasets"]["mt_bench"]
    assert f"| mt_bench | 1 | {rep['new_tokens']:,} | {rep['tau']:.2f} |" in card
    assert "--draft tiny-head --datasets mt_bench --limit 1 --out bench.json" in card
    assert "| data | " in card and "| data-tf | " in card and "teacher-forced" in card
    assert f"{doc['total_steps']:,} optimizer steps" in card
    trained = doc["data"]["train"]
    per_step = round(trained["tokens"] / trained["micro_batches"])
    assert f"{per_step:,} tokens per micro-batch on average" in card
    assert "Made by the test suite." in card


def test_a_damaged_head_is_caught(released, heads):
    import shutil

    from eagle3.heads import HeadError, resolve_draft

    head, *_ = released
    bad = heads / "tiny-damaged"
    shutil.copytree(head, bad)
    w = bytearray((bad / "model.safetensors").read_bytes())
    w[-3] ^= 0x01  # inside the last tensor's data: the file still parses
    (bad / "model.safetensors").write_bytes(bytes(w))
    assert cli_main(["check", str(bad)]) == 1
    with pytest.raises(HeadError, match="model.safetensors: sha256 does not match"):
        resolve_draft("tiny-damaged")
    shutil.rmtree(bad)


def test_commands_take_the_shipped_head_by_name(released, tiny_target, capsys):
    """generate by name: a bf16 head on the fp32 target gives exactly HF generate's greedy tokens;
    an unknown name exits 2 and names the known heads."""
    from eagle3.eval.bench import _hf_generate
    from eagle3.infer.engine import encode_prompt

    head, _, cfg, _ = released
    prompt = "Write a short poem about rivers."
    capsys.readouterr()
    rc = cli_main(["generate", "--config", str(cfg), "--draft", "tiny-head", "--prompt", prompt,
                   "--json", "--max-new-tokens", "24"])  # fmt: skip
    assert rc == 0
    got = json.loads(capsys.readouterr().out)
    ids = encode_prompt(tiny_target.tokenizer, [{"role": "user", "content": prompt}])
    from eagle3.config import load_recipe

    ref, _ = _hf_generate(tiny_target, ids, 24, 0.0, load_recipe(cfg).infer, None)
    assert got["tokens"] == ref

    rc = cli_main(["generate", "--config", str(cfg), "--draft", "no-such-head", "--prompt", "x"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no-such-head" in err and "tiny-head" in err


def test_the_inference_flow_serves_a_head_by_name(released, prefect_harness):
    from flows.infer import infer_flow

    _, _, cfg, _ = released
    out = infer_flow(["Hello there"], config=str(cfg), draft="tiny-head", max_new_tokens=8)
    assert out["count"] == 1 and out["new_tokens"] > 0
    assert out["champion"]["source"] == "shipped head"
    assert out["champion"]["uri"].endswith("tiny-head")


def test_release_again_with_a_bench_of_the_shipped_weights(released, tmp_path):
    """The card says which weights each report measured: the first release quotes the fp32
    checkpoint's bench; benched by name and released again, the card quotes the head's own."""
    head, report, cfg, out = released
    assert (
        "measured on the checkpoint this head was converted from" in (head / "CARD.md").read_text()
    )
    weights = (head / "model.safetensors").read_bytes()
    own = tmp_path / "own.json"
    args = ["--config", str(cfg), "eval.limit=1", "eval.max_new_tokens=16"]
    assert cli_main(["bench", *args, "--draft", "tiny-head", "--out", str(own)]) == 0
    assert cli_main(["release", "--draft", out["draft_dir"], "--name", "tiny-head",
                     "--bench", str(own)]) == 0  # fmt: skip
    assert (head / "model.safetensors").read_bytes() == weights  # the same conversion
    card = (head / "CARD.md").read_text()
    assert "measured on these weights" in card and "converted from" not in card
    assert cli_main(["check", str(head)]) == 0
