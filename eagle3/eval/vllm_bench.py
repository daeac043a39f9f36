"""`eagle3 bench --engine vllm`: the head measured in the engine people deploy.

Three vLLM servers run side by side (their idle cost is ~1% of a core each): the target alone,
the target with the head (`vllm.speculative_tokens` drafted per step, a chain), and the target with
vLLM's model-free `ngram` drafting (eval.vllm_ngram; a head-free decoder the head must beat; when
it cannot start, the report says why under `vllm.headfree_skipped`). The prompts are the
own-engine bench's (same data sets, limit, chat template, as token ids). At batch 1 every prompt
goes to every server back to back, in an order that rotates per prompt, so machine noise hits them
alike; mt_bench's second turn continues with the plain server's greedy answer. Then every prompt
again at each `vllm.concurrency` (requests in flight) on every server, the order rotated per
level. The head's acceptance counters are read around the head's own requests only (warm-up and
other traffic outside that window never count).

The report is a BenchReport (docs/CONTRACTS.md §4.2, eagle3/eval/report.py; decoders `eagle3` = vLLM with the head and
`vllm` = vLLM without it, so speedup.vs_vllm is the batch-1 speedup and the gate can use it), tau
and alpha from vLLM's /metrics counters, plus a `vllm` block: acceptance length, per-position
acceptance, tokens/s and speedup at each concurrency, start-up seconds, and whether greedy outputs
with the head equal those without it (`lossless`; `lossless_batched` at each concurrency).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eagle3.eval.bench import _printer, _Tally, rotated
from eagle3.eval.report import BenchReport, Decoding, VllmBlock, VllmLevel, as_report
from eagle3.infer.vllm_client import SpecCounters, VLLMClient, complete_many, same_output


@dataclass
class BenchServers:
    """The bench's vLLM servers: the target alone, with the head, and with vLLM's model-free
    `ngram` drafting (None when off or when it could not start: `ngram_skipped` says why)."""

    plain: Any
    head: Any
    ngram: Any = None
    ngram_skipped: str | None = None


def ngram_spec(plain_spec, recipe):
    """The plain server's spec with vLLM's prompt-lookup drafting (`method: ngram`)."""
    cfg = {
        "method": "ngram",
        "num_speculative_tokens": int(recipe.vllm_speculative_tokens),
        "prompt_lookup_max": int(recipe.infer.lookup_ngram),
        "prompt_lookup_min": 1,
    }
    return dataclasses.replace(plain_spec, speculative_config=cfg)


@contextlib.contextmanager
def bench_servers(recipe, draft_dir, say) -> Iterator[BenchServers]:
    """Plain, with the head and (eval.vllm_ngram) ngram: started together, all stopped on the way
    out. Plain or the head failing to start fails the bench; ngram failing is recorded."""
    from eagle3.ops.vllm_server import VLLMError, spec_from_recipe, start_vllm

    plain = spec_from_recipe(recipe, None)
    specs = {"plain": plain, "eagle3": spec_from_recipe(recipe, draft_dir)}
    if recipe.eval.vllm_ngram:
        specs["ngram"] = ngram_spec(plain, recipe)
    timeout = recipe.vllm.start_timeout
    with ThreadPoolExecutor(len(specs)) as pool:
        futs = {
            k: pool.submit(start_vllm, s, f"bench-{k}", None, timeout, say)
            for k, s in specs.items()
        }
        started, errors = {}, {}
        for k, f in futs.items():
            try:
                started[k] = f.result()
            except VLLMError as e:
                errors[k] = e
    try:
        fatal = [e for k, e in errors.items() if k != "ngram"]
        if fatal:
            raise fatal[0]
        skipped = None
        if not recipe.eval.vllm_ngram:
            skipped = "eval.vllm_ngram is off"
        elif "ngram" in errors:
            skipped = f"the ngram server did not start: {str(errors['ngram'])[:300]}"
            say(f"vllm ngram skipped: {skipped}")
        yield BenchServers(started["plain"], started["eagle3"], started.get("ngram"), skipped)
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
    servers: BenchServers | None = None,
    origin: dict | None = None,
) -> dict:
    """The §4 report measured through vLLM; `servers` already running (tests share them), else
    they are started here and stopped at the end."""
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
        report = _measure(recipe, draft_dir, sets, tok, servers, say, on_prompt)
    else:
        with bench_servers(recipe, draft_dir, say) as started:
            report = _measure(recipe, draft_dir, sets, tok, started, say, on_prompt)
    from eagle3.eval.provenance import provenance

    first = next(iter(report["datasets"].values()))
    decoders = [n for n in ("vllm", "eagle3", "ngram") if n in first["tokens_per_s"]]  # clients'
    return report | {"provenance": provenance(recipe, origin, limit, datasets, decoders)}


def _measure(recipe, draft_dir, sets, tok, servers, say, on_prompt) -> dict:
    from eagle3.infer.engine import encode_prompt
    from eagle3.models.target import TargetSource
    from eagle3.ops.vllm_server import is_cpu_build, python_version_line

    ev = recipe.eval
    plain_srv, spec_srv = servers.plain, servers.head
    plain, spec = VLLMClient(plain_srv.url), VLLMClient(spec_srv.url)
    # decoder name -> client: vllm (plain), eagle3 (with the head), ngram (model-free drafting)
    clients = {"vllm": plain, "eagle3": spec}
    if servers.ngram is not None:
        clients["ngram"] = VLLMClient(servers.ngram.url)
    temperature, max_new, seed = ev.temperature, ev.max_new_tokens, recipe.seed
    order_log: list[list[str]] = []

    def every(ids: list[int], timed: bool = True) -> dict:
        """Every server on one prompt, back to back, in an order that rotates per prompt."""
        names = rotated(list(clients), len(order_log))
        if timed:
            order_log.append(names)
        return {n: clients[n].complete(ids, max_new, temperature, seed) for n in names}

    first = next(iter(sets.values()))
    for p in first[: ev.warmup]:  # untimed: first requests pay for allocations
        every(encode_prompt(tok, [{"role": "user", "content": p.turns[0]}]), timed=False)

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
                out = every(ids)
                ref, got = out["vllm"], out["eagle3"]
                for n, res in out.items():
                    tally.add_time(n, len(res.tokens), res.seconds)
                tally.new_tokens += len(got.tokens)
                label = f"{name}/{p.id}/turn{turn + 1}"
                if temperature > 0:
                    tally.lossless = None
                elif not same_output(got, ref):
                    tally.lossless = False
                    tally.mismatches.append(label)
                all_prompts.append(ids)
                bs1_outputs.append(got.tokens)
                if on_prompt:
                    on_prompt({"id": label, "lossless": same_output(got, ref)})
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

    levels = _concurrency(recipe, all_prompts, bs1_outputs, clients, say)
    bs1 = overall.tokens_per_s()
    levels = {
        "bs1": _level(
            1,
            bs1,
            round(overall.emitted / overall.cycles, 3) if overall.cycles else 0.0,
        ),
        **levels,
    }
    summary = overall.overall()
    worst = _worst_concurrent(levels)
    if worst is not None:
        summary.speedup["vs_best_headfree_concurrent"] = worst[1]
        summary.best_headfree_concurrent = worst[0]
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
        overall=summary,
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
                **({"ngram": round(servers.ngram.started_s, 1)} if servers.ngram else {}),
            },
            **(
                {"headfree_skipped": {"ngram": servers.ngram_skipped}}
                if servers.ngram_skipped
                else {}
            ),
        ),
    )
    return report.to_dict()


def _cores() -> int:
    from eagle3.ops.vllm_server import cpu_count

    return cpu_count()


def _level(in_flight: int, tps: dict[str, float], acceptance: float, **extra) -> VllmLevel:
    """One concurrency level: tokens/s per server, the head's speedup over plain vLLM and over
    the fastest head-free server (plain or ngram)."""
    tps = {n: tps.get(n, 0.0) for n in ("eagle3", "vllm", "ngram") if n in tps}
    headfree = {n: tps[n] for n in ("vllm", "ngram") if tps.get(n)}
    best = max(headfree, key=headfree.get) if headfree else None
    return VllmLevel(
        in_flight=in_flight,
        tokens_per_s=tps,
        speedup=round(tps["eagle3"] / tps["vllm"], 3) if tps.get("vllm") else 0.0,
        acceptance_length=acceptance,
        **extra,
        best_headfree=best,
        speedup_vs_best_headfree=round(tps["eagle3"] / headfree[best], 3) if best else None,
    )


def _worst_concurrent(levels: dict[str, VllmLevel]) -> tuple[str, float] | None:
    """(<decoder>@<level>, ratio) of the lowest head-over-best-head-free ratio above batch 1."""
    above = [
        (k, lv)
        for k, lv in levels.items()
        if lv.in_flight > 1 and lv.speedup_vs_best_headfree is not None
    ]
    if not above:
        return None
    k, lv = min(above, key=lambda kv: kv[1].speedup_vs_best_headfree)
    return f"{lv.best_headfree}@{k}", lv.speedup_vs_best_headfree


def _concurrency(recipe, prompts, bs1_outputs, clients, say) -> dict[str, VllmLevel]:
    """Every prompt again with c requests in flight on every server (c > 1), in an order that
    rotates per level; the head's counters are read around its own run only."""
    ev = recipe.eval
    out = {}
    for i, c in enumerate(sorted(set(recipe.vllm.concurrency))):
        if c == 1 or not prompts:
            continue
        done, secs, accept = {}, {}, 0.0
        for name in rotated(list(clients), i):
            before = clients[name].counters() if name == "eagle3" else None
            done[name], secs[name] = complete_many(
                clients[name], prompts, ev.max_new_tokens, c, ev.temperature, recipe.seed
            )
            if before is not None:
                accept = (clients[name].counters() - before).acceptance_length
        tps = {n: round(sum(len(x.tokens) for x in r) / secs[n], 3) for n, r in done.items()}
        got, ref = done["eagle3"], done["vllm"]
        same = [same_output(a, b) for a, b in zip(ref, got, strict=True)]
        out[f"c{c}"] = _level(
            min(c, len(prompts)),
            tps,
            round(accept, 3),
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
    cols = ("in flight", "with head tok/s", "without tok/s", "ngram tok/s", "speedup")
    for c in (*cols, "vs best head-free", "accept len", "lossless"):
        t.add_column(c, justify="right")
    for key, lv in v.concurrency.items():
        tps = lv.tokens_per_s
        t.add_row(
            str(lv.in_flight),
            f"{tps['eagle3']:.1f}",
            f"{tps['vllm']:.1f}",
            f"{tps['ngram']:.1f}" if "ngram" in tps else "-",
            f"{lv.speedup:.2f}x",
            f"{lv.speedup_vs_best_headfree:.2f}x ({lv.best_headfree})"
            if lv.speedup_vs_best_headfree is not None
            else "-",
            f"{lv.acceptance_length:.2f}",
            str(v.lossless if key == "bs1" else lv.lossless_batched),
        )
    console = Console()
    console.print(t)
    for name, why in (v.headfree_skipped or {}).items():
        console.print(f"{name}: not measured: {why}")
    console.print(
        "per-position acceptance: " + " ".join(f"{a:.2f}" for a in v.per_position_acceptance)
    )
