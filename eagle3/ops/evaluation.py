"""What an evaluated head leaves in the registry, and the champion's numbers to gate it against.

`version_tags` records what the gate and the promotion check later (the eval set, the data
digest, the contract check, a sha256 per file); `registry_tags` adds the headline numbers.
`champion_on_eval_set` gives the champion's numbers on the candidate's eval set: from its tags
when it was measured there, else benchmarked again under the same settings. The promotion gates
again, under its compare-and-swap, against the champion it actually replaces.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

# The metrics a registry version carries as tags (the gate reads them back).
REGISTRY_METRICS = (
    "tau",
    "speedup_vs_hf_generate",
    "speedup_vs_ar",
    "speedup_vs_hf_prompt_lookup",
    "speedup_vs_vllm",
    "speedup_vs_best_headfree",
    "speedup_vs_best_headfree_concurrent",
    "lossless",
    "vllm/acceptance_length",
    "vllm/speedup_bs1",
)


def version_tags(draft: Path, report: dict, eval_set: str, data_digest, problems) -> dict:
    """Registry version tags: what the gate and the promotion check later (sha256 per file)."""
    from eagle3.data.manifest import MANIFEST, read_manifest
    from eagle3.eval.report import as_report
    from eagle3.io import sha256_file

    tags = {
        "eval_set": eval_set,
        "data_digest": data_digest or "",
        "check": "ok" if not problems else "; ".join(problems)[:4000],
        "target": as_report(report).target,
    } | headfree_names(report)
    data = Path(draft).parent / "data"
    if (data / MANIFEST).is_file():  # the target's revision (file sha256 or seed)
        tags["target_revision"] = str(read_manifest(data).target.revision)
    for f in sorted(Path(draft).iterdir()):
        if f.is_file():
            tags[f"sha256.{f.name}"] = sha256_file(f)
    return tags


def headfree_names(report) -> dict[str, str]:
    """{"best_headfree": decoder} when the report names the fastest head-free decoder (the gate
    reads it back from the version's tags to say what the head was measured against)."""
    from eagle3.eval.report import as_report

    best = as_report(report).overall.best_headfree
    return {"best_headfree": best} if best else {}


def registry_tags(metrics: dict[str, float], tags: dict[str, Any]) -> dict[str, Any]:
    """`tags` plus the REGISTRY_METRICS the evaluation measured (rounded)."""
    return {k: round(metrics[k], 6) for k in REGISTRY_METRICS if k in metrics} | tags


def champion_on_eval_set(
    recipe, tracker, eval_set: str, exclude_version: str | None, progress: bool = False
) -> dict | None:
    """The numbers of the champion (champion.json when S3 is configured, else the MLflow alias)
    on this eval set, or None when there is no champion other than `exclude_version`."""
    from eagle3.ops.champion import place_for
    from eagle3.ops.gate import gate_metrics
    from eagle3.ops.promotion import current_champion, fetch_version
    from eagle3.ops.tracking import report_metrics

    place = place_for(recipe, tracker)
    version, _ = current_champion(place)
    if version is None or version == str(exclude_version):
        return None
    baseline = recipe.promote.speedup_baseline
    tags = dict(place.tracker.version(place.model, version).tags)
    if tags.get("eval_set") == eval_set:
        out = gate_metrics(tags, baseline, eval_set)
        out["version"] = version
        out["source"] = "registry tags"
        return out
    # Measured elsewhere: benchmark the champion now, under the same settings as the candidate.
    with tempfile.TemporaryDirectory(prefix="eagle3-champion-") as tmp:
        d = fetch_version(place, version, Path(tmp) / "draft")
        from eagle3.eval.bench import run_bench

        report = run_bench(recipe, str(d), progress=progress)
    out = gate_metrics(report_metrics(report) | headfree_names(report), baseline, eval_set)
    out["version"] = version
    out["source"] = "re-benchmarked on this eval set"
    return out


def report_numbers(recipe, report, version: str | None = None, source: str | None = None) -> dict:
    """The gate numbers (GateNumbers as a dict) of one bench report under `recipe`'s eval set."""
    from eagle3.ops.gate import gate_metrics
    from eagle3.ops.tracking import eval_set_signature, report_metrics

    out = gate_metrics(
        report_metrics(report) | headfree_names(report),
        recipe.promote.speedup_baseline,
        eval_set_signature(recipe, report),
    )
    return (
        out
        | ({"version": str(version)} if version else {})
        | ({"source": source} if source else {})
    )
