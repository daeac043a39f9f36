"""How much would prompt lookup alone accept on the target's own answers? (no model runs)

    .venv/bin/python benchmarks/lookup_ceiling.py runs/smollm2-135m/data --tokens 6 --ngram 3

Replays greedy decoding of each regenerated sample's first answer: at every cycle the lookup
(eagle3.infer.lookup.prompt_lookup over prompt + answer so far) proposes a chain, and the chain's
longest prefix that equals the answer is accepted, plus one bonus token, exactly what a
verification would keep at temperature 0. Prints tau and how often a chain was proposed at all
(each proposal widens the verify).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def replay(ids: list[int], start: int, end: int, tokens: int, ngram: int) -> tuple[int, int, list]:
    """(cycles, proposals, accepted per cycle) for the answer ids[start:end]."""
    from eagle3.infer.lookup import prompt_lookup

    t, cycles, proposals, accepted = start, 0, 0, []
    while t < end:
        chain = prompt_lookup(ids[:t], ngram, tokens)
        k = 0
        while k < len(chain) and t + k < end and chain[k] == ids[t + k]:
            k += 1
        cycles += 1
        proposals += bool(chain)
        accepted.append(k)
        t += k + 1
    return cycles, proposals, accepted


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir", help="a data stage with token shards (eagle3 data)")
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--samples", type=int, default=120)
    args = ap.parse_args()

    from eagle3.data.features import read_token_shard

    samples = []
    for shard in sorted((Path(args.data_dir) / "tokens").glob("*.safetensors")):
        samples += read_token_shard(shard)
        if len(samples) >= args.samples:
            break
    cycles = proposals = 0
    hist: Counter = Counter()
    for s in samples[: args.samples]:
        mask = s.loss_mask.tolist()
        if True not in mask:
            continue
        start = end = mask.index(True)
        while end < len(mask) and mask[end]:
            end += 1
        c, p, acc = replay(s.input_ids.tolist(), start, end, args.tokens, args.ngram)
        cycles, proposals = cycles + c, proposals + p
        hist.update(acc)
    emitted = sum((k + 1) * n for k, n in hist.items())
    print(
        f"{min(len(samples), args.samples)} answers, lookup {args.tokens} tokens, n-gram <= "
        f"{args.ngram}: tau {emitted / cycles:.2f}, a chain proposed in {proposals / cycles:.0%} "
        f"of {cycles} cycles"
    )
    print("accepted per cycle:", dict(sorted(hist.items())))


if __name__ == "__main__":
    main()
