"""Sources: the packaged eval sets, streaming a cut-off ShareGPT file, JSONL shapes, bad records."""

from __future__ import annotations

import json

import pytest

from eagle3.config import build_recipe
from eagle3.data.manifest import SourceEntry
from eagle3.data.sources import (
    Skip,
    SourceError,
    iter_conversations,
    iter_json_array,
    load_conversations,
    load_eval_prompts,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "name,count,turns", [("mt_bench", 80, 2), ("humaneval", 164, 1), ("gsm8k", 1319, 1)]
)
def test_eval_sets(name, count, turns):
    prompts = load_eval_prompts(name)
    assert len(prompts) == count
    assert {len(p.turns) for p in prompts} == {turns}
    assert len({p.id for p in prompts}) == count
    assert all(t.strip() for p in prompts for t in p.turns)
    assert [p.id for p in load_eval_prompts(name, limit=3)] == [p.id for p in prompts[:3]]


def test_mt_bench_first_question():
    p = load_eval_prompts("mt_bench", limit=1)[0]
    assert p.id == "mt_bench:81"
    assert p.turns[0].startswith(
        "Compose an engaging travel blog post about a recent trip to Hawaii"
    )
    assert p.turns[1].startswith("Rewrite your previous response")


def _sharegpt_records(n):
    return [
        {
            "id": f"c{i}",
            "conversations": [
                {"from": "human", "value": f"q{i} \u00e9\u4e2d"},
                {"from": "gpt", "value": f"a{i}"},
            ],
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("chunk", [3, 7, 64, 1 << 20])
def test_cut_off_json_array_streams_complete_records(tmp_path, chunk):
    text = json.dumps(_sharegpt_records(5), indent=2)
    cut = text[: text.index('"c4"') + 10]  # mid-record, like the packaged ShareGPT file
    path = tmp_path / "cut.json"
    path.write_text(cut)
    info = SourceEntry(name="s", path=str(path))
    recs = [r for _, r in iter_json_array(path, info, chunk=chunk)]
    assert [r["id"] for r in recs] == ["c0", "c1", "c2", "c3"]
    assert info.truncated
    full = tmp_path / "full.json"
    full.write_text(text)
    info2 = SourceEntry(name="s", path=str(full))
    assert len(list(iter_json_array(full, info2, chunk=chunk))) == 5
    assert not info2.truncated


def test_packaged_sharegpt_is_streamed_with_limit():
    recipe = build_recipe(
        {
            "name": "t",
            "target": {"kind": "tiny"},
            "data": {"sources": [{"name": "sharegpt", "limit": 5}]},
        }
    )
    loaded = load_conversations(recipe)
    assert len(loaded.conversations) == 5
    assert loaded.sources[0].sha256 and "17,671" in loaded.sources[0].note
    for c in loaded.conversations:
        assert c.id.startswith("sharegpt:")
        assert c.messages[0]["role"] in ("user", "system")
        assert {m["role"] for m in c.messages} <= {"system", "user", "assistant"}


def test_jsonl_shapes_and_bad_records(tmp_path):
    lines = [
        json.dumps(
            {
                "id": "a",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ],
            }
        ),
        '{"id": "broken", "messages": [',  # malformed line 2
        json.dumps({"prompt": "just a prompt"}),
        json.dumps({"id": "e", "messages": []}),
        json.dumps({"id": "n", "messages": [{"role": "assistant", "content": "no user"}]}),
        "",
        json.dumps({"id": "r", "messages": [{"role": "wizard", "content": "x"}]}),
        json.dumps({"id": "t", "turns": ["one", "two"]}),
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines) + "\n")
    recipe = build_recipe(
        {
            "name": "t",
            "target": {"kind": "tiny"},
            "data": {"sources": [{"name": "mine"}], "catalog": {"mine": {"path": str(path)}}},
        }
    )
    loaded = load_conversations(recipe)
    ids = [c.id for c in loaded.conversations]
    assert ids == ["mine:a", "mine:3", "mine:t"]
    assert loaded.conversations[0].messages[0] == {"role": "system", "content": "be brief"}
    assert [m["content"] for m in loaded.conversations[2].messages] == ["one", "two"]
    reasons = {s.id: s.reason for s in loaded.skipped}
    assert reasons["mine:line2"].startswith("malformed JSON: line 2")
    assert reasons["mine:e"] == "empty conversation"
    assert reasons["mine:n"] == "no user turn"
    assert "unknown role: 'wizard'" in reasons["mine:r"]
    assert loaded.sources[0].read == 7 and loaded.sources[0].bad == 4


def test_hf_dataset_from_local_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _sharegpt_records(3)))
    info = SourceEntry(name="hfd", path=str(path), format="hf")
    items = list(iter_conversations(info))
    assert [c.id for c in items] == ["hfd:c0", "hfd:c1", "hfd:c2"]
    assert not any(isinstance(c, Skip) for c in items)
    assert items[0].messages[1] == {"role": "assistant", "content": "a0"}


def test_unknown_source_names_itself():
    with pytest.raises(SourceError, match="'nope' is not in the catalog"):
        load_eval_prompts("nope")


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    recipe = build_recipe(
        {
            "name": "t",
            "target": {"kind": "tiny"},
            "data": {
                "sources": [
                    {"name": "disk", "path": str(tmp_path / "ds"), "format": "hf", "limit": 2}
                ]
            },
        }
    )
    loaded = load_conversations(recipe)
    assert [c.id for c in loaded.conversations] == ["disk:0", "disk:1"]
    assert loaded.conversations[1].messages == [{"role": "user", "content": "q1"}]


def test_broken_record_mid_file_is_an_error_not_a_memory_hog(tmp_path):
    text = json.dumps(_sharegpt_records(3))
    broken = text.replace('"c1"', '"c1" oops', 1)  # bad JSON in the middle, complete file after it
    path = tmp_path / "broken.json"
    path.write_text(broken)
    it = iter_json_array(path, chunk=16, max_record=200)  # records are ~150 chars
    assert next(it)[1]["id"] == "c0"
    with pytest.raises(SourceError, match="record 1 is not valid JSON"):
        next(it)
