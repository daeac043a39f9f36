"""The portable checkpoint (docs/CONTRACTS.md §3): round trip, the checker, exports, public
checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eagle3.data.vocab import build_draft_vocab
from eagle3.models.checkpoint import (
    check_checkpoint,
    expected_tensors,
    load_draft,
    read_config,
    save_draft,
)
from eagle3.models.draft import DraftConfig, Eagle3Draft
from eagle3.models.export import export_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_draft(tiny_target):
    c = DraftConfig.from_target(tiny_target.config, 512, tiny_target.aux_layer_ids)
    torch.manual_seed(0)
    d = Eagle3Draft(c)
    counts = torch.zeros(tiny_target.vocab_size, dtype=torch.long)
    counts[torch.randint(0, tiny_target.vocab_size, (5000,))] += 1
    v = build_draft_vocab(counts, 512)
    d.set_vocab(v.d2t, v.t2d)
    return d


@pytest.fixture()
def saved(tiny_draft, tmp_path):
    return save_draft(tiny_draft, tmp_path / "draft")


def _edit_tensors(path: Path, fn) -> None:
    t = load_file(str(path / "model.safetensors"))
    fn(t)
    save_file(t, str(path / "model.safetensors"))


def _edit_config(path: Path, fn) -> None:
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_round_trip_is_bit_exact(tiny_draft, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    assert check_checkpoint(saved) == []
    back = load_draft(saved)
    a, b = tiny_draft.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    cfg = read_config(saved)
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["vocab_size"] == 49152 and cfg["draft_vocab_size"] == 512
    assert "eagle_aux_hidden_state_layer_ids" not in cfg  # the default is omitted
    assert set(load_file(str(saved / "model.safetensors"))) == set(expected_tensors(back.config))


def test_save_in_bf16_checks_and_keeps_int_maps(tiny_draft, tmp_path):
    out = save_draft(tiny_draft, tmp_path / "bf16", dtype="bfloat16")
    assert check_checkpoint(out) == []
    t = load_file(str(out / "model.safetensors"))
    assert t["fc.weight"].dtype == torch.bfloat16
    assert t["d2t"].dtype == torch.int64 and t["t2d"].dtype == torch.bool


@pytest.mark.parametrize(
    "damage, expect",
    [
        (
            lambda t: t.pop("midlayer.self_attn.k_proj.weight"),
            "midlayer.self_attn.k_proj.weight is missing",
        ),
        (lambda t: t.pop("d2t"), "d2t is missing"),
        (
            lambda t: t.update({"fc.weight": t["fc.weight"][:, :-1].contiguous()}),
            "fc.weight has shape",
        ),
        (lambda t: t.update({"norm.weight": t["norm.weight"].half()}), "norm.weight has dtype"),
        (lambda t: t.update({"t2d": t["t2d"].long()}), "t2d has dtype"),
        (
            lambda t: t.update({"embed_tokens.weight": torch.zeros(4, 4)}),
            "unexpected tensor embed_tokens.weight",
        ),
        (lambda t: t.update({"d2t": t["d2t"].flip(0).contiguous()}), "d2t"),
    ],
)
def test_check_rejects_damaged_weights(saved, damage, expect):
    _edit_tensors(saved, damage)
    problems = check_checkpoint(saved)
    assert any(expect in p for p in problems), problems


@pytest.mark.parametrize(
    "damage, expect",
    [
        (lambda c: c.update(architectures=["LlamaForCausalLM"]), "architectures"),
        (lambda c: c.pop("draft_vocab_size"), "draft_vocab_size is missing"),
        (lambda c: c.update(num_hidden_layers=2), "num_hidden_layers"),
        (lambda c: c.update(tie_word_embeddings=True), "tie_word_embeddings"),
        (lambda c: c.update(torch_dtype="float64"), "torch_dtype"),
        # Custom aux layers with the SGLang list off by one (it must be the vLLM ids minus 1).
        (
            lambda c: c.update(
                eagle_aux_hidden_state_layer_ids=[1, 3, 6],
                eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 3, 6]},
            ),
            "minus 1",
        ),
        (lambda c: c.update(eagle_aux_hidden_state_layer_ids=[1, 3, 6]), "need both"),
        (
            lambda c: c.update(
                eagle_aux_hidden_state_layer_ids=[2, 4, 5],
                eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 3, 4]},
            ),
            "equal the default",
        ),
    ],
)
def test_check_rejects_bad_config(saved, damage, expect):
    _edit_config(saved, damage)
    problems = check_checkpoint(saved)
    assert any(expect in p for p in problems), problems


def test_custom_aux_layers_write_both_conventions(tiny_target, tmp_path):
    c = DraftConfig.from_target(tiny_target.config, 256, [1, 3, 6])
    out = save_draft(Eagle3Draft(c), tmp_path / "custom")
    cfg = read_config(out)
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 3, 6]
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 5]
    assert check_checkpoint(out) == []
    assert load_draft(out).config.aux_layer_ids == [1, 3, 6]


def test_cli_check_exit_codes(saved):
    ok = subprocess.run(
        [sys.executable, "-m", "eagle3.cli", "check", str(saved)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    _edit_tensors(saved, lambda t: t.pop("lm_head.weight"))
    bad = subprocess.run(
        [sys.executable, "-m", "eagle3.cli", "check", str(saved)], capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert "lm_head.weight is missing" in bad.stdout


def test_export_sglang_and_vllm(saved, tmp_path):
    sgl = export_checkpoint(saved, "sglang", tmp_path / "sgl", dtype="bfloat16")
    assert check_checkpoint(sgl) == []
    assert load_file(str(sgl / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16

    with pytest.raises(ValueError, match="verifier"):
        export_checkpoint(saved, "vllm", tmp_path / "vllm0")
    vl = export_checkpoint(
        saved, "vllm", tmp_path / "vllm", verifier="HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    cfg = json.loads((vl / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle3"
    assert cfg["norm_before_residual"] is False
    assert cfg["draft_vocab_size"] == 512
    assert cfg["transformer_layer_config"]["vocab_size"] == 49152
    assert (
        cfg["speculators_config"]["verifier"]["name_or_path"]
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] >= 1
    # The same tensors, the decoder layer named as speculators 0.9.0 names it.
    ours, theirs = (
        load_file(str(saved / "model.safetensors")),
        load_file(str(vl / "model.safetensors")),
    )
    assert {k.replace("midlayer.", "layers.0.") for k in ours} == set(theirs)
    for k, v in ours.items():
        assert torch.equal(theirs[k.replace("midlayer.", "layers.0.")], v), k
    assert check_checkpoint(vl) == []


def test_loads_public_eagle3_layout(tiny_draft, tmp_path):
    """Public EAGLE-3 releases: pytorch_model.bin, sometimes `layers.0.` names and the target's
    embedding included, config without head_dim. They load into the same module."""
    d = tmp_path / "public"
    d.mkdir()
    sd = {k.replace("midlayer.", "layers.0."): v for k, v in tiny_draft.state_dict().items()}
    sd["embed_tokens.weight"] = torch.zeros(
        tiny_draft.config.vocab_size, tiny_draft.config.hidden_size
    )
    torch.save(sd, d / "pytorch_model.bin")
    cfg = read_config(save_draft(tiny_draft, tmp_path / "ours"))
    cfg.pop("head_dim")
    (d / "config.json").write_text(json.dumps(cfg))
    back = load_draft(d)
    for k, v in tiny_draft.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


# --- fail closed: hashes and sums are checked whichever way a head arrives -------------------------
def test_load_draft_refuses_weights_that_do_not_match_the_recorded_sha256(saved):
    # Before: only `eagle3 check` compared them; load_draft loaded replaced weights silently.
    _edit_tensors(saved, lambda t: t.update({"norm.weight": t["norm.weight"] + 1.0}))
    from eagle3.models.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"model\.safetensors sha256 .* does not match"):
        load_draft(saved)
    # No recorded hash (a checkpoint from elsewhere): nothing to compare, it loads.
    _edit_config(saved, lambda c: c["eagle3"].pop("weights_sha256"))
    assert load_draft(saved) is not None


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_check_names_a_tensor_with_nan_or_inf(saved, value):
    def poison(t):
        t["fc.weight"][0, 0] = value

    _edit_tensors(saved, poison)
    _edit_config(saved, lambda c: c["eagle3"].pop("weights_sha256"))  # only the values are wrong
    problems = check_checkpoint(saved)
    assert any("tensor fc.weight holds 1 NaN or Inf values" in p for p in problems), problems


def test_heads_with_sums_are_verified_by_name_or_by_path(saved, tmp_path, monkeypatch):
    import shutil

    from eagle3.heads import HeadError, resolve_draft, write_sums

    root = tmp_path / "heads"
    head = root / "h1"
    shutil.copytree(saved, head)
    write_sums(head)
    monkeypatch.setenv("EAGLE3_HEADS_DIR", str(root))
    monkeypatch.chdir(tmp_path)
    for given in ("h1", "heads/h1", str(head)):
        assert resolve_draft(given) is not None
    (head / "config.json").write_text((head / "config.json").read_text() + " ")
    # Before: a directory path skipped SHA256SUMS (only a bare name was verified).
    for given in ("h1", "heads/h1", str(head)):
        with pytest.raises(HeadError, match="config.json: sha256 does not match SHA256SUMS"):
            resolve_draft(given)
    # A copy elsewhere that carries sums is verified too.
    other = tmp_path / "elsewhere"
    shutil.copytree(head, other)
    with pytest.raises(HeadError, match="is damaged"):
        resolve_draft(other)
    # A shipped head without sums is refused; a training run's draft/ (no sums) is not.
    (head / "SHA256SUMS").unlink()
    for given in ("h1", str(head)):
        with pytest.raises(HeadError, match="has no SHA256SUMS: refused"):
            resolve_draft(given)
    assert resolve_draft(saved) == saved
