"""The champion of a registered model: one source of truth, moved only by compare-and-swap.

champion.json in S3 names the champion; the MLflow alias `champion` follows it. champion.json is
only ever written conditionally (PutObject If-Match on the ETag that was read, If-None-Match for
the first one; SeaweedFS 4.48 and MinIO honour both), so of two promotions that read the same
champion only one can replace it: the other re-reads and is gated again against the new one.
registry.json, created once, binds `<prefix>/<model>/` to one MLflow registry, so a second
registry sharing the bucket can never move this champion or write its versions.

`follow_alias` points the alias at whatever champion.json names, re-reading after the write, so a
slow promotion can never leave the alias behind a newer pointer. `reconcile` repairs what a crash
or a failed write left (an aborted promotion's pointer is put back, then the alias follows) and
returns each change as a sentence.

champion.json: {registered_model, version, uri, manifest_sha256, mlflow_run_id, registry_id,
promotion_id, promoted_at, metrics, history: [earlier champions, oldest first]}.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from eagle3.ops import storage
from eagle3.ops.storage import PreconditionFailed, S3Settings, StorageError, fault_point

ALIAS = "champion"
BINDING = "registry.json"
REGISTRY_TAG = "eagle3.registry_id"
ABORT_TAG = "eagle3.aborted."  # + promotion id, on the model version whose promotion failed
CAS_ATTEMPTS = 20


class RegistryMismatch(StorageError):
    """The S3 prefix, or the version a pointer names, belongs to another MLflow registry."""


class ChampionContention(StorageError):
    """champion.json kept changing under us (CAS_ATTEMPTS conditional writes lost in a row)."""


@dataclass
class Place:
    """Where one registered model's champion lives: S3 (None when not configured) and MLflow."""

    s3: S3Settings | None
    tracker: Any  # eagle3.ops.tracking.Tracker
    model: str

    @property
    def pointer_uri(self) -> str:
        return f"s3://{self.s3.bucket}/{storage.pointer_key(self.s3, self.model)}"

    def need_s3(self) -> S3Settings:
        if self.s3 is None:
            raise StorageError(
                "no S3 bucket configured: set storage.bucket in the recipe, or EAGLE3_S3_BUCKET"
            )
        return self.s3


def place_for(recipe, tracker=None) -> Place:
    from eagle3.ops.tracking import Tracker, registered_model_name

    try:
        s3 = storage.settings_from_recipe(recipe.storage)
    except StorageError:
        s3 = None
    return Place(s3, tracker or Tracker(recipe.tracking), registered_model_name(recipe))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_id() -> str:
    return uuid.uuid4().hex


def fmt(version: str | None) -> str:
    return f"v{version}" if version is not None else "none"


# --- registry identity --------------------------------------------------------------------------------
def registry_id(place: Place) -> str:
    """The registered model's `eagle3.registry_id` tag: a random id set once per registry."""
    place.tracker.ensure_model(place.model)
    rid = place.tracker.model_tags(place.model).get(REGISTRY_TAG)
    if not rid:
        place.tracker.set_model_tag(place.model, REGISTRY_TAG, new_id())
        rid = place.tracker.model_tags(place.model)[REGISTRY_TAG]  # a concurrent setter wins
    return rid


def bind_registry(place: Place) -> str:
    """Claim `<prefix>/<model>/` for this registry (first come), or refuse another one's."""
    from eagle3.names import redact

    s3 = place.need_s3()
    rid = registry_id(place)
    key = s3.key(place.model, BINDING)
    body, _ = storage.get_object(s3, key)
    if body is None:
        mine = {
            "registry_id": rid,
            "registered_model": place.model,
            "tracking_uri": redact(place.tracker.uri),
            "bound_at": now(),
        }
        try:
            storage.put_bytes(
                s3, key, storage.json_bytes(mine), "application/json", if_none_match=True
            )
            return rid
        except PreconditionFailed:
            body = storage.get_bytes(s3, key)
    have = json.loads(body)
    if have.get("registry_id") != rid:
        raise RegistryMismatch(
            f"s3://{s3.bucket}/{s3.key(place.model)}/ belongs to another MLflow registry "
            f"({have.get('tracking_uri')}, id {str(have.get('registry_id'))[:8]}…), not to "
            f"{redact(place.tracker.uri)} (id {rid[:8]}…); refusing to touch it: point "
            "tracking.uri at the registry that owns it, or use another storage.prefix or "
            "tracking.registered_model"
        )
    return rid


