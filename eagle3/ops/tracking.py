"""MLflow 3.17: runs, params, metrics, the data manifest as a dataset input, artifacts, registry.

Everything goes through an explicit `MlflowClient` and explicit run ids (no fluent active-run
state), so Prefect tasks on any thread log to the right run. Tracking URI: the recipe's
`tracking.uri`, else MLFLOW_TRACKING_URI, else `sqlite:///<home>/mlflow.db` (never the file store),
where <home> is $EAGLE3_HOME or `.eagle3` in the working directory.

One file over 400 lines because it is the one MLflow boundary: runs, dataset inputs, artifacts
and the registry share the client and the naming (champion.py only catches its exception type).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eagle3.io import sha256_json
from eagle3.names import redact_value

if TYPE_CHECKING:
    from eagle3.eval.report import BenchReport, VllmBlock

# MLflow limits: 500 chars per param value in older servers (6000 now); we cut at 500 for safety.
_PARAM_MAX = 500


def home() -> Path:
    from eagle3.settings import settings

    return settings().home.resolve()


def tracking_uri(tracking_cfg: Any = None) -> str:
    uri = getattr(tracking_cfg, "uri", None) or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("file:") or (not re.match(r"^[a-z][a-z0-9+.-]*:", uri)):
            raise ValueError(
                f"tracking.uri {uri!r}: the MLflow file store is deprecated; use sqlite:///PATH "
                "or an http(s) server"
            )
        return uri
    h = home()
    h.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{h / 'mlflow.db'}"


def registered_model_name(recipe: Any) -> str:
    if recipe.tracking.registered_model:
        return recipe.tracking.registered_model
    from eagle3.models.target import TargetSource

    return f"eagle3-{TargetSource.of(recipe.target).slug}"


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def is_local(uri: str) -> bool:
    return uri.startswith("sqlite:")


# MLflow 3's UI opens an experiment by its kind: without one it may infer GenAI and show Traces and
# Judges. Ours are model training: runs, metric charts, the registry.
KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# Kinds nobody chose (absent, or what the UI inferred and stored): ours replaces them.
_UNCHOSEN_KINDS = {
    "",
    "genai_development_inferred",
    "custom_model_development_inferred",
    "no_inferred_type",
}


class Tracker:
    """One experiment on one tracking server; all calls take explicit run ids."""

    def __init__(self, tracking_cfg: Any = None):
        from mlflow import MlflowClient

        # No mlflow.set_tracking_uri: it sets MLFLOW_TRACKING_URI process-wide, and the next
        # Tracker (another recipe's) would silently talk to this registry.
        self.uri = tracking_uri(tracking_cfg)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        name = getattr(tracking_cfg, "experiment", None) or "eagle3"
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            location = None
            if is_local(self.uri):
                # Next to the sqlite file, not in the working directory.
                db = Path(self.uri.removeprefix("sqlite:///"))
                location = (db.parent / "mlartifacts").resolve().as_uri()
            try:
                self.experiment_id = self.client.create_experiment(
                    name, artifact_location=location, tags={KIND_TAG: MODEL_TRAINING}
                )
            except Exception:  # created by a concurrent process
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp is not None:
            self.experiment_id = exp.experiment_id
            if exp.tags.get(KIND_TAG, "") in _UNCHOSEN_KINDS:  # made before the tag, or inferred
                self.client.set_experiment_tag(self.experiment_id, KIND_TAG, MODEL_TRAINING)
        self.experiment = name

    # --- runs -----------------------------------------------------------------------------------
    def start_run(self, name: str, parent_id: str | None = None, tags: dict | None = None) -> str:
        t = {k: str(redact_value(v, k)) for k, v in (tags or {}).items() if v is not None}
        if parent_id:
            t["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=t)
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def run(self, run_id: str):
        return self.client.get_run(run_id)

    def artifact_uri(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.artifact_uri

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(redact_value(v, k))) for k, v in tags.items() if v is not None]
        if items:
            self.client.log_batch(run_id, tags=items)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = []
        for k, v in params.items():
            v = redact_value(v, k)
            if isinstance(v, (list, dict)):
                v = json.dumps(v, sort_keys=True)
            text = "" if v is None else str(v)
            items.append(Param(k, text[:_PARAM_MAX]))
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(_metric_key(k), float(v), ts, int(step or 0))
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def log_dataset(self, run_id: str, manifest: dict[str, Any], path: str | Path) -> None:
        """The data manifest as an MLflow dataset input (name, digest, source = manifest path)."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        source = LocalArtifactDatasetSource(str(Path(path).resolve()))
        name = f"eagle3-data-{str(manifest.get('digest', ''))[:12]}"
        ds = MetaDataset(source=source, name=name, digest=str(manifest.get("digest", ""))[:36])
        tag = InputTag(key="mlflow.data.context", value="training")
        self.client.log_inputs(run_id, [DatasetInput(dataset=ds._to_mlflow_entity(), tags=[tag])])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(run_id, str(p), artifact_path)

    def log_json(self, run_id: str, obj: Any, name: str) -> None:
        self.client.log_dict(run_id, obj, name)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_figure(self, run_id: str, fig, name: str) -> None:
        import matplotlib.pyplot as plt

        try:
            self.client.log_figure(run_id, fig, name)
        finally:
            plt.close(fig)  # pyplot keeps every figure alive until closed

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    # --- registry --------------------------------------------------------------------------------
    def ensure_model(self, name: str, description: str | None = None) -> None:
        """Create the registered model once, tagged with a random `eagle3.registry_id` that tells
        this registry apart from any other one sharing the bucket (eagle3.ops.champion)."""
        import uuid

        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            desc = description or "EAGLE-3 draft heads (eagle3); aliases candidate and champion"
            try:
                self.client.create_registered_model(
                    name, tags={"eagle3.registry_id": uuid.uuid4().hex}, description=desc
                )
            except MlflowException:
                self.client.get_registered_model(name)  # created concurrently

    def register(
        self, name: str, run_id: str, artifact_path: str = "draft", tags: dict | None = None
    ) -> str:
        """A new version whose source is the run's `artifact_path` folder; alias `candidate`."""
        self.ensure_model(name, "EAGLE-3 draft heads (eagle3); aliases candidate and champion")
        source = f"{self.artifact_uri(run_id)}/{artifact_path}"
        mv = self.client.create_model_version(
            name,
            source=source,
            run_id=run_id,
            tags={k: str(redact_value(v, k)) for k, v in (tags or {}).items()},
        )
        self.client.set_registered_model_alias(name, "candidate", mv.version)
        return str(mv.version)

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        self.client.set_registered_model_alias(name, alias, str(version))

    def delete_alias(self, name: str, alias: str) -> None:
        self.client.delete_registered_model_alias(name, alias)

    def alias_version(self, name: str, alias: str):
        """The ModelVersion behind an alias, or None."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None

    def version(self, name: str, version: str | int):
        return self.client.get_model_version(name, str(version))

    def set_version_tags(self, name: str, version: str | int, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(name, str(version), k, str(redact_value(v, k)))

    def set_model_tag(self, name: str, key: str, value: Any) -> None:
        self.client.set_registered_model_tag(name, key, str(redact_value(value, key)))

    def model_tags(self, name: str) -> dict[str, str]:
        return dict(self.client.get_registered_model(name).tags)

    def download_version(self, name: str, version: str | int, dest: str | Path) -> Path:
        import mlflow

        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        out = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}", dst_path=str(dest), tracking_uri=self.uri
        )
        return Path(out)

    def run_url(self, run_id: str) -> str | None:
        if self.uri.startswith("http"):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return None

    def model_url(self, name: str, version: str | int | None = None) -> str | None:
        if not self.uri.startswith("http"):
            return None
        base = f"{self.uri.rstrip('/')}/#/models/{name}"
        return f"{base}/versions/{version}" if version else base


@contextlib.contextmanager
def stage_run(tracker: Tracker, recipe: Any, name: str, parent_id=None, params=None, tags=None):
    """A (nested) MLflow run for one stage, yielding its id; FAILED if the stage raises, KILLED on
    Ctrl-C. Params (the flattened recipe) are logged on top-level runs unless `params` says."""
    from eagle3.config import flatten
    from eagle3.models.target import TargetSource

    base = {
        "eagle3.stage": name,
        "eagle3.target": TargetSource.of(recipe.target).slug,
        "eagle3.recipe": recipe.name,
        "git.commit": git_commit(),
    }
    run_id = tracker.start_run(name, parent_id=parent_id, tags={**base, **(tags or {})})
    if params if params is not None else parent_id is None:
        tracker.log_params(run_id, flatten(recipe))
    try:
        yield run_id
    except KeyboardInterrupt:
        tracker.end_run(run_id, "KILLED")
        raise
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    else:
        tracker.end_run(run_id, "FINISHED")


def _metric_key(k: str) -> str:
    # MLflow allows alphanumerics, _ - . space : / ; anything else becomes _
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", k)


# --- the benchmark report as metrics ------------------------------------------------------------------
def report_metrics(report: dict[str, Any] | BenchReport) -> dict[str, float]:
    """Flat metrics from a docs/CONTRACTS.md §4 report: overall names of §6, then
    `<dataset>/...`."""
    from eagle3.eval.report import as_report

    r = as_report(report)
    out: dict[str, float] = {"tau": float(r.overall.tau)}
    for k, v in r.overall.speedup.items():
        out[f"speedup_{k}"] = float(v)
    out["lossless"] = 1.0 if r.overall.lossless else 0.0  # null (sampling) logs as 0
    if r.tree_only is not None:  # the head without the prompt-lookup branch
        out["tau_tree_only"] = float(r.tree_only.tau)
        for k, v in r.tree_only.speedup.items():
            out[f"speedup_tree_only_{k}"] = float(v)
    alphas: dict[int, list[tuple[float, int]]] = {}
    tps: dict[str, list[float]] = {}
    for ds, s in r.datasets.items():
        out[f"{ds}/tau"] = float(s.tau)
        for k, v in s.speedup.items():
            out[f"{ds}/speedup_{k}"] = float(v)
        for k, v in s.tokens_per_s.items():
            out[f"{ds}/tokens_per_s_{k}"] = float(v)
            tps.setdefault(k, []).append(float(v))
        for i, a in enumerate(s.alpha):
            out[f"{ds}/alpha_{i}"] = float(a)
            alphas.setdefault(i, []).append((float(a), s.prompts or 1))
    for i, vals in alphas.items():
        w = sum(n for _, n in vals) or 1
        out[f"alpha_{i}"] = sum(a * n for a, n in vals) / w
    for k, vals in tps.items():
        out[f"tokens_per_s_{k}"] = sum(vals) / len(vals)
    if r.vllm is not None:
        out |= vllm_metrics(r.vllm)
    return out


def vllm_metrics(v: VllmBlock) -> dict[str, float]:
    """`vllm/...` metrics of an `eagle3 bench --engine vllm` report's `vllm` block."""
    out = {"vllm/acceptance_length": float(v.acceptance_length)}
    if v.lossless is not None:
        out["vllm/lossless"] = 1.0 if v.lossless else 0.0
    for i, a in enumerate(v.alpha):
        out[f"vllm/alpha_{i}"] = float(a)
    for i, a in enumerate(v.per_position_acceptance):
        out[f"vllm/acceptance_pos_{i}"] = float(a)
    for key, lv in v.concurrency.items():
        out[f"vllm/speedup_{key}"] = float(lv.speedup)
        out[f"vllm/tokens_per_s_{key}"] = float(lv.tokens_per_s["eagle3"])
        out[f"vllm/tokens_per_s_plain_{key}"] = float(lv.tokens_per_s["vllm"])
        out[f"vllm/acceptance_length_{key}"] = float(lv.acceptance_length)
        if lv.speedup_vs_best_headfree is not None:  # over the fastest of plain and ngram
            out[f"vllm/speedup_vs_best_headfree_{key}"] = float(lv.speedup_vs_best_headfree)
        if "ngram" in lv.tokens_per_s:
            out[f"vllm/tokens_per_s_ngram_{key}"] = float(lv.tokens_per_s["ngram"])
    for k, secs in v.start_seconds.items():
        out[f"vllm/start_seconds_{k}"] = float(secs)
    return out


