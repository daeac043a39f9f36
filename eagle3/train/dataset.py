"""Indexable training sets: in-memory TokenSamples (online) or feature shards read lazily (offline).

Both give `lengths` up front (packing needs only those) and a sample by index on demand. Shards are
read by slices through safetensors' memory map, so a packed micro-batch touches only its rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from eagle3.data.features import FeatureSample


class SampleList:
    """A list of TokenSample or FeatureSample held in memory."""

    def __init__(self, samples: list):
        self.samples = list(samples)
        self.lengths = [len(s.input_ids) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.samples[i]


class ShardDataset:
    """FeatureSamples of offline shards (eagle3.data.features layout), loaded one at a time."""

    def __init__(self, shards: list[str | Path]):
        from safetensors import safe_open

        self.index: list[tuple[Path, str, int, int]] = []
        for path in shards:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"feature shard {path} does not exist")
            try:
                with safe_open(str(path), framework="pt") as f:
                    ids = json.loads(f.metadata()["sample_ids"])
                    off = f.get_tensor("offsets").tolist()
            except Exception as e:  # a damaged shard: name it
                raise ValueError(f"feature shard {path} cannot be read: {e}") from e
            if len(off) != len(ids) + 1:
                raise ValueError(
                    f"feature shard {path}: {len(ids)} sample ids but {len(off)} offsets"
                )
            self.index += [
                (path, sid, a, b) for sid, a, b in zip(ids, off[:-1], off[1:], strict=True)
            ]
        self.lengths = [b - a for _, _, a, b in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> FeatureSample:
        from safetensors import safe_open

        path, sid, a, b = self.index[i]
        with safe_open(str(path), framework="pt") as f:
            t = {k: f.get_slice(k)[a:b] for k in ("input_ids", "loss_mask", "aux", "last_hidden")}
        return FeatureSample(
            sample_id=sid,
            input_ids=t["input_ids"].long(),
            loss_mask=t["loss_mask"].bool(),
            aux=t["aux"],
            last_hidden=t["last_hidden"],
        )


def as_dataset(data) -> SampleList | ShardDataset:
    if isinstance(data, (SampleList, ShardDataset)):
        return data
    return SampleList(data)


def token_samples_equal(a, b) -> bool:
    return torch.equal(a.input_ids, b.input_ids) and torch.equal(
        a.loss_mask.bool(), b.loss_mask.bool()
    )