def check_version_identity(place: Place, ptr: dict[str, Any]) -> None:
    """The version a pointer names must be this registry's (same MLflow run), never a namesake."""
    from mlflow.exceptions import MlflowException

    v = str(ptr["version"])
    try:
        mv = place.tracker.version(place.model, v)
    except MlflowException as e:
        if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RegistryMismatch(
            f"{place.pointer_uri} names v{v}, which registry {place.tracker.uri} does not have"
        ) from None
    want = ptr.get("mlflow_run_id")
    if want and mv.run_id != want:
        raise RegistryMismatch(
            f"{place.pointer_uri} names v{v} of run {want}, but this registry's v{v} comes from "
            f"run {mv.run_id}: not the same model; refusing to move the alias"
        )


# --- the pointer --------------------------------------------------------------------------------------
def read_pointer(place: Place) -> tuple[dict[str, Any] | None, str | None]:
    """(champion.json, its ETag), or (None, None) when there is no champion."""
    s3 = place.need_s3()
    body, etag = storage.get_object(s3, storage.pointer_key(s3, place.model))
    return storage.parse_pointer(s3, place.model, body), etag


def write_pointer(place: Place, new: dict[str, Any], etag: str | None) -> str:
    """Replace the pointer whose ETag is `etag` (None: create it); PreconditionFailed if it moved."""
    s3 = place.need_s3()
    body = storage.json_bytes(new)
    tag = storage.put_bytes(
        s3,
        storage.pointer_key(s3, place.model),
        body,
        "application/json",
        if_match=etag,
        if_none_match=etag is None,
    )
    return tag


def delete_pointer(place: Place, etag: str) -> None:
    s3 = place.need_s3()
    storage.delete_key(s3, storage.pointer_key(s3, place.model), if_match=etag)


def entry(ptr: dict[str, Any]) -> dict[str, Any]:
    """A pointer without its history: what goes onto the next pointer's history."""
    return {k: v for k, v in ptr.items() if k != "history"}


def previous(ptr: dict[str, Any]) -> dict[str, Any] | None:
    """The pointer this one replaced, exactly as it was (history is append-only)."""
    hist = list(ptr.get("history") or [])
    return {**hist[-1], "history": hist[:-1]} if hist else None


def successor(old: dict[str, Any] | None, **fields: Any) -> dict[str, Any]:
    history = [*old.get("history", []), entry(old)] if old else []
    return {**fields, "history": history}


# --- the alias follows -------------------------------------------------------------------------------
def alias_version(place: Place) -> str | None:
    mv = place.tracker.alias_version(place.model, ALIAS)
    return None if mv is None else str(mv.version)


def follow_alias(place: Place, committed: dict[str, Any] | None = None) -> str | None:
    """Point the alias at what champion.json names now; returns that version (None: none).

    The alias is re-read-checked: after each alias write champion.json is read again, and the
    alias follows again if it moved meanwhile, so a slow promotion never leaves the alias behind
    a newer pointer. `committed`: the pointer this process just wrote; it is used first, and if
    S3 stops answering right after that write the alias still follows it (the write went through).
    """
    ptr = committed
    for _ in range(CAS_ATTEMPTS):
        if ptr is None and committed is None:
            ptr, _ = read_pointer(place)
        want = str(ptr["version"]) if ptr else None
        if ptr is not None:
            check_version_identity(place, ptr)
        if alias_version(place) != want:
            if want is None:
                place.tracker.delete_alias(place.model, ALIAS)
            else:
                place.tracker.set_alias(place.model, ALIAS, want)
        fault_point("after_alias_write", model=place.model, version=want)
        try:
            again, _ = read_pointer(place)
        except storage.S3Unavailable:
            if committed is None:
                raise
            return want  # our own write landed; nobody can move it while S3 is down
        if (str(again["version"]) if again else None) == want:
            return want
        ptr, committed = again, None
    raise ChampionContention(f"{place.pointer_uri} kept changing while the alias followed it")


# --- failed promotions and repairs --------------------------------------------------------------------
def mark_aborted(place: Place, version: str, promotion_id: str, why: str) -> None:
    """Record on the version that promotion `promotion_id` failed: a pointer it may have left
    behind is put back by `reconcile` (and by the next promotion)."""
    place.tracker.set_version_tags(place.model, version, {ABORT_TAG + promotion_id: why[:250]})


def is_aborted(place: Place, ptr: dict[str, Any]) -> bool:
    pid = ptr.get("promotion_id")
    if not pid:
        return False
    return ABORT_TAG + pid in place.tracker.version(place.model, str(ptr["version"])).tags


def undo(place: Place, done: dict[str, Any]) -> str:
    """Put back the pointer that `done` (a commit: new pointer, its ETag, the old pointer) replaced,
    unless it has moved on since (then nothing of ours is live)."""
    old = done.get("old")
    try:
        if old is None:
            delete_pointer(place, done["etag"])
        else:
            write_pointer(place, old, done["etag"])
        return f"champion.json put back to {fmt(old and old['version'])}"
    except PreconditionFailed:
        cur, _ = read_pointer(place)
        if (cur or {}).get("promotion_id") == (old or {}).get("promotion_id") and (
            (cur is None) == (old is None)
        ):
            return f"champion.json put back to {fmt(old and old['version'])}"
        return f"champion.json moved on to {fmt(cur and cur['version'])} since; nothing to undo"


