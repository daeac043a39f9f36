"""AdamW and the learning-rate schedule: linear warmup, then cosine decay to zero."""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier for the update at `step` (0-based) of `total` updates."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def warmup_steps(total: int, ratio: float) -> int:
    return max(1, round(ratio * total)) if ratio > 0 else 0


def make_optimizer(params, lr: float, betas, weight_decay: float, total: int, warmup_ratio: float):
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    warm = warmup_steps(total, warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warm))
    return opt, sched
