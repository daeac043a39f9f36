"""The `eagle3` command. Heavy packages are imported inside the handlers: `--help` stays instant.

Exit status: 0 success, 2 bad input (recipe, arguments, data, checkpoint, prompt) or an unusable
environment (a stack server down, the MLOps extra `eagle3[ops]` not installed), 1 failure during
work. Every command but `pipeline` calls the library directly, without Prefect; `pipeline` checks
its input and the stack, then runs `python -m flows` (the orchestration layer's entry) in a child
process.

One file over 400 lines because it is only argument parsing and one thin handler per command,
each calling the library; no logic lives here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """Raised for input the user can fix; the CLI exits 2 with the message."""


def recipe_from_args(args):
    from eagle3.config import ConfigError, load_recipe

    try:
        return load_recipe(args.config, args.overrides, getattr(args, "profile", None))
    except ConfigError as e:
        raise BadInput(str(e)) from None


# --- handlers ---------------------------------------------------------------------------------------
def cmd_data(args) -> int:
    recipe = recipe_from_args(args)
    from eagle3.data.chat import TemplateError
    from eagle3.data.features import DiskBudgetError
    from eagle3.data.shards import DataLockedError
    from eagle3.data.sources import SourceError
    from eagle3.data.stages import data_stages, run_stages

    try:
        manifests = run_stages(recipe, progress=True)
    except (DiskBudgetError, SourceError, DataLockedError, TemplateError) as e:
        raise BadInput(str(e)) from None
    from eagle3.data.manifest import DataManifest

    for stage in data_stages(recipe):
        m = DataManifest.model_validate(manifests[stage.name])
        s = m.samples
        print(
            f"{stage.name}: {s.written} samples ({s.train} train, {s.val} val), "
            f"{s.skipped} skipped {s.skipped_by_reason}; {m.tokens.total:,} "
            f"tokens, {m.tokens.trainable:,} trainable"
            + (
                f"; draft vocab {m.vocab.size} covers {m.vocab.coverage:.1%}"
                if stage.name == "data"
                else " (mixed into training)"
            )
        )
        print(f"{stage.name} manifest: {stage.data_dir / 'manifest.json'} (digest {m.digest[:12]})")
    return EXIT_OK


def cmd_train(args) -> int:
    recipe = recipe_from_args(args)
    from eagle3.train.trainer import DataMissing, run_training

    try:
        summary = run_training(recipe, progress=True)
    except DataMissing as e:
        raise BadInput(str(e)) from None
    import os

    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks
        return EXIT_OK
    best = summary.get("best") or {}
    if best.get("metric"):
        print(
            f"best {best['metric']} = {best['value']:.4f} at step {best['step']} of {summary['steps']}"
        )
    print(f"draft checkpoint: {summary['draft_dir']}")
    print(f"metrics: {summary['train_metrics']}")
    return EXIT_OK


def cmd_bench(args) -> int:
    recipe = recipe_from_args(args)
    draft = _draft(args.draft)
    if args.engine:
        recipe.eval.engine = args.engine
    from eagle3.data.sources import SourceError
    from eagle3.eval.bench import print_report, run_bench
    from eagle3.eval.report import as_report

    datasets = [d for d in args.datasets.split(",") if d] if args.datasets else None
    if args.limit is not None and args.limit < 1:
        raise BadInput(f"--limit {args.limit}: must be >= 1")
    journal = Path(args.journal) if args.journal else journal_path(args.out)
    if args.fresh:
        journal.unlink(missing_ok=True)
    from eagle3.ops.vllm_server import VLLMError, VLLMSetupError

    try:
        report = run_bench(
            recipe,
            draft,
            datasets=datasets,
            limit=args.limit,
            progress=True,
            journal=journal,
            origin={"recipe": args.config, "overrides": list(args.overrides or [])},
            resume_across_commits=args.resume_across_commits,
        )
    except (SourceError, VLLMSetupError) as e:  # an unknown data set name; no vLLM venv
        raise BadInput(str(e)) from None
    except VLLMError as e:
        print(f"eagle3 bench: {e}", file=sys.stderr)
        return EXIT_FAIL
    from eagle3.io import write_json_atomic

    write_json_atomic(args.out, report)
    print_report(report)
    print(f"report: {args.out}")
    resumed = as_report(report).resumed_prompts
    if resumed:
        print(
            f"{resumed} prompt(s) were taken from {journal} (measured by an "
            "earlier run with the same head and settings); --fresh measures everything again"
        )
    return EXIT_OK


def journal_path(out: str | Path) -> Path:
    """Where `eagle3 bench --out FILE` keeps its finished prompts: FILE with .prompts.json."""
    out = Path(out)
    return out.with_name(out.stem + ".prompts.json")


def cmd_generate(args) -> int:
    recipe = recipe_from_args(args)
    draft = _draft(args.draft)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if args.temperature is not None and args.temperature < 0:
        raise BadInput(f"--temperature {args.temperature}: must be >= 0")
    from eagle3.models.checkpoint import check_checkpoint

    problems = check_checkpoint(draft)  # before anything is loaded
    if problems:
        raise BadInput(
            f"--draft {draft} is not a valid checkpoint:\n  - " + "\n  - ".join(problems)
        )
    from eagle3.infer.engine import generate_text

    result = generate_text(
        recipe,
        draft,
        args.prompt,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(result["text"])
        print(
            f"\n[{len(result['tokens'])} tokens, tau {result['tau']:.2f}, "
            f"{result['tokens_per_s']:.1f} tok/s]",
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_serve(args) -> int:
    from eagle3.ops import vllm_server as vs

    if args.stop:
        print(vs.stop_recorded())
        return EXIT_OK
    if not args.config:
        raise BadInput("--config is required (unless --stop)")
    if args.record and args.detach:
        raise BadInput("--record runs in the foreground (the recorder lives in this process)")
    recipe = recipe_from_args(args)
    draft, version = None, "none"
    if args.draft == "champion":
        draft, version = _fetch_champion(recipe)
    elif args.draft:
        draft, version = str(_draft(args.draft)), Path(args.draft).name
    # Recording: vLLM on a free port behind the proxy, which takes the port asked for.
    spec = vs.spec_from_recipe(recipe, draft, port=args.port)
    if args.record:
        from eagle3.ops.procs import free_port_block

        spec.port = free_port_block(1)
    try:
        srv = vs.start_vllm(spec, "serve", timeout=recipe.vllm.start_timeout, echo=print)
    except vs.VLLMSetupError as e:
        raise BadInput(str(e)) from None
    except vs.VLLMError as e:
        print(f"eagle3 serve: {e}", file=sys.stderr)
        return EXIT_FAIL
    head = (
        f"with the head {draft} ({spec.speculative_tokens} speculative tokens)"
        if draft
        else "alone"
    )
    print(f"serving {spec.model} {head}")
    print(f"OpenAI API: {srv.url}/v1   (health {srv.url}/health, metrics {srv.url}/metrics)")
    print(f"log: {srv.log}")
    if args.detach:
        path = vs.save_record(srv)
        print(f"detached (pid {srv.pid}, recorded in {path}); stop it with `eagle3 serve --stop`")
        return EXIT_OK
    if args.record:
        return _serve_recording(srv, recipe, version, args.port or recipe.vllm.port)
    return _serve_foreground(srv)


def _serve_recording(srv, recipe, version: str, port: int | None) -> int:
    """vLLM behind the recording proxy (eagle3/serve/recorder.py) until Ctrl-C."""
    from eagle3.extras import require_ops

    require_ops("boto3", "starlette", "uvicorn")
    from eagle3.ops.inference import settings_or_none
    from eagle3.ops.procs import free_port_block
    from eagle3.ops.tracking import registered_model_name
    from eagle3.serve.recorder import Recorder, RecordingServer, build_app

    s = settings_or_none(recipe)
    model = registered_model_name(recipe)
    rec = Recorder(recipe, model, version, s=s).start()
    proxy = RecordingServer(build_app(srv.url, rec), port or free_port_block(1)).start()
    where = f"s3://{s.bucket}/{s.key(model, 'traffic')}/" if s else "the spool only (no S3)"
    print(f"recording chat completions to {where} (spool {rec.spool_dir})")
    print(f"OpenAI API, recorded: {proxy.url}/v1   (opt out: header `X-Eagle3-Capture: off`)")
    try:
        return _serve_foreground(srv)
    finally:
        proxy.stop()
        rec.stop()
        print(f"traffic: {rec.counts}")


def _serve_foreground(srv) -> int:
    """Until Ctrl-C or SIGTERM; if vLLM dies, say why."""
    import signal
    import time

    from eagle3.ops.procs import tail as _tail
    from eagle3.ops.vllm_server import failure_cause

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print("Ctrl-C stops it")
    try:
        while srv.alive():
            time.sleep(2)
        print(
            f"eagle3 serve: vLLM exited: {failure_cause(srv.log)}\n{_tail(srv.log, 20)}",
            file=sys.stderr,
        )
        return EXIT_FAIL
    except KeyboardInterrupt:
        srv.stop()
        print("vLLM stopped")
        return EXIT_OK


def _fetch_champion(recipe) -> tuple[str, str]:
    """The registry's champion, downloaded and verified under .eagle3/vllm/ (S3 or MLflow)."""
    from eagle3.extras import require_ops
    from eagle3.ops.vllm_server import record_path

    require_ops("mlflow", "boto3")
    use_stack(recipe, need=("s3", "mlflow"))
    from eagle3.ops.champion_fetch import fetch_champion, resolve_champion

    try:
        champ = resolve_champion(recipe)
    except LookupError as e:
        raise BadInput(str(e)) from None
    dest = record_path().parent / f"champion-{champ['model']}-v{champ['version']}"
    if not (dest / "config.json").is_file():
        fetch_champion(recipe, champ, dest)
    print(f"champion {champ['model']} v{champ['version']} ({champ['source']}): {dest}")
    return str(dest), str(champ["version"])


