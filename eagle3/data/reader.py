"""What training reads from a finished data stage, through its manifest (docs/CONTRACTS.md §5):
the token samples split into train/val, and the feature shard paths. The vocabulary:
eagle3.data.vocab.load_vocab."""

from __future__ import annotations

from pathlib import Path

from eagle3.data.features import read_token_shard
from eagle3.data.manifest import read_manifest
from eagle3.data.samples import TokenSample


def load_token_samples(data_dir: str | Path) -> tuple[list[TokenSample], list[TokenSample]]:
    """(train, val) TokenSamples of a finished data stage, in shard order."""
    manifest = read_manifest(data_dir)
    val = set(manifest.split.val_ids)
    samples = [s for p in manifest.shard_paths(data_dir, "tokens") for s in read_token_shard(p)]
    return [s for s in samples if s.sample_id not in val], [
        s for s in samples if s.sample_id in val
    ]


def feature_shards(data_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(train, val) feature shard paths (empty lists when data.features was off)."""
    manifest = read_manifest(data_dir)
    return manifest.shard_paths(data_dir, "features/train"), manifest.shard_paths(
        data_dir, "features/val"
    )
