"""`make demo` / `python -m flows.demo`: the whole system in one command.

stack up (reusing a running one) -> the pipeline on configs/smollm2-135m.yaml, profile demo
(data -> train -> evaluate -> gated promotion) -> the shipped head (heads/smollm2-135m-instruct,
trained by the `full` profile) benchmarked on the same prompts with the same settings -> one
on-demand inference run against the champion -> one summary table with both heads side by side
(tau and speed with and without the prompt-lookup branch, lossless, the gate's decision and
reasons) and the URLs of the Prefect UI, the MLflow UI and the S3 objects.

The gate's floor: the demo profile lowers promote.min_speedup and the head-free floors
(min_speedup_vs_headfree*) to 0 so that a head trained for a few minutes on 2 CPU cores still
shows promotion, S3 and serving end to end. The summary then
says so in plain words, with the verdict the recipe's own floor (no profile) gives.

Resumable: after Ctrl-C, run it again. The data task is cached on its settings (and the data stage
resumes its shards), training resumes from the checkpoint in the run dir, and both benches resume
from their per-prompt journals.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smollm2-135m.yaml")
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--state-dir", help="stack state (default .eagle3/stack)")
    ap.add_argument(
        "--shipped-head",
        default="smollm2-135m-instruct",
        help="the shipped head shown beside the demo head (heads/NAME); '' to leave it out",
    )
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    return ap


def run_demo(args) -> dict:
    from rich.console import Console

    from eagle3.config import load_recipe
    from eagle3.ops.stack import load_stack_env, stack_up

    console = Console()
    recipe = load_recipe(args.config, args.overrides, args.profile)  # bad input fails first
    own_floor = load_recipe(args.config, args.overrides).promote  # the recipe without the profile
    console.rule("[bold]1/4 local stack")
    st = stack_up(args.state_dir, echo=console.print)
    load_stack_env(args.state_dir)

    # Prefect and MLflow are imported only now, so that they connect to the stack.
    from flows.infer import infer_flow
    from flows.pipeline import pipeline_flow

    console.rule(f"[bold]2/4 pipeline: {recipe.name} (profile {args.profile})")
    out = pipeline_flow(recipe)
    console.rule(f"[bold]3/4 the shipped head {args.shipped_head or '(none asked)'}, same prompts")
    shipped = bench_shipped(recipe, args.shipped_head, console) if args.shipped_head else None
    console.rule("[bold]4/4 on-demand inference against the champion")
    inference = None
    try:
        inference = infer_flow([args.prompt], config=recipe, max_new_tokens=args.max_new_tokens)
    except LookupError as e:  # no champion yet: the gate rejected the first candidate
        console.print(f"[yellow]no inference: {e}")
    _summary(console, st, recipe, out, inference, shipped, own_floor)
    return {"pipeline": out, "inference": inference, "shipped": shipped}


def bench_shipped(recipe, name: str, console) -> dict | None:
    """The shipped head's numbers on the demo's eval set and settings, or None (said in one line)
    when the repository has no such head yet."""
    from eagle3.eval.bench import run_bench
    from eagle3.heads import heads_dir, resolve_draft
    from eagle3.ops.tracking import report_metrics

    if not (heads_dir() / name / "config.json").is_file():
        console.print(
            f"no shipped head {name} in {heads_dir()} yet: showing the demo head alone "
            "(`eagle3 release` puts one there)"
        )
        return None
    path = resolve_draft(name)  # verifies its SHA256SUMS
    journal = recipe.run_path / f"shipped-{name}.prompts.json"
    report = run_bench(recipe, path, progress=True, journal=journal)
    return {"name": name, "dir": str(path), "report": report, "metrics": report_metrics(report)}


def floor_note(metrics: dict, used, own) -> tuple[str, str] | None:
    """(style, text) when the profile's gate floor is below the recipe's own: what the own floor
    would have decided. None when the profile keeps the recipe's floor."""
    from eagle3.ops.gate import decide, gate_metrics

    keys = ("min_tau", "min_speedup", "min_speedup_vs_headfree")
    if all(getattr(used, k) >= getattr(own, k) for k in keys):
        return None
    b = used.speedup_baseline

    def floor(cfg) -> str:
        return (
            f"tau >= {cfg.min_tau:g}, >= {cfg.min_speedup:g}x {b.replace('_', ' ')} and >= "
            f"{cfg.min_speedup_vs_headfree:g}x the best head-free decoder"
        )

    verdict = decide(gate_metrics(metrics, b, None), None, own, [])
    if verdict.promote:
        return "green", f"clears the recipe's own floor too ({floor(own)})"
    why = "; ".join(
        r
        for r in verdict.reasons
        if "floor" in r or "lossless" in r or "head-free" in r or "not finite" in r
    )
    return (
        "yellow",
        f"promoted only because the demo profile lowers the floor ({floor(used)}); the "
        f"recipe's own floor ({floor(own)}) would REJECT it: {why}",
    )