def eval_set_signature(recipe: Any, report: dict[str, Any] | BenchReport) -> str:
    """What makes two evaluations comparable: target, datasets and their prompt counts, settings."""

    from eagle3.eval.report import as_report

    r = as_report(report)
    sig: dict[str, Any] = {
        "target": r.target,
        "datasets": {k: s.prompts for k, s in r.datasets.items()},
        "max_new_tokens": recipe.eval.max_new_tokens,
        "temperature": recipe.eval.temperature,
        "limit": recipe.eval.limit,
    }
    if r.engine_name != "eagle3":  # tau of a vLLM chain is not a tree's tau
        sig["engine"] = r.engine
    return sha256_json(sig)[:16]


# --- the data manifest and the trainer's numbers as metrics -------------------------------------------
def manifest_numbers(manifest: dict, stage: str = "data") -> dict[str, float]:
    """The manifest's counts, one level deep: data/samples.conversations, data/tokens.total, ..."""
    out = {}
    for k, v in manifest.items():
        items = v.items() if isinstance(v, dict) else [(None, v)]
        for k2, v2 in items:
            if isinstance(v2, (int, float)) and not isinstance(v2, bool):
                out[f"{stage}/{k}" + (f".{k2}" if k2 else "")] = float(v2)
    return out


def contract_names(metrics: dict[str, float]) -> dict[str, float]:
    """The trainer's keys plus the CONTRACTS §6 `eval/acc_<i>` names for its val/acc_<i>."""
    out = dict(metrics)
    for k, v in metrics.items():
        if k.startswith("val/acc_"):
            out["eval/acc_" + k.removeprefix("val/acc_")] = v
    return out
