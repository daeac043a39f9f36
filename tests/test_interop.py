"""Round-trip interop (issue 15, item 5): the speculators format written and read, variants refused
by name, export defaults (dtype, verifier), and the export loaded by speculators 0.9.0 itself and
read by vLLM 0.32's config adapter (in the vLLM venv, a subprocess)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eagle3.cli import main as cli_main
from eagle3.data.vocab import build_draft_vocab
from eagle3.models.checkpoint import (
    CheckpointError,
    check_checkpoint,
    load_draft,
    read_config,
    read_raw_config,
    save_draft,
)
from eagle3.models.draft import DraftConfig, Eagle3Draft
from eagle3.models.export import export_checkpoint
from eagle3.ops.vllm_env import VllmEnvMissing, require_vllm_python

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
# A rope no reader gets right by accident (the tiny target's is the default 10000, unscaled).
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 1024,
}
TREE = {"mode": "tree", "total_tokens": 16, "depth": 4, "top_k": 4}


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def verifier_dir(tiny_target, tmp_path_factory):
    """The tiny target as an HF directory: the verifier speculators loads its embedding from."""
    d = tmp_path_factory.mktemp("verifier")
    tiny_target.model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def head(tiny_target):
    """A head with every tensor distinct (norms too: a swapped name cannot pass) and a llama3
    rope at theta 1e5."""
    c = DraftConfig.from_target(tiny_target.config, 512, tiny_target.aux_layer_ids)
    c = dataclasses.replace(c, rope_theta=100000.0, rope_scaling=dict(LLAMA3_ROPE))
    torch.manual_seed(0)
    d = Eagle3Draft(c)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    counts = torch.zeros(tiny_target.vocab_size, dtype=torch.long)
    counts[torch.randint(0, tiny_target.vocab_size, (5000,))] += 1
    v = build_draft_vocab(counts, 512)
    d.set_vocab(v.d2t, v.t2d)
    return d.eval()


@pytest.fixture(scope="module")
def portable(head, verifier_dir, tmp_path_factory):
    """The trainer's checkpoint: fp32 weights of a bf16 target that it names."""
    extra = {"tree": TREE, "target": str(verifier_dir), "target_dtype": "bfloat16"}
    return save_draft(head, tmp_path_factory.mktemp("ckpt") / "draft", extra=extra)


@pytest.fixture(scope="module")
def spec_fp32(portable, tmp_path_factory):
    return export_checkpoint(
        portable, "vllm", tmp_path_factory.mktemp("x") / "vllm", dtype="float32"
    )


def _logits(draft, target, seed=1, t=7):
    """Draft-vocabulary logits of one pass over a random row sequence (fp32 inputs)."""
    g = torch.Generator().manual_seed(seed)
    c = draft.config
    aux = torch.randn(1, t, 3 * c.target_hidden_size, generator=g)
    ids = torch.randint(0, c.vocab_size, (1, t), generator=g)
    pos = torch.arange(t)[None]
    with torch.no_grad():
        emb = target.model.get_input_embeddings()(ids).float()
        h, _ = draft(emb, draft.fuse(aux), pos)
        return draft.logits(h), {"aux": aux, "ids": ids, "positions": pos}


def _assert_same_head(a: Eagle3Draft, b: Eagle3Draft, dtype=None):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        want = sa[k] if dtype is None or k in ("d2t", "t2d") else sa[k].to(dtype)
        assert sb[k].dtype == want.dtype and torch.equal(sb[k], want), k