def cmd_check(args) -> int:
    from eagle3.models.checkpoint import check_checkpoint, read_raw_config
    from eagle3.models.speculators import is_speculators

    problems = check_checkpoint(args.dir)
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        return EXIT_FAIL
    fmt = "speculators format" if is_speculators(read_raw_config(args.dir)) else "portable format"
    print(f"{args.dir}: OK (EAGLE-3 draft checkpoint, contract §3, {fmt})")
    return EXIT_OK


def cmd_export(args) -> int:
    draft = _draft(args.draft)
    from eagle3.models.checkpoint import read_raw_config
    from eagle3.models.export import export_checkpoint
    from eagle3.models.speculators import is_speculators

    out = export_checkpoint(draft, args.format, args.out, verifier=args.verifier, dtype=args.dtype)
    cfg = read_raw_config(out)
    if is_speculators(cfg):
        verifier = cfg["speculators_config"]["verifier"]["name_or_path"]
        print(f"exported for {args.format}: {out} ({cfg['torch_dtype']}, verifier {verifier})")
    else:
        print(f"exported for {args.format}: {out} ({cfg['torch_dtype']})")
    return EXIT_OK


def cmd_stack(args) -> int:
    from eagle3.extras import require_ops
    from eagle3.ops.stack import stack_command

    if args.action == "up":  # `down` and `status` must work whatever is installed
        require_ops("prefect", "mlflow", "boto3", "cryptography")

    ports = {"prefect": args.prefect_port, "mlflow": args.mlflow_port, "s3": args.s3_port}
    return stack_command(args.action, Path(args.state_dir) if args.state_dir else None, ports)


