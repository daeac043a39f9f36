"""`eagle3 bench --engine vllm`: the head measured in the engine people deploy.

Two vLLM servers run side by side (their idle cost is ~1% of a core): the target alone and the
target with the head (`vllm.speculative_tokens` drafted per step, a chain). The prompts are the
own-engine bench's (same data sets, limit, chat template, as token ids). At batch 1 every prompt
goes to both servers back to back, so machine noise hits them alike; mt_bench's second turn
continues with the plain server's greedy answer. Then every prompt again at each
`vllm.concurrency` (requests in flight), plain and with the head.

The report is a BenchReport (docs/CONTRACTS.md §4.2, eagle3/eval/report.py; decoders `eagle3` = vLLM with the head and
`vllm` = vLLM without it, so speedup.vs_vllm is the batch-1 speedup and the gate can use it), tau
and alpha from vLLM's /metrics counters, plus a `vllm` block: acceptance length, per-position
acceptance, tokens/s and speedup at each concurrency, start-up seconds, and whether greedy outputs
with the head equal those without it (`lossless`; `lossless_batched` at each concurrency).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from eagle3.eval.bench import _printer, _Tally
from eagle3.eval.report import BenchReport, Decoding, VllmBlock, VllmLevel, as_report
from eagle3.infer.vllm_client import SpecCounters, VLLMClient, complete_many


@contextlib.contextmanager
def bench_servers(recipe, draft_dir, say) -> Iterator[tuple]:
    """(plain, with the head): started together, both stopped on the way out."""
    from eagle3.ops.vllm_server import VLLMError, spec_from_recipe, start_vllm

    specs = {"plain": spec_from_recipe(recipe, None), "eagle3": spec_from_recipe(recipe, draft_dir)}
    timeout = recipe.vllm.start_timeout
    with ThreadPoolExecutor(2) as pool:
        futs = {
            k: pool.submit(start_vllm, s, f"bench-{k}", None, timeout, say)
            for k, s in specs.items()
        }
        started, errors = {}, []
        for k, f in futs.items():
            try:
                started[k] = f.result()
            except VLLMError as e:
                errors.append(e)
    try:
        if errors:
            raise errors[0]
        yield started["plain"], started["eagle3"]
    finally:
        for s in started.values():
            s.stop()


def _tokenizer(recipe):
    from transformers import AutoTokenizer

    from eagle3.models.target import TargetSource

    return AutoTokenizer.from_pretrained(TargetSource.for_recipe(recipe).hf_dir())


def _tally_spec(tally: _Tally, d: SpecCounters) -> None:
    """Acceptance from the counters: a draft step is one verify forward; alpha is conditional."""
    tally.cycles += int(d.drafts)
    tally.emitted += int(d.drafts + d.accepted)
    tried = [d.drafts, *d.per_pos[:-1]]
    n = max(len(tally.attempts), len(d.per_pos))
    tally.attempts = [a + b for a, b in zip(_pad(tally.attempts, n), _pad(tried, n), strict=True)]
    tally.accepts = [a + b for a, b in zip(_pad(tally.accepts, n), _pad(d.per_pos, n), strict=True)]
    tally.attempts = [int(x) for x in tally.attempts]
    tally.accepts = [int(x) for x in tally.accepts]


def _pad(xs, n):
    return list(xs) + [0] * (n - len(xs))


def run_vllm_bench(
    recipe,
    draft_dir: str | Path,
    datasets: list[str] | None = None,
    limit: int | None = None,
    progress: bool = True,
    on_prompt: Callable[[dict], None] | None = None,
    servers: tuple | None = None,
) -> dict:
    """The §4 report measured through vLLM; `servers` = (plain, with head) already running
    (tests share one pair), else both are started here and stopped at the end."""
    from eagle3.data.sources import load_eval_prompts

    ev = recipe.eval
    datasets = list(datasets or ev.datasets)
    if not datasets:
        raise ValueError("eval.datasets: no data set to benchmark")
    limit = limit if limit is not None else ev.limit
    say = _printer(progress)
    sets = {name: load_eval_prompts(name, limit, recipe) for name in datasets}
    tok = _tokenizer(recipe)
    if servers is not None:
        return _measure(recipe, draft_dir, sets, tok, servers, say, on_prompt)
    with bench_servers(recipe, draft_dir, say) as pair:
        return _measure(recipe, draft_dir, sets, tok, pair, say, on_prompt)


def _measure(recipe, draft_dir, sets, tok, servers, say, on_prompt) -> dict:
    from eagle3.infer.engine import encode_prompt
    from eagle3.models.target import TargetSource
    from eagle3.ops.vllm_server import is_cpu_build, python_version_line

    ev = recipe.eval
    plain_srv, spec_srv = servers
    plain, spec = VLLMClient(plain_srv.url), VLLMClient(spec_srv.url)
    temperature, max_new, seed = ev.temperature, ev.max_new_tokens, recipe.seed

    def both(ids: list[int]):
        ref = plain.complete(ids, max_new, temperature, seed)
        got = spec.complete(ids, max_new, temperature, seed)
        return ref, got

    first = next(iter(sets.values()))
    for p in first[: ev.warmup]:  # untimed: first requests pay for allocations
        both(encode_prompt(tok, [{"role": "user", "content": p.turns[0]}]))

    report_sets, overall = {}, _Tally()
    all_prompts: list[list[int]] = []
    bs1_outputs: list[list[int]] = []
    for name, prompts in sets.items():
        tally = _Tally()
        before = spec.counters()
        for p in prompts:
            messages: list[dict] = []
            tally.prompts += 1
            for turn, text in enumerate(p.turns):
                messages.append({"role": "user", "content": text})
                ids = encode_prompt(tok, messages)
                ref, got = both(ids)
                tally.add_time("vllm", len(ref.tokens), ref.seconds)
                tally.add_time("eagle3", len(got.tokens), got.seconds)
                tally.new_tokens += len(got.tokens)
                label = f"{name}/{p.id}/turn{turn + 1}"
                if temperature > 0:
                    tally.lossless = None
                elif got.tokens != ref.tokens:
                    tally.lossless = False
                    tally.mismatches.append(label)
                all_prompts.append(ids)
                bs1_outputs.append(got.tokens)
                if on_prompt:
                    on_prompt({"id": label, "lossless": got.tokens == ref.tokens})
                messages.append(
                    {
                        "role": "assistant",
                        "content": tok.decode(ref.tokens, skip_special_tokens=True),
                    }
                )
            say(f"vllm {name} {p.id}: so far speedup {tally.speedup()}, lossless {tally.lossless}")
        _tally_spec(tally, spec.counters() - before)
        report_sets[name] = tally.dataset()
        overall.merge(tally)

    levels = _concurrency(recipe, all_prompts, bs1_outputs, plain, spec, say)
    bs1 = overall.tokens_per_s()
    levels = {
        "bs1": VllmLevel(
            in_flight=1,
            tokens_per_s={"eagle3": bs1.get("eagle3", 0.0), "vllm": bs1.get("vllm", 0.0)},
            speedup=round(bs1["eagle3"] / bs1["vllm"], 3) if bs1.get("vllm") else 0.0,
            acceptance_length=round(overall.emitted / overall.cycles, 3) if overall.cycles else 0.0,
        ),
        **levels,
    }
    alpha = [
        round(b / a, 4) if a else 0.0
        for a, b in zip(overall.attempts, overall.accepts, strict=True)
    ]
    k = recipe.vllm_speculative_tokens
    cpu = is_cpu_build()
    report = BenchReport(
        engine="vllm",
        target=TargetSource.of(recipe.target).name,
        draft=str(draft_dir),
        device=f"{'cpu' if cpu else 'cuda'} ({python_version_line()})",
        dtype=recipe.target.dtype,
        threads=spec_srv.spec.threads or _cores(),
        decoding=Decoding(
            mode="chain", total_tokens=k, depth=k, top_k=1, temperature=temperature, engine="vllm"
        ),
        datasets=report_sets,
        overall=overall.overall(),
        vllm=VllmBlock(
            version=python_version_line(),
            speculative_tokens=k,
            enforce_eager=spec_srv.spec.enforce_eager,
            acceptance_length=levels["bs1"].acceptance_length,
            alpha=alpha,
            # P(draft position i accepted) per verify step, as vLLM's log prints it.
            per_position_acceptance=[
                round(b / overall.cycles, 4) if overall.cycles else 0.0 for b in overall.accepts
            ],
            num_drafts=overall.cycles,
            num_accepted_tokens=overall.emitted - overall.cycles,
            num_draft_tokens=overall.cycles * k,
            lossless=overall.lossless,
            concurrency=levels,
            start_seconds={
                "vllm": round(plain_srv.started_s, 1),
                "eagle3": round(spec_srv.started_s, 1),
            },
        ),
    )
    return report.to_dict()


def _cores() -> int:
    from eagle3.ops.vllm_server import cpu_count

    return cpu_count()


def _concurrency(recipe, prompts, bs1_outputs, plain, spec, say) -> dict[str, VllmLevel]:
    """Every prompt again with c requests in flight, plain then with the head (c > 1)."""
    ev = recipe.eval
    out = {}
    for c in sorted(set(recipe.vllm.concurrency)):
        if c == 1 or not prompts:
            continue
        ref, t_ref = complete_many(
            plain, prompts, ev.max_new_tokens, c, ev.temperature, recipe.seed
        )
        before = spec.counters()
        got, t_got = complete_many(spec, prompts, ev.max_new_tokens, c, ev.temperature, recipe.seed)
        d = spec.counters() - before
        n_ref = sum(len(x.tokens) for x in ref)
        n_got = sum(len(x.tokens) for x in got)
        tps = {"eagle3": round(n_got / t_got, 3), "vllm": round(n_ref / t_ref, 3)}
        same = [a.tokens == b.tokens for a, b in zip(ref, got, strict=True)]
        out[f"c{c}"] = VllmLevel(
            in_flight=min(c, len(prompts)),
            tokens_per_s=tps,
            speedup=round(tps["eagle3"] / tps["vllm"], 3) if tps["vllm"] else 0.0,
            acceptance_length=round(d.acceptance_length, 3),
            # Batched greedy decoding need not be bit-identical to batch 1 (other kernels and
            # reduction orders); reported, not required.
            lossless_batched=all(same) if ev.temperature == 0 else None,
            same_as_bs1=sum(a.tokens == b for a, b in zip(got, bs1_outputs, strict=True)),
        )
        say(f"vllm concurrency {c}: {tps} speedup {out[f'c{c}'].speedup}")
    return out


def print_vllm(report: dict | BenchReport) -> None:
    from rich.console import Console
    from rich.table import Table

    r = as_report(report)
    v = r.vllm
    if not v:
        return
    t = Table(
        title=f"{v.version}: {r.target} + {Path(r.draft).name}, "
        f"{v.speculative_tokens} speculative tokens, eager={v.enforce_eager}"
    )
    for c in ("in flight", "with head tok/s", "without tok/s", "speedup", "accept len", "lossless"):
        t.add_column(c, justify="right")
    for key, lv in v.concurrency.items():
        tps = lv.tokens_per_s
        t.add_row(
            str(lv.in_flight),
            f"{tps['eagle3']:.1f}",
            f"{tps['vllm']:.1f}",
            f"{lv.speedup:.2f}x",
            f"{lv.acceptance_length:.2f}",
            str(v.lossless if key == "bs1" else lv.lossless_batched),
        )
    console = Console()
    console.print(t)
    console.print(
        "per-position acceptance: " + " ".join(f"{a:.2f}" for a in v.per_position_acceptance)
    )
