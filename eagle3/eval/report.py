"""The bench report (docs/schemas/bench-report.schema.json): what `eagle3 bench` writes and the
flows, the gate, the release card and the printers read.

Field order is the order the JSON has always been written in, and `to_dict` leaves out what a
writer did not set, so a report written through these models is byte for byte the old dict.

Every model allows extra keys: reports outlive the code that wrote them (MLflow artifacts, release
folders), so a reader must take a report from a newer writer and keep what it does not know.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from eagle3.contract import Contract, first_error


class Summary(Contract):
    """Tau, speedups and losslessness over some prompts (`overall`, `tree_only`)."""

    tau: float = Field(description="new tokens / target verification forwards (bonus included)")
    speedup: dict[str, float] = Field(
        description="vs_<decoder>: tokens_per_s['eagle3'] / tokens_per_s[decoder]; "
        "vs_best_headfree: over the fastest head-free decoder of the run (best_headfree); "
        "vs_best_headfree_concurrent (vLLM): the lowest such ratio over the concurrency levels"
    )
    lossless: bool | None = Field(
        description="every greedy eagle3 output equals the target's own; null when sampling"
    )
    best_headfree: str | None = Field(
        default=None, description="the fastest head-free decoder measured in the same run"
    )
    best_headfree_concurrent: str | None = Field(
        default=None, description="vLLM: <decoder>@<level> of vs_best_headfree_concurrent"
    )


class DatasetSummary(Contract):
    """One data set's numbers; `tree_only` is the same prompts with the lookup branch off."""

    prompts: int
    new_tokens: int
    tau: float
    alpha: list[float] = Field(description="P(depth i+1 accepted | depth i accepted)")
    tokens_per_s: dict[str, float] = Field(description="per decoder: eagle3, ar, hf_generate, ...")
    speedup: dict[str, float]
    lossless: bool | None
    mismatches: list[str] | None = Field(
        default=None, description="<dataset>/<id>/turn<n> whose output differed (when any)"
    )
    tree_only: DatasetSummary | None = None


class Decoding(Contract):
    mode: str = Field(description="tree or chain")
    total_tokens: int
    depth: int
    top_k: int
    temperature: float
    draft_dtype: str | None = None
    lookup_tokens: int | None = Field(default=None, description="prompt-lookup branch; 0: off")
    engine: str | None = None


class AutotuneResult(Contract):
    mode: str
    total_tokens: int
    depth: int
    top_k: int
    tokens_per_s: float
    tau: float


class Autotune(Contract):
    best: dict[str, Any] = Field(description="the tree settings chosen: mode, total_tokens, ...")
    results: list[AutotuneResult]


class VllmLevel(Contract):
    """One concurrency level of the vLLM bench (`bs1`, `c<n>`)."""

    in_flight: int
    tokens_per_s: dict[str, float] = Field(
        description="eagle3: with the head; vllm: without; ngram: vLLM's model-free drafting"
    )
    speedup: float
    acceptance_length: float
    lossless_batched: bool | None = None
    same_as_bs1: int | None = None
    best_headfree: str | None = Field(default=None, description="fastest of vllm and ngram")
    speedup_vs_best_headfree: float | None = None


class VllmBlock(Contract):
    version: str
    speculative_tokens: int
    enforce_eager: bool
    acceptance_length: float
    alpha: list[float]
    per_position_acceptance: list[float]
    num_drafts: int
    num_accepted_tokens: int
    num_draft_tokens: int
    lossless: bool | None
    concurrency: dict[str, VllmLevel]
    start_seconds: dict[str, float]
    headfree_skipped: dict[str, str] | None = Field(
        default=None, description="head-free decoder -> why it was not measured"
    )


class Provenance(Contract):
    """Where the numbers come from (eagle3/eval/provenance.py)."""

    commit: str | None = Field(description="git commit of the code; null outside a checkout")
    dirty: bool | None = Field(description="tracked files differed from the commit")
    recipe: str | None = Field(description="the recipe file given on the command line")
    recipe_name: str
    profile: str | None
    overrides: list[str]
    settings_sha256: str = Field(description="of every resolved setting")
    limit: int | None = Field(description="prompts per data set; null: all")
    datasets: list[str]
    decoder_order: list[str] = Field(description="the first prompt's order")
    order: str = Field(description="how the order changes from prompt to prompt")


class BenchReport(Contract):
    """`eagle3 bench --out FILE` (own engine) or `eagle3 bench --engine vllm`."""

    engine: str | None = Field(default=None, description="absent: eagle3's own engine")
    target: str
    draft: str
    draft_sha256: str | None = Field(default=None, description="of the draft's model.safetensors")
    device: str
    dtype: str
    threads: int
    decoding: Decoding
    datasets: dict[str, DatasetSummary]
    overall: Summary
    tree_only: Summary | None = Field(default=None, description="the head alone, lookup off")
    engine_time: dict[str, float] | None = Field(
        default=None, description="seconds over all eagle3 generations: prefill/draft/verify/..."
    )
    autotune: Autotune | None = None
    resumed_prompts: int | None = Field(default=None, description="taken from the journal")
    vllm: VllmBlock | None = None
    provenance: Provenance | None = None

    @property
    def engine_name(self) -> str:
        return self.engine or "eagle3"

    def max_depth(self) -> int:
        return max((len(s.alpha) for s in self.datasets.values()), default=0)


def as_report(report: dict[str, Any] | BenchReport) -> BenchReport:
    """The typed report of a report dict (as run_bench returns and flows pass it on)."""
    return report if isinstance(report, BenchReport) else BenchReport.model_validate(report)


def read_report(path: str | Path) -> BenchReport:
    """A bench report file; ValueError naming the file and the first bad key when it is not one."""
    path = Path(path)
    try:
        return BenchReport.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    except ValidationError as e:
        raise ValueError(
            f"{path}: not a bench report (eagle3 bench --out): {first_error(e)}"
        ) from e
