"""The promotion gate (pure) and the tracking helpers (MLflow on a temp sqlite)."""

from __future__ import annotations

import pytest

from eagle3.config import PromoteConfig
from eagle3.ops.gate import decide, gate_metrics

pytestmark = pytest.mark.slow

CFG = PromoteConfig(min_tau=1.5, min_speedup=1.0, tolerance=0.05)


def cand(tau=2.0, speedup=1.5, lossless=True, eval_set="E"):
    return gate_metrics(
        {"tau": tau, "speedup_vs_hf_generate": speedup, "lossless": 1.0 if lossless else 0.0},
        "hf_generate",
        eval_set,
    )


def champ(tau=2.0, speedup=1.5, eval_set="E"):
    return {**cand(tau, speedup, True, eval_set), "version": "7"}


def test_first_version_uses_absolute_floors():
    d = decide(cand(), None, CFG, [])
    assert d.promote and "no champion yet" in d.reasons[0]
    d = decide(cand(tau=1.4), None, CFG, [])
    assert not d.promote and any("tau 1.400 below the floor 1.500" in r for r in d.reasons)
    d = decide(cand(speedup=0.9), None, CFG, [])
    assert not d.promote and any("speedup vs hf_generate 0.900 below" in r for r in d.reasons)


def test_lossless_and_checkpoint_are_required():
    d = decide(cand(lossless=False), None, CFG, [])
    assert not d.promote and any("not lossless" in r for r in d.reasons)
    d = decide(cand(), None, CFG, ["fc.weight: missing"])
    assert not d.promote and any("eagle3 check" in r and "fc.weight" in r for r in d.reasons)
    relaxed = PromoteConfig(min_tau=1.5, min_speedup=1.0, require_lossless=False)
    assert decide(cand(lossless=False), None, relaxed, []).promote


def test_tolerance_against_the_champion_on_the_same_eval_set():
    # within 5 %: promoted; worse by more: rejected, naming what and by how much
    assert decide(cand(tau=1.92), champ(), CFG, []).promote
    d = decide(cand(tau=1.8), champ(), CFG, [])
    assert not d.promote
    assert d.reasons == ["tau 1.800 worse than champion v7's 2.000 by more than 5%"]
    d = decide(cand(speedup=1.3), champ(), CFG, [])
    assert not d.promote and "speedup vs hf_generate 1.300 worse than champion v7" in d.reasons[0]
    # numbers from another eval set are not compared
    d = decide(cand(), champ(eval_set="OTHER"), CFG, [])
    assert not d.promote and "another eval set" in d.reasons[0]


def test_missing_numbers_are_reasons_not_crashes():
    d = decide(gate_metrics({}, "hf_generate", "E"), None, CFG, [])
    assert not d.promote
    assert {"no tau in the evaluation", "no speedup vs hf_generate in the evaluation"} <= set(
        d.reasons
    )
    # registry tags are strings
    g = gate_metrics({"tau": "2.5", "speedup_vs_ar": "1.2", "lossless": "1.0"}, "ar", "E")
    assert g == {
        "tau": 2.5,
        "speedup": 1.2,
        "speedup_baseline": "ar",
        "lossless": True,
        "eval_set": "E",
    }


