"""`eagle3 bench` on the tiny recipe: the §4 report, lossless, CLI exit codes; tree auto-tuning."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from conftest import ROOT

from eagle3.cli import main
from eagle3.config import load_recipe
from eagle3.eval.bench import print_report, run_bench
from eagle3.eval.report import BenchReport
from eagle3.models.checkpoint import load_draft, save_draft

pytestmark = pytest.mark.slow

QUICK = ["eval.max_new_tokens=12", "eval.warmup=1", "eval.threads=1"]
DECODERS = {"eagle3", "ar", "hf_generate", "hf_prompt_lookup"}
SPEEDUPS = {"vs_ar", "vs_hf_generate", "vs_hf_prompt_lookup"}


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def head_dir(tiny_trained_head, tmp_path_factory):
    return save_draft(tiny_trained_head, tmp_path_factory.mktemp("bench") / "draft")


def test_report_follows_the_contract(head_dir, capsys):
    recipe = load_recipe(ROOT / "configs" / "tiny.yaml", QUICK)
    seen = []
    report = run_bench(
        recipe, head_dir, datasets=["mt_bench"], limit=1, progress=False, on_prompt=seen.append
    )
    json.dumps(report)  # plain data
    # The typed contract: the report validates against the checked-in schema, reads back byte for
    # byte, and keeps the key order it has always been written in.
    jsonschema.validate(
        report, json.loads((ROOT / "docs/schemas/bench-report.schema.json").read_text())
    )
    assert json.dumps(BenchReport.model_validate(report).to_dict()) == json.dumps(report)
    assert list(report) == [
        "target",
        "draft",
        "draft_sha256",
        "device",
        "dtype",
        "threads",
        "decoding",
        "datasets",
        "overall",
        "engine_time",
        "resumed_prompts",
    ]
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["threads"] == 1
    d = report["decoding"]
    assert d == {
        "mode": "tree",
        "total_tokens": 16,
        "depth": 4,
        "top_k": 4,
        "temperature": 0.0,
        "draft_dtype": "float32",  # infer.draft_dtype auto: the target's
        "lookup_tokens": 0,
    }
    s = report["datasets"]["mt_bench"]
    assert set(s) == {
        "prompts",
        "new_tokens",
        "tau",
        "alpha",
        "tokens_per_s",
        "speedup",
        "lossless",
    }
    assert s["prompts"] == 1 and 2 <= s["new_tokens"] <= 2 * 12  # two turns
    assert s["lossless"] is True and s["tau"] >= 1.0
    assert len(s["alpha"]) == 4 and all(0.0 <= a <= 1.0 for a in s["alpha"])
    assert set(s["tokens_per_s"]) == DECODERS and all(v > 0 for v in s["tokens_per_s"].values())
    assert set(s["speedup"]) == SPEEDUPS
    tps = s["tokens_per_s"]
    assert s["speedup"]["vs_ar"] == pytest.approx(tps["eagle3"] / tps["ar"], rel=1e-2)
    o = report["overall"]
    assert (
        set(o) >= {"tau", "speedup", "lossless"} and o["lossless"] is True and o["tau"] == s["tau"]
    )
    assert [p["id"] for p in seen] == ["mt_bench/mt_bench:81/turn1", "mt_bench/mt_bench:81/turn2"]
    assert all(p["lossless"] for p in seen)
    print_report(report)
    out = capsys.readouterr().out
    assert "alpha per depth (mt_bench)" in out and "True" in out


def test_cli_bench_writes_the_report_and_rejects_bad_input(head_dir, tmp_path):
    out = tmp_path / "r.json"
    cfg = str(ROOT / "configs" / "tiny.yaml")
    args = ["bench", "--config", cfg, "--draft", str(head_dir), "--out", str(out), "--limit", "1"]
    assert (
        main([*args, "eval.max_new_tokens=6", "eval.threads=1", "eval.baselines=[hf_generate]"])
        == 0
    )
    report = json.loads(out.read_text())
    assert report["datasets"]["mt_bench"]["lossless"] is True
    assert set(report["datasets"]["mt_bench"]["tokens_per_s"]) == {"eagle3", "hf_generate"}
    assert main([*args, "--datasets", "no_such_set"]) == 2
    assert main([*args, "eval.baselines=[nope]"]) == 2
    assert (
        main(["bench", "--config", cfg, "--draft", str(tmp_path / "missing"), "--out", str(out)])
        == 2
    )


def test_autotune_writes_the_best_tree_into_the_checkpoint(
    head_dir, tiny_target, tiny_recipe, tmp_path
):
    import infer_support

    from eagle3.infer.autotune import autotune, save_tuned
    from eagle3.infer.engine import SpecEngine, tuned_infer

    torch.set_num_threads(1)
    draft = load_draft(head_dir)
    engine = SpecEngine(tiny_target, draft, tiny_recipe.infer)
    grid = [("chain", 2, 2, 1), ("tree", 8, 3, 3)]
    prompts = infer_support.random_prompts(n_seq=2).tolist()
    tuned = autotune(engine, prompts, grid=grid, max_new_tokens=8)
    assert engine.cfg == tiny_recipe.infer  # restored
    assert [
        (r["mode"], r["total_tokens"], r["depth"], r["top_k"]) for r in tuned["results"]
    ] == grid
    best = max(tuned["results"], key=lambda r: r["tokens_per_s"])
    assert tuned["best"] == {k: best[k] for k in ("mode", "total_tokens", "depth", "top_k")}
    out = save_tuned(draft, tmp_path / "tuned", tuned, "cpu", 1)
    again = load_draft(out)
    assert again.config.eagle3["tree"]["depth"] == best["depth"]
    on = tiny_recipe.infer.model_copy(update={"autotune": True})
    assert tuned_infer(on, again).depth == best["depth"]
    assert (
        tuned_infer(tiny_recipe.infer, again) == tiny_recipe.infer
    )  # autotune off: the recipe wins