def use_stack(recipe, need=("s3", "mlflow", "prefect")) -> None:
    """Variables of a running `eagle3 stack` fill what the environment does not set (before
    Prefect or MLflow are imported, so that they connect to it). A server the command needs that
    is down is named, and the command stops: it never falls back to another registry."""
    import os

    from eagle3.ops.stack import StackError, check_servers, load_stack_env

    try:
        applied = load_stack_env(need=need)
        check_servers(need)
    except StackError as e:
        raise BadInput(str(e)) from None
    if "s3" in need:
        from eagle3.ops import storage

        try:
            settings = storage.settings_from_recipe(recipe.storage)
        except storage.StorageError:
            settings = None  # no bucket: the gate runs, nothing is shipped (said later)
        if settings is not None:
            try:
                storage.check_access(settings)
            except storage.StorageError as e:
                raise BadInput(str(e)) from None
    if applied:
        where = os.environ.get("MLFLOW_TRACKING_URI")
        print(f"using the running stack (MLflow {where})", file=sys.stderr)


def cmd_pipeline(args) -> int:
    """Bad input and a stack server that is down stop here (exit 2, before any work); then the
    orchestration layer's own entry, `python -m flows`, runs the pipeline in a child process with
    the stack's variables already in its environment (Prefect reads its settings once, when it
    is first loaded). eagle3/ never loads the flows package itself."""
    from eagle3.extras import require_ops

    recipe = recipe_from_args(args)
    require_ops("prefect", "mlflow", "boto3", "matplotlib")
    use_stack(recipe)
    argv = [sys.executable, "-m", "flows", "--config", str(args.config)]
    argv += ["--profile", args.profile] if args.profile else []
    return run_child(argv + list(args.overrides))


