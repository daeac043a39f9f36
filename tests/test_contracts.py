"""The typed contracts: checked-in JSON Schemas equal what the models generate, reports and
decisions written the old way read back byte for byte, and bad documents are refused by name.

(A report of a real tiny bench is checked in test_bench.py, a real tiny manifest in
test_data_pipeline.py: both reuse those modules' runs.)"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from conftest import ROOT

from eagle3.config import PromoteConfig
from eagle3.data.manifest import read_manifest
from eagle3.eval.report import BenchReport, read_report
from eagle3.ops.gate import GateDecision, decide, gate_metrics
from eagle3.schemas import main as schemas_main
from eagle3.schemas import render, schemas

SCHEMAS = ROOT / "docs" / "schemas"


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


def test_checked_in_schemas_equal_the_models(tmp_path):
    generated = schemas()
    assert set(generated) == {p.name for p in SCHEMAS.glob("*.schema.json")}
    for name, s in generated.items():
        assert (SCHEMAS / name).read_text() == render(s), f"{name}: run `python -m eagle3.schemas`"
        jsonschema.Draft202012Validator.check_schema(s)
    assert schemas_main(["--check"]) == 0
    # --check notices a stale file; writing puts the same bytes back.
    (tmp_path / "bench-report.schema.json").write_text("{}\n")
    assert schemas_main(["--check", "--dir", str(tmp_path)]) == 1
    assert schemas_main(["--dir", str(tmp_path)]) == 0
    assert schemas_main(["--check", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "gate-decision.schema.json").read_text() == (
        SCHEMAS / "gate-decision.schema.json"
    ).read_text()


def old_vllm_report() -> dict:
    """An `eagle3 bench --engine vllm` report as the dict-building writer wrote it (key order too)."""
    level = {"in_flight": 1, "tokens_per_s": {"eagle3": 30.5, "vllm": 20.0}, "speedup": 1.525}
    return {
        "engine": "vllm",
        "target": "tiny-llama(seed=0)",
        "draft": "/runs/tiny/draft",
        "device": "cpu (vllm 0.32.0)",
        "dtype": "float32",
        "threads": 2,
        "decoding": {
            "mode": "chain",
            "total_tokens": 3,
            "depth": 3,
            "top_k": 1,
            "temperature": 0.0,
            "engine": "vllm",
        },
        "datasets": {
            "mt_bench": {
                "prompts": 2,
                "new_tokens": 40,
                "tau": 2.1,
                "alpha": [0.6, 0.4, 0.2],
                "tokens_per_s": {"vllm": 20.0, "eagle3": 30.5},
                "speedup": {"vs_vllm": 1.525},
                "lossless": False,
                "mismatches": ["mt_bench/1/turn2"],
            }
        },
        "overall": {"tau": 2.1, "speedup": {"vs_vllm": 1.525}, "lossless": False},
        "vllm": {
            "version": "vllm 0.32.0",
            "speculative_tokens": 3,
            "enforce_eager": True,
            "acceptance_length": 2.1,
            "alpha": [0.6, 0.4, 0.2],
            "per_position_acceptance": [0.6, 0.24, 0.05],
            "num_drafts": 19,
            "num_accepted_tokens": 21,
            "num_draft_tokens": 57,
            "lossless": False,
            "concurrency": {
                "bs1": {**level, "acceptance_length": 2.1},
                "c4": {
                    **level,
                    "in_flight": 2,
                    "acceptance_length": 2.0,
                    "lossless_batched": None,
                    "same_as_bs1": 1,
                },
            },
            "start_seconds": {"vllm": 40.2, "eagle3": 55.0},
        },
    }


def test_a_report_reads_back_byte_for_byte_and_keeps_unknown_keys(tmp_path):
    old = old_vllm_report()
    jsonschema.validate(old, schema("bench-report"))
    r = BenchReport.model_validate(old)
    assert json.dumps(r.to_dict()) == json.dumps(old)  # same keys, same order, same values
    assert r.engine_name == "vllm" and r.vllm.concurrency["c4"].lossless_batched is None
    assert r.datasets["mt_bench"].mismatches == ["mt_bench/1/turn2"]
    # A newer writer's key is kept (forward-compatible readers), at every level.
    newer = {**old, "energy_j": 1.5}
    newer["datasets"] = {"mt_bench": {**old["datasets"]["mt_bench"], "p99_ms": 9.0}}
    assert BenchReport.model_validate(newer).to_dict() == newer


def test_a_bad_report_is_refused_naming_the_file_and_key(tmp_path):
    bad = old_vllm_report()
    del bad["datasets"]["mt_bench"]["tau"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"r\.json: not a bench report .*datasets\.mt_bench\.tau"):
        read_report(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_report(path)


def test_the_gate_decision_is_the_dict_it_always_was():
    cfg = PromoteConfig(min_tau=1.5, min_speedup=1.0, tolerance=0.05)
    cand = gate_metrics({"tau": 2.0, "speedup_vs_ar": 1.5, "lossless": 1.0}, "ar", "E")
    assert cand == {
        "tau": 2.0,
        "speedup": 1.5,
        "speedup_baseline": "ar",
        "lossless": True,
        "eval_set": "E",
    }
    champ = {**cand, "tau": 1.9, "version": "7", "source": "registry tags"}
    d = decide(cand, champ, cfg, [])
    # Exactly what dataclasses.asdict() of the old Decision dataclass gave: four keys, the numbers as passed in.
    assert json.dumps(d.to_dict()) == json.dumps(
        {"promote": True, "reasons": d.reasons, "candidate": cand, "champion": champ}
    )
    assert d.to_dict()["champion"] == champ and d.verdict == "PROMOTE"
    first = decide(cand, None, cfg, []).to_dict()
    assert list(first) == ["promote", "reasons", "candidate", "champion"]
    assert first["champion"] is None
    for doc in (d.to_dict(), first):
        jsonschema.validate(doc, schema("gate-decision"))
        assert json.dumps(GateDecision.model_validate(doc).to_dict()) == json.dumps(doc)
    # Made and read within one run: an unknown key is a bug, refused.
    with pytest.raises(ValueError, match="promote_anyway"):
        GateDecision.model_validate({**first, "promote_anyway": True})
    with pytest.raises(ValueError, match="promote"):
        GateDecision.model_validate({"reasons": []})


def test_a_manifest_that_is_not_one_is_refused(tmp_path):
    from eagle3.data.manifest import compute_digest

    digest_of = {"samples_sha256": "a", "val_ids": [], "vocab_d2t_sha256": "b", "features": None}
    doc = {"version": 1, "digest_of": digest_of, "digest": compute_digest(digest_of)}
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"manifest\.json: not a data manifest: recipe"):
        read_manifest(tmp_path)
    doc["digest_of"]["val_ids"] = ["x"]  # edited after the digest
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="digest does not match"):
        read_manifest(Path(tmp_path))
