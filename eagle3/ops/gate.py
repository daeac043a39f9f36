"""The promotion gate: a pure decision from the candidate's numbers, the champion's and the recipe.

Promote only if: the candidate is lossless (when required), its checkpoint passes
`check_checkpoint`, every number is finite, tau and speedup clear the recipe's absolute floors,
the head beats the fastest head-free decoder of its engine measured in the same run (at batch 1
and, in vLLM, at every concurrency level) by the recipe's floors, and - when a champion exists and
was measured on the SAME eval set - tau and speedups are not worse than the champion's by more
than the relative tolerance. Every failed condition becomes a reason.

A NaN compares false with everything, so a NaN would pass every `<` test: non-finite numbers,
the candidate's or the champion's, are refused by name before any comparison.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ConfigDict, Field

from eagle3.contract import Contract


class GateNumbers(Contract):
    """The numbers the gate compares, of a candidate or a champion (docs/schemas/gate-decision).

    Extra keys are allowed: a champion's numbers are read back from champion.json and registry
    tags, which other versions of this code may have written."""

    tau: float | None = None
    speedup: float | None = Field(default=None, description="vs speedup_baseline")
    speedup_baseline: str | None = Field(default=None, description="decoder; hf_generate if absent")
    lossless: bool | None = None
    speedup_vs_headfree: float | None = Field(
        default=None, description="over the fastest head-free decoder of the run, batch 1"
    )
    best_headfree: str | None = Field(default=None, description="which decoder that was")
    speedup_vs_headfree_concurrent: float | None = Field(
        default=None, description="vLLM: the lowest such ratio over the concurrency levels > 1"
    )
    engine: str | None = Field(
        default=None, description="eagle3 (serves one request at a time) or vllm"
    )
    eval_set: str | None = Field(default=None, description="eval_set_signature of the bench")
    version: str | None = Field(default=None, description="a champion's registry version")
    source: str | None = Field(default=None, description="where a champion's numbers come from")


class GateDecision(Contract):
    """What the gate decided and from which numbers.

    Extra keys are refused: a decision is made and read by this code base within one run (the
    evaluation hands it to the promotion), so an unknown key is a bug, not a newer writer."""

    model_config = ConfigDict(extra="forbid")

    promote: bool
    reasons: list[str] = Field(default_factory=list)
    candidate: GateNumbers = Field(default_factory=GateNumbers)
    champion: GateNumbers | None = None

    @property
    def verdict(self) -> str:
        return "PROMOTE" if self.promote else "REJECT"

    @property
    def summary(self) -> str:
        return f"{self.verdict}: " + "; ".join(self.reasons)


def as_decision(decision: dict[str, Any] | GateDecision) -> GateDecision:
    """The typed decision of a decision dict (as flows pass it on)."""
    if isinstance(decision, GateDecision):
        return decision
    return GateDecision.model_validate(decision)


# The numbers decide() compares, by GateNumbers field: a non-finite one is refused by name.
NUMBERS = ("tau", "speedup", "speedup_vs_headfree", "speedup_vs_headfree_concurrent")


def gate_metrics(metrics: dict[str, Any], baseline: str, eval_set: str | None) -> dict[str, Any]:
    """The numbers the gate reads (GateNumbers as a dict), from report_metrics() output or a
    version's tags. The head-free ratios and the engine are set only when the metrics carry them
    (numbers written before the head-free comparison keep their old shape)."""

    def num(k):
        v = metrics.get(k)
        try:
            return float(v) if v is not None else None
        except (TypeError, ValueError):
            return None

    lossless = metrics.get("lossless")
    if isinstance(lossless, str):
        lossless = lossless.strip().lower() in ("1", "1.0", "true")
    elif lossless is not None:
        lossless = bool(float(lossless))
    extra: dict[str, Any] = {}
    for field, key in (
        ("speedup_vs_headfree", "speedup_vs_best_headfree"),
        ("speedup_vs_headfree_concurrent", "speedup_vs_best_headfree_concurrent"),
    ):
        if num(key) is not None:
            extra[field] = num(key)
    if isinstance(metrics.get("best_headfree"), str):
        extra["best_headfree"] = metrics["best_headfree"]
    # vLLM benches always log vllm/* numbers; our engine's never do.
    if any(str(k).startswith("vllm/") for k in metrics):
        extra["engine"] = "vllm"
    elif "speedup_vs_headfree" in extra:
        extra["engine"] = "eagle3"
    return GateNumbers(
        tau=num("tau"),
        speedup=num(f"speedup_vs_{baseline}"),
        speedup_baseline=baseline,
        lossless=lossless,
        eval_set=eval_set,
        **extra,
    ).to_dict()


def not_finite(numbers: GateNumbers) -> list[str]:
    """`name=value` of every NaN or infinite number the gate would compare."""
    out = []
    for name in NUMBERS:
        v = getattr(numbers, name)
        if v is not None and not math.isfinite(v):
            out.append(f"{name}={v}")
    return out


def headfree_reasons(c: GateNumbers, cfg: Any) -> list[str]:
    """Why the candidate fails the head-free floors (empty: it clears them, or they are off)."""
    out = []
    floor = getattr(cfg, "min_speedup_vs_headfree", 0.0)
    best = f" ({c.best_headfree})" if c.best_headfree else ""
    if floor > 0:
        if c.speedup_vs_headfree is None:
            out.append(
                "no speedup vs the best head-free decoder in the evaluation (a bench from before "
                "the head-free comparison?): re-evaluate"
            )
        elif c.speedup_vs_headfree < floor:
            out.append(
                f"speedup vs the best head-free decoder{best} {c.speedup_vs_headfree:.3f} below "
                f"the floor {floor:.3f}: the head does not beat decoding without it"
            )
    cfloor = getattr(cfg, "min_speedup_vs_headfree_concurrent", 0.0)
    conc = c.speedup_vs_headfree_concurrent
    if cfloor > 0 and c.engine != "eagle3":  # our engine serves one request at a time
        if conc is None:
            out.append("no speedup vs the best head-free decoder at concurrency in the evaluation")
        elif conc < cfloor:
            out.append(
                f"speedup vs the best head-free decoder at concurrency {conc:.3f} below the "
                f"floor {cfloor:.3f}"
            )
    return out


def decide(
    candidate: dict[str, Any] | GateNumbers,
    champion: dict[str, Any] | GateNumbers | None,
    promote_cfg: Any,
    check_problems: list[str],
) -> GateDecision:
    c = GateNumbers.model_validate(candidate)
    champ = None if champion is None else GateNumbers.model_validate(champion)
    reasons: list[str] = []
    ok = True
    b = c.speedup_baseline or "hf_generate"
    if check_problems:
        ok = False
        reasons.append(f"checkpoint fails `eagle3 check`: {'; '.join(check_problems[:3])}")
    if promote_cfg.require_lossless and c.lossless is not True:
        ok = False
        reasons.append(f"not lossless (lossless={c.lossless})")
    bad = not_finite(c)
    if bad:
        return GateDecision(
            promote=False,
            reasons=[*reasons, f"candidate numbers are not finite: {', '.join(bad)}"],
            candidate=c,
            champion=champ,
        )
    if champ is not None and not_finite(champ):
        v = champ.version or "?"
        return GateDecision(
            promote=False,
            reasons=[
                *reasons,
                f"champion v{v}'s numbers are not finite ({', '.join(not_finite(champ))}): no "
                "comparison can hold against them; re-evaluate the champion",
            ],
            candidate=c,
            champion=champ,
        )
    tau, sp = c.tau, c.speedup
    if tau is None:
        ok = False
        reasons.append("no tau in the evaluation")
    elif tau < promote_cfg.min_tau:
        ok = False
        reasons.append(f"tau {tau:.3f} below the floor {promote_cfg.min_tau:.3f}")
    if sp is None:
        ok = False
        reasons.append(f"no speedup vs {b} in the evaluation")
    elif sp < promote_cfg.min_speedup:
        ok = False
        reasons.append(f"speedup vs {b} {sp:.3f} below the floor {promote_cfg.min_speedup:.3f}")
    headfree = headfree_reasons(c, promote_cfg)
    if headfree:
        ok = False
        reasons += headfree
    tol = promote_cfg.tolerance
    if champ is not None and tau is not None and sp is not None:
        v = champ.version if "version" in champ.model_fields_set else "?"
        if champ.eval_set != c.eval_set:
            ok = False
            reasons.append(
                f"champion v{v} was measured on another eval set "
                f"({champ.eval_set} vs {c.eval_set}); re-evaluate it first"
            )
        else:
            ct, cs = champ.tau, champ.speedup
            if ct is not None and tau < ct * (1 - tol):
                ok = False
                reasons.append(
                    f"tau {tau:.3f} worse than champion v{v}'s {ct:.3f} by more than {tol:.0%}"
                )
            if cs is not None and sp < cs * (1 - tol):
                ok = False
                reasons.append(
                    f"speedup vs {b} {sp:.3f} worse than champion v{v}'s {cs:.3f} by more "
                    f"than {tol:.0%}"
                )
            ch, h = champ.speedup_vs_headfree, c.speedup_vs_headfree
            if ch is None and h is not None:
                reasons.append(
                    f"champion v{v} has no speedup vs the best head-free decoder (numbers from "
                    "an older bench): not compared on it"
                )
            elif ch is not None and h is not None and h < ch * (1 - tol):
                ok = False
                reasons.append(
                    f"speedup vs the best head-free decoder {h:.3f} worse than champion v{v}'s "
                    f"{ch:.3f} by more than {tol:.0%}"
                )
            if ok:
                reasons.append(
                    f"tau {tau:.3f} / speedup {sp:.3f} within {tol:.0%} of or better than "
                    f"champion v{v} ({ct}, {cs}) on the same eval set"
                )
    if ok:
        if champ is None:
            reasons.append(
                f"no champion yet; tau {tau:.3f} >= {promote_cfg.min_tau} and speedup vs {b} "
                f"{sp:.3f} >= {promote_cfg.min_speedup}"
            )
        if c.speedup_vs_headfree is not None:
            reasons.append(_headfree_line(c, promote_cfg))
        if promote_cfg.require_lossless:
            reasons.append("lossless")
        if not check_problems:
            reasons.append("checkpoint passes `eagle3 check`")
    return GateDecision(promote=ok, reasons=reasons, candidate=c, champion=champ)


def _headfree_line(c: GateNumbers, cfg: Any) -> str:
    best = f" ({c.best_headfree})" if c.best_headfree else ""
    line = (
        f"speedup vs the best head-free decoder{best} {c.speedup_vs_headfree:.3f} >= "
        f"{getattr(cfg, 'min_speedup_vs_headfree', 0.0):g}"
    )
    if c.speedup_vs_headfree_concurrent is not None:
        line += (
            f", at concurrency {c.speedup_vs_headfree_concurrent:.3f} >= "
            f"{getattr(cfg, 'min_speedup_vs_headfree_concurrent', 0.0):g}"
        )
    elif c.engine == "eagle3":
        line += "; concurrency not gated: our engine serves one request at a time"
    return line
