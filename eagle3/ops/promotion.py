"""Promotion, rollback and reconcile of a registered model's champion (flows and the CLI call these).

promote: repair any split first (reconcile) -> gate against the champion -> upload the version
(immutable, resumable) -> compare-and-swap champion.json, gated again against the champion it
replaces -> the alias follows. If the alias cannot follow, champion.json is put back; a commit
that failed after its write may have landed is marked aborted on the version, and the next
reconcile puts it back. So a failed promotion never leaves its version as the champion.

Each stage runs through `step(name, fn, *args)`: the CLI calls it directly, the Prefect flow as a
task with retries. Stages are idempotent (a retried commit recognises its own promotion id).

One file over 400 lines because promote, rollback and reconcile are one state machine over the
same pointer and alias; splitting them would spread its invariants.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

from eagle3.ops import champion as ch
from eagle3.ops import storage
from eagle3.ops.champion import Place
from eagle3.ops.gate import as_decision
from eagle3.ops.storage import PreconditionFailed, StorageError, fault_point


class PromotionFailed(StorageError):
    """The promotion stopped after its pointer write; the message says what is live now."""


def run_step(name: str, fn, *args, **kwargs):
    """Run one stage directly (the CLI); flows pass a step that wraps it in a Prefect task."""
    return fn(*args, **kwargs)


# --- the numbers the gate compares --------------------------------------------------------------------
def registry_numbers(place: Place, version: str, baseline: str) -> dict[str, Any]:
    from eagle3.ops.gate import gate_metrics

    tags = dict(place.tracker.version(place.model, version).tags)
    return gate_metrics(tags, baseline, tags.get("eval_set"))


def champion_numbers(
    place: Place, ptr: dict[str, Any] | None, measured: dict | None, baseline: str
) -> dict[str, Any] | None:
    """The gate numbers of the champion `ptr` names: measured on this eval set by the evaluation
    when it benchmarked that very version, else those recorded at its promotion, else its tags."""
    from eagle3.ops.gate import GateNumbers

    if ptr is None:
        return None
    v = str(ptr["version"])
    if measured and str(GateNumbers.model_validate(measured).version) == v:
        return measured
    recorded = GateNumbers.model_validate(ptr.get("metrics") or {})
    if recorded.tau is None or recorded.speedup_baseline != baseline:
        m = registry_numbers(place, v, baseline)
    else:
        m = recorded.to_dict()
    return {**m, "version": v, "source": "champion.json"}


def current_champion(place: Place) -> tuple[str | None, str]:
    """(version, where from): champion.json when S3 is configured, else the MLflow alias."""
    if place.s3 is not None:
        ptr, _ = ch.read_pointer(place)
        return (str(ptr["version"]) if ptr else None), "s3"
    return ch.alias_version(place), "mlflow"


# --- versions -----------------------------------------------------------------------------------------
def check_recorded_sha256(place: Place, version: str, tags: dict, draft_dir: Path) -> None:
    """Every file the version's `sha256.<name>` tags name is in `draft_dir` with those bytes."""
    for k, v in tags.items():
        if k.startswith("sha256."):
            f = Path(draft_dir) / k.removeprefix("sha256.")
            if not f.is_file() or storage.sha256_file(f) != v:
                raise storage.IntegrityError(
                    f"{f}: missing or differs from what registry version {place.model} "
                    f"v{version} recorded (sha256); refusing to use it"
                )


def verify_against_registry(place: Place, version: str, draft_dir: Path) -> None:
    """The local checkpoint must be the bytes the registry version recorded (sha256.* tags)."""
    check_recorded_sha256(
        place, version, dict(place.tracker.version(place.model, version).tags), draft_dir
    )


def fetch_version(place: Place, version: str, dest: Path) -> Path:
    """A registered version's checkpoint: from S3 when it was committed there by THIS registry
    (verified), else from the MLflow registry (checked against the version's sha256 tags)."""
    mv = place.tracker.version(place.model, version)
    man = storage.read_manifest(place.s3, place.model, version) if place.s3 else None
    if man is not None:
        if man.get("mlflow_run_id") and man["mlflow_run_id"] != mv.run_id:
            raise ch.RegistryMismatch(
                f"s3://{place.s3.bucket}/{storage.version_key(place.s3, place.model, version)}/ "
                f"holds v{version} of run {man['mlflow_run_id']}, not this registry's run {mv.run_id}"
            )
        return storage.download_version(place.s3, place.model, version, dest)
    out = place.tracker.download_version(place.model, version, Path(dest).parent / "mlflow")
    check_recorded_sha256(place, version, dict(mv.tags), out)
    return out


