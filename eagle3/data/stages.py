"""A recipe's data stages: the main one in `<run_dir>/data`, and one per `data.mix` entry in
`<run_dir>/data-<name>`, whose training samples join the main stage's (e.g. teacher-forced text:
the sources' own answers, `regenerate: false`).

A mixed stage is the main data section with its own sources and regenerate setting; it keeps no
held-out split (validation is the main stage's held-out samples) and mixes nothing itself. Each
stage resumes on its own (shards, locks and keys as in eagle3.data.shards).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAIN = "data"


@dataclass(frozen=True)
class Stage:
    name: str  # "data" or "data-<mix name>": also the folder name in the run dir
    recipe: Any  # the Recipe that stage runs with
    data_dir: Path


def mix_recipe(recipe, mix):
    """The recipe of one data.mix stage."""
    data = recipe.data.model_copy(
        update={
            "sources": list(mix.sources),
            "regenerate": mix.regenerate,
            "limit": None,  # the mixed sources carry their own limits
            "val_fraction": 0.0,
            "mix": [],
        }
    )
    return recipe.model_copy(update={"data": data})


def data_stages(recipe) -> list[Stage]:
    """The main stage first, then data.mix in recipe order."""
    run = recipe.run_path
    out = [Stage(MAIN, recipe, run / MAIN)]
    for m in recipe.data.mix:
        out.append(Stage(f"{MAIN}-{m.name}", mix_recipe(recipe, m), run / f"{MAIN}-{m.name}"))
    return out


def mixed_dirs(recipe) -> list[Path]:
    """Data dirs whose training samples join the main stage's: data.mix, then train.mix_data."""
    return [s.data_dir for s in data_stages(recipe)[1:]] + [Path(d) for d in recipe.train.mix_data]


def combined_digest(main: str, mixed: list[str]) -> str:
    """The digest of what training reads: the main stage's alone, or a hash over all of them."""
    if not mixed:
        return main
    return hashlib.sha256(json.dumps([main, *mixed]).encode()).hexdigest()


def training_digest(recipe) -> str:
    """combined_digest of the stages on disk (their manifests must exist)."""
    from eagle3.data.manifest import read_manifest

    main = read_manifest(recipe.run_path / MAIN).digest or ""
    return combined_digest(main, [read_manifest(d).digest or "" for d in mixed_dirs(recipe)])


def run_stages(recipe, progress: bool = True, target=None) -> dict[str, dict]:
    """Every data stage of the recipe, in order; {stage name: manifest}."""
    from eagle3.data.pipeline import run_data

    out = {}
    for s in data_stages(recipe):
        if progress and len(recipe.data.mix):
            print(f"data stage {s.name} -> {s.data_dir}")
        out[s.name] = run_data(s.recipe, progress=progress, target=target, data_dir=s.data_dir)
    return out