def number_rows(metrics: dict) -> list[tuple[str, str]]:
    """(label, value) rows of one head's bench numbers, in the summary's order."""

    def x(key: str) -> str:
        return f"{metrics[key]:.2f}x" if key in metrics else "-"

    def tau(key: str) -> str:
        return f"{metrics[key]:.3f}" if key in metrics else "-"

    return [
        ("tau, head + prompt-lookup branch", tau("tau")),
        ("tau, head alone (tree only)", tau("tau_tree_only")),
        ("vs HF generate, head + lookup", x("speedup_vs_hf_generate")),
        ("vs HF generate, head alone", x("speedup_tree_only_vs_hf_generate")),
        ("vs HF prompt lookup, head + lookup", x("speedup_vs_hf_prompt_lookup")),
        ("vs our lookup branch alone (no head)", x("speedup_vs_lookup")),
        # What the gate reads: the head over the fastest head-free decoder of the same run.
        ("vs the best head-free decoder, head + lookup", x("speedup_vs_best_headfree")),
        ("vs the best head-free decoder, head alone", x("speedup_tree_only_vs_best_headfree")),
        ("vs the best head-free, at concurrency", x("speedup_vs_best_headfree_concurrent")),
        ("lossless (greedy == target)", str(bool(metrics.get("lossless")))),
    ]


def _summary(console, st, recipe, out: dict, inference, shipped, own_floor) -> None:
    import json

    from rich.table import Table

    from eagle3.ops.gate import as_decision

    m = out["metrics"]
    d = as_decision(out["decision"])
    t = Table(title=f"eagle3 demo: {out['model']} v{out['version']}", show_lines=False)
    t.add_column("what", style="bold")
    t.add_column("demo head: trained just now", overflow="fold")
    if shipped:
        t.add_column(f"shipped head: {shipped['name']}", overflow="fold")
    pad = [""] if shipped else []
    metrics_file = recipe.run_path / "train_metrics.json"
    trained = "-"
    if metrics_file.is_file():
        doc = json.loads(metrics_file.read_text())
        trained = (
            f"{doc['total_steps']} steps, {doc['data']['train']['samples']} samples "
            f"(profile {recipe.profile})"
        )
    row = [trained]
    if shipped:
        e = _eagle3_block(shipped["dir"])
        row.append(
            f"step {e.get('train', {}).get('step')}, profile {e.get('profile')} "
            f"({shipped['dir']}/CARD.md)"
        )
    t.add_row("training", *row)
    ours = number_rows(m)
    theirs = number_rows(shipped["metrics"]) if shipped else [("", "")] * len(ours)
    for (label, a), (_, b) in zip(ours, theirs, strict=True):
        t.add_row(label, a, *([b] if shipped else []))
    verdict = "[green]PROMOTE" if d.promote else "[red]REJECT"
    t.add_row("gate", verdict, *(["not gated: shipped with the repository"] if shipped else []))
    for r in d.reasons:
        t.add_row("", f"- {r}", *pad)
    note = floor_note(m, recipe.promote, own_floor)
    if note:
        t.add_row("gate floor", f"[{note[0]}]{note[1]}", *pad)
    shipped_to = out.get("s3_uri") or (
        f"no: {out['promotion_skipped']}" if out.get("promotion_skipped") else "no"
    )
    t.add_row("promoted to S3", shipped_to, *pad)
    if inference:
        t.add_row(
            "inference",
            f"{inference['count']} prompt(s), tau {inference['tau']:.2f}, "
            f"{inference['tokens_per_s']:.1f} tok/s, champion v{inference['champion']['version']}",
            *pad,
        )
        t.add_row("answer", inference["outputs"][0]["text"][:300], *pad)
        t.add_row("outputs", inference.get("output_uri") or "-", *pad)
    if shipped is None:
        t.caption = "no shipped head in this checkout yet: the demo head alone"
    console.print(t)
    urls = Table(title="where to look", show_header=False)
    urls.add_column("", no_wrap=True)
    urls.add_column("", overflow="fold")
    urls.add_row("Prefect UI", st.prefect_url + "/runs")
    if out.get("prefect_flow_run_url"):
        urls.add_row("  this pipeline run", out["prefect_flow_run_url"])
    urls.add_row("MLflow UI", st.mlflow_url)
    if out.get("mlflow_run_url"):
        urls.add_row("  this run", out["mlflow_run_url"])
    if out.get("mlflow_model_url"):
        urls.add_row("  registered model", out["mlflow_model_url"])
    from eagle3.settings import settings

    bucket = settings().s3_bucket or st.bucket
    urls.add_row("S3 endpoint", f"{st.s3_url} (bucket {bucket}; keys in {st.env_path})")
    if out.get("s3_uri"):
        urls.add_row("  champion checkpoint", out["s3_uri"])
    from eagle3.ops.storage import StorageError, settings_from_recipe

    try:
        s = settings_from_recipe(recipe.storage)
        urls.add_row("  champion pointer", s.uri(out["model"], "champion.json"))
    except StorageError:
        pass
    console.print(urls)


def _eagle3_block(draft_dir: str) -> dict:
    from eagle3.models.checkpoint import read_config

    return read_config(draft_dir).get("eagle3") or {}


def main(argv: list[str] | None = None) -> int:
    from eagle3.env import disable_telemetry

    disable_telemetry()
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    args = _parser().parse_args(argv)
    try:
        run_demo(args)
    except KeyboardInterrupt:
        print(
            "\ninterrupted. Run `make demo` again to resume: the data are cached and training "
            "resumes from its checkpoint. `eagle3 stack down` stops the servers.",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        from eagle3.config import ConfigError

        if isinstance(e, ConfigError):
            print(f"demo: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
