"""Target-side inputs of a TTT step: aux features, embeddings and target distributions.

online: the frozen target runs on the packed batch (a block-diagonal causal mask and restarting
positions keep samples apart, exactly as if each ran alone). offline: aux and the final hidden
state come from feature shards and the logits are rebuilt with the target's lm_head. hybrid: online
in epoch 0, and the features are cached on disk for later epochs (per micro-batch, since the
composition of micro-batches is fixed for the run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from eagle3.train.batching import Packed
from eagle3.train.ttt import TargetDist, block_causal, needed_rows, target_dist


@dataclass
class StepInputs:
    aux: torch.Tensor
    embeds: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    loss_mask: torch.Tensor
    target: TargetDist

    def args(self) -> tuple:
        return (self.aux, self.embeds, self.position_ids, self.segment, self.loss_mask, self.target)


def packed_mask(segment: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """4D additive mask [B,1,T,T] for the HF target (0 = attend, dtype min = masked): works with the
    eager and sdpa attention of transformers, which pass a 4D mask through unchanged."""
    allow = block_causal(segment)
    mask = torch.zeros(allow.shape, dtype=dtype, device=segment.device)
    return mask.masked_fill(~allow, torch.finfo(dtype).min)[:, None]


@torch.no_grad()
def target_hidden(target, batch: Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux [B,T,3Ht], final normed hidden [B,T,Ht]) from one target forward over a packed batch."""
    mask = packed_mask(batch.segment, target.dtype)
    with target.capture() as store:
        out = target.model.model(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
    return target.stack_aux(store), out.last_hidden_state


def step_inputs(
    target,
    draft,
    batch: Packed,
    aux: torch.Tensor,
    last_hidden: torch.Tensor,
    loss_style: str = "eagle3",
) -> StepInputs:
    with torch.no_grad():
        need = needed_rows(batch.segment, batch.loss_mask, loss_style)
        dist = target_dist(target.lm_head, last_hidden, draft.draft_token_ids, draft.t2d, need)
        embeds = target.embed(batch.input_ids)
    return StepInputs(aux, embeds, batch.position_ids, batch.segment, batch.loss_mask, dist)


class FeatureSource:
    """Gives StepInputs for a micro-batch in the recipe's feature mode."""

    def __init__(
        self,
        target,
        draft,
        mode: str,
        cache_dir: Path | None = None,
        cache_dtype=torch.bfloat16,
        loss_style: str = "eagle3",
    ):
        if mode not in ("online", "offline", "hybrid"):
            raise ValueError(f"train.features must be online, offline or hybrid, got {mode!r}")
        if mode == "hybrid" and cache_dir is None:
            raise ValueError("hybrid features need a cache directory")
        self.target, self.draft, self.mode = target, draft, mode
        self.cache_dir, self.cache_dtype = cache_dir, cache_dtype
        self.loss_style = loss_style
        self.target_seconds = 0.0  # time spent in the target (forward or lm_head), for throughput

    def __call__(self, batch: Packed, batch_id: int, epoch: int) -> StepInputs:
        import time

        t0 = time.perf_counter()
        device = self.target.device
        batch = batch.to(device)
        if self.mode == "offline":
            if batch.aux is None:
                raise ValueError("offline features: the batch holds no aux features (no shards?)")
            aux, last = batch.aux, batch.last_hidden
        elif self.mode == "hybrid" and epoch > 0:
            aux, last = self._cached(batch_id, device)
        else:
            aux, last = target_hidden(self.target, batch)
            if self.mode == "hybrid":
                self._store(batch_id, aux, last)
        out = step_inputs(self.target, self.draft, batch, aux, last, self.loss_style)
        self.target_seconds += time.perf_counter() - t0
        return out

    def _path(self, batch_id: int) -> Path:
        return self.cache_dir / f"batch-{batch_id:07d}.safetensors"

    def _store(self, batch_id: int, aux: torch.Tensor, last: torch.Tensor) -> None:

        from safetensors.torch import save_file

        from eagle3.io import atomic_path

        path = self._path(batch_id)
        if path.is_file():
            return
        tensors = {
            "aux": aux.to(self.cache_dtype).cpu(),
            "last_hidden": last.to(self.cache_dtype).cpu(),
        }
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))

    def _cached(self, batch_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import load_file

        path = self._path(batch_id)
        if not path.is_file():
            raise FileNotFoundError(
                f"hybrid feature cache {path} is missing (epoch 0 did not write it)"
            )
        t = load_file(str(path))
        return t["aux"].to(device, self.target.dtype), t["last_hidden"].to(
            device, self.target.dtype
        )
