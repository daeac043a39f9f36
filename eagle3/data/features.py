"""Offline feature shards (safetensors): what TTT training needs, so the target need not run again.

Per sample: input_ids, loss_mask, the aux features [T, 3*Ht] and the target's final normed hidden
state [T, Ht] (logits are rebuilt at train time with the target's lm_head: storing [T, V] logits
would cost ~85x more disk for a 49k vocabulary). One shard holds many samples, concatenated along
the token axis, with `offsets` marking where each sample starts.

Token shards (the same layout without `aux`/`last_hidden`) hold the TokenSamples of online training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from eagle3.data.samples import TokenSample


@dataclass
class FeatureSample:
    sample_id: str
    input_ids: torch.Tensor  # int64 [T]
    loss_mask: torch.Tensor  # bool  [T]
    aux: torch.Tensor  # [T, 3*Ht]
    last_hidden: torch.Tensor  # [T, Ht]


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from eagle3.io import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def _token_tensors(samples) -> dict[str, torch.Tensor]:
    lengths = [len(s.input_ids) for s in samples]
    offsets = torch.tensor(
        [0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64
    )
    empty = torch.zeros(0, dtype=torch.int64)
    return {
        "input_ids": torch.cat([s.input_ids.long().cpu() for s in samples]) if samples else empty,
        "loss_mask": (
            torch.cat([s.loss_mask.bool().cpu() for s in samples]) if samples else empty.bool()
        ).to(torch.uint8),
        "offsets": offsets,
    }


def write_shard(
    path: str | Path,
    samples: list[FeatureSample],
    dtype: torch.dtype = torch.bfloat16,
    metadata: dict[str, str] | None = None,
) -> int:
    """Write samples into one safetensors shard atomically (temp file + rename); returns rows."""
    tensors = _token_tensors(samples)
    tensors["aux"] = torch.cat([s.aux.cpu() for s in samples]).to(dtype)
    tensors["last_hidden"] = torch.cat([s.last_hidden.cpu() for s in samples]).to(dtype)
    meta = {**(metadata or {}), "sample_ids": json.dumps([s.sample_id for s in samples])}
    _save_atomic(tensors, Path(path), meta)
    return len(samples)


def write_token_shard(
    path: str | Path, samples: list[TokenSample], metadata: dict[str, str] | None = None
) -> int:
    """TokenSamples (ids + loss mask) into one safetensors shard, atomically; returns rows."""
    meta = {**(metadata or {}), "sample_ids": json.dumps([s.sample_id for s in samples])}
    _save_atomic(_token_tensors(samples), Path(path), meta)
    return len(samples)


def read_token_shard(path: str | Path) -> list[TokenSample]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        ids = json.loads(f.metadata()["sample_ids"])
        t = {k: f.get_tensor(k) for k in ("input_ids", "loss_mask", "offsets")}
    off = t["offsets"].tolist()
    return [
        TokenSample(sid, t["input_ids"][a:b].clone(), t["loss_mask"][a:b].bool())
        for sid, a, b in zip(ids, off[:-1], off[1:], strict=True)
    ]


def shard_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a shard (e.g. the key it was written for); {} when unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # a damaged or foreign file: treat as not written
        return {}


def bytes_per_token(target_hidden: int, dtype: str = "bfloat16") -> int:
    """Disk per token of a feature shard: aux [3Ht] + last_hidden [Ht] + int64 id + uint8 mask."""
    return 4 * target_hidden * DTYPES[dtype].itemsize + 8 + 1


@torch.inference_mode()
def extract_features(
    target, samples: list[TokenSample], batch_size: int = 8, dtype: torch.dtype | None = None
) -> list[FeatureSample]:
    """One target forward per batch (right padding: causal attention keeps real rows exact).

    Features are cast to `dtype` (the storage dtype) per sample: a shard never holds fp32 copies.
    """
    out: list[FeatureSample | None] = [None] * len(samples)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
    dev = target.device
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(samples[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(samples[i])
            ids[r, :n] = samples[i].input_ids
            mask[r, :n] = 1
        f = target.features(ids.to(dev), mask.to(dev), with_logits=False)
        for r, i in enumerate(idx):
            n, s = len(samples[i]), samples[i]
            out[i] = FeatureSample(
                s.sample_id,
                s.input_ids,
                s.loss_mask,
                f.aux[r, :n].to("cpu", dtype or f.aux.dtype),
                f.last_hidden[r, :n].to("cpu", dtype or f.aux.dtype),
            )
    return out  # type: ignore[return-value]


def read_shard(path: str | Path) -> list[FeatureSample]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        ids = json.loads(f.metadata()["sample_ids"])
        t = {
            k: f.get_tensor(k) for k in ("input_ids", "loss_mask", "aux", "last_hidden", "offsets")
        }
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
