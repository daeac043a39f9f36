"""The data stage end to end on the tiny target: outputs, bad input, resume after a kill, digest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import torch

from eagle3.config import build_recipe
from eagle3.data.features import DiskBudgetError, read_shard, read_token_shard
from eagle3.data.manifest import read_manifest
from eagle3.data.pipeline import run_data
from eagle3.data.reader import feature_shards, load_token_samples
from eagle3.data.vocab import load_vocab
from eagle3.fetch import sha256_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _conv(i, n_turns=1):
    msgs = []
    for k in range(n_turns):
        msgs += [
            {"role": "user", "content": f"Question {i}.{k}: name a colour."},
            {"role": "assistant", "content": "An original answer that must be replaced."},
        ]
    return {"id": f"c{i}", "messages": msgs}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Eight good conversations (some multi-turn, one with a system prompt) and five bad records."""
    good = [_conv(i, n_turns=1 + i % 3) for i in range(8)]
    good[3]["messages"].insert(0, {"role": "system", "content": "Answer in one word."})
    bad = [
        '{"id": "broken", "messages": [',
        json.dumps({"id": "empty", "messages": []}),
        json.dumps({"id": "nouser", "messages": [{"role": "assistant", "content": "hi"}]}),
        json.dumps({"id": "long", "messages": [{"role": "user", "content": "word " * 400}]}),
        json.dumps({"id": "blank", "messages": [{"role": "user", "content": "  "}]}),
    ]
    lines = [json.dumps(g) for g in good[:4]] + bad + [json.dumps(g) for g in good[4:]]
    path = tmp_path_factory.mktemp("src") / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_recipe(tiny_recipe, source, run_dir, *overrides):
    tree = tiny_recipe.model_dump(mode="json", exclude_none=True)
    tree["run_dir"] = str(run_dir)
    tree["data"].update(
        {
            "sources": [{"name": "chats"}],
            "catalog": {"chats": {"path": str(source)}},
            "max_len": 160,
            "max_new_tokens": 8,
            "batch_size": 4,
            "shard_size": 4,
            "draft_vocab_size": 256,
            "val_fraction": 0.2,
            "long_policy": "drop",
        }
    )
    return build_recipe(tree, list(overrides))


@pytest.fixture(scope="module")
def base(tiny_recipe, tiny_target, source, tmp_path_factory):
    recipe = make_recipe(tiny_recipe, source, tmp_path_factory.mktemp("base"))
    events = []
    manifest = run_data(recipe, progress=False, callback=events.append, target=tiny_target)
    return recipe, manifest, events


