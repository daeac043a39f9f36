"""torch.distributed plumbing: process group from torchrun's environment, DDP / FSDP2 wrapping,
sum-reductions and full state dicts. A single process needs none of it (world size 1)."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(mode: str, device: str) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, ...), or use one already open."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    if world <= 1:
        return DistInfo()
    if mode == "none":
        log.info("train.distributed is none but %d processes run: using ddp", world)
        mode = "ddp"
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        owns = True
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, mode, owns)


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, info: DistInfo, device: str) -> torch.nn.Module:
    """DDP or FSDP2 around the TTT module (its forward is the whole unroll, so that the wrapper's
    hooks see every use of the draft's parameters)."""
    if info.world <= 1:
        return module
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [torch.device(device).index] if device.startswith("cuda") else None
        return DDP(module, device_ids=ids)
    if info.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # One unit: the draft is one layer; sharding pays off through the optimizer state.
        fully_shard(module)
        return module
    raise ValueError(f"train.distributed must be none, ddp or fsdp, got {info.mode!r}")


def no_sync(model: torch.nn.Module, skip: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP); FSDP2 and plain: no-op."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def all_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def full_state(model: torch.nn.Module, optimizer, info: DistInfo) -> tuple[dict, dict]:
    """(model, optimizer) state dicts, complete and on CPU (collective under FSDP2)."""
    if info.mode == "fsdp" and info.world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=opts)
    inner = getattr(model, "module", model)
    return inner.state_dict(), optimizer.state_dict()


def load_full_state(
    model: torch.nn.Module, optimizer, model_sd: dict, optim_sd: dict, info: DistInfo
) -> None:
    if info.mode == "fsdp" and info.world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_state_dict(
            model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts
        )
        return
    getattr(model, "module", model).load_state_dict(model_sd)
    optimizer.load_state_dict(optim_sd)
