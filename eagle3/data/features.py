"""Offline feature shards (safetensors): what TTT training needs, so the target need not run again.

Per sample: input_ids, loss_mask, the aux features [T, 3*Ht] and the target's final normed hidden
state [T, Ht] (logits are rebuilt at train time with the target's lm_head: storing [T, V] logits
would cost ~85x more disk for a 49k vocabulary). One shard holds many samples, concatenated along
the token axis, with `offsets` marking where each sample starts.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class FeatureSample:
    sample_id: str
    input_ids: torch.Tensor  # int64 [T]
    loss_mask: torch.Tensor  # bool  [T]
    aux: torch.Tensor  # [T, 3*Ht]
    last_hidden: torch.Tensor  # [T, Ht]


def write_shard(path: str | Path, samples: list[FeatureSample], dtype: torch.dtype = torch.bfloat16) -> int:
    """Write samples into one safetensors shard atomically (temp file + rename); returns rows."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = [len(s.input_ids) for s in samples]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    tensors = {
        "input_ids": torch.cat([s.input_ids.long().cpu() for s in samples]),
        "loss_mask": torch.cat([s.loss_mask.bool().cpu() for s in samples]).to(torch.uint8),
        "aux": torch.cat([s.aux.cpu() for s in samples]).to(dtype),
        "last_hidden": torch.cat([s.last_hidden.cpu() for s in samples]).to(dtype),
        "offsets": offsets,
    }
    meta = {"sample_ids": json.dumps([s.sample_id for s in samples])}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(samples)


def read_shard(path: str | Path) -> list[FeatureSample]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        ids = json.loads(f.metadata()["sample_ids"])
        t = {k: f.get_tensor(k) for k in ("input_ids", "loss_mask", "aux", "last_hidden", "offsets")}
    off = t["offsets"].tolist()
    return [
        FeatureSample(
            sample_id=sid,
            input_ids=t["input_ids"][a:b],
            loss_mask=t["loss_mask"][a:b].bool(),
            aux=t["aux"][a:b],
            last_hidden=t["last_hidden"][a:b],
        )
        for sid, a, b in zip(ids, off[:-1], off[1:], strict=True)
    ]


def iter_samples(shards: Iterable[str | Path]) -> Iterator[FeatureSample]:
    for shard in shards:
        yield from read_shard(shard)
