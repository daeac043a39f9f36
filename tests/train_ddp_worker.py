"""torchrun worker for test_train_distributed: trains each job file written by the test, in order
(one launch for several jobs: starting processes is the slow part).

Usage: torchrun --standalone --nproc-per-node 2 tests/train_ddp_worker.py JOB.pt [JOB.pt ...]
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from eagle3.config import build_recipe
from eagle3.models.target import load_target
from eagle3.train.trainer import train


def main(job_paths: list[str]) -> None:
    # One process group for all jobs: re-initialising after a destroy can read the previous
    # group's stale addresses from torchrun's store (intermittent "connection refused").
    dist.init_process_group("gloo")
    target = None
    try:
        for path in job_paths:
            job = torch.load(path, weights_only=False)
            recipe = build_recipe(job["tree"])
            target = target or load_target(recipe.target, recipe.cache_path)
            train(recipe, job["train"], job["val"], job["vocab"], target=target, data_digest="d1")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
