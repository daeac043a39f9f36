"""The promotion gate: a pure decision from the candidate's numbers, the champion's and the recipe.

Promote only if: the candidate is lossless (when required), its checkpoint passes
`check_checkpoint`, tau and speedup clear the recipe's absolute floors, and - when a champion
exists and was measured on the SAME eval set - tau and speedup are not worse than the champion's
by more than the relative tolerance. Every failed condition becomes a reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    candidate: dict[str, Any] = field(default_factory=dict)
    champion: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def summary(self) -> str:
        head = "PROMOTE" if self.promote else "REJECT"
        return f"{head}: " + "; ".join(self.reasons)


def gate_metrics(metrics: dict[str, Any], baseline: str, eval_set: str | None) -> dict[str, Any]:
    """The numbers the gate reads, from report_metrics() output or a version's tags."""

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
    return {
        "tau": num("tau"),
        "speedup": num(f"speedup_vs_{baseline}"),
        "speedup_baseline": baseline,
        "lossless": lossless,
        "eval_set": eval_set,
    }


def decide(
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    promote_cfg: Any,
    check_problems: list[str],
) -> Decision:
    c = candidate
    reasons: list[str] = []
    ok = True
    b = c.get("speedup_baseline", "hf_generate")
    if check_problems:
        ok = False
        reasons.append(f"checkpoint fails `eagle3 check`: {'; '.join(check_problems[:3])}")
    if promote_cfg.require_lossless and c.get("lossless") is not True:
        ok = False
        reasons.append(f"not lossless (lossless={c.get('lossless')})")
    tau, sp = c.get("tau"), c.get("speedup")
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
    if champion is not None and tau is not None and sp is not None:
        v = champion.get("version", "?")
        if champion.get("eval_set") != c.get("eval_set"):
            ok = False
            reasons.append(
                f"champion v{v} was measured on another eval set "
                f"({champion.get('eval_set')} vs {c.get('eval_set')}); re-evaluate it first"
            )
        else:
            ct, cs = champion.get("tau"), champion.get("speedup")
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
        if champion is None:
            reasons.append(
                f"no champion yet; tau {tau:.3f} >= {promote_cfg.min_tau} and speedup vs {b} "
                f"{sp:.3f} >= {promote_cfg.min_speedup}"
            )
        if promote_cfg.require_lossless:
            reasons.append("lossless")
        if not check_problems:
            reasons.append("checkpoint passes `eagle3 check`")
    return Decision(ok, reasons, c, champion)
