"""S3 through boto3: immutable draft versions verified by sha256, conditional writes, downloads.

Layout (docs/CONTRACTS.md §6):
    s3://<bucket>/<prefix>/<registered model>/v<version>/{config.json, model.safetensors, manifest.json}
    s3://<bucket>/<prefix>/<registered model>/champion.json   (eagle3.ops.champion: moved by CAS)

A version is written once: its files first, then manifest.json with If-None-Match, which commits
it. A prefix without a manifest is an unfinished upload that a retry completes; a manifest with
other content or another registry's identity is never overwritten. Every object is read back and
hashed before a pointer may name it; downloads are hashed before anyone loads them. The S3 keys
are never logged: error messages name the endpoint, the bucket and the key, nothing else.

One file over 400 lines because upload, commit, verify and download share the conditional-write
and hashing rules of an immutable version; the pointer is champion.py.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eagle3.io import atomic_dir, sha256_file

MANIFEST = "manifest.json"
POINTER = "champion.json"


class StorageError(RuntimeError):
    """An S3 problem the user must fix (configuration, credentials, a missing object)."""


class S3Unavailable(StorageError):
    """The endpoint did not answer; retrying may help."""


class S3AuthError(StorageError):
    """The endpoint rejected the credentials; retrying will not help."""


class IntegrityError(StorageError):
    """An object's bytes do not match the sha256 recorded for it."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object changed (If-Match) or exists (If-None-Match)."""


class VersionConflict(StorageError):
    """A version prefix already holds other content, or another registry's: never overwritten."""


# --- settings ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class S3Settings:
    bucket: str
    prefix: str = "eagle3"
    endpoint_url: str | None = None
    region: str = "us-east-1"
    # Explicit keys (else boto3's chain: AWS_ACCESS_KEY_ID, ...). Kept out of repr and of every message.
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)

    def with_bucket(self, bucket: str) -> S3Settings:
        return S3Settings(
            bucket, self.prefix, self.endpoint_url, self.region, self.access_key, self.secret_key
        )

    @property
    def where(self) -> str:
        return f"S3 endpoint {self.endpoint_url or 'AWS default'} (bucket {self.bucket!r})"

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p and p.strip("/"))

    def uri(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}"


def settings_from_recipe(storage_cfg: Any) -> S3Settings:
    """recipe.storage, completed by the environment (AWS_ENDPOINT_URL_S3, EAGLE3_S3_BUCKET)."""
    from eagle3.settings import settings

    bucket = storage_cfg.bucket or settings().s3_bucket
    if not bucket:
        raise StorageError(
            "no S3 bucket configured: set storage.bucket in the recipe, or EAGLE3_S3_BUCKET "
            "(`eagle3 stack up` writes it to .eagle3/stack/stack.env)"
        )
    endpoint = (
        storage_cfg.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    region = storage_cfg.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return S3Settings(bucket, storage_cfg.prefix, endpoint, region)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket")
    return bucket, key


# --- client and errors ------------------------------------------------------------------------------
def client(s: S3Settings, max_attempts: int = 3):
    """A boto3 S3 client for these settings and the CURRENT credentials (explicit, else the
    environment, else boto3's chain). Clients are cached per (settings, credentials): building
    one costs about half a second, and boto3's default session would keep stale keys."""
    key = s.access_key or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = s.secret_key if s.access_key else os.environ.get("AWS_SECRET_ACCESS_KEY")
    token = None if s.access_key else os.environ.get("AWS_SESSION_TOKEN")
    return _client(s.endpoint_url, s.region, key, secret, token, max_attempts)


@functools.lru_cache(maxsize=32)
def _client(endpoint, region, key, secret, token, max_attempts):
    import boto3
    from botocore.config import Config

    keys = {}
    if key:
        keys = {
            "aws_access_key_id": key,
            "aws_secret_access_key": secret,
            "aws_session_token": token,
        }
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        **keys,
        config=Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=3,
            read_timeout=30,
            s3={"addressing_style": "path"},
        ),
    )


_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "403",
}


