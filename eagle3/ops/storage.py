"""S3 through boto3: versioned draft uploads verified by sha256, the champion pointer, downloads.

Layout (CONTRACTS.md §6):
    s3://<bucket>/<prefix>/<registered model>/v<version>/{config.json, model.safetensors, manifest.json}
    s3://<bucket>/<prefix>/<registered model>/champion.json      (written last, after verification)

champion.json holds the promoted version, the sha256 of its manifest and the `history` of earlier
champions (newest last), which `rollback` pops. Every object is read back and hashed before the
pointer moves; downloads are hashed before anyone loads them. The S3 keys are never logged: error
messages name the endpoint, the bucket and the key of the object, nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    bucket = storage_cfg.bucket or os.environ.get("EAGLE3_S3_BUCKET")
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


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def put_bytes(s: S3Settings, key: str, data: bytes, content_type: str | None = None) -> None:
    c = client(s)
    extra = {"ContentType": content_type} if content_type else {}
    _call(
        s,
        f"write s3://{s.bucket}/{key}",
        c.put_object,
        Bucket=s.bucket,
        Key=key,
        Body=data,
        **extra,
    )


def get_bytes(s: S3Settings, key: str) -> bytes:
    c = client(s)
    resp = _call(s, f"read s3://{s.bucket}/{key}", c.get_object, Bucket=s.bucket, Key=key)
    return _call(s, f"read s3://{s.bucket}/{key}", resp["Body"].read)


def get_bytes_or_none(s: S3Settings, key: str) -> bytes | None:
    try:
        return get_bytes(s, key)
    except StorageError as e:
        if "no such object" in str(e):
            return None
        raise


def delete_key(s: S3Settings, key: str) -> None:
    c = client(s)
    _call(s, f"delete s3://{s.bucket}/{key}", c.delete_object, Bucket=s.bucket, Key=key)


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


# --- versions ---------------------------------------------------------------------------------------
def version_key(s: S3Settings, model: str, version: int | str) -> str:
    return s.key(model, f"v{version}")


def build_manifest(draft_dir: str | Path, **meta: Any) -> dict[str, Any]:
    """Each checkpoint file's sha256 and size, plus the metadata (metrics, run id, digest, ...)."""
    d = Path(draft_dir)
    files = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            rel = p.relative_to(d).as_posix()
            files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    if not files:
        raise StorageError(f"{d}: no files to upload")
    return {"files": files, **meta}


def upload_version(
    s: S3Settings, model: str, version: int | str, draft_dir: str | Path, meta: dict[str, Any]
) -> dict[str, Any]:
    """Upload the checkpoint and its manifest, read every object back and verify its sha256.

    Returns {"uri", "manifest", "manifest_sha256"}. Raises IntegrityError on a mismatch and
    S3Unavailable / S3AuthError on transport problems. The champion pointer is not touched.
    """
    d = Path(draft_dir)
    manifest = build_manifest(d, registered_model=model, version=str(version), **meta)
    base = version_key(s, model, version)
    for rel in manifest["files"]:
        data = (d / rel).read_bytes()
        put_bytes(s, f"{base}/{rel}", data)
    body = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    put_bytes(s, f"{base}/{MANIFEST}", body, "application/json")
    verify_version(s, model, version, expect_manifest_sha256=sha256_bytes(body))
    return {
        "uri": f"s3://{s.bucket}/{base}/",
        "manifest": manifest,
        "manifest_sha256": sha256_bytes(body),
    }


def verify_version(
    s: S3Settings, model: str, version: int | str, expect_manifest_sha256: str | None = None
) -> dict[str, Any]:
    """Read back the manifest and every file of a version; raise IntegrityError on any mismatch."""
    base = version_key(s, model, version)
    body = get_bytes(s, f"{base}/{MANIFEST}")
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
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
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
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def verify_local(dir: str | Path) -> None:
    """Re-hash a downloaded version against its manifest.json (a cached copy may have changed)."""
    d = Path(dir)
    manifest = json.loads((d / MANIFEST).read_text())
    for rel, info in manifest["files"].items():
        p = d / rel
        if not p.is_file() or sha256_file(p) != info["sha256"]:
            raise IntegrityError(f"{p}: missing or its sha256 does not match the manifest")


