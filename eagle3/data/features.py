"""Offline feature shards (safetensors): what TTT training needs, so the target need not run again.

Per sample: input_ids, loss_mask, the aux features [T, 3*Ht] and the target's final normed hidden
state [T, Ht] (logits are rebuilt at train time with the target's lm_head: storing [T, V] logits
would cost ~85x more disk for a 49k vocabulary). One shard holds many samples, concatenated along
the token axis, with `offsets` marking where each sample starts.

Token shards (the same layout without `aux`/`last_hidden`) hold the TokenSamples of online training.
A data stage writes one train and one val feature file per token shard (`write_feature_shards`),
each keyed like every shard (eagle3.data.shards), after checking the disk they need.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from eagle3.data.samples import TokenSample

if TYPE_CHECKING:
    from eagle3.data.manifest import FeaturesInfo, Shard

log = logging.getLogger(__name__)


class DiskBudgetError(ValueError):
    """The feature shards would need more disk than data.max_disk_gb allows."""


@dataclass
class FeatureSample:
    sample_id: str
    input_ids: torch.Tensor  # int64 [T]
    loss_mask: torch.Tensor  # bool  [T]
    aux: torch.Tensor  # [T, 3*Ht]
    last_hidden: torch.Tensor  # [T, Ht]


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    """One safetensors file with string metadata, atomically (temp file + rename)."""
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
    save_tensors(tensors, Path(path), meta)
    return len(samples)


def write_token_shard(
    path: str | Path, samples: list[TokenSample], metadata: dict[str, str] | None = None
) -> int:
    """TokenSamples (ids + loss mask) into one safetensors shard, atomically; returns rows."""
    meta = {**(metadata or {}), "sample_ids": json.dumps([s.sample_id for s in samples])}
    save_tensors(_token_tensors(samples), Path(path), meta)
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


def check_disk(tokens: int, data, hidden: int, data_dir: Path) -> dict[str, Any]:
    """Say the disk need of `tokens` tokens of features before writing them; refuse above
    data.max_disk_gb (GB = 1e9 bytes) or above what is free. `data`: the recipe's data section."""
    per = bytes_per_token(hidden, data.feature_dtype)
    need = tokens * per
    # Feature files already written (a resumed run) count as available: they get rewritten at most.
    have = sum(p.stat().st_size for p in (data_dir / "features").glob("*.safetensors"))
    free = shutil.disk_usage(data_dir).free + have
    msg = (
        f"feature shards need about {need / 1e9:.3f} GB ({tokens:,} tokens x {per:,} bytes/token "
        f"at {data.feature_dtype}, target hidden {hidden}); data.max_disk_gb is "
        f"{data.max_disk_gb:g}, {free / 1e9:.1f} GB free"
    )
    log.info(msg)
    if need > data.max_disk_gb * 1e9:
        raise DiskBudgetError(
            f"refusing to write features: {msg}. Raise data.max_disk_gb, lower "
            "data.limit or data.max_len, or use train.features=online with "
            "data.features=false"
        )
    if need > free:
        raise DiskBudgetError(f"refusing to write features: {msg}, more than is free")
    return {"bytes_per_token": per, "estimated_bytes": need, "max_disk_gb": data.max_disk_gb}


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


# --- a data stage's feature files ---------------------------------------------------------------------
def write_feature_shards(
    target,
    identity: dict,
    per_shard,
    token_keys,
    val: set[str],
    data,
    data_dir: Path,
    progress,
    emit,
) -> tuple[FeaturesInfo, list[Shard]]:
    """The train/val feature files of every token shard (`per_shard[i]`: its TokenSamples,
    `token_keys[i]`: its key), after checking the disk they need; a file present with its current
    key is kept. Returns the manifest's `features` and the files as its shard rows."""
    from tqdm import tqdm

    from eagle3.data.manifest import FeaturesInfo, Shard
    from eagle3.data.shards import ShardPaths, feature_key

    total = sum(len(s) for rows in per_shard for s in rows)
    info = FeaturesInfo(
        written=True,
        dtype=data.feature_dtype,
        **check_disk(total, data, target.hidden_size, data_dir),
    )
    if progress:
        print(
            f"features: about {info.estimated_bytes / 1e9:.3f} GB "
            f"({total:,} tokens x {info.bytes_per_token:,} bytes/token)"
        )
    dtype, out = DTYPES[data.feature_dtype], []
    for i in tqdm(range(len(per_shard)), desc="features", unit="shard", disable=not progress):
        paths = ShardPaths.of(data_dir, i)
        for part, rows in (
            ("train", [s for s in per_shard[i] if s.sample_id not in val]),
            ("val", [s for s in per_shard[i] if s.sample_id in val]),
        ):
            path = paths.features(part)
            if not rows:
                path.unlink(missing_ok=True)
                continue
            ids = [s.sample_id for s in rows]
            key = feature_key(
                token_keys[i], identity, target.aux_layer_ids, data.feature_dtype, ids
            )
            if shard_metadata(path).get("key") != key:
                feats = extract_features(target, rows, data.batch_size, dtype)
                write_shard(path, feats, dtype, metadata={"key": key})
            out.append(Shard.of(f"features/{part}", path, data_dir, len(rows)))  # its sha256 now
        emit({"stage": "features", "shard": i, "shards": len(per_shard)})
    return info, out
