"""The speed and acceptance benchmark behind `eagle3 bench` (report: docs/CONTRACTS.md §4,
eagle3/eval/report.py).

Every prompt is decoded by all decoders back to back (eagle3, ar, HF generate, HF prompt lookup)
in one process, so machine noise hits them alike and the ratios hold. mt_bench is two-turn: the
second turn continues the conversation with the target's own greedy answer to the first (the HF
generate output, so every decoder sees the same second prompt). At temperature 0 every eagle3
output must equal HF generate's token for token (`lossless`).

One file over 400 lines because every decoder must run back to back on each prompt in one loop,
with its journal; the report type is report.py, its rendering render.py.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eagle3.eval.report import BenchReport, DatasetSummary, Decoding, Summary, as_report

DECODERS = ("eagle3", "ar", "hf_generate", "hf_prompt_lookup", "lookup")
# The decoders that run without a head: the gate credits the head only with what it adds over the
# fastest of them (`lookup`: our engine with its prompt-lookup branch and no head; `vllm` and
# `ngram`: vLLM without a head, plainly and with its model-free drafting).
HEADFREE = ("ar", "hf_generate", "hf_prompt_lookup", "lookup", "vllm", "ngram")


@dataclass
class _Tally:
    prompts: int = 0
    new_tokens: int = 0
    cycles: int = 0
    emitted: int = 0
    attempts: list[int] = field(default_factory=list)
    accepts: list[int] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    split: dict[str, float] = field(default_factory=dict)
    lossless: bool | None = True
    mismatches: list[str] = field(default_factory=list)

    def add_time(self, name: str, tokens: int, seconds: float) -> None:
        self.tokens[name] = self.tokens.get(name, 0) + tokens
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def add_spec(self, res) -> None:
        self.new_tokens += len(res.tokens)
        self.cycles += res.cycles
        self.emitted += sum(res.accept_lengths)
        n = max(len(self.attempts), len(res.depth_attempts))
        self.attempts += [0] * (n - len(self.attempts))
        self.accepts += [0] * (n - len(self.accepts))
        for i, (a, b) in enumerate(zip(res.depth_attempts, res.depth_accepts, strict=True)):
            self.attempts[i] += a
            self.accepts[i] += b
        for k in ("prefill", "draft", "verify", "accept"):
            self.split[k] = self.split.get(k, 0.0) + res.timings[k]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> _Tally:
        return cls(**d)

    def merge(self, other: _Tally) -> None:
        self.prompts += other.prompts
        self.mismatches += other.mismatches
        self.new_tokens += other.new_tokens
        self.cycles += other.cycles
        self.emitted += other.emitted
        n = max(len(self.attempts), len(other.attempts))
        self.attempts = [
            a + b for a, b in zip(_pad(self.attempts, n), _pad(other.attempts, n), strict=True)
        ]
        self.accepts = [
            a + b for a, b in zip(_pad(self.accepts, n), _pad(other.accepts, n), strict=True)
        ]
        for name in other.tokens:
            self.add_time(name, other.tokens[name], other.seconds[name])
        for k, v in other.split.items():
            self.split[k] = self.split.get(k, 0.0) + v
        self.lossless = (
            None
            if other.lossless is None or self.lossless is None
            else self.lossless and other.lossless
        )

    def tokens_per_s(self) -> dict[str, float]:
        return {
            n: round(self.tokens[n] / self.seconds[n], 3) if self.seconds[n] > 0 else 0.0
            for n in self.tokens
        }

    def tau(self) -> float:
        return round(self.emitted / self.cycles, 3) if self.cycles else 0.0

    def speedup(self) -> dict[str, float]:
        tps = self.tokens_per_s()
        return {
            f"vs_{n}": round(tps["eagle3"] / tps[n], 3) if tps.get(n) else 0.0
            for n in tps
            if n != "eagle3"
        }

    def best_headfree(self) -> tuple[str, float] | None:
        """(name, speedup) of the fastest head-free decoder measured; None when none was."""
        tps = self.tokens_per_s()
        measured = {n: tps[n] for n in HEADFREE if tps.get(n)}
        if not measured or not tps.get("eagle3"):
            return None
        best = max(measured, key=measured.get)
        return best, round(tps["eagle3"] / measured[best], 3)

    def overall(self) -> Summary:
        speedup, extra = self.speedup(), {}
        best = self.best_headfree()
        if best is not None:
            speedup["vs_best_headfree"] = best[1]
            extra["best_headfree"] = best[0]
        return Summary(tau=self.tau(), speedup=speedup, lossless=self.lossless, **extra)

    def dataset(self) -> DatasetSummary:
        """The per-data-set entry; `mismatches` only when there are any."""
        alpha = [
            round(b / a, 3) if a else 0.0 for a, b in zip(self.attempts, self.accepts, strict=True)
        ]
        return DatasetSummary(
            prompts=self.prompts,
            new_tokens=self.new_tokens,
            tau=self.tau(),
            alpha=alpha,
            tokens_per_s=self.tokens_per_s(),
            speedup=self.speedup(),
            lossless=self.lossless,
            **({"mismatches": list(self.mismatches)} if self.mismatches else {}),
        )


def rotated(names: list[str], i: int) -> list[str]:
    """`names` rotated by i: decoders alternate order from prompt to prompt, so that none always
    runs first (cold caches) or last (a warmed, possibly throttled machine)."""
    if not names:
        return names
    k = i % len(names)
    return names[k:] + names[:k]


def _pad(xs: list[int], n: int) -> list[int]:
    return xs + [0] * (n - len(xs))


def _hf_generate(
    target, ids: list[int], max_new: int, temperature: float, infer, lookup: int | None
):
    inp = torch.tensor([ids], device=target.device)
    kw = dict(
        max_new_tokens=max_new,
        eos_token_id=target.eos_token_ids,
        pad_token_id=target.eos_token_ids[0] if target.eos_token_ids else 0,
        attention_mask=torch.ones_like(inp),
    )
    if temperature > 0:
        kw |= dict(
            do_sample=True,
            temperature=temperature,
            top_p=infer.top_p,
            top_k=infer.top_k_sampling,  # 0 disables it (None would mean HF's default of 50)
        )
    else:
        kw |= dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if lookup:
        kw["prompt_lookup_num_tokens"] = lookup
    t0 = time.perf_counter()
    with torch.no_grad():
        out = target.model.generate(inp, **kw)
    if target.device.type == "cuda":
        torch.cuda.synchronize()
    return out[0, len(ids) :].tolist(), time.perf_counter() - t0


def run_bench(
    recipe,
    draft_dir: str | Path,
    datasets: list[str] | None = None,
    limit: int | None = None,
    progress: bool = True,
    on_prompt: Callable[[dict], None] | None = None,
    journal: str | Path | None = None,
    origin: dict | None = None,
    resume_across_commits: bool = False,
) -> dict:
    """Benchmark a draft head on the recipe's eval sets; returns the §4 report (plus `autotune`,
    and `tree_only` with eval.tree_only). `journal`: a file where every finished prompt is kept,
    so that a rerun resumes (eagle3/eval/journal.py); None measures everything afresh. A journal
    from another commit of the code is set aside unless `resume_across_commits`. `origin`:
    {"recipe": path, "overrides": [...]} of the command line, for the report's provenance.

    With eval.engine: vllm the head is measured through vLLM instead (eagle3/eval/vllm_bench.py).
    """
    if recipe.eval.engine == "vllm":
        from eagle3.eval.vllm_bench import run_vllm_bench

        return run_vllm_bench(
            recipe, draft_dir, datasets, limit, progress, on_prompt, origin=origin
        )
    threads = torch.get_num_threads()
    if recipe.eval.threads:
        torch.set_num_threads(recipe.eval.threads)
    try:
        return _run_bench(
            recipe,
            draft_dir,
            datasets,
            limit,
            progress,
            on_prompt,
            journal,
            origin,
            resume_across_commits,
        )
    finally:
        torch.set_num_threads(threads)  # the caller's process keeps its own setting


def _run_bench(
    recipe, draft_dir, datasets, limit, progress, on_prompt, journal_path, origin, across
) -> dict:
    from eagle3.data.sources import load_eval_prompts
    from eagle3.env import describe_device
    from eagle3.eval.journal import (
        BenchProgress,
        Journal,
        bench_key,
        prompt_key,
        weights_sha256,
    )
    from eagle3.eval.provenance import code_id, provenance
    from eagle3.infer.engine import draft_dtype, encode_prompt, load_engine
    from eagle3.infer.lookup_decode import generate_lookup

    ev = recipe.eval
    datasets = list(datasets or ev.datasets)
    if not datasets:
        raise ValueError("eval.datasets: no data set to benchmark")
    limit = limit if limit is not None else ev.limit
    bad = [b for b in ev.baselines if b not in DECODERS[1:]]
    if bad:
        raise ValueError(f"eval.baselines: unknown decoder(s) {bad} (have {list(DECODERS[1:])})")
    temperature = ev.temperature
    engine = load_engine(recipe, draft_dir)
    target, tok = engine.target, engine.target.tokenizer
    say = _printer(progress)

    # Every data set's prompts first: a bad name fails before any timing starts.
    sets = {name: load_eval_prompts(name, limit, recipe) for name in datasets}
    autotuned = None
    # Sweep once per checkpoint: a tuned tree already in it is used as is (see tuned_infer).
    if recipe.infer.autotune and "tree" not in (engine.draft.config.eagle3 or {}):
        from eagle3.infer.autotune import autotune, save_tuned

        # Calibrate on the two prompts after the benchmarked ones, so tuning never sees them.
        n = len(sets[datasets[0]])
        pool = load_eval_prompts(datasets[0], n + 2, recipe)
        pool = pool[n:] if len(pool) > n else pool[:2]
        calib = [encode_prompt(tok, [{"role": "user", "content": p.turns[0]}]) for p in pool]
        autotuned = autotune(engine, calib, max_new_tokens=min(64, ev.max_new_tokens), progress=say)
        engine.cfg = engine.cfg.model_copy(update=autotuned["best"])
        save_tuned(
            engine.draft,
            draft_dir,
            autotuned,
            describe_device(str(target.device)),
            torch.get_num_threads(),
        )
        say(f"autotune: best {autotuned['best']}")

    # The same head without the prompt-lookup branch, on the same prompts (eval.tree_only).
    tree_only = ev.tree_only and engine.cfg.lookup_tokens > 0
    device = describe_device(str(target.device))
    weights = weights_sha256(draft_dir)
    key = bench_key(weights, recipe, engine.cfg, device, torch.get_num_threads())
    journal = Journal(journal_path, key, code_id(), across)
    if journal.set_aside:
        say(f"{journal_path}: {journal.why}: set aside as {journal.set_aside}")

    def spec(ids: list[int], lookup: bool):
        cfg = engine.cfg
        if not lookup:
            engine.cfg = cfg.model_copy(update={"lookup_tokens": 0})
        try:
            return engine.generate(
                ids, temperature=temperature, max_new_tokens=ev.max_new_tokens, seed=recipe.seed
            )
        finally:
            engine.cfg = cfg

    lookup_n = engine.cfg.lookup_tokens or ev.prompt_lookup_num_tokens

    def runs(ids: list[int]) -> dict[str, Callable[[], object]]:
        """Each decoder of one prompt, by name, as a call (run back to back, rotated)."""
        max_new = ev.max_new_tokens
        out: dict[str, Callable[[], object]] = {"eagle3": lambda: spec(ids, True)}
        if tree_only:
            out["tree_only"] = lambda: spec(ids, False)
        if "ar" in ev.baselines:
            out["ar"] = lambda: engine.generate_ar(
                ids, temperature=temperature, max_new_tokens=max_new, seed=recipe.seed
            )
        out["hf_generate"] = lambda: _hf_generate(
            target, ids, max_new, temperature, engine.cfg, None
        )
        if "hf_prompt_lookup" in ev.baselines:
            n = ev.prompt_lookup_num_tokens
            out["hf_prompt_lookup"] = lambda: _hf_generate(
                target, ids, max_new, temperature, engine.cfg, n
            )
        if "lookup" in ev.baselines:
            out["lookup"] = lambda: generate_lookup(
                engine, ids, lookup_n, temperature, max_new, recipe.seed
            )
        return out

    order_log: list[list[str]] = []

    def decode_all(ids: list[int], tallies: list[_Tally] | None, label: str) -> list[int]:
        calls = runs(ids)
        names = rotated(list(calls), len(order_log))
        if tallies is not None:
            order_log.append(names)
        done = {name: calls[name]() for name in names}
        results = [done["eagle3"]] + ([done["tree_only"]] if tree_only else [])
        ref = done["hf_generate"][0]
        timings = {}
        for name, res in done.items():
            if name in ("eagle3", "tree_only"):
                continue
            if isinstance(res, tuple):  # HF generate: (tokens, seconds)
                timings[name] = (len(res[0]), res[1])
            else:
                timings[name] = (len(res.tokens), res.timings["total"])
        for tally, res in zip(tallies or [], results, strict=False):
            tally.add_spec(res)
            tally.add_time("eagle3", len(res.tokens), res.timings["total"])
            for name, (n_tok, s) in timings.items():
                if name in ev.baselines:
                    tally.add_time(name, n_tok, s)
            if temperature > 0:
                tally.lossless = None
            elif res.tokens != ref:
                tally.lossless = False
                tally.mismatches.append(label)
        if tallies is not None and on_prompt:
            res = results[0]
            on_prompt(
                {
                    "id": label,
                    "tau": res.tau,
                    "lossless": res.tokens == ref,
                    "tokens": len(res.tokens),
                }
            )
        return ref

    def measure(name: str, p) -> dict:
        tallies = [_Tally() for _ in range(2 if tree_only else 1)]
        t0 = time.perf_counter()
        messages: list[dict] = []
        for t in tallies:
            t.prompts = 1
        for turn, text in enumerate(p.turns):
            messages.append({"role": "user", "content": text})
            ids = encode_prompt(tok, messages)
            ref = decode_all(ids, tallies, f"{name}/{p.id}/turn{turn + 1}")
            messages.append(
                {"role": "assistant", "content": tok.decode(ref, skip_special_tokens=True)}
            )
        return {
            "dataset": name,
            "id": str(p.id),
            "seconds": round(time.perf_counter() - t0, 3),
            "tally": tallies[0].to_dict(),
            "tree_only": tallies[1].to_dict() if tree_only else None,
        }

    report_sets, overall, overall_tree = {}, _Tally(), _Tally()
    eta = BenchProgress(sum(len(v) for v in sets.values()))
    warmed = False
    for name in datasets:
        tally, tally_tree = _Tally(), _Tally()
        for p in sets[name]:
            pkey = prompt_key(name, str(p.id), list(p.turns))
            rec = journal.get(pkey)
            if rec is None:
                if not warmed:  # allocations, kernels and caches, untimed
                    first = sets[datasets[0]]
                    for w in first[: ev.warmup]:
                        msg = [{"role": "user", "content": w.turns[0]}]
                        decode_all(encode_prompt(tok, msg), None, "warmup")
                    warmed = True
                rec = measure(name, p)
                journal.put(pkey, rec)
                eta.measured(rec["seconds"])
            else:
                eta.resumed()
            tally.merge(_Tally.from_dict(rec["tally"]))
            if tree_only:
                tally_tree.merge(_Tally.from_dict(rec["tree_only"]))
            alone = f", tree only tau {tally_tree.tau()}" if tree_only else ""
            say(
                f"{name} {p.id} {eta.line()}: so far tau {tally.tau()}{alone}, speedup "
                f"{tally.speedup()}, lossless {tally.lossless}"
            )
        report_sets[name] = tally.dataset()
        if tree_only:
            report_sets[name].tree_only = tally_tree.dataset()
        overall.merge(tally)
        overall_tree.merge(tally_tree)

    depth, top_k, total = engine.tree_shape()
    report = BenchReport(
        target=target.name,
        draft=str(draft_dir),
        draft_sha256=weights,  # of model.safetensors: which weights these numbers are of
        device=device,
        dtype=recipe.target.dtype,
        threads=torch.get_num_threads(),
        decoding=Decoding(
            mode=engine.cfg.mode,
            total_tokens=total,
            depth=depth,
            top_k=top_k,
            temperature=temperature,
            # Beyond the contract's keys: the draft may run in another dtype than the target.
            draft_dtype=draft_dtype(recipe),
            lookup_tokens=engine.cfg.lookup_tokens,  # prompt-lookup branch per tree; 0: off
        ),
        datasets=report_sets,
        overall=overall.overall(),
        # Beyond the contract: the head alone, same prompts and settings, lookup branch off.
        **({"tree_only": overall_tree.overall()} if tree_only else {}),
        # Engine time split (seconds over all eagle3 generations): where a cycle's time goes.
        engine_time={k: round(v, 4) for k, v in overall.split.items()},
        **({"autotune": autotuned} if autotuned else {}),
        resumed_prompts=eta.skipped,
        provenance=provenance(recipe, origin, limit, datasets, list(runs([0]))),
    )
    return report.to_dict()


def headfree_lines(r: BenchReport) -> list[str]:
    """What the gate reads: the head over the fastest head-free decoder of the same run."""
    out = []
    for label, o in (("head + lookup", r.overall), ("head alone (tree only)", r.tree_only)):
        if o is not None and o.best_headfree:
            out.append(
                f"{label} vs the best head-free decoder ({o.best_headfree}): "
                f"{o.speedup['vs_best_headfree']:.2f}x"
            )
    o = r.overall
    if o.best_headfree_concurrent:
        out.append(
            f"at concurrency, the lowest vs the best head-free ({o.best_headfree_concurrent}): "
            f"{o.speedup['vs_best_headfree_concurrent']:.2f}x"
        )
    return out


def _printer(progress: bool) -> Callable[[str], None]:
    if not progress:
        return lambda msg: None
    from rich.console import Console

    console = Console(stderr=True)
    return lambda msg: console.log(msg)


def print_report(report: dict | BenchReport) -> None:
    from rich.console import Console
    from rich.table import Table

    r = as_report(report)
    d = r.decoding
    title = (
        f"{r.target} + {Path(r.draft).name}\n{r.device}, {r.dtype}, "
        f"{r.threads} threads; {d.mode} total={d.total_tokens} depth={d.depth} "
        f"top_k={d.top_k} lookup={d.lookup_tokens or 0} T={d.temperature} "
        f"draft={d.draft_dtype or r.dtype}"
    )
    baselines = [
        n
        for n in (*DECODERS[1:], "vllm", "ngram")
        if any(n in s.tokens_per_s for s in r.datasets.values())
    ]
    table = Table(title=title)
    short = {
        "ar": "ar",
        "hf_generate": "hf gen",
        "hf_prompt_lookup": "hf pld",
        "lookup": "lookup",
        "vllm": "vllm",
        "ngram": "ngram",
    }
    table.add_column("dataset", overflow="fold")
    engine = "vllm+head" if r.engine == "vllm" else "eagle3"
    for c in (
        "n",
        "tokens",
        "tau",
        f"{engine}\ntok/s",
        *[f"{short[b]}\ntok/s (x)" for b in baselines],
        "lossless",
    ):
        table.add_column(c, justify="right")
    rows = list(r.datasets.items())
    rows += [(f"{name}\ntree only", s.tree_only) for name, s in rows if s.tree_only]
    for name, s in rows:
        tps = s.tokens_per_s
        cells = [f"{tps.get(b, 0):.1f}\n({s.speedup.get('vs_' + b, 0):.2f}x)" for b in baselines]
        table.add_row(
            name,
            str(s.prompts),
            str(s.new_tokens),
            f"{s.tau:.2f}",
            f"{tps.get('eagle3', 0):.1f}",
            *cells,
            str(s.lossless),
        )
    for name, o in (("overall", r.overall), ("overall\ntree only", r.tree_only)):
        if o:
            cells = [f"({o.speedup.get('vs_' + b, 0):.2f}x)" for b in baselines]
            table.add_row(name, "", "", f"{o.tau:.2f}", "", *cells, str(o.lossless))
    console = Console()
    console.print(table)
    for line in headfree_lines(r):
        console.print(line)
    for name, s in r.datasets.items():
        console.print(f"alpha per depth ({name}): " + " ".join(f"{a:.2f}" for a in s.alpha))
    if r.vllm:
        from eagle3.eval.vllm_bench import print_vllm

        print_vllm(r)
    split = r.engine_time
    if split:
        cyc = sum(v for k, v in split.items() if k != "prefill") or 1.0
        console.print(
            "eagle3 time after prefill: "
            + ", ".join(
                f"{k} {100 * split[k] / cyc:.0f}%"
                for k in ("draft", "verify", "accept")
                if k in split
            )
        )