def explain(e: Exception, s: S3Settings, what: str) -> StorageError:
    """Turn a botocore exception into one of ours; the message names the endpoint, never the keys."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )
    from botocore.exceptions import ConnectTimeoutError as BotoConnectTimeout

    if isinstance(e, StorageError):
        return e
    if isinstance(e, NoCredentialsError):
        return S3AuthError(
            f"{s.where}: no S3 credentials found while trying to {what}; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or run `eagle3 stack up`)"
        )
    if isinstance(
        e, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, BotoConnectTimeout)
    ):
        return S3Unavailable(f"{s.where} is unreachable while trying to {what}: {e}")
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
            return PreconditionFailed(f"{s.where}: precondition failed while trying to {what}")
        if code in _AUTH_CODES or status == 403:
            return S3AuthError(
                f"{s.where} rejected the credentials ({code or status}) while trying to {what}; "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for this endpoint"
            )
        if code in ("NoSuchBucket",):
            return StorageError(f"{s.where}: the bucket does not exist (while trying to {what})")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{s.where}: no such object (while trying to {what})")
        if status and int(status) >= 500:
            return S3Unavailable(f"{s.where} failed with {code or status} while trying to {what}")
        return StorageError(f"{s.where}: {code or status} while trying to {what}: {e}")
    if isinstance(e, OSError):
        return S3Unavailable(f"{s.where} is unreachable while trying to {what}: {e}")
    return StorageError(f"{s.where}: {type(e).__name__} while trying to {what}: {e}")


def _call(s: S3Settings, what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise explain(e, s, what) from e


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- basic object operations -----------------------------------------------------------------------
def check_access(s: S3Settings) -> None:
    """Fail early, with the endpoint named, when the bucket cannot be reached with these keys."""
    c = client(s, max_attempts=1)
    _call(s, f"reach bucket {s.bucket}", c.head_bucket, Bucket=s.bucket)


def ensure_bucket(s: S3Settings) -> None:
    from botocore.exceptions import ClientError

    c = client(s)
    try:
        c.head_bucket(Bucket=s.bucket)
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            _call(s, f"create bucket {s.bucket}", c.create_bucket, Bucket=s.bucket)
            return
        raise explain(e, s, f"reach bucket {s.bucket}") from e
    except Exception as e:
        raise explain(e, s, f"reach bucket {s.bucket}") from e


def put_bytes(
    s: S3Settings,
    key: str,
    data: bytes,
    content_type: str | None = None,
    if_match: str | None = None,
    if_none_match: bool = False,
) -> str:
    """Write one object; returns its ETag. `if_match` (an ETag) or `if_none_match` make the write
    conditional: it then fails with PreconditionFailed instead of replacing a newer object."""
    c = client(s)
    extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
    if if_match:
        extra["IfMatch"] = if_match
    if if_none_match:
        extra["IfNoneMatch"] = "*"
    resp = _call(
        s,
        f"write s3://{s.bucket}/{key}",
        c.put_object,
        Bucket=s.bucket,
        Key=key,
        Body=data,
        **extra,
    )
    return resp.get("ETag", "")


def get_object(s: S3Settings, key: str) -> tuple[bytes, str] | tuple[None, None]:
    """(bytes, ETag) of an object, or (None, None) when it does not exist."""
    c = client(s)
    try:
        resp = _call(s, f"read s3://{s.bucket}/{key}", c.get_object, Bucket=s.bucket, Key=key)
    except StorageError as e:
        if "no such object" in str(e):
            return None, None
        raise
    return _call(s, f"read s3://{s.bucket}/{key}", resp["Body"].read), resp.get("ETag", "")


def get_bytes(s: S3Settings, key: str) -> bytes:
    c = client(s)
    resp = _call(s, f"read s3://{s.bucket}/{key}", c.get_object, Bucket=s.bucket, Key=key)
    return _call(s, f"read s3://{s.bucket}/{key}", resp["Body"].read)


def get_bytes_or_none(s: S3Settings, key: str) -> bytes | None:
    return get_object(s, key)[0]


def delete_key(s: S3Settings, key: str, if_match: str | None = None) -> None:
    c = client(s)
    extra = {"IfMatch": if_match} if if_match else {}
    _call(s, f"delete s3://{s.bucket}/{key}", c.delete_object, Bucket=s.bucket, Key=key, **extra)


def list_keys(s: S3Settings, prefix: str) -> list[str]:
    c = client(s)
    keys, token = [], None
    while True:
        kw = {"Bucket": s.bucket, "Prefix": prefix}
        if token:
            kw["ContinuationToken"] = token
        resp = _call(s, f"list s3://{s.bucket}/{prefix}", c.list_objects_v2, **kw)
        keys += [o["Key"] for o in resp.get("Contents", [])]
        if not resp.get("IsTruncated"):
            return keys
        token = resp.get("NextContinuationToken")


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


# --- versions ---------------------------------------------------------------------------------------
# What names a version's origin: a version number is only unique inside one registry.
IDENTITY_KEYS = ("registry_id", "mlflow_run_id")


def version_key(s: S3Settings, model: str, version: int | str) -> str:
    return s.key(model, f"v{version}")


def build_manifest(draft_dir: str | Path, **meta: Any) -> dict[str, Any]:
    """Each checkpoint file's sha256 and size, plus the metadata (metrics, run id, digest, ...)."""
    d = Path(draft_dir)
    files = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            rel = p.relative_to(d).as_posix()
            if rel == MANIFEST:  # a downloaded version carries the manifest it came with
                continue
            files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    if not files:
        raise StorageError(f"{d}: no files to upload")
    return {"files": files, **meta}