def manifest_meta(place: Place, recipe, version: str, rid: str, candidate: dict) -> dict:
    from eagle3.config import flatten
    from eagle3.names import redact, redact_mapping

    mv = place.tracker.version(place.model, version)
    tags = dict(mv.tags)
    return {
        "registry_id": rid,
        "mlflow_run_id": mv.run_id,
        "tracking_uri": redact(place.tracker.uri),
        "metrics": candidate,
        "data_digest": tags.get("data_digest"),
        "target": {
            "id": tags.get("target"),
            "kind": recipe.target.kind,
            "revision": tags.get("target_revision") or recipe.target.revision,
        },
        "eval_set": tags.get("eval_set"),
        "recipe": redact_mapping(flatten(recipe)),  # immutable: nothing secret goes in
    }


# --- the commit -----------------------------------------------------------------------------------------
def commit(
    place: Place,
    version: str,
    uploaded: dict,
    candidate: dict,
    problems: list[str],
    promote_cfg: Any,
    measured: dict | None,
    promotion_id: str,
    rid: str,
) -> dict[str, Any]:
    """Compare-and-swap champion.json to `version`, gated against the champion it replaces (read
    with the ETag the write is conditional on). Returns {"committed", "decision", "old", "etag",
    "pointer"}; a retry after a write that landed returns that commit."""
    from eagle3.ops.gate import decide

    baseline = promote_cfg.speedup_baseline
    for _ in range(ch.CAS_ATTEMPTS):
        ptr, etag = ch.read_pointer(place)
        if ptr is not None and ptr.get("promotion_id") == promotion_id:
            return {"committed": True, "pointer": ptr, "old": ch.previous(ptr), "etag": etag}
        if (
            ptr is not None
            and str(ptr["version"]) == str(version)
            and ptr["manifest_sha256"] == uploaded["manifest_sha256"]
        ):
            return {"committed": True, "pointer": ptr, "old": None, "etag": etag, "already": True}
        decision = decide(
            candidate, champion_numbers(place, ptr, measured, baseline), promote_cfg, problems
        )
        if not decision.promote:
            return {"committed": False, "decision": decision.to_dict(), "pointer": ptr}
        new = ch.successor(
            ptr,
            registered_model=place.model,
            version=str(version),
            uri=uploaded["uri"],
            manifest_sha256=uploaded["manifest_sha256"],
            mlflow_run_id=uploaded["manifest"].get("mlflow_run_id"),
            registry_id=rid,
            promotion_id=promotion_id,
            promoted_at=ch.now(),
            metrics=candidate,
        )
        fault_point("before_pointer_write", model=place.model, version=str(version))
        try:
            tag = ch.write_pointer(place, new, etag)
        except PreconditionFailed:
            continue  # another promotion moved it: re-read, gate again against that one
        fault_point("after_pointer_write", model=place.model, version=str(version))
        return {
            "committed": True,
            "decision": decision.to_dict(),
            "pointer": new,
            "old": ptr,
            "etag": tag,
        }
    raise ch.ChampionContention(f"{place.pointer_uri} kept changing during the promotion")


