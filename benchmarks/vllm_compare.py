"""Our engine vs vLLM, with and without the head, on the same prompts in one run (issue #15).

    .venv/bin/python benchmarks/vllm_compare.py --draft runs/smollm2-135m/draft --prompts 80 \
        --out bench_vllm_compare.json
    .venv/bin/python benchmarks/vllm_compare.py --draft DIR --prompts 3 --max-new-tokens 64  # smoke

MT-bench (first N questions, both turns; turn 2 continues with HF generate's answer, as
`eagle3 bench` does), greedy, one prompt at a time, every decoder back to back on each prompt so
machine noise hits them alike:
- hf_generate: the target's HF `generate` (the reference output);
- eagle3: our engine with the recipe's settings (the `full` profile: every trick it has);
- eagle3_chain: our engine as a chain of K draft tokens (what vLLM drafts), for the tau cross-check;
- vllm: vLLM without a head (the baseline a CPU user would pick);
- vllm_eagle3: vLLM with the head, K speculative tokens.
Then every prompt again with `--concurrency` requests in flight, vLLM without vs with the head.
Reports tokens/s and ratios, our chain tau vs vLLM's mean acceptance length (1 + accepted /
drafts from /metrics), per-position acceptance, and whether every output equals hf_generate's.
vLLM runs from the vLLM venv (`make vllm`); on a GPU box the same script drives CUDA vLLM
(`target.device=cuda`, `target.dtype=bfloat16`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DECODERS = ("hf_generate", "eagle3", "eagle3_chain", "vllm", "vllm_eagle3")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--draft", required=True, help="the head: a portable dir or a shipped head's name"
    )
    ap.add_argument("--config", default="configs/smollm2-135m.yaml")
    ap.add_argument("--profile", default="full")
    ap.add_argument("--prompts", type=int, default=80, help="MT-bench questions (2 turns each)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: eval.max_new_tokens")
    ap.add_argument("--k", type=int, default=3, help="speculative tokens (vLLM and our chain)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--compiled", action="store_true", help="vLLM with torch.compile (not eager)")
    ap.add_argument("--out", default=None, help="JSON report")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch

    from eagle3.config import load_recipe
    from eagle3.data.sources import load_eval_prompts
    from eagle3.eval.bench import _hf_generate, rotated
    from eagle3.eval.provenance import provenance
    from eagle3.eval.vllm_bench import bench_servers
    from eagle3.heads import resolve_draft
    from eagle3.infer.engine import SpecEngine, encode_prompt, load_engine
    from eagle3.infer.vllm_client import VLLMClient, complete_many
    from eagle3.models.checkpoint import load_draft

    over = [
        f"vllm.speculative_tokens={args.k}",
        f"vllm.enforce_eager={not args.compiled}",
        "eval.temperature=0",
        "eval.vllm_ngram=false",  # this script compares the head only: no ngram server
        *args.overrides,
    ]
    recipe = load_recipe(args.config, over, args.profile)
    max_new = args.max_new_tokens or recipe.eval.max_new_tokens
    if recipe.eval.threads:
        torch.set_num_threads(recipe.eval.threads)
    say = lambda m: print(m, flush=True)  # noqa: E731
    prompts = load_eval_prompts("mt_bench", args.prompts, recipe)
    args.draft = str(resolve_draft(args.draft))  # a name: its SHA256SUMS are checked here

    t0 = time.perf_counter()
    engine = load_engine(recipe, args.draft)
    chain_cfg = engine.cfg.model_copy(
        update={"mode": "chain", "depth": args.k, "lookup_tokens": 0, "pad_verify": False}
    )
    # The chain runs the head in the target's dtype, as vLLM does (the recipe may run ours in bf16).
    chain_draft = load_draft(args.draft, device=engine.target.device, dtype=recipe.target.dtype)
    chain = SpecEngine(engine.target, chain_draft, chain_cfg)
    target, tok = engine.target, engine.target.tokenizer
    say(
        f"our engine loaded in {time.perf_counter() - t0:.0f} s ({engine.cfg.mode} "
        f"{engine.tree_shape()}, lookup {engine.cfg.lookup_tokens}, backend {engine.cfg.backend})"
    )

    tokens = dict.fromkeys(DECODERS, 0)
    seconds = dict.fromkeys(DECODERS, 0.0)
    same = {d: 0 for d in DECODERS[1:]}
    chain_cycles = chain_emitted = 0
    chain_acc = [0] * args.k
    all_ids: list[list[int]] = []
    turns = 0
    with bench_servers(recipe, args.draft, say) as started:
        plain, spec = VLLMClient(started.plain.url), VLLMClient(started.head.url)
        warm = encode_prompt(tok, [{"role": "user", "content": "Hello!"}])
        for c in (plain, spec):
            c.complete(warm, 16)
        engine.generate(warm, temperature=0.0, max_new_tokens=16)
        chain.generate(warm, temperature=0.0, max_new_tokens=16)
        before = spec.counters()
        for n, p in enumerate(prompts, 1):
            messages: list[dict] = []
            for text in p.turns:
                messages.append({"role": "user", "content": text})
                ids = encode_prompt(tok, messages)
                calls = {
                    "hf_generate": lambda ids=ids: _hf_generate(
                        target, ids, max_new, 0.0, engine.cfg, None
                    ),
                    "eagle3": lambda ids=ids: engine.generate(
                        ids, temperature=0.0, max_new_tokens=max_new
                    ),
                    "eagle3_chain": lambda ids=ids: chain.generate(
                        ids, temperature=0.0, max_new_tokens=max_new
                    ),
                    "vllm": lambda ids=ids: plain.complete(ids, max_new),
                    "vllm_eagle3": lambda ids=ids: spec.complete(ids, max_new),
                }
                # Back to back, in an order rotated by one per turn: none always runs first.
                raw = {name: calls[name]() for name in rotated(list(calls), turns)}
                outs = {"hf_generate": raw["hf_generate"]}
                for name in ("eagle3", "eagle3_chain"):
                    outs[name] = (raw[name].tokens, raw[name].timings["total"])
                for name in ("vllm", "vllm_eagle3"):
                    outs[name] = (raw[name].tokens, raw[name].seconds)
                ref = outs["hf_generate"][0]
                r = raw["eagle3_chain"]
                chain_cycles += r.cycles
                chain_emitted += sum(r.accept_lengths)
                chain_acc = [a + b for a, b in zip(chain_acc, r.depth_accepts, strict=True)]
                for name, (toks, s) in outs.items():
                    tokens[name] += len(toks)
                    seconds[name] += s
                    if name != "hf_generate":
                        same[name] += toks == ref
                turns += 1
                all_ids.append(ids)
                messages.append(
                    {"role": "assistant", "content": tok.decode(ref, skip_special_tokens=True)}
                )
            tps = {d: tokens[d] / seconds[d] for d in DECODERS if seconds[d]}
            say(f"[{n}/{len(prompts)}] " + ", ".join(f"{d} {v:.1f}" for d, v in tps.items()))
        d = spec.counters() - before
        conc = {}
        for name, client in (("vllm", plain), ("vllm_eagle3", spec)):
            outs, secs = complete_many(client, all_ids, max_new, args.concurrency)
            conc[name] = sum(len(o.tokens) for o in outs) / secs
        starts = {"vllm": started.plain.started_s, "vllm_eagle3": started.head.started_s}

    tps = {k: round(tokens[k] / seconds[k], 3) for k in DECODERS}
    tau = chain_emitted / chain_cycles if chain_cycles else 0.0
    report = {
        "target": target.name,
        "draft": args.draft,
        "prompts": len(prompts),
        "turns": turns,
        "max_new_tokens": max_new,
        "threads": torch.get_num_threads(),
        "speculative_tokens": args.k,
        "vllm_enforce_eager": not args.compiled,
        "vllm_start_seconds": {k: round(v, 1) for k, v in starts.items()},
        "our_settings": {
            "mode": engine.cfg.mode,
            "depth_topk_total": list(engine.tree_shape()),
            "lookup_tokens": engine.cfg.lookup_tokens,
            "backend": engine.cfg.backend,
            "pad_verify": engine.cfg.pad_verify,
        },
        "tokens": tokens,
        "tokens_per_s": tps,
        "same_as_hf_generate": {k: f"{v}/{turns}" for k, v in same.items()},
        "ratios": {
            "vllm_eagle3_vs_vllm_bs1": round(tps["vllm_eagle3"] / tps["vllm"], 3),
            f"vllm_eagle3_vs_vllm_c{args.concurrency}": round(
                conc["vllm_eagle3"] / conc["vllm"], 3
            ),
            "eagle3_vs_hf_generate": round(tps["eagle3"] / tps["hf_generate"], 3),
            "eagle3_vs_vllm": round(tps["eagle3"] / tps["vllm"], 3),
            "eagle3_vs_vllm_eagle3": round(tps["eagle3"] / tps["vllm_eagle3"], 3),
        },
        f"tokens_per_s_c{args.concurrency}": {k: round(v, 3) for k, v in conc.items()},
        "acceptance": {
            "our_chain_tau": round(tau, 4),
            "vllm_acceptance_length": round(d.acceptance_length, 4),
            "relative_difference": round(abs(d.acceptance_length - tau) / tau, 4) if tau else None,
            "our_chain_accepted_per_position": chain_acc,
            "vllm_accepted_per_position": [int(x) for x in d.per_pos],
            "our_chain_cycles": chain_cycles,
            "vllm_drafts": int(d.drafts),
        },
        "provenance": provenance(
            recipe,
            {"recipe": args.config, "overrides": over},
            args.prompts,
            ["mt_bench"],
            list(DECODERS),
        ),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        from eagle3.io import write_json_atomic

        write_json_atomic(args.out, report)
        print(f"report: {args.out}")


if __name__ == "__main__":
    main()