def test_report_metrics_and_names(tiny_recipe):
    from eagle3.ops.tracking import eval_set_signature, registered_model_name, report_metrics

    ds = lambda tau, n: {  # noqa: E731
        "prompts": n,
        "new_tokens": 10,
        "tau": tau,
        "alpha": [0.5, 0.25],
        "tokens_per_s": {"eagle3": 20.0, "ar": 10.0},
        "speedup": {"vs_ar": 2.0, "vs_hf_generate": 1.5},
        "lossless": True,
    }
    report = {
        "target": "t",
        "draft": "d",
        "device": "cpu",
        "dtype": "float32",
        "threads": 1,
        "decoding": {"mode": "tree", "total_tokens": 8, "depth": 2, "top_k": 2, "temperature": 0.0},
        "datasets": {"mt_bench": ds(2.0, 3), "gsm8k": {**ds(3.0, 1), "alpha": [0.9, 0.5]}},
        "overall": {"tau": 2.2, "speedup": {"vs_ar": 2.0, "vs_hf_generate": 1.5}, "lossless": True},
    }
    m = report_metrics(report)
    assert m["tau"] == 2.2 and m["speedup_vs_hf_generate"] == 1.5 and m["speedup_vs_ar"] == 2.0
    assert m["lossless"] == 1.0 and m["gsm8k/tau"] == 3.0 and m["mt_bench/alpha_1"] == 0.25
    assert m["alpha_0"] == pytest.approx((0.5 * 3 + 0.9 * 1) / 4)  # weighted by prompts
    assert m["tokens_per_s_eagle3"] == 20.0
    assert registered_model_name(tiny_recipe) == "eagle3-tiny-llama"
    sig = eval_set_signature(tiny_recipe, report)
    report2 = {**report, "datasets": {"mt_bench": ds(2.0, 4)}}
    assert (
        sig == eval_set_signature(tiny_recipe, report) != eval_set_signature(tiny_recipe, report2)
    )


def test_tracking_uri_rules(monkeypatch, tmp_path):
    from eagle3.config import TrackingConfig
    from eagle3.ops.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("EAGLE3_HOME", str(tmp_path))
    assert tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking_uri(TrackingConfig()) == "http://127.0.0.1:1"
    assert tracking_uri(TrackingConfig(uri="sqlite:///x.db")) == "sqlite:///x.db"
    for bad in ("./mlruns", "file:///tmp/mlruns"):
        with pytest.raises(ValueError, match="file store"):
            tracking_uri(TrackingConfig(uri=bad))


def test_tracker_logs_runs_dataset_and_registry(tmp_path, mlflow_sqlite):
    import json
    import uuid

    from eagle3.config import TrackingConfig
    from eagle3.ops.tracking import Tracker

    t = Tracker(TrackingConfig(experiment=f"exp-{uuid.uuid4().hex[:8]}"))
    parent = t.start_run("pipeline")
    child = t.start_run("train", parent_id=parent, tags={"eagle3.target": "tiny"})
    t.log_params(child, {"a.b": 1, "c": [1, 2], "long": "x" * 2000})
    t.log_metrics(child, {"train/loss_0": 1.0, "bad key!": 2.0, "nan": float("nan")}, step=3)
    manifest = {"digest": "abc123", "samples": 3}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    t.log_dataset(child, manifest, tmp_path / "manifest.json")
    run = t.run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["c"] == "[1, 2]" and len(run.data.params["long"]) == 500
    assert run.data.metrics == {"train/loss_0": 1.0, "bad key_": 2.0}
    assert run.inputs.dataset_inputs[0].dataset.digest == "abc123"
    # artifacts land next to the sqlite file, not in the working directory
    d = tmp_path / "draft"
    d.mkdir()
    (d / "config.json").write_text("{}")
    t.log_artifact(parent, d, "draft")
    assert run.info.artifact_uri.startswith((mlflow_sqlite / "mlartifacts").as_uri())
    name = f"eagle3-x-{uuid.uuid4().hex[:8]}"
    v = t.register(name, parent, "draft", {"tau": 2.0})
    assert v == "1" and str(t.alias_version(name, "candidate").version) == "1"
    assert t.alias_version(name, "champion") is None
    t.set_alias(name, "champion", v)
    assert t.alias_version(name, "champion").tags["tau"] == "2.0"
    out = t.download_version(name, v, tmp_path / "dl")
    assert (out / "config.json").read_text() == "{}"


