"""`eagle3 release`: a trained draft as a head that ships in the repository (`heads/<name>/`).

The release (docs/CONTRACTS.md §8) holds the checkpoint in bf16 (model.safetensors + config.json,
§3), the bench reports its card quotes, CARD.md (data, training, held-out acceptance per TTT
step, bench figures, the commands that reproduce the head and its numbers) and SHA256SUMS over
every other file. It is built in a temp folder, checked (`eagle3 check`, size limit), then
swapped into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from eagle3.data.manifest import read_manifest
from eagle3.eval.report import read_report
from eagle3.heads import CARD_FILE, heads_dir, write_sums
from eagle3.io import atomic_dir, sha256_file


class ReleaseError(ValueError):
    """The draft cannot be released (invalid, too large, or its facts cannot be read)."""


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def release_head(
    draft_dir: str | Path,
    name: str,
    out: str | Path | None = None,
    bench: list[str | Path] | None = None,
    train_metrics: str | Path | None = None,
    reproduce: str | None = None,
    note: str | None = None,
    dtype: str = "bfloat16",
    max_mb: float = 25.0,
) -> Path:
    """Write the release; returns its folder (default heads/<name>)."""
    from eagle3.models.checkpoint import (
        WEIGHTS_FILE,
        check_checkpoint,
        load_draft,
        read_config,
        save_draft,
    )

    if not name or "/" in name or name.startswith("."):
        raise ReleaseError(f"--name {name!r}: a plain folder name is needed")
    draft_dir = Path(draft_dir)
    problems = check_checkpoint(draft_dir)
    if problems:
        raise ReleaseError(f"{draft_dir} is not a valid checkpoint: " + "; ".join(problems))
    out = Path(out) if out else heads_dir() / name
    facts = gather_facts(draft_dir, bench or [], train_metrics)
    facts["name"], facts["note"] = name, note
    facts["reproduce"] = reproduce or default_reproduce(facts, draft_dir)

    with atomic_dir(out) as head:
        extra = {"release": {"name": name}}
        save_draft(load_draft(draft_dir), head, dtype=dtype, extra=extra)
        size = (head / WEIGHTS_FILE).stat().st_size
        if size > max_mb * 1e6:
            raise ReleaseError(
                f"{WEIGHTS_FILE} is {size / 1e6:.1f} MB in {dtype}, over the {max_mb:g} MB a "
                "shipped head may take (a smaller data.draft_vocab_size shrinks lm_head)"
            )
        facts["size_mb"] = size / 1e6
        facts["weights_sha256"] = sha256_file(head / WEIGHTS_FILE)
        facts["config"] = read_config(head)
        for b in facts["bench"]:
            shutil.copyfile(b["path"], head / b["file"])
        (head / CARD_FILE).write_text(render_card(facts))
        write_sums(head)
        problems = check_checkpoint(head)
        if problems:
            raise ReleaseError("the release fails `eagle3 check`: " + "; ".join(problems))
    return out


# --- what the card says ---------------------------------------------------------------------------
def gather_facts(draft_dir: Path, bench: list, train_metrics) -> dict[str, Any]:
    """The checkpoint's own record, the training metrics and data manifests of its run (when
    found beside it) and the bench reports."""
    from eagle3.models.checkpoint import read_config

    cfg = read_config(draft_dir)
    tm_path = Path(train_metrics) if train_metrics else draft_dir.parent / "train_metrics.json"
    if train_metrics and not tm_path.is_file():
        raise ReleaseError(f"--train-metrics {tm_path}: no such file")
    tm = _read_json(tm_path) if tm_path.is_file() else None
    run_dir = tm_path.parent if tm else draft_dir.parent
    stages = []
    for d in sorted(run_dir.glob("data*")):
        try:
            stages.append((d.name, read_manifest(d)))
        except (OSError, ValueError):  # no manifest, or not one: the card leaves it out
            continue
    reports = []
    for i, path in enumerate(bench):
        path = Path(path)
        try:
            rep = read_report(path)
        except OSError as e:
            raise ReleaseError(f"--bench {path}: cannot be read ({e.strerror or e})") from e
        except ValueError as e:
            raise ReleaseError(f"--bench {e}") from e
        sets = rep.datasets
        n = max(s.prompts for s in sets.values()) if sets else 0
        file = f"bench-{'-'.join(sets)}-{n}.json"
        if any(r["file"] == file for r in reports):
            file = file.replace(".json", f"-{i}.json")
        reports.append({"path": path, "file": file, "report": rep, "limit": n})
    return {
        "eagle3": cfg.get("eagle3") or {},
        "vocab_size": cfg.get("vocab_size"),
        "draft_vocab_size": cfg.get("draft_vocab_size"),
        "train": tm,
        "stages": stages,
        "bench": reports,
    }


def default_reproduce(facts: dict, draft_dir: Path) -> str:
    """The pipeline of the checkpoint's recipe and profile, then this release (as run now)."""
    bench = "".join(f" --bench {b['path']}" for b in facts["bench"])
    return (
        f"eagle3 pipeline {_recipe_args(facts)}\n"
        f"eagle3 release --draft {draft_dir} --name {facts['name']}{bench}"
    )


