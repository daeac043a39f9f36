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
DECODERS = {"eagle3", "ar", "hf_generate", "hf_prompt_lookup", "lookup"}
SPEEDUPS = {"vs_ar", "vs_hf_generate", "vs_hf_prompt_lookup", "vs_lookup"}


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
        "provenance",
    ]
    prov = report["provenance"]
    assert len(prov["commit"]) == 40 and isinstance(prov["dirty"], bool)
    assert prov["recipe_name"] == "tiny" and prov["profile"] is None and prov["limit"] == 1
    assert prov["datasets"] == ["mt_bench"] and prov["decoder_order"][0] == "eagle3"
    assert set(prov["decoder_order"]) == DECODERS
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
    # The gate's number: the head over the fastest head-free decoder of this run, named.
    headfree = {n: tps[n] for n in ("ar", "hf_generate", "hf_prompt_lookup", "lookup")}
    best = max(headfree, key=headfree.get)
    assert o["best_headfree"] == best
    assert o["speedup"]["vs_best_headfree"] == pytest.approx(tps["eagle3"] / tps[best], rel=1e-2)
    assert o["speedup"]["vs_best_headfree"] <= min(o["speedup"][f"vs_{n}"] for n in headfree)
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
    # The command is in the report, not rebuilt afterwards.
    prov = report["provenance"]
    assert prov["recipe"] == cfg and prov["limit"] == 1
    assert prov["overrides"] == [
        "eval.max_new_tokens=6",
        "eval.threads=1",
        "eval.baselines=[hf_generate]",
    ]
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


def test_lookup_decoding_without_a_head_is_the_targets_own_output(tiny_target, tiny_recipe):
    """`lookup`: our engine, prompt-lookup branch, no head. Greedy output == plain AR, token for
    token, and on a repetitive prompt the lookup chain is accepted (tau > 1)."""
    import infer_support

    from eagle3.infer.engine import SpecEngine
    from eagle3.infer.lookup_decode import generate_lookup

    torch.set_num_threads(1)
    engine = SpecEngine(tiny_target, None, tiny_recipe.infer)
    prompts = infer_support.random_prompts(n_seq=2).tolist()
    prompts.append(prompts[0] * 3)  # repeats itself: the lookup has something to propose
    taus = []
    for ids in prompts:
        ar = engine.generate_ar(ids, temperature=0.0, max_new_tokens=24)
        got = generate_lookup(engine, ids, 6, temperature=0.0, max_new_tokens=24)
        assert got.tokens == ar.tokens, ids
        taus.append(got.tau)
    assert max(taus) > 1.0, taus
    with pytest.raises(ValueError, match="lookup_tokens >= 1"):
        generate_lookup(engine, prompts[0], 0)


def test_decoders_alternate_order_per_prompt():
    from eagle3.eval.bench import rotated

    names = ["eagle3", "ar", "hf_generate"]
    firsts = [rotated(names, i)[0] for i in range(4)]
    assert firsts == ["eagle3", "ar", "hf_generate", "eagle3"]
    assert all(sorted(rotated(names, i)) == sorted(names) for i in range(5))


def test_the_journal_resumes_only_the_same_code_and_settings(tmp_path):
    from eagle3.eval.journal import Journal

    path = tmp_path / "j.json"
    Journal(path, "K", "c1").put("p1", {"x": 1})
    assert Journal(path, "K", "c1").get("p1") == {"x": 1}
    # Another commit (before: the journal had no code version, and resumed across a refactor).
    other = Journal(path, "K", "c2")
    assert other.get("p1") is None and other.set_aside == tmp_path / "j.json.old"
    assert "measured by commit c1, this is c2" in other.why
    # ... unless told to, when the settings match.
    Journal(path, "K", "c1").put("p1", {"x": 1})
    assert Journal(path, "K", "c2", across_commits=True).get("p1") == {"x": 1}
    # Other settings are never resumed, told or not.
    Journal(path, "K", "c1").put("p1", {"x": 1})
    assert Journal(path, "OTHER", "c1", across_commits=True).get("p1") is None


def test_the_markdown_report_states_the_gates_headfree_ratio():
    from eagle3.eval.render import markdown_report

    ds = {"prompts": 1, "new_tokens": 9, "tau": 2.0, "alpha": [0.5], "lossless": True,
          "tokens_per_s": {"eagle3": 12.0, "lookup": 15.0}, "speedup": {"vs_lookup": 0.8}}  # fmt: skip
    report = {
        "target": "t", "draft": "d", "device": "cpu", "dtype": "float32", "threads": 1,
        "decoding": {"mode": "tree", "total_tokens": 4, "depth": 1, "top_k": 2, "temperature": 0.0},
        "datasets": {"mt_bench": ds},
        "overall": {"tau": 2.0, "speedup": {"vs_lookup": 0.8, "vs_best_headfree": 0.8},
                    "lossless": True, "best_headfree": "lookup"},
    }  # fmt: skip
    text = markdown_report(load_recipe(ROOT / "configs" / "tiny.yaml"), report, {}, None, "1", "m")
    assert "vs the best head-free decoder (**lookup**): **0.80x**" in text


def test_code_version_outside_a_checkout_is_unknown_not_a_neighbours(tmp_path):
    import subprocess

    from eagle3.eval.provenance import code_version

    # A copy inside someone else's repository (e.g. site-packages in a venv in a work tree) must
    # not report that repository's commit as its own.
    outer = tmp_path / "outer"
    inner = outer / "lib" / "site-packages"
    inner.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    ident = ["-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "-C", str(outer), *ident, "commit", "-q", "--allow-empty", "-m", "x"],
                   check=True)  # fmt: skip
    assert code_version(inner) == {"commit": None, "dirty": None}
    assert len(code_version()["commit"]) == 40  # this checkout