def test_experiments_open_in_mlflows_model_training_view(mlflow_sqlite):
    """MLflow 3.17's UI shows an experiment by its `mlflow.experimentKind` tag; without one it
    may open the GenAI view (Traces, Judges). New experiments carry the model-training kind, an
    older one without a kind gets it, and a kind someone chose stays."""
    import uuid

    from eagle3.config import TrackingConfig
    from eagle3.ops.tracking import Tracker

    def kind(t: Tracker) -> str | None:
        return t.client.get_experiment(t.experiment_id).tags.get("mlflow.experimentKind")

    new = Tracker(TrackingConfig(experiment=f"exp-{uuid.uuid4().hex[:8]}"))
    assert kind(new) == "custom_model_development"
    older, chosen = (f"exp-{uuid.uuid4().hex[:8]}" for _ in range(2))
    arts = (mlflow_sqlite / "mlartifacts").as_uri()  # not ./mlruns in the working directory
    new.client.create_experiment(older, artifact_location=arts)
    new.client.create_experiment(
        chosen, artifact_location=arts, tags={"mlflow.experimentKind": "genai_development"}
    )
    assert kind(Tracker(TrackingConfig(experiment=older))) == "custom_model_development"
    assert kind(Tracker(TrackingConfig(experiment=chosen))) == "genai_development"


# --- the head is credited only with what it adds over the best head-free decoder -------------------
HEADFREE = PromoteConfig(
    min_tau=1.5,
    min_speedup=1.0,
    min_speedup_vs_headfree=1.0,
    min_speedup_vs_headfree_concurrent=1.0,
)


def ours(vs_headfree, best="hf_prompt_lookup", **kw):
    """Our engine's numbers: batch 1 only (no vllm/* metrics)."""
    m = {"tau": 2.0, "speedup_vs_hf_generate": 1.7, "lossless": 1.0, **kw}
    if vs_headfree is not None:
        m["speedup_vs_best_headfree"] = vs_headfree
    return gate_metrics({**m, "best_headfree": best}, "hf_generate", "E")


def test_a_head_slower_than_the_best_headfree_decoder_is_rejected():
    # The case: 1.71x HF generate, yet slower than HF prompt lookup alone.
    d = decide(ours(0.78), None, HEADFREE, [])
    assert not d.promote
    assert any(
        "speedup vs the best head-free decoder (hf_prompt_lookup) 0.780 below the floor 1.000" in r
        for r in d.reasons
    ), d.reasons
    d = decide(ours(1.2), None, HEADFREE, [])
    assert d.promote, d.reasons
    assert any("concurrency not gated: our engine serves one request" in r for r in d.reasons)
    # A bench from before the comparison carries no ratio: rejected under the floor, not a crash.
    d = decide(ours(None), None, HEADFREE, [])
    assert not d.promote and any("no speedup vs the best head-free" in r for r in d.reasons)
    # The library default keeps the floors off (recipes set them).
    assert decide(ours(0.5), None, PromoteConfig(min_tau=1.5, min_speedup=1.0), []).promote


def test_vllm_is_gated_at_concurrency_too():
    base = {"tau": 2.0, "speedup_vs_vllm": 1.1, "lossless": 1.0, "vllm/acceptance_length": 2.0}
    fast1 = {"speedup_vs_best_headfree": 1.1}
    c = gate_metrics({**base, **fast1, "speedup_vs_best_headfree_concurrent": 0.72}, "vllm", "E")
    assert c["engine"] == "vllm"
    d = decide(c, None, HEADFREE, [])
    assert not d.promote
    assert any("at concurrency 0.720 below the floor 1.000" in r for r in d.reasons), d.reasons
    # vLLM numbers without a concurrent ratio: not measured = not cleared
    d = decide(gate_metrics({**base, **fast1}, "vllm", "E"), None, HEADFREE, [])
    assert not d.promote and any("at concurrency in the evaluation" in r for r in d.reasons)
    ok = gate_metrics({**base, **fast1, "speedup_vs_best_headfree_concurrent": 1.05}, "vllm", "E")
    assert decide(ok, None, HEADFREE, []).promote


def test_a_champion_without_the_headfree_ratio_is_said_not_crashed():
    old = {**champ(), "source": "registry tags"}  # tags written before the comparison
    d = decide(ours(1.2), old, HEADFREE, [])
    assert d.promote, d.reasons
    assert any("champion v7 has no speedup vs the best head-free decoder" in r for r in d.reasons)
    newer = {**ours(1.5), "version": "7"}
    d = decide(ours(1.2), newer, HEADFREE, [])
    assert not d.promote
    assert any("1.200 worse than champion v7's 1.500" in r for r in d.reasons), d.reasons


