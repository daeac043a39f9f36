"""Regeneration through vLLM (`data.backend: openai`) vs our continuous batching, same prompts.

    .venv/bin/python benchmarks/regen_vllm.py --prompts 16 --max-new-tokens 128 --batch-size 8
    .venv/bin/python benchmarks/regen_vllm.py --draft runs/smollm2-135m/draft   # server with the head

ShareGPT conversations (the data the pipeline regenerates, every user turn), greedy. Our side is
what `eagle3 data` runs with data.backend: hf (`regenerate_hf`: `--batch-size` answers in flight);
vLLM's side is `regenerate_openai` against a vLLM server started here (eagle3/ops/vllm_server.py)
with `--batch-size` conversations in flight. Prints tokens/s of each (generated tokens, as each
backend counts them: our token ids up to EOS, vLLM's usage.completion_tokens) and how many
regenerated conversations are identical; where they differ it prints the first difference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/smollm2-135m.yaml")
    ap.add_argument("--prompts", type=int, default=16, help="ShareGPT conversations")
    ap.add_argument("--batch-size", type=int, default=8, help="answers / requests in flight")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--draft", default=None, help="serve with this head (default: target alone)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch

    from eagle3.config import load_recipe
    from eagle3.data.regenerate import regenerate_hf, regenerate_openai
    from eagle3.data.sources import Conversation, iter_conversations, resolve_source
    from eagle3.models.target import load_target
    from eagle3.ops.vllm_server import spec_from_recipe, start_vllm

    recipe = load_recipe(args.config, args.overrides)
    cfg = recipe.data.model_copy(
        update={
            "max_new_tokens": args.max_new_tokens,
            "max_len": args.max_len,
            "batch_size": args.batch_size,
            "concurrency": args.batch_size,
            "temperature": 0.0,
        }
    )
    convs = []
    for item in iter_conversations(resolve_source("sharegpt", recipe=recipe)):
        if isinstance(item, Conversation):
            convs.append(item)
        if len(convs) == args.prompts:
            break
    target = load_target(recipe.target, recipe.cache_path)
    srv = start_vllm(spec_from_recipe(recipe, args.draft), "regen", echo=print)
    try:
        t = time.perf_counter()
        theirs = regenerate_openai(f"{srv.url}/v1", target.tokenizer, convs, cfg)
        t_vllm = time.perf_counter() - t
    finally:
        srv.stop()  # our side runs alone on the cores
    t = time.perf_counter()
    ours = regenerate_hf(target, convs, cfg)
    t_ours = time.perf_counter() - t

    same = 0
    first_diff = None
    for a, b in zip(ours.conversations, theirs.conversations, strict=False):
        if a.messages == b.messages:
            same += 1
        elif first_diff is None:
            for ma, mb in zip(a.messages, b.messages, strict=False):
                if ma != mb:
                    first_diff = (a.id, ma["content"][:200], mb["content"][:200])
                    break
    print(
        f"\n{target.name}, {len(convs)} conversations, {args.batch_size} in flight, "
        f"max_new_tokens {args.max_new_tokens}, torch threads {torch.get_num_threads()}, "
        f"vLLM {'with head ' + args.draft if args.draft else 'without head'} "
        f"(eager={recipe.vllm.enforce_eager}, started in {srv.started_s:.0f} s)"
    )
    for name, res, secs in (("ours (continuous)", ours, t_ours), ("vLLM (openai)", theirs, t_vllm)):
        s = res.stats
        print(
            f"  {name:<18} {s.turns:>4} answers {s.new_tokens:>6} tokens {secs:>7.1f} s "
            f"{s.new_tokens / secs:>7.1f} tok/s  errors {s.errors}"
        )
    print(f"  identical regenerated conversations: {same}/{len(ours.conversations)}")
    if first_diff:
        print(
            f"  first difference ({first_diff[0]}):\n    ours: {first_diff[1]!r}\n"
            f"    vLLM: {first_diff[2]!r}"
        )


if __name__ == "__main__":
    main()