def test_outputs(base, tiny_target):
    recipe, m, events = base
    data_dir = recipe.run_path / "data"
    assert m == read_manifest(data_dir).to_dict()
    # The typed contract: the file validates against the checked-in schema and the model writes
    # it back byte for byte (sorted keys, as write_manifest writes it).
    text = (data_dir / "manifest.json").read_text()
    schema = json.loads((ROOT / "docs/schemas/data-manifest.schema.json").read_text())
    jsonschema.validate(json.loads(text), schema)
    again = json.dumps(
        read_manifest(data_dir).to_dict(), indent=2, sort_keys=True, ensure_ascii=False
    )
    assert again + "\n" == text
    assert [e["stage"] for e in events] == ["regenerate"] * 3 + ["features"] * 3 + ["done"]
    # Contract §5 facts.
    assert m["target"]["id"] == "tiny-llama(seed=0)" and m["target"]["revision"]
    assert m["aux_layer_ids"] == tiny_target.aux_layer_ids
    assert len(m["chat_template_sha256"]) == 64
    src = m["sources"][0]
    assert (src["read"], src["kept"], src["bad"]) == (13, 9, 4)
    s = m["samples"]
    assert s["written"] == 8 and s["train"] + s["val"] == 8 and s["val"] >= 1
    reasons = {x["id"]: x["reason"] for x in s["skipped_samples"]}
    assert set(reasons) == {
        "chats:line5",
        "chats:empty",
        "chats:nouser",
        "chats:long",
        "chats:blank",
    }
    assert reasons["chats:line5"].startswith("malformed JSON: line 5")
    assert reasons["chats:long"].startswith("too long: prompt of")
    assert s["skipped"] == 5 and sum(s["skipped_by_reason"].values()) == 5
    # Token samples: what online training reads.
    train, val = load_token_samples(data_dir)
    ids = [x.sample_id for x in train + val]
    assert sorted(ids) == sorted(f"chats:c{i}" for i in range(8))
    assert {x.sample_id for x in val} == set(m["split"]["val_ids"])
    assert sum(len(x) for x in train + val) == m["tokens"]["total"]
    assert sum(int(x.loss_mask.sum()) for x in train + val) == m["tokens"]["trainable"]
    assert all(x.input_ids.dtype == torch.int64 and x.loss_mask.any() for x in train + val)
    assert all(len(x) <= recipe.data.max_len for x in train + val)
    # Shards: row counts and sha256 as listed.
    for sh in m["shards"]:
        assert sha256_file(data_dir / sh["path"]) == sh["sha256"]
    tok_rows = [sh["rows"] for sh in m["shards"] if sh["kind"] == "tokens"]
    assert sum(tok_rows) == 8
    # Vocab from the trainable tokens of the train split.
    vocab = load_vocab(data_dir)
    assert vocab.d2t.shape == (256,) and vocab.t2d.shape == (tiny_target.vocab_size,)
    assert int(vocab.t2d.sum()) == 256 and m["vocab"]["size"] == 256
    assert m["vocab"]["coverage"] == pytest.approx(vocab.coverage)
    trained = torch.cat([x.input_ids[x.loss_mask] for x in train])
    assert bool(vocab.t2d[trained].all()) == (vocab.seen <= 256)
    # Feature shards: the target's own aux and last hidden states, bf16.
    ftrain, fval = feature_shards(data_dir)
    assert len(ftrain) == 3 and {p.name for p in fval} <= {
        f"val-{i:05d}.safetensors" for i in range(3)
    }
    feats = {f.sample_id: f for p in ftrain + fval for f in read_shard(p)}
    assert set(feats) == set(ids)
    one = train[0]
    f = feats[one.sample_id]
    assert f.aux.dtype == torch.bfloat16 and f.aux.shape == (len(one), 3 * tiny_target.hidden_size)
    assert torch.equal(f.input_ids, one.input_ids) and torch.equal(f.loss_mask, one.loss_mask)
    ref = tiny_target.features(one.input_ids[None], with_logits=False)
    torch.testing.assert_close(
        f.last_hidden.float(), ref.last_hidden[0].float(), atol=0.05, rtol=0.02
    )
    torch.testing.assert_close(f.aux.float(), ref.aux[0].float(), atol=0.05, rtol=0.02)


