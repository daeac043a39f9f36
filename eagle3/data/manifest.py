"""The data manifest (docs/CONTRACTS.md §5) and its digest.

The digest is a sha256 over `digest_of`: what the training data IS, not how it was made or stored:
- the token samples (id, input ids, loss mask), hashed in sample-id order, and the train/val split;
- the draft vocabulary (d2t);
- when feature shards are written: the target (id, revision) and the feature settings that fix
  their values (aux layer ids, dtype).
Shard layout, batch size, concurrency, run directory, timings and paths are left out, so the
digest changes when and only when the data changes. Shard files keep their own sha256 in the
manifest for integrity checks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from eagle3 import io

MANIFEST = "manifest.json"
VERSION = 1


def samples_sha256(samples) -> str:
    """Order-independent content hash of TokenSamples (sorted by sample id)."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.sample_id):
        h.update(s.sample_id.encode())
        h.update(b"\0")
        h.update(s.input_ids.long().contiguous().numpy().tobytes())
        h.update(s.loss_mask.bool().contiguous().numpy().tobytes())
    return h.hexdigest()


def tensor_sha256(t) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def compute_digest(digest_of: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(digest_of)).hexdigest()


def finish(manifest: dict[str, Any]) -> dict[str, Any]:
    """Set `digest` from `digest_of`."""
    manifest["digest"] = compute_digest(manifest["digest_of"])
    return manifest


def write_json_atomic(path: str | Path, obj: Any) -> None:
    io.write_json_atomic(path, obj, sort_keys=True)


def write_manifest(data_dir: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(data_dir) / MANIFEST
    write_json_atomic(path, finish(manifest))
    return path


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `eagle3 data` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if manifest.get("digest") != compute_digest(manifest.get("digest_of", {})):
        raise ValueError(f"{path}: digest does not match its content (edited by hand?)")
    return manifest
