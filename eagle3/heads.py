"""Heads shipped with the project, by name: `heads/<name>/` of the repository.

`--draft smollm2-135m-instruct` finds `heads/smollm2-135m-instruct/`; a directory path still
works as before. A shipped head carries SHA256SUMS (the sha256 of each of its files, in
`sha256sum -c` format); it is verified before the head is used, and by `eagle3 check`.

Fail closed: any directory that carries SHA256SUMS is verified however it is named (a name, or a
path such as `heads/x` or `/abs/heads/x`), and a directory under heads/ without SHA256SUMS is
refused: a shipped head that lost its sums cannot show it is the head that was released.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from eagle3.io import sha256_file, write_atomic

SUMS_FILE = "SHA256SUMS"
CARD_FILE = "CARD.md"
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


class HeadError(ValueError):
    """An unknown head name, or a shipped head whose files do not match their sha256."""


def heads_dir() -> Path:
    """`heads/` of the repository (EAGLE3_HEADS_DIR overrides it, e.g. for tests)."""
    from eagle3.settings import settings

    return settings().heads_dir or Path(__file__).resolve().parents[1] / "heads"


def known_heads(root: Path | None = None) -> list[str]:
    root = root or heads_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def resolve_draft(arg: str | Path) -> Path:
    """A draft directory from a path or a shipped head's name (whose sha256s are checked)."""
    path = Path(arg)
    if path.is_dir():
        return _verified(path, str(arg))
    name = str(arg)
    if "/" not in name and os.sep not in name:
        head = heads_dir() / name
        if (head / "config.json").is_file():
            return _verified(head, name)
    known = ", ".join(known_heads()) or "none yet"
    raise HeadError(
        f"draft {name!r}: no such directory, and not a shipped head (known heads in "
        f"{heads_dir()}: {known})"
    )


def is_shipped(path: Path) -> bool:
    """Whether `path` is a head directory inside heads/ (however it was named)."""
    try:
        return path.resolve().parent == heads_dir().resolve()
    except OSError:
        return False


def _verified(head: Path, given: str) -> Path:
    """`head` when its SHA256SUMS match (or it has none and is not a shipped head); else
    HeadError naming the head and what is wrong."""
    if not (head / SUMS_FILE).is_file():
        if is_shipped(head):
            raise HeadError(
                f"shipped head {given} ({head}) has no {SUMS_FILE}: refused (a shipped head must "
                "carry the sums it was released with; `eagle3 release` writes them)"
            )
        return head
    problems = verify_sums(head)
    if problems:
        raise HeadError(f"head {given} ({head}) is damaged: " + "; ".join(problems))
    return head


def write_sums(head: Path) -> Path:
    """SHA256SUMS over every other file of the head (sorted names)."""
    files = sorted(p for p in head.iterdir() if _listable(p))
    text = "".join(f"{sha256_file(p)}  {p.name}\n" for p in files)
    return write_atomic(head / SUMS_FILE, text)


def verify_sums(head: str | Path) -> list[str]:
    """Problems with a head's SHA256SUMS (empty when every listed file matches, and no file of
    the head is missing from it); [] for a directory without SHA256SUMS."""
    head = Path(head)
    path = head / SUMS_FILE
    if not path.is_file():
        return []
    problems, listed = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.match(line)
        if not m:
            problems.append(f"{SUMS_FILE} line {n}: not `<sha256>  <file>`")
            continue
        digest, name = m.groups()
        listed.add(name)
        f = head / name
        if not f.is_file():
            problems.append(f"{name}: listed in {SUMS_FILE} but missing")
        elif sha256_file(f) != digest:
            problems.append(f"{name}: sha256 does not match {SUMS_FILE}")
    for p in sorted(head.iterdir()):
        if _listable(p) and p.name not in listed:
            problems.append(f"{p.name}: not listed in {SUMS_FILE}")
    return problems


def _listable(p: Path) -> bool:
    return p.is_file() and p.name != SUMS_FILE and not p.name.startswith(".")
