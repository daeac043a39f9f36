"""Regeneration backends. The OpenAI-compatible one talks to a real HTTP server on 127.0.0.1 that
serves the tiny target (chat template + greedy generate), the way vLLM or SGLang would."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from eagle3.config import build_recipe
from eagle3.data.chat import encode_chat
from eagle3.data.regenerate import (
    generate_batch,
    regenerate_hf,
    regenerate_openai,
    user_turns,
)
from eagle3.data.sources import Conversation

pytestmark = pytest.mark.slow


class FakeOpenAI:
    """/v1/models and /v1/chat/completions backed by the tiny target; records what it served."""

    def __init__(self, target):
        self.target = target
        self.lock = threading.Lock()  # one generation at a time, like a single-GPU server
        self.count_lock = threading.Lock()
        self.inflight = 0
        self.max_inflight = 0
        self.requests = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.count_lock:
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                try:
                    code, obj = fake.answer(req)
                finally:  # before replying: the client may send its next request once it reads this
                    with fake.count_lock:
                        fake.inflight -= 1
                self._send(code, obj)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, req):
        if "FAIL" in req["messages"][-1]["content"]:
            return 400, {"error": {"message": "this prompt is refused"}}
        tok = self.target.tokenizer
        ids = encode_chat(tok, req["messages"], add_generation_prompt=True)
        with self.lock:
            ((new, cut),) = generate_batch(self.target, [ids], req["max_tokens"])
        text = tok.decode(new, skip_special_tokens=True)
        self.requests.append((req, text))
        reply = {
            "id": "x",
            "object": "chat.completion",
            "model": req["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "length" if cut else "stop",
                    "message": {"role": "assistant", "content": text},
                }
            ],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new)},
        }
        return 200, reply

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _convs():
    out = []
    for i in range(6):
        msgs = []
        for w in ("tea", "rain")[: 1 + i % 2]:
            msgs += [
                {"role": "user", "content": f"Tell me about {w} ({i})."},
                {"role": "assistant", "content": "old"},
            ]
        out.append(Conversation(f"t:{i}", msgs, "t"))
    out.append(Conversation("t:fail", [{"role": "user", "content": "FAIL please"}], "t"))
    return out


@pytest.fixture(scope="module")
def data_cfg(tiny_recipe):
    tree = tiny_recipe.model_dump(mode="json", exclude_none=True)
    tree["data"].update({"max_new_tokens": 10, "max_len": 128, "concurrency": 3, "batch_size": 4})
    return build_recipe(tree).data


def test_user_turns():
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "assistant", "content": "lead"},
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "c"},
    ]
    assert user_turns(msgs) == [
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
        ],
        [{"role": "user", "content": "c"}],
    ]


def test_openai_backend_against_a_local_server(tiny_target, data_cfg):
    convs = _convs()
    with FakeOpenAI(tiny_target) as server:
        res = regenerate_openai(server.url, tiny_target.tokenizer, convs, data_cfg)
    # Bounded concurrency, and actually concurrent.
    assert 2 <= server.max_inflight <= data_cfg.concurrency
    # The failing conversation is reported with its id and the server's reason; the rest go on.
    assert [(s.id, s.reason.split(":")[0]) for s in res.skipped] == [("t:fail", "endpoint error")]
    assert "this prompt is refused" in res.skipped[0].reason
    assert res.stats.errors == 1
    got = {c.id: c.messages for c in res.conversations}
    assert sorted(got) == [f"t:{i}" for i in range(6)]
    # Turn by turn: the second request of a two-turn conversation carries the first answer.
    for i in range(6):
        msgs = got[f"t:{i}"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (1 + i % 2)
        for k in range(1, len(msgs), 2):
            served = [t for r, t in server.requests if r["messages"] == msgs[:k]]
            assert served == [msgs[k]["content"]]
    assert res.stats.turns == 9 and res.stats.new_tokens > 0
    # Same model, same greedy decoding: the batched HF backend gives the same conversations.
    hf = regenerate_hf(tiny_target, convs[:6], data_cfg)
    assert {c.id: c.messages for c in hf.conversations} == got


def test_hf_batch_matches_one_at_a_time(tiny_target):
    tok = tiny_target.tokenizer
    prompts = [
        encode_chat(tok, [{"role": "user", "content": "x " * n}], add_generation_prompt=True)
        for n in (1, 7, 30)
    ]
    batched = generate_batch(tiny_target, prompts, [5, 9, 3])
    single = [
        generate_batch(tiny_target, [p], n)[0] for p, n in zip(prompts, [5, 9, 3], strict=True)
    ]
    assert batched == single
    assert [len(ids) for ids, _ in batched] == [5, 9, 3]  # the random tiny target never stops early


def test_prompt_beyond_max_len_stops_the_conversation(tiny_target, data_cfg):
    long = Conversation(
        "t:long",
        [
            {"role": "user", "content": "short"},
            {"role": "assistant", "content": "old"},
            {"role": "user", "content": "word " * 300},
        ],
        "t",
    )
    only_long = Conversation("t:only", [{"role": "user", "content": "word " * 300}], "t")
    res = regenerate_hf(tiny_target, [long, only_long], data_cfg)
    assert [c.id for c in res.conversations] == ["t:long"]
    assert len(res.conversations[0].messages) == 2  # the first turn survives
    assert res.stats.turns_cut == 1
    assert res.skipped[0].id == "t:only" and res.skipped[0].reason.startswith("too long: prompt of")


def test_sampling_follows_the_seed(tiny_target):
    tok = tiny_target.tokenizer
    prompt = encode_chat(
        tok, [{"role": "user", "content": "Pick a word."}], add_generation_prompt=True
    )
    a = generate_batch(tiny_target, [prompt, prompt], 6, temperature=1.5, seed=1)
    b = generate_batch(tiny_target, [prompt, prompt], 6, temperature=1.5, seed=1)
    c = generate_batch(tiny_target, [prompt, prompt], 6, temperature=1.5, seed=2)
    assert a == b
    assert a != c
    assert a[0] != a[1]  # rows of a batch draw independently