def upload_version(
    s: S3Settings, model: str, version: int | str, draft_dir: str | Path, meta: dict[str, Any]
) -> dict[str, Any]:
    """Upload the checkpoint, then commit its manifest (If-None-Match); read everything back.

    Idempotent: a version already committed with the same files and identity (`registry_id`,
    `mlflow_run_id` in `meta`) is verified and returned; one with other content raises
    VersionConflict. Files of an unfinished upload (no manifest yet) are simply written again.
    Returns {"uri", "manifest", "manifest_sha256"}. The champion pointer is not touched.
    """
    d = Path(draft_dir)
    manifest = build_manifest(d, registered_model=model, version=str(version), **meta)
    base = version_key(s, model, version)
    fault_point("before_version_upload", model=model, version=str(version))
    existing = get_bytes_or_none(s, f"{base}/{MANIFEST}")
    if existing is not None:
        return _adopt(s, model, version, existing, manifest)
    for rel in manifest["files"]:
        put_bytes(s, f"{base}/{rel}", (d / rel).read_bytes())
        fault_point("after_version_object", model=model, version=str(version), file=rel)
    body = json_bytes(manifest)
    try:
        put_bytes(s, f"{base}/{MANIFEST}", body, "application/json", if_none_match=True)
    except PreconditionFailed:  # committed meanwhile (a concurrent retry of the same promotion)
        return _adopt(s, model, version, get_bytes(s, f"{base}/{MANIFEST}"), manifest)
    verify_version(s, model, version, expect_manifest_sha256=sha256_bytes(body))
    return {
        "uri": f"s3://{s.bucket}/{base}/",
        "manifest": manifest,
        "manifest_sha256": sha256_bytes(body),
    }


def _adopt(
    s: S3Settings, model: str, version: int | str, body: bytes, want: dict[str, Any]
) -> dict[str, Any]:
    """An already committed version: the same upload again (verify it), or a conflict."""
    base = f"s3://{s.bucket}/{version_key(s, model, version)}/"
    try:
        have = json.loads(body)
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{base}{MANIFEST}: not valid JSON: {e}") from e
    for k in IDENTITY_KEYS:
        if have.get(k) and want.get(k) and have[k] != want[k]:
            raise VersionConflict(
                f"{base} already holds v{version} from another origin ({k} {have[k]} there, "
                f"{want[k]} here); versions are immutable: use another storage.prefix or "
                "registered model name for this registry"
            )
    if have.get("files") != want["files"]:
        differ = sorted(
            n
            for n in set(have.get("files") or {}) | set(want["files"])
            if (have.get("files") or {}).get(n) != want["files"].get(n)
        )
        raise VersionConflict(
            f"{base} already holds v{version} with other content ({', '.join(differ)} differ); "
            "versions are immutable and are never overwritten"
        )
    verify_version(s, model, version, expect_manifest_sha256=sha256_bytes(body))
    return {"uri": base, "manifest": have, "manifest_sha256": sha256_bytes(body)}


