"""Latency of ONE target forward over n new tokens on top of a cached prefix: HF vs the fast forward.

    .venv/bin/python benchmarks/target_forward.py [--prefix 256] [--reps 7] [--dtypes float32,bfloat16]

Decoders, measured interleaved (one rep of each in turn, per n) so that the ratios hold on a noisy,
shared machine; the table shows the minimum of `--reps` (interference on a shared machine only adds time):
- hf:        `model(ids, cache=DynamicCache)` with causal n rows, then `cache.crop(prefix)` (the
             plain HF decoding step, as `generate` runs it; crop time not counted).
- hf_runner: eagle3's HFRunner.verify (HF forward + preallocated cache + 4D tree mask).
- fast:      FastRunner.verify (eagle3/models/fast_llama.py), logits for all n rows.
- fast_nolm: the same forward without the lm_head (logits_rows=False): the lm_head's share.
Also: a prefill of `--prefix` tokens with logits for all rows vs the last row only.

On a shared 2-core box, 2-thread wall times are dominated by other jobs (each OpenMP region waits
for both threads to be scheduled: 5-10x inflation was seen at load 4-8). There,
`--threads 1 --clock cpu` (process CPU time of one thread) still measures what the code costs.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import time

import torch

from eagle3.infer.fast_runner import FastRunner
from eagle3.infer.runner import HFRunner

SMOLLM2_SHAPES = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


CLOCK = time.perf_counter


def _timed(fn) -> float:
    t0 = CLOCK()
    fn()
    return (CLOCK() - t0) * 1e3


def _embedded(dtype: str):
    from eagle3.config import TargetConfig
    from eagle3.models.target import load_target

    return load_target(TargetConfig(kind="embedded", dtype=dtype, device="cpu"))


def _random_smollm2(dtype: str):
    """SmolLM2-135M's exact shapes with random weights: same cost, no GGUF (e.g. on a bare box)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from eagle3.models.target import DTYPES, Target

    cfg = LlamaConfig(**SMOLLM2_SHAPES)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(DTYPES[dtype])
    return Target(model, None, None, "random SmolLM2-135M shapes", "random")


def bench_dtype(dtype, ns, prefix, reps, compile, random_weights) -> list[dict]:
    from transformers import DynamicCache

    target = _random_smollm2(dtype) if random_weights else _embedded(dtype)
    model, vocab = target.model, target.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (prefix,), generator=g)

    # transformers 5.24 renamed past_key_values= to cache= (older versions, e.g. on a GPU box, lack
    # it; HFRunner is written for the new name, so it is left out there).
    new_api = "cache" in inspect.signature(model.model.forward).parameters
    ckw = "cache" if new_api else "past_key_values"
    with torch.no_grad():
        hf_cache = DynamicCache(config=model.config)
        model(input_ids=prompt[None], use_cache=True, **{ckw: hf_cache})
    hf_runner = HFRunner(target, capacity=prefix + 64) if new_api else None
    if hf_runner:
        hf_runner.prefill(prompt, last_only=True)
    fast = FastRunner(target, capacity=prefix + 64)
    fast.prefill(prompt, last_only=True)
    runners = {"fast": fast}
    if compile:
        runners["fast_compiled"] = FastRunner(target, capacity=prefix + 64, compile=True)
        runners["fast_compiled"].prefill(prompt, last_only=True)

    rows = []
    for n in ns:
        toks = torch.randint(0, vocab, (n,), generator=g)
        depth = torch.arange(n)
        pos = prefix + depth
        chain = torch.ones(n, n, dtype=torch.bool).tril()  # a chain: same mask work as a tree

        def hf_step(toks=toks, pos=pos):
            with torch.no_grad():
                model(
                    input_ids=toks[None], position_ids=pos[None], use_cache=True, **{ckw: hf_cache}
                )

        def hf_crop():
            extra = hf_cache.get_seq_length() - prefix
            if extra:
                hf_cache.crop(-extra)  # transformers 5.24: crop takes a negative count

        args = (toks, pos, chain)
        cases = {
            "hf": hf_step,
            **({"hf_runner": lambda a=args: hf_runner.verify(*a)} if hf_runner else {}),
            **{k: (lambda r=r, a=args: r.verify(*a)) for k, r in runners.items()},
            "fast_nolm": lambda t=toks, p=pos: fast.model(t, p, fast.kv, prefix, None, False),
        }
        for fn in cases.values():  # warm-up (and compile) outside the timing
            fn()
            hf_crop()
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(reps):
            for k, fn in cases.items():
                times[k].append(_timed(fn))
                hf_crop()
        # The minimum: what the code costs; a shared machine only ever adds time (see --help).
        row = {"dtype": dtype, "n": n, **{k: min(v) for k, v in times.items()}}
        rows.append(row)
        print(_fmt_row(row, list(cases)), flush=True)

    # Prefill: logits for every row vs the last row only.
    pf = FastRunner(target, capacity=prefix + 8)

    def prefill(last_only):
        pf.reset()
        pf.prefill(prompt, last_only=last_only)

    prefill(True)
    t_all, t_last = [], []
    for _ in range(max(3, reps // 2)):
        t_all.append(_timed(lambda: prefill(False)))
        t_last.append(_timed(lambda: prefill(True)))
    print(
        f"  {dtype} fast prefill of {prefix} tokens: all-row logits "
        f"{min(t_all):.0f} ms, last-row logits {min(t_last):.0f} ms",
        flush=True,
    )
    return rows


def _fmt_row(row: dict, keys: list[str]) -> str:
    cells = " ".join(f"{k} {row[k]:7.1f}" for k in keys)
    return f"  {row['dtype']:9s} n={row['n']:3d}  {cells}  hf/fast {row['hf'] / row['fast']:.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefix", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--ns", default="1,2,4,8,16,32")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd fast forward")
    ap.add_argument(
        "--random-weights", action="store_true", help="SmolLM2 shapes, random weights (no GGUF)"
    )
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time; with --threads 1 it is robust to other jobs on a shared box",
    )
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    ns = [int(x) for x in args.ns.split(",")]
    print(
        f"target forward latency, ms of {args.clock} time (min of {args.reps}), SmolLM2-135M, "
        f"prefix {args.prefix}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    rows = []
    for dtype in args.dtypes.split(","):
        rows += bench_dtype(dtype, ns, args.prefix, args.reps, args.compile, args.random_weights)

    keys = [k for k in rows[0] if k not in ("dtype", "n")]
    print(f"\non {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible")
    print("\n| dtype | n | " + " | ".join(keys) + " | hf / fast | fast(n) / fast(1) |")
    print("|" + " --- |" * (len(keys) + 4))
    for r in rows:
        base = next(x["fast"] for x in rows if x["dtype"] == r["dtype"] and x["n"] == ns[0])
        cells = " | ".join(f"{r[k]:.1f}" for k in keys)
        print(
            f"| {r['dtype']} | {r['n']} | {cells} | {r['hf'] / r['fast']:.2f}x | "
            f"{r['fast'] / base:.2f} |"
        )


if __name__ == "__main__":
    main()
