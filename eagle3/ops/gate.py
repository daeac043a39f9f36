"""The promotion gate: a pure decision from the candidate's numbers, the champion's and the recipe.

Promote only if: the candidate is lossless (when required), its checkpoint passes
`check_checkpoint`, tau and speedup clear the recipe's absolute floors, and - when a champion
exists and was measured on the SAME eval set - tau and speedup are not worse than the champion's
by more than the relative tolerance. Every failed condition becomes a reason.
"""

from __future__ import annotations

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


def gate_metrics(metrics: dict[str, Any], baseline: str, eval_set: str | None) -> dict[str, Any]:
    """The numbers the gate reads (GateNumbers as a dict), from report_metrics() output or a
    version's tags."""

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
    return GateNumbers(
        tau=num("tau"),
        speedup=num(f"speedup_vs_{baseline}"),
        speedup_baseline=baseline,
        lossless=lossless,
        eval_set=eval_set,
    ).to_dict()


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
        if promote_cfg.require_lossless:
            reasons.append("lossless")
        if not check_problems:
            reasons.append("checkpoint passes `eagle3 check`")
    return GateDecision(promote=ok, reasons=reasons, candidate=c, champion=champ)