def verify_version(
    s: S3Settings, model: str, version: int | str, expect_manifest_sha256: str | None = None
) -> dict[str, Any]:
    """Read back the manifest and every file of a version; raise IntegrityError on any mismatch."""
    base = version_key(s, model, version)
    body = get_bytes_or_none(s, f"{base}/{MANIFEST}")
    if body is None:
        raise IntegrityError(
            f"s3://{s.bucket}/{base}/: no {MANIFEST}: the version was never committed"
        )
    if expect_manifest_sha256 and sha256_bytes(body) != expect_manifest_sha256:
        raise IntegrityError(
            f"s3://{s.bucket}/{base}/{MANIFEST}: sha256 {sha256_bytes(body)[:16]}… does not match "
            f"{expect_manifest_sha256[:16]}…"
        )
    manifest = json.loads(body)
    for rel, info in manifest["files"].items():
        data = get_bytes(s, f"{base}/{rel}")
        got = sha256_bytes(data)
        if got != info["sha256"] or len(data) != info["size"]:
            raise IntegrityError(
                f"s3://{s.bucket}/{base}/{rel}: sha256 {got[:16]}… ({len(data)} bytes) does not "
                f"match the manifest's {info['sha256'][:16]}… ({info['size']} bytes)"
            )
    return manifest


def read_manifest(s: S3Settings, model: str, version: int | str) -> dict[str, Any] | None:
    """A committed version's manifest, or None (never uploaded, or an unfinished upload)."""
    body = get_bytes_or_none(s, f"{version_key(s, model, version)}/{MANIFEST}")
    return None if body is None else json.loads(body)


def download_version(
    s: S3Settings,
    model: str,
    version: int | str,
    dest: str | Path,
    expect_manifest_sha256: str | None = None,
) -> Path:
    """Download a version into `dest` (atomically) and verify every file BEFORE returning it."""
    base = version_key(s, model, version)
    body = get_bytes(s, f"{base}/{MANIFEST}")
    if expect_manifest_sha256 and sha256_bytes(body) != expect_manifest_sha256:
        raise IntegrityError(
            f"s3://{s.bucket}/{base}/{MANIFEST}: sha256 does not match the champion pointer "
            f"({sha256_bytes(body)[:16]}… vs {expect_manifest_sha256[:16]}…)"
        )
    manifest = json.loads(body)
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        for rel, info in manifest["files"].items():
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise IntegrityError(f"s3://{s.bucket}/{base}/{MANIFEST}: unsafe path {rel!r}")
            data = get_bytes(s, f"{base}/{rel}")
            got = sha256_bytes(data)
            if got != info["sha256"]:
                raise IntegrityError(
                    f"s3://{s.bucket}/{base}/{rel}: downloaded sha256 {got[:16]}… does not match "
                    f"the manifest's {info['sha256'][:16]}…; refusing to load it"
                )
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        (tmp / MANIFEST).write_bytes(body)
    return dest


def verify_local(dir: str | Path) -> None:
    """Re-hash a downloaded version against its manifest.json (a cached copy may have changed)."""
    d = Path(dir)
    manifest = json.loads((d / MANIFEST).read_text())
    for rel, info in manifest["files"].items():
        p = d / rel
        if not p.is_file() or sha256_file(p) != info["sha256"]:
            raise IntegrityError(f"{p}: missing or its sha256 does not match the manifest")


# --- the champion pointer, read-only here (eagle3.ops.champion moves it) -------------------------------
def pointer_key(s: S3Settings, model: str) -> str:
    return s.key(model, POINTER)


def read_champion(s: S3Settings, model: str) -> dict[str, Any] | None:
    return parse_pointer(s, model, get_bytes_or_none(s, pointer_key(s, model)))