def run_child(argv: list[str]) -> int:
    """Run `argv` to its end and return its exit status. Ctrl-C reaches the child too (same
    process group): we wait for it to stop cleanly; SIGTERM is passed on."""
    import signal
    import subprocess

    proc = subprocess.Popen(argv)
    try:
        old = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    except ValueError:  # not the main thread: no handler, the child is still waited for
        old = None
    try:
        while True:
            try:
                rc = proc.wait()
                return rc if rc >= 0 else 128 - rc  # killed by signal N: 128 + N, as a shell says
            except KeyboardInterrupt:
                continue
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def cmd_promote(args) -> int:
    recipe = recipe_from_args(args)
    if sum(bool(x) for x in (args.version, args.rollback, args.reconcile)) > 1:
        raise BadInput("give one of --version, --rollback, --reconcile")
    from eagle3.extras import require_ops

    require_ops("mlflow", "boto3")
    use_stack(recipe, need=("s3", "mlflow"))
    from eagle3.ops import promotion, storage

    try:
        if args.rollback:
            out = promotion.rollback_recipe(recipe)
            for c in out["reconciled"]:
                print(f"reconciled first: {c}")
            for c in out["repaired"]:
                print(f"repaired: {c}")
            print(
                f"rolled back: champion is v{out['champion']} again "
                f"(was v{out['rolled_back_from']})"
            )
            return EXIT_OK
        if args.reconcile:
            print(promotion.describe_reconcile(promotion.reconcile_recipe(recipe)))
            return EXIT_OK
        out = promotion.promote_recipe(recipe, version=args.version)
    except storage.StorageError as e:
        print(f"eagle3 promote: {e}", file=sys.stderr)
        return EXIT_FAIL
    for c in out.get("reconciled", []):
        print(f"reconciled first: {c}")
    print(promotion.describe_promotion(out))
    return EXIT_OK if out["promoted"] else EXIT_FAIL


