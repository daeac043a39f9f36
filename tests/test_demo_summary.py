"""The demo's summary tells the truth: the gate floor it lowered, both heads side by side, and the
head's numbers with and without the prompt-lookup branch."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from eagle3.config import PromoteConfig, load_recipe
from flows.demo import _summary, floor_note, number_rows

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
SMOL = ROOT / "configs" / "smollm2-135m.yaml"


def _metrics(tau, speedup, tau_alone=None, alone=None, headfree=None):
    m = {"tau": tau, "speedup_vs_hf_generate": speedup, "lossless": 1.0,
         "speedup_vs_hf_prompt_lookup": speedup * 0.7,
         "speedup_vs_best_headfree": speedup * 0.7 if headfree is None else headfree}  # fmt: skip
    if tau_alone is not None:
        m |= {"tau_tree_only": tau_alone, "speedup_tree_only_vs_hf_generate": alone}
    return m


def test_the_demo_profile_lowers_the_floor_of_its_own_recipe():
    used = load_recipe(SMOL, profile="demo").promote
    own = load_recipe(SMOL).promote
    assert used.min_speedup < own.min_speedup == 1.0
    style, text = floor_note(_metrics(1.2, 0.48), used, own)
    assert style == "yellow"
    assert "promoted only because the demo profile lowers the floor" in text
    assert (
        "would REJECT it" in text and "speedup vs hf_generate 0.480 below the floor 1.000" in text
    )
    assert used.min_speedup_vs_headfree < own.min_speedup_vs_headfree == 1.0
    style, text = floor_note(_metrics(2.4, 1.5), used, own)
    assert style == "green" and "clears the recipe's own floor too" in text
    # The case: fast against HF generate, slower than the best head-free decoder.
    style, text = floor_note(_metrics(2.4, 1.71, headfree=0.78), used, own)
    assert style == "yellow" and "would REJECT it" in text
    assert "speedup vs the best head-free decoder 0.780 below the floor 1.000" in text
    # A head that is not lossless fails the real floor for that reason too.
    _, text = floor_note({**_metrics(2.4, 1.3), "lossless": 0.0}, used, own)
    assert "not lossless" in text
    assert floor_note(_metrics(1.2, 0.48), own, own) is None  # nothing lowered, nothing to say


def test_number_rows_show_the_head_with_and_without_the_lookup_branch():
    rows = dict(number_rows(_metrics(2.51, 1.234, 1.62, 0.91)))
    assert rows["tau, head + prompt-lookup branch"] == "2.510"
    assert rows["tau, head alone (tree only)"] == "1.620"
    assert rows["vs HF generate, head + lookup"] == "1.23x"
    assert rows["vs HF generate, head alone"] == "0.91x"
    assert dict(number_rows(_metrics(1.5, 1.0)))["tau, head alone (tree only)"] == "-"
    assert rows["vs the best head-free decoder, head + lookup"] == "0.86x"  # 1.234 * 0.7
    assert rows["vs the best head-free, at concurrency"] == "-"  # our engine: batch 1 only


def _render(shipped, tmp_path) -> str:
    from eagle3.ops.stack import Stack

    recipe = load_recipe(SMOL, [f"run_dir={tmp_path}"], profile="demo")
    own = load_recipe(SMOL).promote
    out = {
        "model": "eagle3-smollm2-135m-instruct",
        "version": "1",
        "metrics": _metrics(1.9, 0.8, 1.2, 0.5),
        "decision": {"promote": True, "reasons": ["no champion yet", "lossless"]},
        "s3_uri": "s3://eagle3/eagle3/eagle3-smollm2-135m-instruct/v1/",
    }
    console = Console(record=True, width=200)
    _summary(console, Stack(tmp_path), recipe, out, None, shipped, own)
    return console.export_text()


def test_summary_puts_both_heads_in_one_table(tmp_path):
    import json

    head = tmp_path / "head"  # the summary reads only the eagle3 block of its config.json
    head.mkdir()
    (head / "config.json").write_text(json.dumps({"eagle3": {"train": {"step": 850},
                                                             "profile": "full"}}))  # fmt: skip
    shipped = {
        "name": "smollm2-135m-instruct",
        "dir": str(head),
        "report": {},
        "metrics": _metrics(3.03, 2.14, 1.69, 1.06),
    }
    text = _render(shipped, tmp_path)
    assert "shipped head: smollm2-135m-instruct" in text and "demo head: trained just now" in text
    line = next(x for x in text.splitlines() if "tau, head alone" in x)
    assert "1.200" in line and "1.690" in line
    assert "step 850, profile full" in text
    assert "promoted only because the demo profile lowers the floor" in text
    assert PromoteConfig().min_speedup == 0.0  # the library default stays permissive


def test_summary_without_a_shipped_head_says_so(tmp_path):
    text = _render(None, tmp_path)
    assert "no shipped head in this checkout yet: the demo head alone" in text
    assert "shipped head:" not in text
