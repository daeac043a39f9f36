"""Files written atomically (a reader sees the old file or the new one, never half of one), the
sha256 of a file and of a JSON value. Every writer and every content key in eagle3 goes through
these."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any, compact: bool = False) -> bytes:
    """Sorted keys, so equal values give equal bytes. `compact` (no spaces) is the data manifest's
    and shard keys' form; the default form keys journals, flow caches and settings. Both are
    stored in files already written, so neither may change."""
    seps = (",", ":") if compact else None
    return json.dumps(obj, sort_keys=True, separators=seps, default=str).encode()


def sha256_json(obj: Any, compact: bool = False) -> str:
    return hashlib.sha256(canonical_json(obj, compact)).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """A temp file beside `path` for the caller to write (by name: torch.save, save_file, ...);
    renamed over `path` with `mode` when the block ends, removed if it raises. The temp file is
    created 0600, so a private file is never readable by others, not even half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | Path, data: bytes | str, mode: int = 0o644) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically, with `mode` (0o600 for secrets)."""
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2, sort_keys: bool = False) -> Path:
    """json.dump into a temp file in the same folder, then rename over `path`."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    return write_atomic(path, text)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temp folder beside `path` to fill; swapped into place when the block ends (an old
    `path` is moved aside first and removed only after the swap), removed if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