def test_nan_or_inf_numbers_are_refused_by_name():
    nan, inf = float("nan"), float("inf")
    # Before: nan < floor is False, so a NaN tau or speedup cleared every floor.
    for bad in (cand(tau=nan), cand(speedup=inf), ours(nan)):
        d = decide(bad, None, CFG, [])
        assert not d.promote and any("not finite" in r for r in d.reasons), d.reasons
    d = decide(cand(tau=nan), None, CFG, [])
    assert "tau=nan" in d.reasons[-1]
    # Registry tags are strings: "nan" parses to NaN and is refused the same way.
    assert not decide(
        gate_metrics(
            {"tau": "nan", "speedup_vs_hf_generate": "1.5", "lossless": "1.0"}, "hf_generate", "E"
        ),
        None,
        CFG,
        [],
    ).promote
    # A NaN champion would disable every comparison (x < nan * 0.95 is False): rejected, said so.
    d = decide(cand(tau=1.0), {**champ(), "tau": nan}, PromoteConfig(min_tau=0.5), [])
    assert not d.promote
    assert any("champion v7's numbers are not finite (tau=nan)" in r for r in d.reasons)


def test_mlflow_metrics_carry_every_headfree_ratio():
    from eagle3.ops.tracking import report_metrics

    level = lambda n, e, v, g: {  # noqa: E731
        "in_flight": n, "tokens_per_s": {"eagle3": e, "vllm": v, "ngram": g},
        "speedup": round(e / v, 3), "acceptance_length": 1.5,
        "best_headfree": "ngram" if g > v else "vllm",
        "speedup_vs_best_headfree": round(e / max(v, g), 3),
    }  # fmt: skip
    ds = {"prompts": 1, "new_tokens": 9, "tau": 1.5, "alpha": [0.5], "lossless": True,
          "tokens_per_s": {"eagle3": 9.7, "vllm": 10.0, "ngram": 13.0},
          "speedup": {"vs_vllm": 0.97, "vs_ngram": 0.746}}  # fmt: skip
    report = {
        "engine": "vllm", "target": "t", "draft": "d", "device": "cpu", "dtype": "float32",
        "threads": 2,
        "decoding": {"mode": "chain", "total_tokens": 3, "depth": 3, "top_k": 1, "temperature": 0.0},
        "datasets": {"mt_bench": ds},
        "overall": {"tau": 1.5, "lossless": True, "best_headfree": "ngram",
                    "best_headfree_concurrent": "vllm@c4",
                    "speedup": {"vs_vllm": 0.97, "vs_ngram": 0.746, "vs_best_headfree": 0.746,
                                "vs_best_headfree_concurrent": 0.72}},
        "vllm": {"version": "v", "speculative_tokens": 3, "enforce_eager": True,
                 "acceptance_length": 1.5, "alpha": [0.5], "per_position_acceptance": [0.5],
                 "num_drafts": 6, "num_accepted_tokens": 3, "num_draft_tokens": 18,
                 "lossless": True, "start_seconds": {"vllm": 1.0, "eagle3": 1.0},
                 "concurrency": {"bs1": level(1, 9.7, 10.0, 13.0), "c4": level(4, 18.0, 25.0, 20.0)}},
    }  # fmt: skip
    m = report_metrics(report)
    assert m["speedup_vs_best_headfree"] == 0.746
    assert m["speedup_vs_best_headfree_concurrent"] == 0.72
    assert m["vllm/speedup_vs_best_headfree_bs1"] == round(9.7 / 13.0, 3)
    assert m["vllm/speedup_vs_best_headfree_c4"] == 0.72 and m["vllm/tokens_per_s_ngram_c4"] == 20.0
    # ... and the gate rejects this head under the recipes' floors, at batch 1 and concurrency.
    d = decide(gate_metrics(m, "vllm", "E"), None, HEADFREE.model_copy(update={"min_tau": 1.0,
               "min_speedup": 0.0}), [])  # fmt: skip
    assert not d.promote
    assert sum("best head-free decoder" in r for r in d.reasons) == 2, d.reasons
