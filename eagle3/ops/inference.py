"""On-demand inference against the champion, confined to what it needs (the inference flow's work).

A request sets only what a request is for: its prompts, output_uri, and overrides of the sampling
settings and the token budget (`REQUEST_KEYS`); every other override (vllm.*, target.*,
cache_dir, storage, tracking, promote, the profile, ...) is refused by name, and a deployment's run
may not swap the deployment's recipe: `check_request`. Prompts are a list of
strings or an s3:// JSONL in the configured bucket; outputs go only to
s3://<bucket>/<prefix>/<model>/inference/ as a new object, never over an existing one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

# The only overrides an inference request may carry: sampling and the token budget. Everything
# else (what is served, how, where it lives, who decides) comes from the deployment's recipe.
REQUEST_KEYS = (
    "infer.temperature",
    "infer.top_p",
    "infer.top_k_sampling",
    "infer.max_new_tokens",
    "seed",
)


def settings_or_none(recipe):
    from eagle3.ops import storage

    try:
        return storage.settings_from_recipe(recipe.storage)
    except storage.StorageError:
        return None


def check_request(
    config: Any, overrides: list[str] | None, deployment_config: Any, draft: str | None = None
) -> None:
    """Refuse any override outside REQUEST_KEYS, (in a deployment's run) another recipe, and a
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
        key = ".".join(parts)
        if key not in REQUEST_KEYS:
            raise PermissionError(
                f"override {key}: an inference request may not change it (a request sets only "
                f"{', '.join(REQUEST_KEYS)}, its prompts and output_uri; the rest comes from the "
                "deployment's recipe)"
            )
    if deployment_config is not None and config != deployment_config:
        raise PermissionError(
            f"config {str(config)[:120]!r}: this deployment serves {deployment_config!r}; a run "
            "may not swap its recipe"
        )


def output_key(recipe, model: str, output_uri: str | None, run_id: str) -> str | None:
    """The key the outputs go to: output_uri when it lies under <prefix>/<model>/inference/,
    else <run id>.jsonl there (None when no S3 is configured)."""
    from eagle3.ops import storage

    s = settings_or_none(recipe)
    if s is None:
        if output_uri:
            raise storage.OutsideScope(f"output_uri {output_uri}: no S3 bucket configured")
        return None
    if output_uri:
        return storage.check_output_uri(s, model, output_uri)
    return storage.inference_prefix(s, model) + f"{run_id}.jsonl"


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


def load_prompts(recipe, prompts: Any) -> list[str]:
    """The prompt strings of a list (strings, or objects with `prompt`) or an s3:// JSONL."""
    from eagle3.ops import storage

    if isinstance(prompts, str):
        if not prompts.startswith("s3://"):
            raise ValueError(
                f"prompts {prompts!r}: give a list of strings or an s3:// URI of a JSONL"
            )
        s = settings_or_none(recipe)
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


def generate(
    recipe,
    draft_dir: str,
    prompts: list[str],
    temperature: float | None,
    max_new_tokens: int | None,
) -> list[dict]:
    """One row per prompt (text, new_tokens, tau, verify_steps, tokens_per_s, seconds), by our
    engine or (infer.engine: vllm) a vLLM server holding the head; every prompt is checked to
    fit before the first generation."""
    if recipe.infer.engine == "vllm":
        return generate_vllm(recipe, draft_dir, prompts, temperature, max_new_tokens)
    from eagle3.infer import engine as eng
    from eagle3.traffic.record import acceptance_of_lengths

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
                "messages": [{"role": "user", "content": p}],
                "text": tok.decode(res.tokens, skip_special_tokens=True),
                "token_ids": [int(t) for t in res.tokens],
                "finish_reason": res.stop_reason,
                "acceptance": acceptance_of_lengths(res.accept_lengths).to_dict(),
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
    """A vLLM server holding the head for the length of the call (infer.engine: vllm)."""
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


def write_outputs(recipe, rows: list[dict], key: str) -> str:
    """The rows as a new JSONL object at `key`; a retry after a write that landed finds the same
    rows there, anything else there is refused."""
    from eagle3.ops import storage

    s = settings_or_none(recipe)
    try:
        storage.write_jsonl(s, key, rows, overwrite=False)
    except storage.PreconditionFailed:
        if storage.read_jsonl(s, key) != rows:
            raise storage.OutsideScope(
                f"s3://{s.bucket}/{key} exists; outputs never replace it"
            ) from None
    return f"s3://{s.bucket}/{key}"


def summarize(rows: list[dict], champ: dict, out_uri: str | None) -> dict:
    """The run's totals: tokens, the engine's tau weighted by verify steps (the prefill's first
    token counts in no step), tokens per second, what was served and where the outputs went."""
    tokens = sum(x["new_tokens"] for x in rows)
    steps = sum(x["verify_steps"] for x in rows)
    secs = sum(x["seconds"] for x in rows)
    return {
        "count": len(rows),
        "new_tokens": tokens,
        "tau": sum(x["tau"] * x["verify_steps"] for x in rows) / steps if steps else 0.0,
        "tokens_per_s": tokens / secs if secs else 0.0,
        "champion": {k: champ[k] for k in ("model", "version", "source", "uri")},
        "output_uri": out_uri,
        "outputs": rows,
    }