def _edit_config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _check_cli(d: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli_main(["check", str(d)])
    return rc, capsys.readouterr().out


# --- the speculators format, written and read --------------------------------------------------
def test_speculators_export_reloads_identically(head, portable, spec_fp32, tiny_target, capsys):
    raw = read_raw_config(spec_fp32)
    assert raw["speculators_model_type"] == "eagle3" and raw["speculators_version"] == "0.9.0"
    assert raw["transformer_layer_config"]["hidden_size"] == head.config.hidden_size
    assert "hidden_size" not in raw  # nested: the bug this format had on read
    names = set(load_file(str(spec_fp32 / "model.safetensors")))
    assert len(names) == 15 and not any(n.startswith("midlayer.") for n in names)
    assert {"layers.0.self_attn.q_proj.weight", "fc.weight", "d2t", "t2d"} <= names
    assert check_checkpoint(spec_fp32) == []
    assert _check_cli(spec_fp32, capsys) == (
        0,
        f"{spec_fp32}: OK (EAGLE-3 draft checkpoint, contract §3, speculators format)\n",
    )

    back = load_draft(spec_fp32)
    _assert_same_head(head, back)
    # The same meaning: the config the trainer wrote, read from either directory.
    assert back.config == load_draft(portable).config
    assert back.config.rope_theta == 100000.0 and back.config.rope_scaling == LLAMA3_ROPE
    assert back.config.aux_layer_ids is None  # explicit default ids read back as the default
    assert back.config.eagle3["tree"] == TREE
    assert read_config(spec_fp32)["draft_vocab_size"] == 512
    ours, _ = _logits(head, tiny_target)
    theirs, _ = _logits(back, tiny_target)
    assert torch.equal(ours, theirs)


def test_export_dtype_defaults_to_the_targets(head, portable, tmp_path):
    for fmt in ("vllm", "sglang"):
        out = export_checkpoint(portable, fmt, tmp_path / fmt)  # target_dtype bfloat16 recorded
        t = load_file(str(out / "model.safetensors"))
        assert t["fc.weight"].dtype == torch.bfloat16, fmt
        assert t["d2t"].dtype == torch.int64 and t["t2d"].dtype == torch.bool
        assert read_config(out)["torch_dtype"] == "bfloat16"
        assert check_checkpoint(out) == []
        _assert_same_head(head, load_draft(out), dtype=torch.bfloat16)  # the cast, nothing else
    # --dtype still wins, and an unrecorded target dtype keeps the checkpoint's (a byte copy).
    out = export_checkpoint(portable, "sglang", tmp_path / "f32", dtype="float32")
    assert (out / "model.safetensors").read_bytes() == (portable / "model.safetensors").read_bytes()
    old = save_draft(head, tmp_path / "old")  # no eagle3.target_dtype
    out = export_checkpoint(old, "vllm", tmp_path / "old-vllm", verifier="org/model")
    assert read_config(out)["torch_dtype"] == "float32"


def test_export_verifier_comes_from_the_checkpoint(head, portable, verifier_dir, tmp_path, capsys):
    # The trainer's key (eagle3.target): no --verifier, through the CLI too.
    rc = cli_main(
        ["export", "--draft", str(portable), "--format", "vllm", "--out", str(tmp_path / "a")]
    )
    assert rc == 0, capsys.readouterr()
    raw = read_raw_config(tmp_path / "a")
    assert raw["speculators_config"]["verifier"]["name_or_path"] == str(verifier_dir)
    assert raw["speculators_config"]["verifier"]["architectures"] == ["LlamaForCausalLM"]
    assert raw["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == TREE["depth"]
    assert raw["torch_dtype"] == "bfloat16"
    # The older key, and an explicit --verifier over both.
    old = save_draft(head, tmp_path / "old", extra={"target_id": "org/old-target"})
    out = export_checkpoint(old, "vllm", tmp_path / "b")
    assert (
        read_raw_config(out)["speculators_config"]["verifier"]["name_or_path"] == "org/old-target"
    )
    out = export_checkpoint(old, "vllm", tmp_path / "c", verifier="org/other")
    assert read_raw_config(out)["speculators_config"]["verifier"]["name_or_path"] == "org/other"
    # A recorded name no engine can load (the tiny target's) asks for --verifier, naming it.
    tiny = save_draft(head, tmp_path / "tiny", extra={"target": "tiny-llama(seed=0)"})
    with pytest.raises(CheckpointError, match=r"--verifier.*tiny-llama\(seed=0\)"):
        export_checkpoint(tiny, "vllm", tmp_path / "d")
    assert not (tmp_path / "d").exists()  # refused before anything was written
    rc = cli_main(
        ["export", "--draft", str(tiny), "--format", "vllm", "--out", str(tmp_path / "d")]
    )
    assert rc == 2


def test_sglang_and_speculators_exports_round_trip(head, portable, spec_fp32, tmp_path):
    sgl = export_checkpoint(portable, "sglang", tmp_path / "sgl", dtype="float32")
    assert read_raw_config(sgl)["architectures"] == ["LlamaForCausalLMEagle3"]
    _assert_same_head(head, load_draft(sgl))
    # speculators -> portable -> speculators: the same files in meaning, both ways.
    back = export_checkpoint(spec_fp32, "sglang", tmp_path / "back", dtype="float32")
    assert (
        load_file(str(back / "model.safetensors")).keys()
        == load_file(str(portable / "model.safetensors")).keys()
    )
    _assert_same_head(head, load_draft(back))
    assert read_config(back) == read_config(portable)
    again = export_checkpoint(back, "vllm", tmp_path / "again", dtype="float32")
    assert read_raw_config(again) == read_raw_config(spec_fp32)
    a, b = (
        load_file(str(again / "model.safetensors")),
        load_file(str(spec_fp32 / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_legacy_midlayer_names_are_read_and_reported(head, spec_fp32, tmp_path, capsys):
    """Our earlier speculators exports named the layer `midlayer.*`: vLLM reads them, speculators
    0.9.0 re-initialises the layer. load_draft reads them; check says why to re-export."""
    d = tmp_path / "legacy"
    d.mkdir()
    (d / "config.json").write_bytes((spec_fp32 / "config.json").read_bytes())
    t = load_file(str(spec_fp32 / "model.safetensors"))
    save_file(
        {k.replace("layers.0.", "midlayer."): v for k, v in t.items()}, str(d / "model.safetensors")
    )
    _assert_same_head(head, load_draft(d))
    rc, out = _check_cli(d, capsys)
    assert rc == 1 and "10 tensors named midlayer.*" in out and "layers.0.*" in out


# --- variants eagle3 does not compute: refused by name -----------------------------------------
def _set(key, value):
    def edit(cfg):
        node = cfg
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value

    return edit


def _drop(key):
    return lambda cfg: cfg.pop(key)


SPECULATORS_VARIANTS = [
    ("norm_before_residual", _set("norm_before_residual", True)),
    ("norm_before_residual is missing", _drop("norm_before_residual")),
    ("norm_before_fc", _set("norm_before_fc", True)),
    ("fc_norm", _set("fc_norm", True)),
    ("norm_output", _set("norm_output", True)),
    ("embed_requires_grad", _set("embed_requires_grad", True)),
    ("model_type", _set("transformer_layer_config.model_type", "qwen3")),
    ("num_hidden_layers", _set("transformer_layer_config.num_hidden_layers", 2)),
    ("attention_bias", _set("transformer_layer_config.attention_bias", True)),
    ("mlp_bias", _set("transformer_layer_config.mlp_bias", True)),
    ("hidden_act", _set("transformer_layer_config.hidden_act", "gelu")),
    (
        "rope_parameters.rope_type",
        _set("transformer_layer_config.rope_parameters.rope_type", "yarn"),
    ),
    (
        "partial_rotary_factor",
        _set("transformer_layer_config.rope_parameters.partial_rotary_factor", 0.5),
    ),
    ("eagle_aux_hidden_state_layer_ids", _set("eagle_aux_hidden_state_layer_ids", [1, 2, 4, 6])),
    ("speculators_model_type", _set("speculators_model_type", "peagle")),
]


@pytest.mark.parametrize(
    "name, edit", SPECULATORS_VARIANTS, ids=[v[0] for v in SPECULATORS_VARIANTS]
)
def test_speculators_variants_are_refused_by_name(spec_fp32, tmp_path, capsys, name, edit):
    d = tmp_path / "variant"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        (d / f).write_bytes((spec_fp32 / f).read_bytes())
    _edit_config(d, edit)
    with pytest.raises(CheckpointError, match="refused") as e:
        load_draft(d)
    assert name in str(e.value)
    rc, out = _check_cli(d, capsys)
    assert rc == 1 and name in out, out


PORTABLE_VARIANTS = [
    ("norm_before_residual", _set("norm_before_residual", True)),
    ("norm_output", _set("norm_output", True)),
    ("eagle_config.norm_before_fc", _set("eagle_config.norm_before_fc", True)),
    ("eagle_config.use_aux_hidden_state", _set("eagle_config.use_aux_hidden_state", False)),
    ("rope_scaling.rope_type", _set("rope_scaling.rope_type", "dynamic")),
]


@pytest.mark.parametrize("name, edit", PORTABLE_VARIANTS, ids=[v[0] for v in PORTABLE_VARIANTS])
def test_portable_variants_are_refused_by_name(portable, tmp_path, capsys, name, edit):
    d = tmp_path / "variant"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        (d / f).write_bytes((portable / f).read_bytes())
    _edit_config(d, edit)
    with pytest.raises(CheckpointError, match="refused") as e:
        load_draft(d)
    assert name in str(e.value)
    rc, out = _check_cli(d, capsys)
    assert rc == 1 and name in out, out


# --- speculators 0.9.0 and vLLM 0.32, in their own venv ----------------------------------------
@pytest.fixture(scope="module")
def vllm_venv_python():
    try:
        return require_vllm_python()
    except VllmEnvMissing as e:
        pytest.skip(str(e))


def test_speculators_and_vllm_read_the_export(
    vllm_venv_python, head, portable, spec_fp32, verifier_dir, tiny_target, tmp_path
):
    """speculators' Eagle3DraftModel loads our export with no missing or unexpected tensor and
    the same tensors; its forward gives our logits; its own converter, run on our portable
    export, writes our speculators export; vLLM's config adapter reads the layer we mean."""
    bf16 = export_checkpoint(portable, "vllm", tmp_path / "bf16")  # the default: the target's dtype
    _, inputs = _logits(head, tiny_target)
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    job = {
        "exports": {"fp32": str(spec_fp32), "bf16": str(bf16)},
        "forward": {"dir": str(spec_fp32), "inputs": str(tmp_path / "inputs.safetensors")},
        "convert": {
            "src": str(portable),
            "verifier": str(verifier_dir),
            "out": str(tmp_path / "conv"),
        },
        "out": str(tmp_path),
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    r = subprocess.run(
        [str(vllm_venv_python), str(HERE / "speculators_interop.py"), str(tmp_path / "job.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    c = head.config
    n_layers = c.eagle3["target_num_hidden_layers"]

    for name, d in (("fp32", spec_fp32), ("bf16", bf16)):
        s = result["speculators"][name]
        info = s["loading_info"]
        assert info["missing_keys"] == [] and info["unexpected_keys"] == [], (name, info)
        assert info["mismatched_keys"] == [] and info["error_msgs"] == [], (name, info)
        ours = load_file(str(d / "model.safetensors"))
        theirs = load_file(str(tmp_path / f"{name}.speculators.safetensors"))
        for k, v in ours.items():  # bit for bit, in the file's dtype
            assert theirs[k].dtype == v.dtype and torch.equal(theirs[k], v), (name, k)
        assert set(s["model_keys"]) - set(ours) <= set(s["ignored_when_missing"]), name
        assert s["flags"] == dict.fromkeys(
            ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"), False
        )
        assert s["aux_layer_ids"] == [2, n_layers // 2, n_layers - 3]
        assert s["draft_vocab_size"] == c.draft_vocab_size
        layer = s["layer"]
        assert (layer["model_type"], layer["num_hidden_layers"], layer["hidden_act"]) == (
            "llama",
            1,
            "silu",
        )
        assert (layer["hidden_size"], layer["intermediate_size"], layer["head_dim"]) == (
            c.hidden_size,
            c.intermediate_size,
            c.head_dim,
        )
        assert (layer["num_attention_heads"], layer["num_key_value_heads"]) == (
            c.num_attention_heads,
            c.num_key_value_heads,
        )
        assert layer["vocab_size"] == c.vocab_size and layer["rms_norm_eps"] == c.rms_norm_eps
        assert layer["rope_parameters"] == {**LLAMA3_ROPE, "rope_theta": 100000.0}
        assert s["verifier"] == str(verifier_dir)

        v = result["vllm"][name]
        assert v["architectures"] == ["Eagle3LlamaForCausalLM"]
        assert [
            v[k] for k in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")
        ] == [False] * 4
        assert v["rope_parameters"] == {**LLAMA3_ROPE, "rope_theta": 100000.0}
        assert (v["draft_vocab_size"], v["vocab_size"], v["head_dim"]) == (
            512,
            c.vocab_size,
            c.head_dim,
        )
        assert v["num_hidden_layers"] == 1 and v["target_hidden_size"] is None
        assert v["eagle_aux_hidden_state_layer_ids"] == [2, n_layers // 2, n_layers - 3]
        assert v["speculative_config"] == {
            "method": "eagle3",
            "num_speculative_tokens": TREE["depth"],
        }

    # speculators' forward (eager attention, fp32) computes our layer: same logits up to rounding.
    ours, _ = _logits(head, tiny_target)
    seen = load_file(str(tmp_path / "logits.safetensors"))
    assert torch.equal(seen["embed"], tiny_target.model.get_input_embeddings().weight)
    theirs = seen["logits"]
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    # speculators' converter on our portable export: the same 15 tensors, bit for bit.
    conv = load_file(str(tmp_path / "conv" / "model.safetensors"))
    ours_t = load_file(str(spec_fp32 / "model.safetensors"))
    assert conv.keys() == ours_t.keys()
    assert all(conv[k].dtype == ours_t[k].dtype and torch.equal(conv[k], ours_t[k]) for k in conv)

    # What speculators writes itself (its converter; its save_pretrained, which keeps a copy of the
    # target's embedding) reads back as our head: the third-party path.
    for written in (tmp_path / "conv", tmp_path / "resaved"):
        assert check_checkpoint(written) == [], written
        back = load_draft(written)
        _assert_same_head(head, back)
        assert dataclasses.replace(back.config, eagle3={}) == dataclasses.replace(c, eagle3={})


def test_missing_vllm_venv_names_itself_and_the_make_target(monkeypatch, tmp_path):
    monkeypatch.setenv("EAGLE3_VLLM_VENV", str(tmp_path / "nowhere"))
    with pytest.raises(VllmEnvMissing, match=r"nowhere.*make vllm.*EAGLE3_VLLM_VENV"):
        require_vllm_python()
    fake = tmp_path / "venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("EAGLE3_VLLM_VENV", str(tmp_path / "venv"))
    assert require_vllm_python() == fake
