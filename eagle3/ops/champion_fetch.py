"""The champion to serve: resolved, downloaded and verified before anything loads it.

champion.json names it when S3 is configured (the truth: no fallback to another registry); the
MLflow alias `champion` only when no S3 is. `eagle3 serve --draft champion` and the inference flow
both call these; the flow adds retries.
"""

from __future__ import annotations

from pathlib import Path

from eagle3.ops import champion as ch
from eagle3.ops import storage


def resolve_champion(recipe, tracker=None) -> dict:
    """{source, model, version, uri[, manifest_sha256]} of the recipe's registered model's
    champion; LookupError when there is none."""
    place = ch.place_for(recipe, tracker)
    if place.s3 is not None:
        ptr, _ = ch.read_pointer(place)
        if ptr is None:
            raise LookupError(f"no champion for {place.model}: {place.pointer_uri} does not exist")
        return {
            "source": "s3",
            "model": place.model,
            "version": str(ptr["version"]),
            "uri": ptr["uri"],
            "manifest_sha256": ptr["manifest_sha256"],
        }
    mv = place.tracker.alias_version(place.model, ch.ALIAS)
    if mv is None:
        raise LookupError(f"no champion for {place.model}: no S3 configured and no MLflow alias")
    return {
        "source": "mlflow",
        "model": place.model,
        "version": str(mv.version),
        "uri": f"models:/{place.model}@champion",
    }


def fetch_champion(recipe, champ: dict, dest: str | Path, tracker=None) -> Path:
    """Download the champion `resolve_champion` named into `dest`, every sha256 verified and the
    checkpoint checked against the contract; raises (IntegrityError, CheckpointError) before
    anything could load it."""
    from eagle3.models.checkpoint import CheckpointError, check_checkpoint
    from eagle3.ops.promotion import fetch_version

    if champ["source"] == "s3":
        out = storage.download_version(
            storage.settings_from_recipe(recipe.storage),
            champ["model"],
            champ["version"],
            Path(dest),
            expect_manifest_sha256=champ["manifest_sha256"],
        )
        storage.verify_local(out)
    else:
        out = fetch_version(ch.place_for(recipe, tracker), champ["version"], Path(dest))
    problems = check_checkpoint(out)
    if problems:
        raise CheckpointError(f"champion v{champ['version']}: " + "; ".join(problems))
    return out
