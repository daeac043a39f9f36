"""On-demand inference against the champion, confined to what it needs (eagle3.ops.inference).

Parameters: prompts (a list of strings, or an s3:// URI of a JSONL in the configured bucket whose
rows are strings or objects with `prompt`), temperature, max_new_tokens, output_uri. The champion
is what champion.json names (the MLflow alias only when no S3 is configured); it is downloaded and
every sha256 verified BEFORE loading. Outputs go only to s3://<bucket>/<prefix>/<model>/inference/
as a new object (never over an existing one). `overrides` may set only sampling and the token
budget (eagle3.ops.inference.REQUEST_KEYS); any other key is refused by name, and a deployment's
run may not swap the deployment's recipe: all of it is checked before any work. This flow adds the retries.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, task

from eagle3.ops.inference import check_request, named_draft, output_key
from flows.common import (
    RETRY_DELAYS,
    flow_run_id,
    resolve_recipe,
    s3_retryable,
    tag_flow_run,
    tracker,
)

DEFAULT_CONFIG = "configs/tiny.yaml"


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


@task(
    name="load-prompts",
    retries=2,
    retry_delay_seconds=RETRY_DELAYS[:2],
    retry_condition_fn=s3_retryable,
)
def load_prompts_task(recipe, prompts: Any) -> list[str]:
    from eagle3.ops.inference import load_prompts

    return load_prompts(recipe, prompts)


@task(name="generate", tags=["gpu"])
def generate_task(
    recipe,
    draft_dir: str,
    prompts: list[str],
    temperature: float | None,
    max_new_tokens: int | None,
) -> list[dict]:
    from eagle3.ops.inference import generate

    return generate(recipe, draft_dir, prompts, temperature, max_new_tokens)


@task(
    name="write-outputs",
    retries=3,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=s3_retryable,
)
def write_outputs_task(recipe, rows: list[dict], key: str) -> str:
    from eagle3.ops.inference import write_outputs

    return write_outputs(recipe, rows, key)


@task(name="capture-traffic")
def capture_task(recipe, model: str, version: str, rows: list[dict], sampling: dict) -> dict:
    """Record what was served (traffic.capture): redacted, spooled, uploaded to <model>/traffic/.
    A failed upload leaves the batch spooled for the next capture (flush retries each batch
    itself). No task retries: a retry would spool the same records a second time."""
    from eagle3.ops.inference import settings_or_none
    from eagle3.traffic.capture import capture, records_of_rows

    s = settings_or_none(recipe)
    if s is None:
        print("traffic: no S3 bucket configured; nothing recorded")
        return {"spooled": 0, "uploaded": [], "waiting": 0}
    return capture(recipe, s, model, records_of_rows(recipe, model, version, rows, sampling))


@flow(name="eagle3-infer", log_prints=True)
def infer_flow(
    prompts: Any,
    config: Any = DEFAULT_CONFIG,
    overrides: list[str] | None = None,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    output_uri: str | None = None,
    draft: str | None = None,
    capture: bool = True,
) -> dict:
    """`draft`: a shipped head's name (heads/<name>/, sha256-checked), served instead of the
    champion. Only names: a run may not point the flow at an arbitrary directory. `capture`:
    False keeps this request out of the traffic records (recording is on only when the
    deployment's recipe says traffic.capture: true)."""
    from eagle3.ops.inference import summarize
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
    summary = summarize(rows, champ, out_uri)
    if r.traffic.capture and capture:
        sampling = {
            "temperature": r.infer.temperature if temperature is None else temperature,
            "top_p": r.infer.top_p,
            "max_tokens": r.infer.max_new_tokens if max_new_tokens is None else max_new_tokens,
            "seed": r.seed,
        }
        model = registered_model_name(r)
        summary["traffic"] = capture_task(r, model, str(champ["version"]), rows, sampling)
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
