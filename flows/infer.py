"""On-demand inference against the champion, confined to what it needs.

Parameters: prompts (a list of strings, or an s3:// URI of a JSONL in the configured bucket whose
rows are strings or objects with `prompt`), temperature, max_new_tokens, output_uri. The champion
is what champion.json names (the MLflow alias only when no S3 is configured); it is downloaded and
every sha256 verified BEFORE loading. Outputs go only to s3://<bucket>/<prefix>/<model>/inference/
as a new object (never over an existing one). Overrides of the storage, tracking and promote
settings are refused, and a deployment's run may not swap the deployment's recipe: all of it is
checked before any work.
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

# Sections an inference run may not change: where champions and outputs live, and who decides.
PROTECTED = ("storage", "tracking", "promote")
DEFAULT_CONFIG = "configs/tiny.yaml"


def _settings_or_none(recipe):
    from eagle3.ops import storage

    try:
        return storage.settings_from_recipe(recipe.storage)
    except storage.StorageError:
        return None


def check_request(
    config: Any, overrides: list[str] | None, deployment_config: Any, draft: str | None = None
) -> None:
    """Refuse overrides of PROTECTED sections, (in a deployment's run) another recipe, and a
    `draft` that is not a shipped head's name."""
    from eagle3.config import parse_override
    from eagle3.heads import known_heads

    if draft is not None and draft not in known_heads():
        raise PermissionError(
            f"draft {draft!r}: inference serves the champion or a shipped head by name "
            f"({', '.join(known_heads()) or 'none shipped'}), not a directory"
        )

    for text in overrides or []:
        parts, _ = parse_override(text)
        if parts[0] in PROTECTED or parts == ["profile"]:
            raise PermissionError(
                f"override {text!r}: inference may not change {parts[0]} settings "
                f"({', '.join(PROTECTED)} and the profile come from the deployment's recipe)"
            )
    if deployment_config is not None and config != deployment_config:
        raise PermissionError(
            f"config {str(config)[:120]!r}: this deployment serves {deployment_config!r}; a run "
            "may not swap its recipe"
        )


def deployment_config() -> Any:
    """The `config` parameter the running deployment was created with (None outside one)."""
    from prefect.runtime import deployment

    dep_id = deployment.id
    if not dep_id:
        return None
    from prefect import get_client

    with get_client(sync_client=True) as c:
        params = c.read_deployment(dep_id).parameters or {}
    return params.get("config", DEFAULT_CONFIG)


def output_key(recipe, model: str, output_uri: str | None, run_id: str) -> str | None:
    """The key the outputs go to: output_uri when it lies under <prefix>/<model>/inference/,
    else <run id>.jsonl there (None when no S3 is configured)."""
    from eagle3.ops import storage

    s = _settings_or_none(recipe)
    if s is None:
        if output_uri:
            raise storage.OutsideScope(f"output_uri {output_uri}: no S3 bucket configured")
        return None
    if output_uri:
        return storage.check_output_uri(s, model, output_uri)
    return storage.inference_prefix(s, model) + f"{run_id}.jsonl"


@task(
    name="resolve-champion",
    retries=2,
    retry_delay_seconds=RETRY_DELAYS[:2],
    retry_condition_fn=s3_retryable,
)
def resolve_champion_task(recipe) -> dict:
    from eagle3.ops.champion_fetch import resolve_champion

    return resolve_champion(recipe, tracker(recipe))


@task(
    name="fetch-champion",
    retries=2,
    retry_delay_seconds=RETRY_DELAYS[:2],
    retry_condition_fn=s3_retryable,
)
def fetch_task(recipe, champ: dict, dest: str) -> str:
    """Download + verify; an IntegrityError is never retried and nothing is loaded."""
    from eagle3.ops.champion_fetch import fetch_champion

    return str(fetch_champion(recipe, champ, dest, tracker(recipe)))


def named_draft(recipe, draft: str) -> dict:
    """The champion-shaped record of a shipped head given by name (no registry involved)."""
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
        s = _settings_or_none(recipe)
        if s is None:
            raise storage.OutsideScope(f"prompts {prompts}: no S3 bucket configured")
        rows = storage.read_jsonl(s, storage.check_prompts_uri(s, prompts))
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
    if recipe.infer.engine == "vllm":
        return generate_vllm(recipe, draft_dir, prompts, temperature, max_new_tokens)
    from eagle3.infer import engine as eng

    engine = eng.load_engine(recipe, draft_dir)
    tok = engine.target.tokenizer
    encoded = [eng.encode_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]
    for i, ids in enumerate(encoded):  # every prompt, before the first generation
        eng.check_prompt_fits(engine.target, ids, max_new_tokens or recipe.infer.max_new_tokens, i)
    rows = []
    for p, ids in zip(prompts, encoded, strict=True):
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


def generate_vllm(recipe, draft_dir, prompts, temperature, max_new_tokens) -> list[dict]:
    """A vLLM server holding the head for the length of the task (infer.engine: vllm)."""
    from transformers import AutoTokenizer

    from eagle3.infer.vllm_client import VLLMClient, generate_rows
    from eagle3.ops.vllm_server import spec_from_recipe, start_vllm

    spec = spec_from_recipe(recipe, draft_dir)
    tok = AutoTokenizer.from_pretrained(spec.model)
    t = recipe.infer.temperature if temperature is None else temperature
    n = recipe.infer.max_new_tokens if max_new_tokens is None else max_new_tokens
    with start_vllm(spec, "infer", timeout=recipe.vllm.start_timeout, echo=print) as srv:
        client = VLLMClient(srv.url)
        try:
            return generate_rows(client, tok, prompts, t, n, recipe.seed)
        finally:
            client.close()


@task(
    name="write-outputs",
    retries=3,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=s3_retryable,
)
def write_outputs_task(recipe, rows: list[dict], key: str) -> str:
    from eagle3.ops import storage

    s = _settings_or_none(recipe)
    try:
        storage.write_jsonl(s, key, rows, overwrite=False)
    except storage.PreconditionFailed:
        # A retry after a write that landed leaves the same rows there; anything else is refused.
        if storage.read_jsonl(s, key) != rows:
            raise storage.OutsideScope(
                f"s3://{s.bucket}/{key} exists; outputs never replace it"
            ) from None
    return f"s3://{s.bucket}/{key}"


@flow(name="eagle3-infer", log_prints=True)
def infer_flow(
    prompts: Any,
    config: Any = DEFAULT_CONFIG,
    overrides: list[str] | None = None,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    output_uri: str | None = None,
    draft: str | None = None,
) -> dict:
    """`draft`: a shipped head's name (heads/<name>/, sha256-checked), served instead of the
    champion. Only names: a run may not point the flow at an arbitrary directory."""
    from eagle3.ops.tracking import registered_model_name

    check_request(config, overrides, deployment_config(), draft)
    r = resolve_recipe(config, overrides)
    tag_flow_run(r)
    run_id = flow_run_id() or time.strftime("%Y%m%dT%H%M%S")
    out_key = output_key(r, registered_model_name(r), output_uri, run_id)  # refused up front
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
    for row in rows:
        row["champion_version"] = champ["version"]
    out_uri = write_outputs_task(r, rows, out_key) if out_key else None
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
