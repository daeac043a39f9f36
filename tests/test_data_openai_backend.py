"""`data.backend: openai` on the wire, against a scripted local server (no model): the request
each turn sends, the client's retries, the skip reason of a refused sample, the thinking a
reasoning parser split out, and no API key taken from the environment. The answers themselves
are checked against the target in test_data_regenerate.py (slow) and test_vllm.py (vLLM)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from eagle3.data import regenerate as R
from eagle3.data.sources import Conversation

pytestmark = pytest.mark.unit


class Scripted:
    """/v1/models and /v1/chat/completions; the last user message says how to answer."""

    def __init__(self):
        self.requests: list[tuple[dict, str | None]] = []
        self.busy_left = 2
        self.lock = threading.Lock()
        me = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, obj, headers=()):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/v1/models":
                    model = {"id": "m1", "object": "model", "created": 0, "owned_by": "t"}
                    return self._send(200, {"object": "list", "data": [model]})
                self._send(404, {"error": {"message": "no such route"}})

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with me.lock:
                    me.requests.append((req, self.headers.get("Authorization")))
                self._send(*me.answer(req))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def answer(self, req):
        said = req["messages"][-1]["content"]
        if said == "REFUSE":
            return 400, {"error": {"message": "this prompt is refused"}}
        with self.lock:
            busy = said == "BUSY" and self.busy_left > 0
            self.busy_left -= busy
        if busy:  # retry-after-ms keeps the client's backoff short
            return 503, {"error": {"message": "overloaded"}}, [("retry-after-ms", "5")]
        msg = {"role": "assistant", "content": f"answer {len(req['messages'])}"}
        if said == "THINK":
            msg["reasoning"] = "step by step"  # vLLM 0.32's field
        if said == "THINK-OLD":
            msg["reasoning_content"] = "old style"  # SGLang's
        choice = {
            "index": 0,
            "message": msg,
            "finish_reason": "length" if said == "LONG" else "stop",
        }
        usage = {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": req["model"]}
        return 200, {**reply, "choices": [choice], "usage": usage}

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def conv(cid: str, *user_turns: str) -> Conversation:
    msgs = []
    for u in user_turns:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": "old"}]
    return Conversation(cid, msgs, "t")


@pytest.fixture
def measured_by_chars(monkeypatch):
    """The tokenizer only measures prompts against max_len: one token per character here."""

    def encode(tokenizer, msgs, add_generation_prompt):
        return list(range(sum(len(m["content"]) for m in msgs)))

    monkeypatch.setattr(R, "encode_chat", encode)


CFG = SimpleNamespace(max_len=64, max_new_tokens=9, temperature=0.0, concurrency=2)


def test_requests_retries_reasons_and_thinking(measured_by_chars, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-travel")
    convs = [
        conv("two", "hello", "THINK"),
        conv("refused", "REFUSE"),
        conv("busy", "BUSY"),
        conv("old", "THINK-OLD"),
        conv("long", "LONG"),
        conv("tight", "x" * 60),
    ]
    with Scripted() as server:
        res = R.regenerate_openai(server.url, None, convs, CFG, seed=7)

    # The request: the served model, the dialog so far, the turn's budget, greedy, the seed.
    first = next(r for r, _ in server.requests if r["messages"][0]["content"] == "hello")
    assert first == {
        "model": "m1",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 9,
        "temperature": 0.0,
        "seed": 7,
    }
    second = [r for r, _ in server.requests if r["messages"][-1]["content"] == "THINK"]
    assert second[0]["messages"][:2] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "answer 1"},
    ]
    # A turn's budget is what max_len leaves, at most max_new_tokens: 64 - 60 characters.
    tight = [r for r, _ in server.requests if r["messages"][-1]["content"] == "x" * 60]
    assert tight[0]["max_tokens"] == 4
    assert {auth for _, auth in server.requests} == {"Bearer EMPTY"}

    got = {c.id: c.messages[-1]["content"] for c in res.conversations}
    assert got == {
        "two": "<think>\nstep by step\n</think>\n\nanswer 3",
        "busy": "answer 1",
        "old": "<think>\nold style\n</think>\n\nanswer 1",
        "long": "answer 1",
        "tight": "answer 1",
    }
    # 503 twice, then answered: the client retried; a 400 is not retried.
    said = [r["messages"][-1]["content"] for r, _ in server.requests]
    assert said.count("BUSY") == 3 and said.count("REFUSE") == 1
    assert [s.id for s in res.skipped] == ["refused"]
    reason = res.skipped[0].reason
    assert reason.startswith(f"endpoint error: {server.url}/chat/completions: ")
    assert "400" in reason and "this prompt is refused" in reason
    assert "sk-must-not-travel" not in reason
    s = res.stats
    assert (s.turns, s.new_tokens, s.hit_max_new_tokens, s.errors) == (6, 24, 1, 1)


def test_served_model_errors_name_the_endpoint_without_credentials():
    with Scripted() as server:
        assert R.served_model(server.url) == "m1"
        bad = server.url.replace("http://", "http://user:secret@") + "/nothing-here"
        with pytest.raises(R.EndpointError) as e:
            R.served_model(bad)
    msg = str(e.value)
    assert msg.startswith(f"{server.url}/nothing-here/models: ") and "404" in msg
    assert "secret" not in msg