def _recipe_args(facts: dict) -> str:
    e = facts["eagle3"]
    profile = f" --profile {e['profile']}" if e.get("profile") else ""
    return f"--config configs/{e.get('recipe') or '<recipe>'}.yaml{profile}"


def bench_command(facts: dict, b: dict) -> str:
    """The report's own command: its engine and the overrides it recorded (provenance)."""
    rep = b["report"]
    sets = ",".join(rep.datasets)
    engine = " --engine vllm" if rep.vllm else ""
    overrides = "".join(f" '{o}'" for o in (rep.provenance.overrides if rep.provenance else []))
    return (
        f"eagle3 bench {_recipe_args(facts)}{engine} --draft {facts['name']} --datasets {sets} "
        f"--limit {b['limit']} --out bench.json{overrides}"
    )


def _f(x, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else "?"


def _data_rows(facts: dict) -> list[str]:
    rows = [
        "| stage | sources | samples (train / held-out) | tokens (trainable) | answers |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, m in facts["stages"]:
        src = ", ".join(f"{s.name} ({s.kept} conversations)" for s in m.sources)
        s, t, r = m.samples, m.tokens, m.regeneration
        how = (
            f"regenerated by the target (T={r.temperature}, ≤ {r.max_new_tokens} "
            "new tokens per turn)"
            if r.enabled
            else "the sources' own (teacher-forced)"
        )
        recorded = sum(x.answers_recorded or 0 for x in m.sources)
        if recorded:  # traffic: the target's served answers, reused where settings matched
            again = sum(x.answers_regenerated or 0 for x in m.sources)
            how = f"the target's own served answers ({recorded:,} reused, {again:,} regenerated)"
        rows.append(
            f"| {name} | {src} | {s.train:,} / {s.val:,} | {t.total:,} ({t.trainable:,}) | {how} |"
        )
    return rows


def _micro_batch_size(tm: dict) -> str:
    """What a step trained on: a micro-batch holds at least one packed row, so train.batch_tokens
    below train.max_len means one row a step, and the tokens a step saw exceed batch_tokens."""
    st, trained = tm.get("settings") or {}, (tm.get("data") or {}).get("train") or {}
    tokens, batches = trained.get("tokens"), trained.get("micro_batches")
    limits = f"train.batch_tokens {st.get('batch_tokens')}, rows of up to {st.get('max_len')}"
    if not tokens or not batches:
        return f"micro-batches of {limits}"
    return f"{round(tokens / batches):,} tokens per micro-batch on average ({limits})"


def _training_lines(facts: dict) -> list[str]:
    e, tm = facts["eagle3"], facts["train"]
    tr = e.get("train") or {}
    if not tm:
        return [f"Step {tr.get('step')} of its run; the run's train_metrics.json was not found."]
    st = tm.get("settings") or {}
    best = tm.get("best") or {}
    data = tm.get("data") or {}
    trained = data.get("train") or {}
    lines = [
        f"{tm['total_steps']:,} optimizer steps ({tm['total_steps'] / tm['steps_per_epoch']:.2f} "
        f"epochs of {tm['steps_per_epoch']:,}) on {_n(trained.get('samples'))} samples "
        f"({_n(trained.get('tokens'))} tokens), features "
        f"{tm.get('features')}, loss style {tm.get('loss_style', 'eagle3')}, "
        f"{e.get('train', {}).get('ttt_steps')} TTT steps; AdamW lr {st.get('lr')} with "
        f"{st.get('warmup_ratio')} warmup then cosine to 0; {_micro_batch_size(tm)}.",
        "",
        f"This checkpoint is step {best.get('step', tr.get('step'))}, the best by "
        f"`{best.get('metric') or tr.get('best_metric')}` "
        f"({_f(best.get('value'), '.4f')}) among the validations.",
    ]
    m = best.get("metrics") or {}
    steps = sorted(int(k.split("_")[-1]) for k in m if k.startswith("val/acc_"))
    if steps:
        n_val = data.get("val", {}).get("samples", "?")
        lines += [
            "",
            f"Held-out, at that step ({n_val} samples never trained on; acc_i: the draft's top-1 "
            "equals the target's at TTT step i; accept_i: expected acceptance of a sampled token):",
            "",
            "| TTT step | " + " | ".join(str(i) for i in steps) + " |",
            "| --- |" + " --- |" * len(steps),
            "| acc | " + " | ".join(_f(m.get(f"val/acc_{i}"), ".3f") for i in steps) + " |",
            "| accept | " + " | ".join(_f(m.get(f"val/accept_{i}"), ".3f") for i in steps) + " |",
        ]
    return lines


def _bench_lines(facts: dict) -> list[str]:
    out = []
    for b in facts["bench"]:
        rep = b["report"]
        if rep.vllm:
            out += _vllm_bench_lines(facts, b)
            continue
        d = rep.decoding
        which = (
            "these weights"
            if rep.draft_sha256 == facts.get("weights_sha256")
            else "the checkpoint this head was converted from (not these bf16 weights: the "
            "command below measures them)"
        )
        out += [
            f"`{b['file']}`, measured on {which}: {rep.device}, target {rep.dtype}, "
            f"draft computing in {d.draft_dtype or rep.dtype}, threads "
            f"{rep.threads}, T={d.temperature}, tree {d.total_tokens}/"
            f"{d.depth}/{d.top_k} (tokens/depth/top-k), prompt-lookup branch "
            f"{d.lookup_tokens or 0} tokens:",
            "",
            "| data set | prompts | new tokens | tau | × HF generate | × HF prompt lookup "
            "| tree only: tau | × HF generate | lossless |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, s in rep.datasets.items():
            sp, alone = s.speedup, s.tree_only
            out.append(
                f"| {name} | {s.prompts} | {s.new_tokens:,} | {_f(s.tau)} | "
                f"{_f(sp.get('vs_hf_generate'))} | {_f(sp.get('vs_hf_prompt_lookup'))} | "
                f"{_f(alone and alone.tau)} | {_f(alone and alone.speedup.get('vs_hf_generate'))}"
                f" | {s.lossless} |"
            )
        out += ["", "Reproduce these numbers:", "", "```bash", bench_command(facts, b), "```", ""]
    return out or ["No bench report was given to `eagle3 release --bench`.", ""]


def _vllm_bench_lines(facts: dict, b: dict) -> list[str]:
    rep = b["report"]
    v = rep.vllm
    out = [
        f"`{b['file']}`, vLLM ({v.version}) with the head against plain vLLM, the same "
        f"server settings, chain of {v.speculative_tokens} speculative tokens, "
        f"{rep.device}, target {rep.dtype}, T={rep.decoding.temperature}, batch 1:",
        "",
        "| data set | prompts | new tokens | acceptance length | accepted at position 1.. "
        "| × plain vLLM | lossless |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    pos = " / ".join(f"{x:.3f}" for x in v.per_position_acceptance)
    for name, s in rep.datasets.items():
        out.append(
            f"| {name} | {s.prompts} | {s.new_tokens:,} | {_f(s.tau, '.3f')} | {pos or '–'} | "
            f"{_f(s.speedup.get('vs_vllm'))} | {s.lossless} |"
        )
    return out + ["", "Reproduce these numbers:", "", "```bash", bench_command(facts, b), "```", ""]


def render_card(facts: dict) -> str:
    e, cfg = facts["eagle3"], facts["config"]
    lines = [
        f"# {facts['name']}",
        "",
        f"An EAGLE-3 draft head for `{e.get('target')}` (revision "
        f"`{str(e.get('target_revision'))[:16]}`): bf16 safetensors, {facts['size_mb']:.1f} MB; "
        f"draft vocabulary {cfg.get('draft_vocab_size'):,} of {cfg.get('vocab_size'):,} tokens. "
        "It runs on any target dtype: `infer.draft_dtype` sets the dtype it computes in, and the "
        "target's verification alone decides every token.",
        "",
        "```bash",
        f"eagle3 generate {_recipe_args(facts)} --draft {facts['name']} --prompt 'Hello!'",
        f"eagle3 check heads/{facts['name']}   # contract §3 and every sha256 in SHA256SUMS",
        "```",
        "",
        "## Data",
        "",
        *_data_rows(facts),
        "",
        f"Data digest `{e.get('data_digest')}`.",
        "",
        "## Training",
        "",
        *_training_lines(facts),
        "",
        "## Bench",
        "",
        "tau: tokens per target forward; × HF generate / × HF prompt lookup: tokens/s against "
        "those decoders, each prompt decoded by all of them back to back in one process; tree "
        "only: the same head with the prompt-lookup branch off; lossless: every output equals "
        "HF generate's greedy output token for token.",
        "",
        *_bench_lines(facts),
        "## Reproduce the head",
        "",
        "```bash",
        facts["reproduce"],
        "```",
    ]
    if facts.get("note"):
        lines += ["", facts["note"]]
    return "\n".join(lines) + "\n"
