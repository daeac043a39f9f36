"""Draft cycle cost in fp32 vs bf16 on this CPU: SmolLM2-shaped head (8k draft vocab, random
weights), one `grow` of the `full` profile's 4/2/2 tree plus an `extend` of 3 accepted rows over a
300-token prefix, interleaved dtype by dtype. Speed does not depend on the weights' values.

    .venv/bin/python benchmarks/draft_dtype.py --threads 1 --reps 30
"""

from __future__ import annotations

import argparse
import time

import torch

from eagle3.env import cpu_flags, cpu_has_bf16
from eagle3.infer.tree import Drafter
from eagle3.models.draft import DraftConfig, Eagle3Draft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--prefix", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab, vd, hidden = 49152, 8192, 576
    cfg = DraftConfig(hidden_size=hidden, intermediate_size=1536, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64, vocab_size=vocab, draft_vocab_size=vd,
                      target_hidden_size=hidden, rms_norm_eps=1e-5, rope_theta=100000.0,
                      rope_scaling=None, max_position_embeddings=8192, torch_dtype="float32",
                      aux_layer_ids=None, eagle3={})  # fmt: skip
    embed = torch.randn(vocab, hidden) * 0.02
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[:vd] = True
    drafters = {}
    for dt in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        d = Eagle3Draft(cfg)
        d.set_vocab(torch.zeros(vd, dtype=torch.long), t2d)
        d = d.to(dt).eval()
        d.inv_freq = d.inv_freq.float()
        e = embed.to(dt)
        drafters[dt] = Drafter(d, lambda ids, e=e: e[ids], 4096)
    aux = torch.randn(args.prefix, 3 * hidden)
    times = {dt: [] for dt in drafters}
    for _ in range(args.reps):
        for dt, dr in drafters.items():
            dr.reset()
            dr.extend(aux.to(dt), torch.randint(0, vocab, (args.prefix,)), 0)
            t0 = time.perf_counter()
            for _ in range(5):
                dr.grow(5, 2, 2, 4)
                dr.extend(aux[:3].to(dt), torch.randint(0, vocab, (3,)), dr.cache.length)
            times[dt].append((time.perf_counter() - t0) / 5)
    flags = cpu_flags()
    print(f"CPU bf16 hardware: {cpu_has_bf16(flags)} (avx512_bf16/amx_bf16 in /proc/cpuinfo flags)")
    for dt, ts in times.items():
        ts.sort()
        print(f"{str(dt):15s} median {1000 * ts[len(ts) // 2]:.2f} ms, min {1000 * ts[0]:.2f} ms "
              "per draft cycle")  # fmt: skip


if __name__ == "__main__":
    main()
