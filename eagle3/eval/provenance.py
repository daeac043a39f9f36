"""Where a bench report's numbers come from: the code, the recipe, the run's own choices.

A number without its report cannot be checked, and a report without its command cannot be rerun:
every bench report carries `provenance` (the git commit and whether the tree was dirty, the
recipe file, profile and overrides, the prompt limit and data sets, the decoders and the order
they ran in) and the digest of every resolved setting, so the command need not be rebuilt
afterwards from memory.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from eagle3.io import sha256_json

REPO = Path(__file__).resolve().parents[2]


def code_version(repo: Path = REPO) -> dict[str, Any]:
    """{"commit": sha, "dirty": bool} of the checkout this code runs from; commit None when it
    is not a git checkout (an installed wheel) or git is missing."""
    if not (repo / ".git").exists():  # an installed copy: a repo around it is not this code's
        return {"commit": None, "dirty": None}
    try:
        sha = _git(repo, "rev-parse", "HEAD").strip()
        # Tracked files only: run dirs, caches and journals are untracked and change nothing.
        dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": sha, "dirty": dirty}


def code_id() -> str:
    """The code's version for the bench journal: the commit (with `+dirty` when tracked files
    differ from it: uncommitted edits can change the numbers), else the installed package's."""
    v = code_version()
    if v["commit"]:
        return v["commit"] + ("+dirty" if v["dirty"] else "")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"eagle3=={version('eagle3')}"
    except PackageNotFoundError:
        return "eagle3==unknown"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout


def settings_sha256(recipe) -> str:
    """sha256 of every resolved setting (profiles folded in, overrides applied)."""
    doc = recipe.model_dump(mode="json", exclude={"profiles"})
    return sha256_json(doc)


def provenance(
    recipe,
    origin: dict[str, Any] | None,
    limit: int | None,
    datasets: list[str],
    decoders: list[str],
) -> dict[str, Any]:
    """The report's `provenance` block. `origin`: {"recipe": path, "overrides": [...]} from the
    command line (None when a flow passed a recipe object: then the settings digest stands in)."""
    origin = origin or {}
    return {
        **code_version(),
        "recipe": str(origin["recipe"]) if origin.get("recipe") else None,
        "recipe_name": recipe.name,
        "profile": recipe.profile,
        "overrides": list(origin.get("overrides") or []),
        "settings_sha256": settings_sha256(recipe),
        "limit": limit,
        "datasets": list(datasets),
        # Decoders ran back to back on every prompt, this list rotated by one per prompt turn.
        "decoder_order": list(decoders),
        "order": "rotated per prompt turn",
    }
