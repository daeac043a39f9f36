"""Indexable training sets: in-memory TokenSamples (online) or feature shards read lazily (offline).

Both give `lengths` up front (packing needs only those) and a sample by index on demand. Shards are
read by slices through safetensors' memory map, so a packed micro-batch touches only its rows.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Callable
from pathlib import Path

from eagle3.data.features import FeatureSample


class SampleList:
    """A list of TokenSample or FeatureSample held in memory."""

    def __init__(self, samples: list):
        self.samples = list(samples)
        self.lengths = [len(s.input_ids) for s in self.samples]

    @property
    def sample_ids(self) -> list[str]:
        return [s.sample_id for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.samples[i]


class ShardDataset:
    """FeatureSamples of offline shards (eagle3.data.features layout), loaded one at a time.

    `keep(sample_id)` selects samples (default all); `prefix` is put before every sample id (a
    mixed data stage's samples are named `<its dir>:<id>`)."""

    def __init__(
        self,
        shards: list[str | Path],
        keep: Callable[[str], bool] | None = None,
        prefix: str = "",
    ):
        from safetensors import safe_open

        self.prefix = prefix

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
                (path, sid, a, b)
                for sid, a, b in zip(ids, off[:-1], off[1:], strict=True)
                if keep is None or keep(sid)
            ]
        self.lengths = [b - a for _, _, a, b in self.index]

    @property
    def sample_ids(self) -> list[str]:
        return [self.prefix + sid for _, sid, _, _ in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> FeatureSample:
        from safetensors import safe_open

        path, sid, a, b = self.index[i]
        with safe_open(str(path), framework="pt") as f:
            t = {k: f.get_slice(k)[a:b] for k in ("input_ids", "loss_mask", "aux", "last_hidden")}
        return FeatureSample(
            sample_id=self.prefix + sid,
            input_ids=t["input_ids"].long(),
            loss_mask=t["loss_mask"].bool(),
            aux=t["aux"],
            last_hidden=t["last_hidden"],
        )


class Concat:
    """Several datasets as one (a run's shards followed by those of its mixed data stages)."""

    def __init__(self, parts: list):
        self.parts = [as_dataset(p) for p in parts]
        self.lengths = [n for p in self.parts for n in p.lengths]
        self.starts = list(itertools.accumulate((len(p) for p in self.parts), initial=0))

    @property
    def sample_ids(self) -> list[str]:
        return [i for p in self.parts for i in p.sample_ids]

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = bisect.bisect_right(self.starts, i) - 1
        return self.parts[part][i - self.starts[part]]


def as_dataset(data) -> SampleList | ShardDataset | Concat:
    if isinstance(data, (SampleList, ShardDataset, Concat)):
        return data
    return SampleList(data)