def parse_pointer(s: S3Settings, model: str, body: bytes | None) -> dict[str, Any] | None:
    """champion.json's content, checked for the fields every reader needs."""
    if body is None:
        return None
    where = f"s3://{s.bucket}/{pointer_key(s, model)}"
    try:
        ptr = json.loads(body)
    except json.JSONDecodeError as e:
        raise StorageError(f"{where}: not valid JSON: {e}") from e
    missing = [
        k
        for k in ("version", "manifest_sha256", "uri")
        if not isinstance(ptr, dict) or k not in ptr
    ]
    if missing:
        raise IntegrityError(
            f"{where} is not a champion pointer (no {', '.join(missing)}); "
            "`eagle3 promote --reconcile` says what to do"
        )
    return ptr


# --- fault injection for tests (no-ops unless a test sets them) -----------------------------------------
FAULTS: dict[str, Any] = {}


def fault_point(point: str, **info: Any) -> None:
    """Call the test's hook for this named point (e.g. stop S3 between two writes)."""
    hook = FAULTS.get(point)
    if hook is not None:
        hook(**info)


# --- JSONL for inference: confined to the configured bucket and <prefix>/<model>/inference/ ----------------
class OutsideScope(ValueError):
    """An S3 location the inference flow may not read or write."""


def inference_prefix(s: S3Settings, model: str) -> str:
    return s.key(model, "inference") + "/"


def check_prompts_uri(s: S3Settings, uri: str) -> str:
    """Prompts are read only from the configured bucket; returns the key."""
    bucket, key = parse_s3_uri(uri)
    if bucket != s.bucket:
        raise OutsideScope(
            f"prompts {uri}: the inference flow reads prompts only from its bucket {s.bucket!r}"
        )
    return key


# The characters an output key may hold: a backslash may become a `/` in SeaweedFS, and anything
# else (spaces, %, control characters, unicode look-alikes) has no use in a name we choose.
SAFE_KEY = re.compile(r"[A-Za-z0-9._/-]+")


def check_output_uri(s: S3Settings, model: str, uri: str) -> str:
    """Outputs go only under s3://<bucket>/<prefix>/<model>/inference/ as a .jsonl whose key holds
    only [A-Za-z0-9._/-] and no `..`; returns the key."""
    bucket, key = parse_s3_uri(uri)
    allowed = f"s3://{s.bucket}/{inference_prefix(s, model)}"
    parts = key.split("/")
    if (
        bucket != s.bucket
        or not key.startswith(inference_prefix(s, model))
        or any(p in ("", ".", "..") for p in parts)
        or not key.endswith(".jsonl")
    ):
        raise OutsideScope(f"output_uri {uri}: inference writes only <name>.jsonl under {allowed}")
    if not SAFE_KEY.fullmatch(key) or ".." in key:
        raise OutsideScope(
            f"output_uri {uri!r}: a key holds only letters, digits and . _ / - (and no `..`)"
        )
    return key


def read_jsonl(s: S3Settings, key: str) -> list[Any]:
    text = get_bytes(s, key).decode("utf-8")
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise StorageError(f"s3://{s.bucket}/{key}: line {i} is not JSON: {e}") from e
    return rows


def write_jsonl(s: S3Settings, key: str, rows: list[dict], overwrite: bool = True) -> None:
    """JSONL to one object; with overwrite=False an existing object is never replaced."""
    buf = io.StringIO()
    for r in rows:
        buf.write(json.dumps(r, ensure_ascii=False) + "\n")
    data = buf.getvalue().encode("utf-8")
    put_bytes(s, key, data, "application/x-ndjson", if_none_match=not overwrite)


def read_jsonl_uri(uri: str, s: S3Settings) -> list[Any]:
    bucket, key = parse_s3_uri(uri)
    return read_jsonl(s.with_bucket(bucket), key)


def write_jsonl_uri(uri: str, rows: list[dict], s: S3Settings) -> None:
    bucket, key = parse_s3_uri(uri)
    write_jsonl(s.with_bucket(bucket), key, rows)