def cmd_release(args) -> int:
    draft = _draft(args.draft)
    from eagle3.release import release_head

    for b in args.bench or []:
        if not Path(b).is_file():
            raise BadInput(f"--bench {b}: no such file")
    out = release_head(
        draft,
        args.name,
        out=args.out,
        bench=args.bench,
        train_metrics=args.train_metrics,
        reproduce=args.reproduce,
        note=args.note,
        max_mb=args.max_mb,
    )
    from eagle3.heads import SUMS_FILE

    print(f"released {args.name}: {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    print(f"verify with: eagle3 check {out}   (contract §3 and {SUMS_FILE})")
    return EXIT_OK


def _draft(arg: str) -> Path:
    """--draft: a checkpoint directory, or a shipped head's name (heads/<name>/)."""
    from eagle3.heads import HeadError, resolve_draft

    try:
        return resolve_draft(arg)
    except HeadError as e:
        raise BadInput(f"--draft {e}") from None


# --- parser -------------------------------------------------------------------------------------------
def add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    p.add_argument("--profile", help="a named profile of the recipe (e.g. demo, full)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="eagle3", description="Train, measure and ship EAGLE-3 draft heads."
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "data", help="conversations -> regenerated answers -> features + draft vocab"
    )
    add_recipe_args(p)
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser("train", help="training-time-test training (resumes from the run dir)")
    add_recipe_args(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("bench", help="speed and acceptance benchmark -> JSON report")
    add_recipe_args(p)
    p.add_argument("--draft", required=True, help="a checkpoint directory or a shipped head's name")
    p.add_argument("--out", required=True)
    p.add_argument("--datasets", help="comma-separated catalog names (default: the recipe's)")
    p.add_argument("--limit", type=int, help="prompts per dataset")
    p.add_argument(
        "--engine",
        choices=["eagle3", "vllm"],
        help="eagle3: our engine; vllm: vLLM with vs without the head (default: eval.engine)",
    )
    p.add_argument(
        "--journal", help="finished prompts, to resume a stopped run (default: OUT.prompts.json)"
    )
    p.add_argument("--fresh", action="store_true", help="ignore the journal: measure every prompt")
    p.add_argument(
        "--resume-across-commits",
        action="store_true",
        help="resume a journal written by another commit of the code (same settings and head)",
    )
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser(
        "serve", help="serve the target (with a head) through vLLM: OpenAI API on 127.0.0.1"
    )
    p.add_argument("--config", help="recipe YAML (configs/*.yaml)")
    p.add_argument("--profile", help="a named profile of the recipe (e.g. demo, full)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides")
    p.add_argument("--draft", help="a head directory, or `champion` (omit: the target alone)")
    p.add_argument("--port", type=int, help="default: vllm.port, else a free port")
    p.add_argument("--detach", action="store_true", help="leave it running (`--stop` ends it)")
    p.add_argument("--stop", action="store_true", help="stop the server `--detach` left running")
    p.add_argument(
        "--record",
        action="store_true",
        help="record chat completions as traffic (docs/CONTRACTS.md §9) through a proxy on --port",
    )
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("generate", help="one speculative generation")
    add_recipe_args(p)
    p.add_argument("--draft", required=True, help="a checkpoint directory or a shipped head's name")
    p.add_argument("--prompt", required=True)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser(
        "release", help="a trained draft as a shipped head: bf16, card, SHA256SUMS (heads/NAME)"
    )
    p.add_argument("--draft", required=True, help="the checkpoint to release")
    p.add_argument("--name", required=True, help="the head's name (its folder under heads/)")
    p.add_argument("--out", help="default heads/NAME of this repository")
    p.add_argument("--bench", action="append", help="a bench report the card quotes (repeatable)")
    p.add_argument("--train-metrics", help="default: train_metrics.json beside the draft")
    p.add_argument("--reproduce", help="the command the card gives to rebuild the head")
    p.add_argument("--note", help="a closing paragraph for the card (e.g. the hours it took)")
    p.add_argument("--max-mb", type=float, default=25.0, help="refuse larger weights (MB)")
    p.set_defaults(fn=cmd_release)

    p = sub.add_parser("check", help="validate a checkpoint against the contract")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("export", help="write a checkpoint that SGLang or vLLM loads")
    p.add_argument("--draft", required=True)
    p.add_argument("--format", required=True, choices=["sglang", "vllm"])
    p.add_argument("--out", required=True)
    p.add_argument(
        "--verifier",
        help="target model id or path the engine pairs it with (vllm format; default: the "
        "target the checkpoint records, eagle3.target)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="default: the target's dtype the checkpoint records (eagle3.target_dtype), else "
        "the checkpoint's",
    )
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("stack", help="the local stack on loopback: Prefect, MLflow, S3")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--state-dir", help="default .eagle3/stack")
    p.add_argument("--prefect-port", type=int, help="default 4200 (or EAGLE3_PREFECT_PORT)")
    p.add_argument("--mlflow-port", type=int, help="default 5000 (or EAGLE3_MLFLOW_PORT)")
    p.add_argument("--s3-port", type=int, help="default 8333 (or EAGLE3_S3_PORT)")
    p.set_defaults(fn=cmd_stack)

    p = sub.add_parser("pipeline", help="Prefect pipeline: data -> train -> evaluate -> promote")
    add_recipe_args(p)
    p.set_defaults(fn=cmd_pipeline)

    p = sub.add_parser(
        "promote", help="gate and promote a registered version, roll back, or reconcile"
    )
    add_recipe_args(p)
    p.add_argument("--version", help="registry version (default: the candidate)")
    p.add_argument(
        "--rollback", action="store_true", help="point champion back to the previous one"
    )
    p.add_argument(
        "--reconcile",
        action="store_true",
        help="make the MLflow alias follow champion.json (S3), undo a failed promotion's "
        "pointer, and say what changed",
    )
    p.set_defaults(fn=cmd_promote)
    return ap


def main(argv: list[str] | None = None) -> int:
    from eagle3.env import disable_telemetry

    disable_telemetry()
    args = build_parser().parse_args(argv)
    return run_command(f"eagle3 {args.command}", args.fn, args)


def run_command(name: str, fn, args) -> int:
    """fn(args) with the exit statuses of the module docstring; errors are said in one line."""
    from eagle3.extras import MissingExtra, missing_message, missing_ops_package

    try:
        return fn(args)
    except (BadInput, MissingExtra) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{name}: interrupted; run it again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # a failure during work: say what, exit 1
        if _is_bad_input(e):
            print(f"{name}: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if pkg := missing_ops_package(e):  # reached by a path that no require_ops covers
            print(f"{name}: {missing_message([pkg])}", file=sys.stderr)
            return EXIT_BAD_INPUT
        import traceback

        traceback.print_exc()
        print(f"{name}: failed: {e}", file=sys.stderr)
        return EXIT_FAIL


def _is_bad_input(e: Exception) -> bool:
    from eagle3.config import ConfigError

    names = {
        "CheckpointError",
        "BadInput",
        "PromptTooLong",
        "SourceError",
        "OutsideScope",
        "HeadError",
        "ReleaseError",
        "SettingsError",
    }
    return isinstance(e, ConfigError) or type(e).__name__ in names


if __name__ == "__main__":
    sys.exit(main())