# --- champion pointer -------------------------------------------------------------------------------
def pointer_key(s: S3Settings, model: str) -> str:
    return s.key(model, POINTER)


def read_champion(s: S3Settings, model: str) -> dict[str, Any] | None:
    body = get_bytes_or_none(s, pointer_key(s, model))
    if body is None:
        return None
    try:
        return json.loads(body)
    except json.JSONDecodeError as e:
        raise StorageError(f"s3://{s.bucket}/{pointer_key(s, model)}: not valid JSON: {e}") from e


def _write_pointer(s: S3Settings, model: str, pointer: dict[str, Any]) -> None:
    body = (json.dumps(pointer, indent=2, sort_keys=True) + "\n").encode()
    put_bytes(s, pointer_key(s, model), body, "application/json")
    if get_bytes(s, pointer_key(s, model)) != body:
        raise IntegrityError(f"s3://{s.bucket}/{pointer_key(s, model)}: read-back differs")


def write_champion(
    s: S3Settings,
    model: str,
    version: int | str,
    uploaded: dict[str, Any],
    extra: dict | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Point champion.json at `version`; the old pointer goes onto `history`. Returns (new, old)."""
    old = read_champion(s, model)
    if (
        old
        and str(old.get("version")) == str(version)
        and old.get("manifest_sha256") == uploaded["manifest_sha256"]
    ):
        # A retry after a write that went through (e.g. the read-back failed): idempotent, and
        # "old" is still the champion before it, so that a restore puts that one back.
        hist = list(old.get("history", []))
        prev = {**hist[-1], "history": hist[:-1]} if hist else None
        return old, prev
    history = list(old.get("history", [])) if old else []
    if old:
        history.append({k: v for k, v in old.items() if k != "history"})
    new = {
        "registered_model": model,
        "version": str(version),
        "uri": uploaded["uri"],
        "manifest_sha256": uploaded["manifest_sha256"],
        "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
        "history": history,
    }
    _write_pointer(s, model, new)
    return new, old


def restore_champion(s: S3Settings, model: str, old: dict[str, Any] | None) -> None:
    """Undo a pointer write (used when the registry alias could not follow)."""
    if old is None:
        delete_key(s, pointer_key(s, model))
    else:
        _write_pointer(s, model, old)


def rollback_champion(s: S3Settings, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Point champion.json back at the previous champion (verified first). Returns (new, old)."""
    cur = read_champion(s, model)
    if not cur:
        raise StorageError(f"s3://{s.bucket}/{pointer_key(s, model)}: no champion to roll back")
    history = list(cur.get("history", []))
    if not history:
        raise StorageError(
            f"s3://{s.bucket}/{pointer_key(s, model)}: champion v{cur['version']} has no "
            "previous champion to roll back to"
        )
    prev = history.pop()
    verify_version(s, model, prev["version"], expect_manifest_sha256=prev.get("manifest_sha256"))
    new = {
        **prev,
        "history": history,
        "rolled_back_from": cur["version"],
        "rolled_back_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_pointer(s, model, new)
    return new, cur


# --- JSONL for inference ------------------------------------------------------------------------------
def read_jsonl_uri(uri: str, s: S3Settings) -> list[Any]:
    bucket, key = parse_s3_uri(uri)
    s2 = s.with_bucket(bucket)
    text = get_bytes(s2, key).decode("utf-8")
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise StorageError(f"{uri}: line {i} is not JSON: {e}") from e
    return rows


def write_jsonl_uri(uri: str, rows: list[dict], s: S3Settings) -> None:
    bucket, key = parse_s3_uri(uri)
    s2 = s.with_bucket(bucket)
    buf = io.StringIO()
    for r in rows:
        buf.write(json.dumps(r, ensure_ascii=False) + "\n")
    put_bytes(s2, key, buf.getvalue().encode("utf-8"), "application/x-ndjson")
