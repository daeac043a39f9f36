"""On-demand inference against the champion (or a shipped head given by name, `draft=`).

Parameters: prompts (a list of strings, or an s3:// URI of a JSONL whose rows are strings or
objects with `prompt`), temperature, max_new_tokens. Resolves the champion (S3 champion.json, or
the MLflow alias when no S3 is configured), downloads it and verifies every sha256 BEFORE loading,
runs the speculative engine, writes the outputs as JSONL next to the input in S3 and returns a
summary (count, tau, tokens/s).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, task

from flows.common import (
    RETRY_DELAYS,
    flow_run_id,
    resolve_recipe,
    s3_retryable,
    tag_flow_run,
    tracker,
)


def _settings_or_none(recipe):
    from eagle3.ops import storage

    try:
        return storage.settings_from_recipe(recipe.storage)
    except storage.StorageError:
        return None


@task(
    name="resolve-champion",
    retries=2,
    retry_delay_seconds=RETRY_DELAYS[:2],
    retry_condition_fn=s3_retryable,
)
def resolve_champion_task(recipe) -> dict:
    from eagle3.ops import storage
    from eagle3.ops.tracking import registered_model_name

    model = registered_model_name(recipe)
    s = _settings_or_none(recipe)
    if s is not None:
        ptr = storage.read_champion(s, model)
        if ptr:
            return {
                "source": "s3",
                "model": model,
                "version": str(ptr["version"]),
                "uri": ptr["uri"],
                "manifest_sha256": ptr["manifest_sha256"],
            }
    mv = tracker(recipe).alias_version(model, "champion")
    if mv is None:
        where = f"s3://{s.bucket}/{storage.pointer_key(s, model)}" if s else "(no S3 configured)"
        raise LookupError(f"no champion for {model}: neither {where} nor the MLflow alias exists")
    return {
        "source": "mlflow",
        "model": model,
        "version": str(mv.version),
        "uri": f"models:/{model}@champion",
    }


@task(
    name="fetch-champion",
    retries=2,
    retry_delay_seconds=RETRY_DELAYS[:2],
    retry_condition_fn=s3_retryable,
)
def fetch_task(recipe, champ: dict, dest: str) -> str:
    """Download + verify; an IntegrityError is never retried and nothing is loaded."""
    from eagle3.ops import storage

    if champ["source"] == "s3":
        s = _settings_or_none(recipe)
        out = storage.download_version(
            s,
            champ["model"],
            champ["version"],
            Path(dest),
            expect_manifest_sha256=champ["manifest_sha256"],
        )
        storage.verify_local(out)
        return str(out)
    from flows.evaluate import fetch_draft

    return str(fetch_draft(recipe, champ["model"], champ["version"], Path(dest)))


def named_draft(recipe, draft: str) -> dict:
    """The champion-shaped record of a draft given by name or path (no registry involved)."""
    from eagle3.heads import resolve_draft
    from eagle3.ops.tracking import registered_model_name

    path = resolve_draft(draft)
    return {
        "source": "shipped head" if str(path) != str(draft) else "directory",
        "model": registered_model_name(recipe),
        "version": Path(draft).name,
        "uri": str(path),
    }


@task(
    name="load-prompts",
    retries=2,
    retry_delay_seconds=RETRY_DELAYS[:2],
    retry_condition_fn=s3_retryable,
)
def load_prompts_task(recipe, prompts: Any) -> list[str]:
    from eagle3.ops import storage

    if isinstance(prompts, str):
        if not prompts.startswith("s3://"):
            raise ValueError(
                f"prompts {prompts!r}: give a list of strings or an s3:// URI of a JSONL"
            )
        s = _settings_or_none(recipe) or storage.S3Settings(bucket="-")
        rows = storage.read_jsonl_uri(prompts, s)
    else:
        rows = list(prompts or [])
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            out.append(row)
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            out.append(row["prompt"])
        else:
            raise ValueError(
                f"prompt {i}: expected a string or an object with a `prompt` string, got {row!r:.80}"
            )
    if not out:
        raise ValueError("no prompts given")
    return out


@task(name="generate", tags=["gpu"])
def generate_task(
    recipe,
    draft_dir: str,
    prompts: list[str],
    temperature: float | None,
    max_new_tokens: int | None,
) -> list[dict]:
    from eagle3.infer import engine as eng

    engine = eng.load_engine(recipe, draft_dir)
    tok = engine.target.tokenizer
    rows = []
    for p in prompts:
        ids = eng.encode_prompt(tok, [{"role": "user", "content": p}])
        t0 = time.perf_counter()
        res = engine.generate(
            ids, temperature=temperature, max_new_tokens=max_new_tokens, seed=recipe.seed
        )
        dt = time.perf_counter() - t0
        rows.append(
            {
                "prompt": p,
                "text": tok.decode(res.tokens, skip_special_tokens=True),
                "new_tokens": len(res.tokens),
                "tau": float(res.tau),
                "verify_steps": int(res.cycles),
                "tokens_per_s": float(res.tokens_per_s)
                or (len(res.tokens) / dt if dt > 0 else 0.0),
                "seconds": dt,
            }
        )
    return rows


@task(
    name="write-outputs",
    retries=3,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=s3_retryable,
)
def write_outputs_task(recipe, rows: list[dict], uri: str) -> str:
    from eagle3.ops import storage

    storage.write_jsonl_uri(uri, rows, _settings_or_none(recipe) or storage.S3Settings(bucket="-"))
    return uri


def output_uri_for(recipe, prompts: Any, model: str, run_id: str) -> str | None:
    if isinstance(prompts, str) and prompts.startswith("s3://"):
        base = prompts[: -len(".jsonl")] if prompts.endswith(".jsonl") else prompts
        return f"{base}.outputs-{run_id}.jsonl"
    s = _settings_or_none(recipe)
    return s.uri(model, "inference", f"{run_id}.jsonl") if s else None


@flow(name="eagle3-infer", log_prints=True)
def infer_flow(
    prompts: Any,
    config: Any = "configs/tiny.yaml",
    overrides: list[str] | None = None,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    output_uri: str | None = None,
    draft: str | None = None,
) -> dict:
    """`draft`: a shipped head's name (heads/<name>/, sha256-checked) or a checkpoint directory,
    served instead of the champion."""
    r = resolve_recipe(config, overrides)
    tag_flow_run(r)
    texts = load_prompts_task(r, prompts)
    tmp = tempfile.mkdtemp(prefix="eagle3-infer-")
    try:
        if draft is not None:
            champ = named_draft(r, draft)
            path = champ["uri"]
        else:
            champ = resolve_champion_task(r)
            path = fetch_task(r, champ, str(Path(tmp) / "draft"))
        rows = generate_task(r, path, texts, temperature, max_new_tokens)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    run_id = flow_run_id() or time.strftime("%Y%m%dT%H%M%S")
    out_uri = output_uri or output_uri_for(r, prompts, champ["model"], run_id)
    for row in rows:
        row["champion_version"] = champ["version"]
    if out_uri:
        write_outputs_task(r, rows, out_uri)
    tokens = sum(x["new_tokens"] for x in rows)
    steps = sum(x["verify_steps"] for x in rows)
    secs = sum(x["seconds"] for x in rows)
    summary = {
        "count": len(rows),
        "new_tokens": tokens,
        # the engine's tau (the prefill's first token counts in no step), weighted by steps
        "tau": sum(x["tau"] * x["verify_steps"] for x in rows) / steps if steps else 0.0,
        "tokens_per_s": tokens / secs if secs else 0.0,
        "champion": {k: champ[k] for k in ("model", "version", "source", "uri")},
        "output_uri": out_uri,
        "outputs": rows,
    }
    served = (
        f"head {champ['uri']} ({champ['source']})"
        if draft is not None
        else f"champion {champ['model']} v{champ['version']} ({champ['source']})"
    )
    print(
        f"{len(rows)} prompts, tau {summary['tau']:.2f}, {summary['tokens_per_s']:.1f} tok/s, "
        f"{served} -> {out_uri}"
    )
    return summary