def champion_damage(place: Place, ptr: dict[str, Any]) -> str | None:
    """Why the version a pointer names cannot be served as it stands (its manifest is gone, or is
    not the one the pointer's sha256 names), or None when the manifest matches."""
    s3 = place.need_s3()
    key = f"{storage.version_key(s3, place.model, ptr['version'])}/{storage.MANIFEST}"
    man = storage.get_bytes_or_none(s3, key)
    if man is None:
        return f"v{ptr['version']}, whose manifest s3://{s3.bucket}/{key} is missing"
    if storage.sha256_bytes(man) != ptr["manifest_sha256"]:
        return (
            f"v{ptr['version']}, whose manifest s3://{s3.bucket}/{key} does not match the "
            "pointer's sha256"
        )
    return None


def reconcile(place: Place, damaged_ok: bool = False) -> list[str]:
    """Make pointer and alias agree, the pointer winning; put back a pointer that a failed
    promotion left. Returns what changed, one sentence each (empty: they agreed).

    A champion whose manifest is missing or damaged raises IntegrityError, unless `damaged_ok`
    (the rollback, which replaces that champion): then the alias is left for the rollback to set
    and the finding is returned."""
    place.need_s3()
    bind_registry(place)
    changes = []
    for _ in range(CAS_ATTEMPTS):
        ptr, etag = read_pointer(place)
        if ptr is not None:
            check_version_identity(place, ptr)  # never act on another registry's version
        if ptr is None or not is_aborted(place, ptr):
            break
        prev = previous(ptr)
        try:
            if prev is None:
                delete_pointer(place, etag)
            else:
                write_pointer(place, prev, etag)
        except PreconditionFailed:
            continue
        changes.append(
            f"champion.json: v{ptr['version']} -> {fmt(prev and prev['version'])} (promotion "
            f"{ptr['promotion_id'][:8]} of v{ptr['version']} had failed)"
        )
    ptr, _ = read_pointer(place)
    why = None if ptr is None else champion_damage(place, ptr)
    if why and not damaged_ok:
        raise storage.IntegrityError(
            f"{place.pointer_uri} names {why}: roll back (`eagle3 promote --rollback` replaces "
            "it with the newest earlier champion that verifies)"
        )
    if why:
        changes.append(f"champion.json names {why}: the alias waits for the rollback")
        return changes
    before = alias_version(place)
    after = follow_alias(place)
    if before != after:
        changes.append(f"alias {ALIAS}: {fmt(before)} -> {fmt(after)} (follows champion.json)")
    return changes


def rollback_pointer(place: Place, rollback_id: str) -> dict[str, Any]:
    """CAS the pointer back to the newest earlier champion that verifies, skipping (and naming)
    earlier ones that do not. A champion whose own manifest is missing or damaged is rolled back
    like any other: this is its repair. Idempotent per id. Returns {"new", "old", "etag",
    "repaired"}: "repaired" says, one sentence each, what was damaged and what was skipped."""
    s3 = place.need_s3()
    for _ in range(CAS_ATTEMPTS):
        cur, etag = read_pointer(place)
        if cur is not None and cur.get("promotion_id") == rollback_id:  # a retry; it went through
            return {"new": cur, "old": None, "etag": etag, "repeat": True, "repaired": []}
        if cur is None:
            raise StorageError(f"{place.pointer_uri}: no champion to roll back")
        repaired = []
        if why := champion_damage(place, cur):
            repaired.append(f"champion.json named {why}; it is no longer served")
        prev = previous(cur)
        while prev is not None:
            try:
                storage.verify_version(
                    s3,
                    place.model,
                    prev["version"],
                    expect_manifest_sha256=prev.get("manifest_sha256"),
                )
                break
            except storage.IntegrityError as e:
                repaired.append(f"skipped the earlier champion v{prev['version']}: {e}")
                prev = previous(prev)
        if prev is None:
            raise StorageError(
                f"{place.pointer_uri}: champion v{cur['version']} has no previous champion that "
                "verifies to roll back to" + "".join(f"; {r}" for r in repaired)
            )
        new = {
            **prev,
            "promotion_id": rollback_id,
            "rolled_back_from": cur["version"],
            "rolled_back_at": now(),
        }
        try:
            tag = write_pointer(place, new, etag)
        except PreconditionFailed:
            continue
        return {"new": new, "old": cur, "etag": tag, "repaired": repaired}
    raise ChampionContention(f"{place.pointer_uri} kept changing during the rollback")
