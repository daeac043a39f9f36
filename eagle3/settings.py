"""The `EAGLE3_*` environment variables: one typed place that names each, its default and meaning.

Read on access (`settings()` builds a fresh object from the current environment), never cached
at import: tests and `eagle3 stack` set variables at run time. An empty variable counts as unset.
A malformed value raises SettingsError naming the variable (the CLI exits 2 on it). None of these
is a secret: the S3 keys travel as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (boto3's own
variables), which nothing here reads or logs. docs/CONTRACTS.md §1 lists them for users.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(ValueError):
    """An EAGLE3_* variable holds a value of the wrong type; the message names it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="EAGLE3_", env_ignore_empty=True, extra="ignore", frozen=True
    )

    home: Path = Field(
        Path(".eagle3"),
        description="the fallback MLflow store (sqlite) when no tracking URI is set",
    )
    stack_dir: Path = Field(
        Path(".eagle3/stack"), description="`eagle3 stack` state: stack.env, stack.json, logs"
    )
    prefect_port: int | None = Field(None, ge=1, le=65535, description="default 4200")
    mlflow_port: int | None = Field(None, ge=1, le=65535, description="default 5000")
    s3_port: int | None = Field(None, ge=1, le=65535, description="default 8333")
    s3_bucket: str | None = Field(None, description="the bucket when the recipe names none")
    cache: Path | None = Field(
        None, description="models, wheels, data sets (default $XDG_CACHE_HOME/eagle3)"
    )
    heads_dir: Path | None = Field(None, description="shipped heads (default <repo>/heads)")
    vllm_venv: Path | None = Field(None, description="vLLM's venv (default <repo>/.venv-vllm)")
    vllm_dir: Path = Field(Path(".eagle3/vllm"), description="vLLM servers' logs and records")
    retry_delay: float = Field(
        1.0, ge=0, description="scales the flows' S3/MLflow retry delays (1, 2, 4 s)"
    )
    progress: bool | None = Field(None, description="progress bars (default: when a terminal)")
    gpu_slots: int = Field(1, ge=1, description="GPU-bound Prefect tasks at once")


def settings() -> Settings:
    """The variables as the environment sets them now."""
    try:
        return Settings()
    except ValidationError as e:
        raise SettingsError(_explain(e)) from None


def env_name(field: str) -> str:
    return f"EAGLE3_{field.upper()}"


def _explain(e: ValidationError) -> str:
    import os

    parts = []
    for err in e.errors():
        name = env_name(str(err["loc"][0])) if err["loc"] else "EAGLE3_*"
        parts.append(f"{name}={os.environ.get(name, '')!r}: {err['msg']}")
    return "; ".join(parts)
