"""The shards of a data stage on disk: their paths, the keys that say when one is current, the lock
that keeps two runs apart, and pruning what an earlier, larger plan left.

A key is the sha256 of everything that decides a file's content (canonical JSON). Each file
stores its key; a rerun skips a file whose stored key equals the current one, so changing the
recipe redoes only what it affects. Keys are part of the on-disk format: existing run folders
resume only while they are computed exactly as here (tests/test_data_keys.py pins them).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eagle3.data.manifest import write_json_atomic
from eagle3.data.regenerate import RegenResult, RegenStats
from eagle3.data.sources import Conversation, Skip
from eagle3.io import sha256_json


class DataLockedError(RuntimeError):
    """Another `eagle3 data` run holds this data folder."""


def key_of(obj: Any) -> str:
    return sha256_json(obj, compact=True)


# --- paths ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardPaths:
    """The files of shard i under a data folder."""

    regen: Path  # regen/00000.json: the conversations after regeneration (+ skips, stats)
    tokens: Path  # tokens/00000.safetensors: its TokenSamples; the shard is done when it holds
    train: Path  # features/train-00000.safetensors
    val: Path  # features/val-00000.safetensors

    @classmethod
    def of(cls, data_dir: Path, i: int) -> ShardPaths:
        return cls(
            regen=data_dir / "regen" / f"{i:05d}.json",
            tokens=data_dir / "tokens" / f"{i:05d}.safetensors",
            train=data_dir / "features" / f"train-{i:05d}.safetensors",
            val=data_dir / "features" / f"val-{i:05d}.safetensors",
        )

    def features(self, part: str) -> Path:
        return {"train": self.train, "val": self.val}[part]


# --- keys ------------------------------------------------------------------------------------------------
def regen_key(convs: list[Conversation], data, identity: dict, template_sha: str) -> str:
    """Key of a shard's regenerated conversations; `data`: the recipe's data section."""
    regen = {
        "on": data.regenerate,
        "backend": data.backend,
        "temperature": data.temperature,
        "max_new_tokens": data.max_new_tokens,
        "max_len": data.max_len,
        "seed": data.seed,
    }
    return key_of(
        {
            "conversations": [
                [c.id, c.messages] + (["recorded answer"] if c.recorded_answer else [])
                for c in convs
            ],
            "target": identity,
            "template": template_sha,
            "regen": regen if data.regenerate else False,
        }
    )


def token_key(rkey: str, data) -> str:
    """Key of a shard's token file: its regeneration key and how the samples were cut."""
    return key_of(
        {"regen": rkey, "turns": data.turns, "max_len": data.max_len, "long": data.long_policy}
    )


def feature_key(
    tkey: str, identity: dict, aux_layer_ids: list[int], dtype: str, sample_ids: list[str]
) -> str:
    """Key of one train/val feature file of a shard."""
    return key_of(
        {
            "tokens": tkey,
            "target": identity,
            "aux": aux_layer_ids,
            "dtype": dtype,
            "ids": sample_ids,
        }
    )


# --- the regenerated conversations of a shard --------------------------------------------------------------
def read_regen(path: Path, key: str) -> RegenResult | None:
    """The shard's regenerated conversations when written for `key`, else None (redo them)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(obj, dict) or obj.get("key") != key:
        return None
    try:
        return RegenResult(
            conversations=[
                Conversation(c["id"], c["messages"], c["source"], c.get("recorded_answer", False))
                for c in obj["conversations"]
            ],
            skipped=[Skip(s["id"], s["reason"]) for s in obj["skipped"]],
            stats=RegenStats(**obj["stats"]),
        )
    except (KeyError, TypeError):  # not our layout: regenerate
        return None


def write_regen(path: Path, key: str, regen: RegenResult) -> None:
    write_json_atomic(
        path,
        {
            "key": key,
            "conversations": [
                {"id": c.id, "source": c.source, "messages": c.messages}
                | ({"recorded_answer": True} if c.recorded_answer else {})
                for c in regen.conversations
            ],
            "skipped": [{"id": s.id, "reason": s.reason} for s in regen.skipped],
            "stats": regen.stats.as_dict(),
        },
    )


# --- lock and prune ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def locked(data_dir: Path) -> Iterator[None]:
    """Hold the data folder for one run; temp files a killed run left are removed."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataLockedError(f"another `eagle3 data` run is writing {data_dir}") from None
        for tmp in data_dir.rglob(".*.tmp"):  # left by a killed run (we hold the lock)
            tmp.unlink(missing_ok=True)
        yield


def prune(data_dir: Path, keep: set[Path]) -> None:
    """Remove token and feature files of an earlier, larger plan so that nothing stale is listed
    or read. Regenerated answers (regen/, hours of work) stay: their key is checked before any
    use, so a later plan that holds the same shard again takes them as they are."""
    for sub in ("tokens", "features"):
        for p in (data_dir / sub).glob("*"):
            if p.is_file() and p not in keep:
                p.unlink()
