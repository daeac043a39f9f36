"""Trained tokens/s of TTT training on this machine, online and offline, with time shares.

    .venv/bin/python benchmarks/train_throughput.py [--config configs/smollm2-135m.yaml]
        [--steps 3] [--batch-tokens 1024] [--max-len 512] [--threads N] [section.key=value ...]

Tokens are real (non-padding) positions of packed micro-batches; each optimizer step runs one
micro-batch. Shares: target (online: the target forward + lm_head/target distributions; offline:
lm_head/target distributions only, the features come precomputed as the data stage writes them),
draft forward+backward (the TTT unroll), optimizer (clip + AdamW). One warmup step is not timed.
The samples are random token ids: the cost does not depend on the text. Last, the rate of the
one-time feature extraction (the target forward alone) and the epochs after which offline pays back.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2-135m.yaml"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--modes", default="online,offline")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch

    from eagle3.config import load_recipe
    from eagle3.data.samples import TokenSample
    from eagle3.data.vocab import build_draft_vocab, count_tokens
    from eagle3.env import describe_device
    from eagle3.models.target import load_target
    from eagle3.train.batching import Loader
    from eagle3.train.dataset import SampleList
    from eagle3.train.inputs import FeatureSource, target_hidden
    from eagle3.train.optim import make_optimizer
    from eagle3.train.trainer import build_draft
    from eagle3.train.ttt import TTT

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.config, args.overrides)
    cfg = recipe.train
    t0 = time.perf_counter()
    target = load_target(recipe.target, recipe.cache_path)
    print(f"target {target.name}: loaded in {time.perf_counter() - t0:.1f} s on {describe_device(str(target.device))}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip

    # Random samples of mixed length; the loss mask covers the last 3/4 (an assistant answer).
    g = torch.Generator().manual_seed(0)
    n_batches = args.steps + 1
    samples, total = [], 0
    while total < n_batches * args.batch_tokens * 1.1:
        n = int(torch.randint(args.max_len // 4, args.max_len + 1, (1,), generator=g))
        ids = torch.randint(100, target.vocab_size, (n,), generator=g)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[n // 4 :] = True
        samples.append(TokenSample(f"r{len(samples)}", ids, mask))
        total += n
    counts = count_tokens(target.vocab_size, torch.cat([s.input_ids for s in samples]))
    vocab = build_draft_vocab(counts + 1, recipe.data.draft_vocab_size)
    loader = Loader(SampleList(samples), args.max_len, "truncate", args.batch_tokens, 0)
    device = target.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    rows, extraction = [], None  # extraction: (tokens, seconds) of the one-time feature pass
    for mode in args.modes.split(","):
        draft = build_draft(recipe, target, vocab).to(device)
        ttt = TTT(draft, cfg.ttt_steps, cfg.step_weight, cfg.grad_checkpointing)
        opt, _ = make_optimizer(draft.parameters(), cfg.lr, cfg.betas, cfg.weight_decay, 1000, 0.0)
        source = FeatureSource(target, draft, mode)
        batches = [loader.get(i) for i in range(min(n_batches, len(loader)))]
        if mode == "offline":  # what the shards hold: aux + last hidden, at the feature dtype
            dt = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
                recipe.data.feature_dtype, torch.float32
            )
            ext_tokens, ext_s = 0, 0.0
            for i, b in enumerate(batches):
                t0 = time.perf_counter()
                aux, last = target_hidden(target, b.to(device))
                b.aux, b.last_hidden = aux.to(dt).cpu(), last.to(dt).cpu()
                if i:  # the first is warmup, as below
                    ext_tokens, ext_s = ext_tokens + b.tokens, ext_s + time.perf_counter() - t0
            extraction = (ext_tokens, ext_s)
        times = {"target": 0.0, "draft": 0.0, "optimizer": 0.0}
        tokens = 0
        for i, batch in enumerate(batches):
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            t0 = time.perf_counter()
            inputs = source(batch, i, 0)
            sync()
            t1 = time.perf_counter()
            if autocast is not None:
                with autocast:
                    loss, _ = ttt(*inputs.args())
            else:
                loss, _ = ttt(*inputs.args())
            loss.backward()
            sync()
            t2 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            t3 = time.perf_counter()
            if i == 0:
                continue  # warmup
            times["target"] += t1 - t0
            times["draft"] += t2 - t1
            times["optimizer"] += t3 - t2
            tokens += batch.tokens
        busy = sum(times.values())
        rows.append((mode, tokens, busy, times))
        print(f"{mode}: {tokens} tokens in {busy:.2f} s", flush=True)

    c = draft.config
    print(f"\ndraft: hidden {c.hidden_size}, draft vocab {c.draft_vocab_size}, target vocab {c.vocab_size}; "
          f"ttt_steps {cfg.ttt_steps}, micro-batch {args.batch_tokens} tokens (rows of {args.max_len}), "
          f"grad_checkpointing {cfg.grad_checkpointing}")  # fmt: skip
    print(f"{'mode':8} {'tokens/s':>9} {'target':>7} {'draft f+b':>10} {'optim':>6}")
    for mode, tokens, busy, times in rows:
        share = {k: 100 * v / busy for k, v in times.items()}
        print(
            f"{mode:8} {tokens / busy:9.1f} {share['target']:6.1f}% {share['draft']:9.1f}% {share['optimizer']:5.1f}%"
        )
    per_token = {mode: busy / tokens for mode, tokens, busy, _ in rows}
    if extraction and extraction[0]:
        ext = extraction[1] / extraction[0]  # seconds a token, paid once by the data stage
        print(f"feature extraction (target forward to {recipe.data.feature_dtype}, no disk): "
              f"{1 / ext:.1f} tok/s")  # fmt: skip
        if {"online", "offline"} <= per_token.keys():
            saved = per_token["online"] - per_token["offline"]
            print(
                f"offline pays back after {ext / saved:.2f} epochs"
                if saved > 0
                else "offline saves nothing per epoch here"
            )


if __name__ == "__main__":
    main()
