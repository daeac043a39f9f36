"""Adaptation: the champion fine-tuned on served traffic, and when the result may replace it.

`adapt_recipe` derives the recipe of one adaptation from the recipe it serves: the traffic of a
time window as the main data stage (its newest `traffic.held_out_fraction` held out: validation,
never trained on), a replay share of the recipe's own sources as a data.mix stage (against
forgetting), the champion's verified weights as train.init_from (and its draft vocabulary as
data.vocab_from), and the short schedule of the `adapt` section.

`adaptation_decision` compares the candidate with the champion, both benched in the same run on
the held-out newest traffic and on the general set (eval.datasets): lossless, acceptance and speed
better on the held-out traffic by the recipe's margins, the general set not worse by more than
`adapt.max_general_loss`. The promotion itself then goes through the usual gate and
compare-and-swap (eagle3/ops/promotion.py).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from eagle3.traffic.source import NAME as TRAFFIC

# The catalog name of the held-out traffic prompts when they are benched.
HELD_OUT = "traffic_held_out"
REPLAY = "replay"


def window_slug(since: str | None, until: str | None) -> str:
    """`<since>--<until>` with only [A-Za-z0-9-] (a folder name); `start` / `now` when open."""

    def part(t: str | None, open_as: str) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", t).strip("-") if t else open_as

    return f"{part(since, 'start')}--{part(until, 'now')}"


def replay_count(share: float, traffic_train: int) -> int:
    """Replay conversations for `traffic_train` traffic conversations trained on, so that replay
    makes up `share` of the mix."""
    if share <= 0 or traffic_train <= 0:
        return 0
    return max(1, round(share / (1 - share) * traffic_train))


def replay_sources(sources: list, n: int) -> list[dict[str, Any]]:
    """The recipe's non-traffic sources cut to `n` conversations in all, split evenly (a source's
    own smaller limit wins); sources left with none are dropped."""
    base = [s for s in sources if s.name != TRAFFIC]
    out = []
    for i, s in enumerate(base):
        quota = n // len(base) + (i < n % len(base))
        limit = min(quota, s.limit) if s.limit is not None else quota
        if limit > 0:
            out.append(s.model_dump(mode="json", exclude_none=True) | {"limit": limit})
    return out


def adapt_recipe(
    recipe,
    champion_dir: str | Path,
    since: str | None,
    until: str | None,
    traffic_train: int,
    champion_version: str | None = None,
):
    """The recipe of one adaptation (see the module docstring). `traffic_train`: the traffic
    conversations of the window that are trained on (not held out); it sizes the replay share.
    The run dir is `<run_dir>-adapt/<window>[-v<champion>]`, so each window and champion resumes
    on its own."""
    from pydantic import ValidationError

    from eagle3.config import ConfigError, Recipe, _format_errors

    a = recipe.adapt
    tree = recipe.model_dump(mode="json")
    window = (
        {"name": TRAFFIC}
        | ({"since": since} if since else {})
        | ({"until": until} if until else {})
    )
    replay = replay_sources(recipe.data.sources, replay_count(a.replay_share, traffic_train))
    tree["data"].update(
        sources=[window],
        limit=None,
        vocab_from=str(champion_dir),
        mix=[{"name": REPLAY, "sources": replay, "regenerate": recipe.data.regenerate}]
        if replay
        else [],
    )
    tree["train"].update(
        init_from=str(champion_dir),
        max_steps=a.max_steps,
        epochs=a.epochs,
        lr=a.lr if a.lr is not None else recipe.train.lr,
        mix_data=[],
    )
    suffix = f"-v{champion_version}" if champion_version else ""
    tree["run_dir"] = f"{recipe.run_path}-adapt/{window_slug(since, until)}{suffix}"
    try:  # not build_recipe: a profile would be merged again over these settings
        return Recipe.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, f"<adaptation of {recipe.name}>")) from None


def held_out_prompts(records: list, val_ids) -> list[dict[str, Any]]:
    """Bench prompts ({id, turns}: the user turns) of the traffic records the data stage held out
    (`val_ids`: the manifest's split.val_ids), oldest first."""
    val = set(val_ids)
    return [
        {"id": r.id, "turns": [m["content"] for m in r.messages if m.get("role") == "user"]}
        for r in records
        if f"{TRAFFIC}:{r.id}" in val
    ]


def window_counts(recipe, since: str | None, until: str | None) -> dict[str, int]:
    """{records, held_out, train} of the traffic window (read from S3, split as the data stage
    will split it); raises the traffic source's SourceError when the window is too small."""
    from eagle3.config import SourceSpec
    from eagle3.traffic.source import load_traffic

    t = load_traffic(recipe, SourceSpec(name=TRAFFIC, since=since, until=until))
    n, held = len(t.records), len(t.held_out)
    return {"records": n, "held_out": held, "train": n - held}


def write_held_out(recipe, val_ids, path: str | Path) -> int:
    """Write the held-out traffic prompts of the adapted recipe's data stage (`val_ids`: its
    manifest's split.val_ids) to `path` as JSONL ({id, turns}); returns how many."""
    import json

    from eagle3.io import write_atomic
    from eagle3.traffic.source import load_traffic

    (spec,) = recipe.data.sources
    rows = held_out_prompts(load_traffic(recipe, spec).records, val_ids)
    if not rows:
        raise ValueError(
            f"no held-out traffic prompt in {recipe.run_path}: the data stage held out none of "
            "the window's records"
        )
    write_atomic(Path(path), "".join(json.dumps(r) + "\n" for r in rows).encode())
    return len(rows)


def bench_recipes(recipe, held_out_file: str | Path):
    """(recipe benching the held-out traffic prompts in `held_out_file`, recipe benching the
    general set): same engine and decoding settings, only the eval sets and limits differ."""
    a = recipe.adapt
    catalog = dict(recipe.data.catalog)
    from eagle3.config import CatalogEntry

    catalog[HELD_OUT] = CatalogEntry(path=str(held_out_file), format="auto")
    traffic = recipe.model_copy(
        update={
            "data": recipe.data.model_copy(update={"catalog": catalog}),
            "eval": recipe.eval.model_copy(
                update={"datasets": [HELD_OUT], "limit": a.held_out_limit}
            ),
        }
    )
    general = recipe.model_copy(
        update={
            "eval": recipe.eval.model_copy(update={"limit": a.general_limit or recipe.eval.limit})
        }
    )
    return traffic, general


# --- the decision --------------------------------------------------------------------------------
def _number(x) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def adaptation_decision(
    candidate: dict[str, Any], champion: dict[str, Any], margins
) -> tuple[bool, list[str]]:
    """(promote, reasons). `candidate`, `champion`: {"traffic": ..., "general": ...}, each gate
    numbers (eagle3.ops.gate.gate_metrics) measured in the same run; `margins`: the recipe's
    `adapt` section. Refused: each failed condition is a reason. Promoted: the reasons say by how
    much each condition held."""
    from eagle3.ops.gate import GateNumbers

    ct, cg = (GateNumbers.model_validate(candidate[k]) for k in ("traffic", "general"))
    ht, hg = (GateNumbers.model_validate(champion[k]) for k in ("traffic", "general"))
    fails: list[str] = []
    held: list[str] = []
    for where, n in (("held-out traffic", ct), ("general set", cg)):
        if n.lossless is not True:
            fails.append(f"not lossless on the {where} (lossless={n.lossless})")
    if not fails:
        held.append("lossless on the held-out traffic and the general set")

    c, h = _number(ct.tau), _number(ht.tau)
    if c is None or h is None:
        fails.append(f"acceptance on held-out traffic not measured (tau {ct.tau} vs {ht.tau})")
    elif c - h < margins.min_acceptance_gain:
        fails.append(
            f"acceptance gain on held-out traffic {c - h:+.3f} (tau {c:.3f} vs champion "
            f"{h:.3f}) below min_acceptance_gain {margins.min_acceptance_gain:g}"
        )
    else:
        held.append(f"acceptance on held-out traffic {c:.3f} vs champion {h:.3f} ({c - h:+.3f})")

    b = ct.speedup_baseline or "hf_generate"
    c, h = _number(ct.speedup), _number(ht.speedup)
    if c is None or h is None or h <= 0:
        fails.append(f"speed on held-out traffic not measured (speedup vs {b} {ct.speedup} vs {h})")
    elif c / h < margins.min_speed_gain:
        fails.append(
            f"speed on held-out traffic {c / h:.3f}x the champion's (speedup vs {b} {c:.3f} vs "
            f"{h:.3f}) below min_speed_gain {margins.min_speed_gain:g}"
        )
    else:
        held.append(f"speed on held-out traffic {c / h:.3f}x the champion's (vs {b} {c:.3f})")

    c, h = _number(cg.tau), _number(hg.tau)
    if c is None or h is None:
        fails.append(f"acceptance on the general set not measured (tau {cg.tau} vs {hg.tau})")
    elif c < h * (1 - margins.max_general_loss):
        fails.append(
            f"acceptance on the general set {c:.3f} is {1 - c / h:.1%} below the champion's "
            f"{h:.3f}: more than max_general_loss {margins.max_general_loss:.0%}"
        )
    else:
        held.append(
            f"acceptance on the general set {c:.3f} vs champion {h:.3f} (within "
            f"{margins.max_general_loss:.0%})"
        )
    return (not fails), (fails or held)
