"""The card's bench section for a vLLM report: acceptance and × plain vLLM, not our engine's
columns, and a reproduce command with the report's own engine and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from eagle3.eval.report import read_report
from eagle3.release import _bench_lines

pytestmark = pytest.mark.unit

REPORT = Path(__file__).parent.parent / "docs/results/traffic_shift2_bench_vllm_adapted.json"


def test_a_vllm_report_renders_its_own_columns_and_command():
    rep = read_report(REPORT)
    facts = {
        "name": "h",
        "eagle3": {"recipe": "smollm2-135m", "profile": "full"},
        "bench": [{"file": "bench-heldout-20.json", "report": rep, "limit": 20}],
    }
    text = "\n".join(_bench_lines(facts))
    assert "| heldout | 20 | 3,605 | 1.617 | 0.386 / 0.156 / 0.076 | 1.15 | True |" in text
    assert "× HF generate" not in text
    assert (
        "eagle3 bench --config configs/smollm2-135m.yaml --profile full --engine vllm --draft h "
        "--datasets heldout --limit 20 --out bench.json "
        "'data.catalog={heldout: {path: runs/shift-gsm8k/held_out.jsonl}}'"
    ) in text