def test_assistant_turns_are_the_targets_own(base, tiny_target):
    from eagle3.data.chat import encode_chat
    from eagle3.data.regenerate import generate_batch

    recipe, _, _ = base
    regen = json.loads((recipe.run_path / "data" / "regen" / "00000.json").read_text())
    conv = next(c for c in regen["conversations"] if c["id"] == "chats:c2")
    msgs = conv["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
    assert "must be replaced" not in json.dumps(msgs)
    # Each answer is the target's greedy answer to the conversation so far (turn by turn).
    for k in (1, 3, 5):
        prompt = encode_chat(tiny_target.tokenizer, msgs[:k], add_generation_prompt=True)
        ((ids, _),) = generate_batch(tiny_target, [prompt], recipe.data.max_new_tokens)
        assert msgs[k]["content"] == tiny_target.tokenizer.decode(ids, skip_special_tokens=True)


def test_resume_after_interrupt(base, tiny_recipe, tiny_target, source, tmp_path):
    recipe = make_recipe(tiny_recipe, source, tmp_path / "run")

    def die_after_first_shard(event):
        if event["stage"] == "regenerate" and event["shard"] == 0:
            raise KeyboardInterrupt  # what Ctrl-C or a kill does between two shards

    with pytest.raises(KeyboardInterrupt):
        run_data(recipe, progress=False, callback=die_after_first_shard, target=tiny_target)
    data_dir = recipe.run_path / "data"
    assert [p.name for p in (data_dir / "tokens").iterdir()] == ["00000.safetensors"]
    assert not (data_dir / "manifest.json").exists()
    events = []
    m = run_data(recipe, progress=False, callback=events.append, target=tiny_target)
    resumed = [e["resumed"] for e in events if e["stage"] == "regenerate"]
    assert resumed == [True, False, False]
    assert m["digest"] == base[1]["digest"]  # nothing lost, nothing twice
    train, val = load_token_samples(data_dir)
    assert len({x.sample_id for x in train + val}) == len(train + val) == 8


def test_killed_process_resumes(base, tiny_recipe, source, tmp_path):
    """SIGKILL a real `eagle3 data` process mid-run (after its first shard), then resume.

    One conversation per shard: after the first there are eight more, so the kill lands mid-run.
    """
    recipe = make_recipe(tiny_recipe, source, tmp_path / "run", "data.shard_size=1")
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(json.dumps(recipe.model_dump(mode="json", exclude_none=True)))  # YAML ⊃ JSON
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "eagle3.cli", "data", "--config", str(cfg)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = recipe.run_path / "data" / "tokens" / "00000.safetensors"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    data_dir = recipe.run_path / "data"
    assert first.exists(), "the child never finished a shard"
    assert not (data_dir / "manifest.json").exists()
    done_before = len(list((data_dir / "tokens").glob("*.safetensors")))
    events = []
    m = run_data(recipe, progress=False, callback=events.append)
    resumed = [e["resumed"] for e in events if e["stage"] == "regenerate"]
    assert resumed == [True] * done_before + [False] * (9 - done_before)
    assert (
        m["digest"] == base[1]["digest"]
    )  # same data as the uninterrupted run: none lost or doubled
    assert not list(data_dir.rglob(".*.tmp"))


def test_digest_changes_when_and_only_when_data_changes(
    base, tiny_recipe, tiny_target, source, tmp_path
):
    _, m0, _ = base
    # Same data, made differently: another run dir, shard layout, batch size, training settings.
    same = make_recipe(
        tiny_recipe,
        source,
        tmp_path / "same",
        "data.shard_size=3",
        "data.batch_size=3",
        "data.concurrency=2",
        "train.lr=0.1",
        "eval.limit=1",
    )
    m1 = run_data(same, progress=False, target=tiny_target)
    assert m1["digest"] == m0["digest"]
    assert m1["shards"] != m0["shards"]  # stored differently, same data
    # Longer answers: other tokens.
    longer = make_recipe(tiny_recipe, source, tmp_path / "longer", "data.max_new_tokens=9")
    assert run_data(longer, progress=False, target=tiny_target)["digest"] != m0["digest"]
    # Same tokens, another draft vocabulary (reuses the run dir: only the vocab is rebuilt).
    vocab = make_recipe(
        tiny_recipe, source, tmp_path / "same", "data.shard_size=3", "data.draft_vocab_size=128"
    )
    events = []
    m3 = run_data(vocab, progress=False, callback=events.append, target=tiny_target)
    assert all(e["resumed"] for e in events if e["stage"] == "regenerate")
    assert m3["digest_of"]["samples_sha256"] == m0["digest_of"]["samples_sha256"]
    assert m3["digest"] != m0["digest"]


def test_disk_budget_refusal(base, tiny_recipe, source, tmp_path):
    from eagle3.cli import main

    recipe, m0, _ = base
    run = tmp_path / "run"
    shutil.copytree(recipe.run_path, run)
    shutil.rmtree(run / "data" / "features")
    tight = make_recipe(tiny_recipe, source, run, "data.max_disk_gb=0.000001")
    with pytest.raises(
        DiskBudgetError,
        match=r"feature shards need about 0\.00\d+ GB \(\d[\d,]* tokens x 521 bytes/token",
    ):
        run_data(tight, progress=False)
    assert not list((run / "data" / "features").glob("*.safetensors"))
    # The CLI says the same and exits 2 (bad input).
    cfg = tmp_path / "tight.yaml"
    cfg.write_text(json.dumps(tight.model_dump(mode="json", exclude_none=True)))
    assert main(["data", "--config", str(cfg)]) == 2
    assert m0["features"]["estimated_bytes"] == m0["tokens"]["total"] * 521


def test_token_shard_roundtrip(tmp_path):
    from eagle3.data.features import write_token_shard
    from eagle3.data.samples import TokenSample

    rows = [
        TokenSample(f"s{i}", torch.arange(i + 1), torch.arange(i + 1) % 2 == 0) for i in range(3)
    ]
    write_token_shard(tmp_path / "t.safetensors", rows, metadata={"key": "k"})
    back = read_token_shard(tmp_path / "t.safetensors")
    assert [r.sample_id for r in back] == ["s0", "s1", "s2"]
    for a, b in zip(rows, back, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)


def test_training_mixes_in_a_teacher_forced_stage(base, tiny_recipe, tiny_target, source, tmp_path):
    from eagle3.config import ConfigError
    from eagle3.train.trainer import DataMissing, conversation_id, mixed_samples, run_training

    recipe, m, _ = base
    tf = make_recipe(
        tiny_recipe, source, tmp_path / "tf", "data.regenerate=false", "data.features=false"
    )
    tf_dir = str(tf.run_path / "data")
    run_data(tf, progress=False, target=tiny_target)
    tf_train, _ = load_token_samples(tf_dir)
    text = tiny_target.tokenizer.decode(tf_train[0].input_ids)
    assert "An original answer that must be replaced." in text  # teacher-forced: not regenerated

    first = conversation_id(tf_train[0].sample_id)
    extra, digests = mixed_samples([tf_dir], m, held_out={first})
    kept = [s for s in tf_train if conversation_id(s.sample_id) != first]
    assert [s.sample_id for s in extra] == [f"{tf_dir}:{s.sample_id}" for s in kept]
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(extra, kept, strict=True))
    assert digests == [read_manifest(tf_dir).digest]

    with pytest.raises(ConfigError, match="tf/data: its target differs"):
        mixed_samples([tf_dir], {**m, "target": {**m["target"], "id": "another model"}}, set())
    with pytest.raises(DataMissing, match="nowhere/manifest.json"):
        mixed_samples([str(tmp_path / "nowhere")], m, set())

    # The trainer counts both stages' training samples and validates on its own held-out ones.
    own_train, own_val = load_token_samples(recipe.run_path / "data")
    mixed = build_recipe(
        recipe.model_dump(mode="json", exclude_none=True),
        [
            f"train.mix_data=[{tf_dir}]",
            "train.max_steps=1",
            "train.batch_tokens=512",
            "train.max_len=160",
            "train.ttt_steps=2",
        ],
    )
    out = run_training(mixed, progress=False)
    data = json.loads(Path(out["train_metrics"]).read_text())["data"]
    own_ids = {conversation_id(s.sample_id) for s in own_val}
    n_extra = sum(conversation_id(s.sample_id) not in own_ids for s in tf_train)
    assert data["train"]["samples"] == len(own_train) + n_extra
    assert data["val"]["samples"] == len(own_val)