def promote(
    place: Place,
    recipe,
    version: str,
    draft_dir: Path,
    candidate: dict,
    problems: list[str],
    measured: dict | None = None,
    step=run_step,
) -> dict[str, Any]:
    """Gate, upload, commit, alias. Returns {"promoted", "decision", ...}; raises when a stage
    fails, after putting the pointer back (or marking the attempt for reconcile)."""
    from eagle3.ops.gate import decide

    cfg = recipe.promote
    out: dict[str, Any] = {"model": place.model, "version": str(version), "promoted": False}
    out["reconciled"] = step("reconcile", ch.reconcile, place)
    ptr, _ = ch.read_pointer(place)
    champ = champion_numbers(place, ptr, measured, cfg.speedup_baseline)
    if ptr is not None and str(ptr["version"]) == str(version):
        champ = None  # promoting the champion again: nothing to compare with
    decision = decide(candidate, champ, cfg, problems)
    out["decision"] = decision.to_dict()
    if not decision.promote:
        return out
    verify_against_registry(place, version, draft_dir)
    rid = ch.registry_id(place)
    meta = manifest_meta(place, recipe, version, rid, candidate)
    uploaded = step(
        "upload-to-s3", storage.upload_version, place.s3, place.model, version, str(draft_dir), meta
    )
    pid = ch.new_id()
    try:
        done = step(
            "commit-champion-pointer",
            commit,
            place,
            version,
            uploaded,
            candidate,
            problems,
            cfg,
            measured,
            pid,
            rid,
        )
    except BaseException as e:
        # The write may have landed before the failure: reconcile puts such a pointer back.
        with contextlib.suppress(Exception):
            ch.mark_aborted(place, str(version), pid, f"commit failed: {e}")
        raise
    if not done["committed"]:
        out["decision"] = done["decision"]
        out["champion_moved"] = True
        return out
    try:
        step("follow-champion-alias", ch.follow_alias, place, done["pointer"])
    except BaseException as e:
        note = "champion.json already named this version; it stays"
        if not done.get("already"):
            with contextlib.suppress(Exception):
                ch.mark_aborted(place, str(version), pid, f"alias could not follow: {e}")
            try:
                note = step("undo-champion-pointer", ch.undo, place, done)
            except Exception as e2:
                note = (
                    f"champion.json could not be put back either ({e2}); run "
                    "`eagle3 promote --reconcile` once S3 answers"
                )
            with contextlib.suppress(Exception):  # an alias write whose answer was lost
                ch.follow_alias(place)
        raise PromotionFailed(
            f"{place.model} v{version}: the MLflow alias could not follow champion.json ({e}); "
            f"{note}"
        ) from e
    place.tracker.set_version_tags(
        place.model, version, {"s3_uri": uploaded["uri"], "promoted": "true"}
    )
    old = done.get("old")
    out.update(
        promoted=True,
        decision=done.get("decision") or out["decision"],
        uri=uploaded["uri"],
        pointer=place.pointer_uri,
        manifest_sha256=uploaded["manifest_sha256"],
        previous=None if old is None else str(old["version"]),
    )
    return out


def rollback(place: Place, step=run_step) -> dict[str, Any]:
    """Point champion.json back at the previous champion, then the alias; put it back if the
    alias cannot follow."""
    # A damaged champion is what a rollback repairs: reconcile reports it instead of refusing.
    reconciled = step("reconcile", ch.reconcile, place, damaged_ok=True)
    done = step("rollback-champion-pointer", ch.rollback_pointer, place, ch.new_id())
    try:
        step("follow-champion-alias", ch.follow_alias, place, done["new"])
    except BaseException as e:
        note = "run `eagle3 promote --reconcile`"
        if done.get("old") is not None:
            note = step("undo-champion-pointer", ch.undo, place, done)
        raise PromotionFailed(f"rollback: the alias could not follow ({e}); {note}") from e
    new, old = done["new"], done.get("old") or {}
    return {
        "champion": str(new["version"]),
        "rolled_back_from": str(new.get("rolled_back_from", old.get("version"))),
        "uri": new["uri"],
        "reconciled": reconciled,
        "repaired": done.get("repaired", []),
    }


