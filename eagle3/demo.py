"""`make demo` / `python -m eagle3.demo`: the whole system in one command.

stack up (reusing a running one) -> the pipeline on configs/smollm2-135m.yaml, profile demo
(data -> train -> evaluate -> gated promotion) -> one on-demand inference run against the champion
-> a summary table (tau, speedups, lossless, the gate's decision and reasons) and the URLs of the
Prefect UI, the MLflow UI and the S3 objects.

Resumable: after Ctrl-C, run it again. The data task is cached on its settings (and the data stage
resumes its shards), and training resumes from the checkpoint in the run dir.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m eagle3.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smollm2-135m.yaml")
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--state-dir", help="stack state (default .eagle3/stack)")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    return ap


def run_demo(args) -> dict:
    from rich.console import Console

    from eagle3.config import load_recipe
    from eagle3.ops.stack import load_stack_env, stack_up

    console = Console()
    recipe = load_recipe(args.config, args.overrides, args.profile)  # bad input fails first
    console.rule("[bold]1/3 local stack")
    st = stack_up(args.state_dir, echo=console.print)
    load_stack_env(args.state_dir)

    # Prefect and MLflow are imported only now, so that they connect to the stack.
    from flows.infer import infer_flow
    from flows.pipeline import pipeline_flow

    console.rule(f"[bold]2/3 pipeline: {recipe.name} (profile {args.profile})")
    out = pipeline_flow(recipe)
    console.rule("[bold]3/3 on-demand inference against the champion")
    inference = None
    try:
        inference = infer_flow([args.prompt], config=recipe, max_new_tokens=args.max_new_tokens)
    except LookupError as e:  # no champion yet: the gate rejected the first candidate
        console.print(f"[yellow]no inference: {e}")
    _summary(console, st, recipe, out, inference)
    return {"pipeline": out, "inference": inference}


def _summary(console, st, recipe, out: dict, inference: dict | None) -> None:
    from rich.table import Table

    m = out["metrics"]
    d = out["decision"]
    t = Table(title=f"eagle3 demo: {out['model']} v{out['version']}", show_lines=False)
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")
    t.add_row("tau (tokens per target forward)", f"{m.get('tau', float('nan')):.3f}")
    for k in sorted(k for k in m if k.startswith("speedup_")):
        t.add_row(k.replace("_", " "), f"{m[k]:.2f}x")
    t.add_row("lossless (greedy == target)", str(bool(m.get("lossless"))))
    verdict = "[green]PROMOTE" if d.get("promote") else "[red]REJECT"
    t.add_row("gate", verdict)
    for r in d.get("reasons", []):
        t.add_row("", f"- {r}")
    shipped = out.get("s3_uri") or (
        f"no: {out['promotion_skipped']}" if out.get("promotion_skipped") else "no"
    )
    t.add_row("promoted to S3", shipped)
    if inference:
        t.add_row(
            "inference",
            f"{inference['count']} prompt(s), tau {inference['tau']:.2f}, "
            f"{inference['tokens_per_s']:.1f} tok/s, champion v{inference['champion']['version']}",
        )
        t.add_row("answer", inference["outputs"][0]["text"][:300])
        t.add_row("outputs", inference.get("output_uri") or "-")
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
    bucket = os.environ.get("EAGLE3_S3_BUCKET", st.bucket)
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