def test_a_smaller_plan_keeps_the_regenerated_answers_beyond_it(tiny_recipe, tiny_target, source,
                                                                tmp_path):  # fmt: skip
    """Lowering the source limit drops the later shards from the stage but keeps their answers,
    so raising it again regenerates nothing (choose limits that are multiples of shard_size: a
    cut shard holds other conversations, so its answers are made anew)."""
    full = make_recipe(tiny_recipe, source, tmp_path, "data.features=false")
    run_data(full, progress=False, target=tiny_target)
    data = tmp_path / "data"
    regen = {p.name: p.stat().st_mtime_ns for p in (data / "regen").glob("*.json")}
    assert len(regen) == 3
    small = make_recipe(tiny_recipe, source, tmp_path, "data.features=false",
                        "data.sources=[{name: chats, limit: 8}]")  # fmt: skip
    m = run_data(small, progress=False, target=tiny_target)
    assert [s["path"] for s in m["shards"]] == [
        "tokens/00000.safetensors",
        "tokens/00001.safetensors",
    ]
    assert not (data / "tokens" / "00002.safetensors").exists()  # not listed, not kept
    assert (data / "regen" / "00002.json").is_file()  # the answers are kept
    events = []
    run_data(full, progress=False, target=tiny_target, callback=events.append)
    assert {p.name: p.stat().st_mtime_ns for p in (data / "regen").glob("*.json")} == regen
    assert [e["resumed"] for e in events if e["stage"] == "regenerate"] == [True, True, False]
