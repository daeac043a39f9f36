"""What every flow shares: recipe resolution, the stack environment, MLflow run scopes, retries.

Flows only orchestrate; the work lives in eagle3 (data, train, eval, infer) and eagle3.ops.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from eagle3.env import disable_telemetry
from eagle3.settings import settings

disable_telemetry()
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

ROOT = Path(__file__).resolve().parents[1]
# Retry delays (seconds) for S3 and MLflow calls; short, because the local stack answers at once
# or not at all. EAGLE3_RETRY_DELAY scales them (0 in tests that want fast faults).
_DELAY = settings().retry_delay
RETRY_DELAYS = [1 * _DELAY, 2 * _DELAY, 4 * _DELAY]


def show_progress() -> bool:
    """Progress bars when a person watches (a terminal), not in workers, CI or tests."""
    flag = settings().progress
    if flag is not None:
        return flag
    import sys

    return sys.stderr.isatty()


def resolve_recipe(recipe: Any, overrides: list[str] | None = None, profile: str | None = None):
    """A Recipe from a Recipe, a dict (its model_dump), or a path to a YAML recipe."""
    from eagle3.config import Recipe, build_recipe, load_recipe

    if isinstance(recipe, Recipe):
        if not overrides and not profile:
            return recipe
        tree = recipe.model_dump(mode="json")
        return build_recipe(tree, overrides, profile, source=f"<recipe {recipe.name}>")
    if isinstance(recipe, dict):
        return build_recipe(recipe, overrides, profile, source="<recipe dict>")
    path = Path(str(recipe))
    if not path.is_absolute() and not path.exists() and (ROOT / path).exists():
        path = ROOT / path
    return load_recipe(path, overrides, profile)


def recipe_tags(recipe) -> list[str]:
    from eagle3.models.target import TargetSource

    return [f"target:{TargetSource.of(recipe.target).slug}", f"recipe:{recipe.name}"]


def tag_flow_run(recipe) -> None:
    """Add the target's tags to the current flow run, however it was started (CLI, deployment,
    a plain call); tasks and subflows started from here inherit them through `tags()`."""
    try:
        from prefect import get_client
        from prefect.runtime import flow_run

        if not flow_run.id:
            return
        with get_client(sync_client=True) as c:
            run = c.read_flow_run(flow_run.id)
            want = sorted(set(run.tags) | set(recipe_tags(recipe)))
            if want != sorted(run.tags):
                c.update_flow_run(run.id, tags=want)
    except Exception as e:  # tags are a convenience: never fail a run for them
        print(f"warning: could not tag the flow run: {e}")


def flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:
        return None


def flow_run_url() -> str | None:
    """The UI page of the current flow run (the address Prefect logs as "View at")."""
    try:
        from prefect.runtime import flow_run
        from prefect.settings import get_current_settings

        ui = get_current_settings().ui_url
        return f"{ui.rstrip('/')}/runs/flow-run/{flow_run.id}" if ui and flow_run.id else None
    except Exception:
        return None


def s3_retryable(task, task_run, state) -> bool:
    """Retry transport failures (endpoint down, 5xx); never bad credentials or corrupt data."""
    from eagle3.ops.storage import IntegrityError, S3AuthError, S3Unavailable

    try:
        state.result()
    except (S3AuthError, IntegrityError):
        return False
    except S3Unavailable:
        return True
    except Exception as e:  # e.g. a botocore error not wrapped yet
        return "unreachable" in str(e).lower() or "connect" in str(e).lower()
    return False


def transient(task, task_run, state) -> bool:
    """Retry what may pass: S3 or MLflow unreachable or failing with 5xx. Never retried: bad
    keys, corrupt or conflicting data, another registry's prefix, bad input."""
    from eagle3.ops.storage import S3Unavailable, StorageError

    try:
        state.result()
    except S3Unavailable:
        return True
    except (StorageError, ValueError, LookupError):
        return False
    except Exception as e:
        if type(e).__name__ == "MlflowException":
            return getattr(e, "error_code", "") in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE")
        text = str(e).lower()
        return any(w in text for w in ("unreachable", "connect", "timed out", "max retries"))
    return False


def prefect_step(name: str, fn, *args, **kwargs):
    """eagle3.ops.promotion's stages as Prefect tasks: retried when the failure may pass, never
    cached (each stage reads the live state of S3 and the registry)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    t = task(
        fn,
        name=name,
        retries=3,
        retry_delay_seconds=RETRY_DELAYS,
        retry_condition_fn=transient,
        cache_policy=NO_CACHE,
        persist_result=False,
    )
    return t(*args, **kwargs)


def tracker(recipe):
    from eagle3.ops.tracking import Tracker

    return Tracker(recipe.tracking)


@contextlib.contextmanager
def mlflow_run(recipe, name: str, parent_id: str | None = None, params: bool = True):
    """A (nested) MLflow run for one stage; FAILED if the stage raises, KILLED on Ctrl-C."""
    from eagle3.ops.tracking import stage_run

    t = tracker(recipe)
    tags = {"prefect.flow_run_id": flow_run_id()}
    with stage_run(t, recipe, name, parent_id, params=params, tags=tags) as run_id:
        yield t, run_id


def write_json(path: str | Path, obj: Any) -> Path:
    from eagle3.io import write_json_atomic

    return write_json_atomic(path, obj)


def ensure_gpu_limit(limit: int | None = None) -> None:
    """Create the `gpu` tag concurrency limit (one GPU-bound task at a time by default)."""
    try:
        from prefect import get_client
        from prefect.exceptions import ObjectNotFound

        n = limit or settings().gpu_slots
        with get_client(sync_client=True) as client:
            try:
                client.read_concurrency_limit_by_tag("gpu")
            except ObjectNotFound:
                client.create_concurrency_limit(tag="gpu", concurrency_limit=n)
    except Exception as e:  # never fail a run for want of a limit
        from prefect.logging import get_run_logger

        with contextlib.suppress(Exception):
            get_run_logger().warning(f"could not ensure the `gpu` concurrency limit: {e}")