# --- what the flow and the CLI call -----------------------------------------------------------------------
def promote_recipe(
    recipe,
    version: str | None = None,
    decision: dict | None = None,
    draft_dir: str | Path | None = None,
    parent_run_id: str | None = None,
    step=run_step,
    run_tags: dict | None = None,
) -> dict[str, Any]:
    """Promote `version` (default: the `candidate` alias) of the recipe's registered model.

    `decision`: the evaluation's (its candidate numbers, and the champion it benchmarked on the
    same eval set); without it the numbers come from the version's registry tags.
    """
    from eagle3.models.checkpoint import check_checkpoint
    from eagle3.ops.tracking import stage_run

    place = ch.place_for(recipe)
    if version is None:
        mv = place.tracker.alias_version(place.model, "candidate")
        if mv is None:
            raise ValueError(
                f"registered model {place.model} has no `candidate` version; run the pipeline "
                "or pass --version"
            )
        version = str(mv.version)
    version = str(version)
    baseline = recipe.promote.speedup_baseline
    given = as_decision(decision) if decision else None
    candidate = (
        given.candidate.to_dict()
        if given and given.candidate.model_fields_set
        else registry_numbers(place, version, baseline)
    )
    measured = given.champion.to_dict() if given and given.champion else None
    with (
        stage_run(place.tracker, recipe, "promote", parent_run_id, tags=run_tags) as run_id,
        tempfile.TemporaryDirectory(prefix="eagle3-promote-") as tmp,
    ):
        draft = Path(
            draft_dir or step("fetch-draft", fetch_version, place, version, Path(tmp) / "d")
        )
        problems = check_checkpoint(draft)
        if place.s3 is None:
            out = _gate_only(place, recipe, version, candidate, problems, measured)
        else:
            out = promote(place, recipe, version, draft, candidate, problems, measured, step)
        d = as_decision(out["decision"])
        place.tracker.set_tags(
            run_id,
            {
                "eagle3.gate": d.verdict,
                "eagle3.gate_reasons": "; ".join(d.reasons)[:4000],
                "eagle3.version": version,
                "eagle3.promoted": str(out["promoted"]).lower(),
                "eagle3.promotion_skipped": out.get("skipped"),
            },
        )
        if out["promoted"]:
            place.tracker.set_tags(
                parent_run_id or run_id,
                {"eagle3.promoted_version": version, "eagle3.s3_uri": out["uri"]},
            )
    return out


def _gate_only(place, recipe, version, candidate, problems, measured) -> dict[str, Any]:
    """No S3 configured: the gate runs (against the MLflow alias), nothing moves."""
    from eagle3.ops.gate import GateNumbers, decide

    cur = ch.alias_version(place)
    champ = None
    if cur is not None and cur != version:
        same = measured and str(GateNumbers.model_validate(measured).version) == cur
        champ = measured if same else None
        champ = champ or {
            **registry_numbers(place, cur, recipe.promote.speedup_baseline),
            "version": cur,
        }
    d = decide(candidate, champ, recipe.promote, problems)
    msg = "no S3 bucket configured: set storage.bucket in the recipe, or EAGLE3_S3_BUCKET"
    return {
        "model": place.model,
        "version": version,
        "promoted": False,
        "decision": d.to_dict(),
        "skipped": msg if d.promote else None,
    }


def rollback_recipe(recipe, step=run_step) -> dict[str, Any]:
    place = ch.place_for(recipe)
    place.need_s3()
    return {"model": place.model, **rollback(place, step)}


def reconcile_recipe(recipe, step=run_step) -> dict[str, Any]:
    place = ch.place_for(recipe)
    place.need_s3()
    changes = step("reconcile", ch.reconcile, place)
    ptr, _ = ch.read_pointer(place)
    return {
        "model": place.model,
        "changes": changes,
        "champion": None if ptr is None else str(ptr["version"]),
    }


# --- what the user reads --------------------------------------------------------------------------------
def describe_promotion(out: dict) -> str:
    head = f"{out['model']} v{out['version']}"
    if out["promoted"]:
        return f"promoted {head} -> {out['uri']} (champion.json, alias champion)"
    if out.get("skipped"):
        return f"not promoted (the gate passed): {out['skipped']}"
    why = "; ".join(as_decision(out["decision"]).reasons)
    if out.get("champion_moved"):
        return f"not promoted: {head}: the champion changed during the promotion: {why}"
    return f"not promoted: {head}: {why}"


def describe_reconcile(out: dict) -> str:
    champ = f"v{out['champion']}" if out["champion"] else "none"
    if not out["changes"]:
        return (
            f"{out['model']}: champion.json and the alias agree (champion {champ}); nothing changed"
        )
    return f"{out['model']}: champion {champ}; changed:\n" + "\n".join(
        f"  - {c}" for c in out["changes"]
    )
