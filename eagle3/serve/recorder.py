"""A recording proxy in front of vLLM's OpenAI routes (`eagle3 serve --record`), on 127.0.0.1.

Every route is passed through unchanged; `POST /v1/chat/completions` answered with 200 and one
choice is also recorded (docs/CONTRACTS.md §9): messages, the answer's text and token ids (the
proxy asks vLLM for `return_token_ids`, so responses carry that vLLM field), sampling, and the
acceptance of that request when it ran alone (the server's spec-decode counters diffed around it;
with other requests in flight the counters cannot be split, and acceptance is left out).

Nothing is recorded on the request path beyond an append to a list: a background thread spools the
list to disk every `spool_every_s` (one atomic batch file) and uploads spooled batches every
`upload_every_s`; a failed upload stays spooled. A request opts out with `X-Eagle3-Capture: off`.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OPT_OUT_HEADER = "x-eagle3-capture"
OPT_OUT_VALUES = ("off", "no", "0", "false")
# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones httpx recomputes: never forwarded.
DROP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te",
                "upgrade", "proxy-authorization", "proxy-connection", OPT_OUT_HEADER}  # fmt: skip


@dataclass
class Answer:
    """One choice of a chat completion, put together from a JSON body or a stream's chunks."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    has_ids: bool = False
    finish_reason: str | None = None
    choices: int = 0

    def add_choice(self, choice: dict, streamed: bool) -> None:
        if choice.get("index", 0) != 0:
            self.choices = max(self.choices, choice["index"] + 1)
            return
        self.choices = max(self.choices, 1)
        part = choice.get("delta" if streamed else "message") or {}
        if isinstance(part.get("content"), str):
            self.text += part["content"]
        if choice.get("token_ids") is not None:
            self.has_ids = True
            self.token_ids.extend(int(t) for t in choice["token_ids"])
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]


def answer_of_body(body: bytes) -> Answer:
    a = Answer()
    for choice in json.loads(body).get("choices") or []:
        a.add_choice(choice, streamed=False)
    return a


class StreamParser:
    """Server-sent events of a streamed chat completion, fed as bytes arrive."""

    def __init__(self) -> None:
        self.buf = b""
        self.answer = Answer()

    def feed(self, chunk: bytes) -> None:
        self.buf += chunk
        while b"\n\n" in self.buf:
            event, self.buf = self.buf.split(b"\n\n", 1)
            for line in event.splitlines():
                data = line[5:].strip() if line.startswith(b"data:") else b""
                if not data or data == b"[DONE]":
                    continue
                for choice in json.loads(data).get("choices") or []:
                    self.answer.add_choice(choice, streamed=True)


def sampling_of(request: dict) -> dict:
    """What the request asked for; an absent temperature is OpenAI's default (1.0), so such an
    answer is never mistaken for a greedy one."""
    t = request.get("temperature")
    top_p = request.get("top_p")
    mx = request.get("max_completion_tokens") or request.get("max_tokens")
    return {
        "temperature": 1.0 if t is None else float(t),
        "top_p": 1.0 if top_p is None else float(top_p),
        "max_tokens": int(mx) if mx else 0,
        "seed": request.get("seed"),
    }


def wants_capture(headers) -> bool:
    return (headers.get(OPT_OUT_HEADER) or "").strip().lower() not in OPT_OUT_VALUES


class Recorder:
    """Records -> memory -> spool (atomic batch files) -> S3, off the request path."""

    def __init__(
        self,
        recipe,
        model: str,
        version: str,
        s=None,
        spool_every_s: float = 2.0,
        upload_every_s: float = 30.0,
        say=print,
    ):
        from eagle3.models.target import TargetSource
        from eagle3.traffic.capture import spool_dir
        from eagle3.traffic.record import compile_patterns

        self.recipe, self.model, self.version, self.s, self.say = recipe, model, version, s, say
        self.target = TargetSource.of(recipe.target).slug
        self.patterns = compile_patterns(recipe.traffic.redact)
        self.spool_dir = spool_dir(recipe, model)
        self.spool_every_s, self.upload_every_s = spool_every_s, upload_every_s
        self.pending: list = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.counts = {"recorded": 0, "spooled": 0, "uploaded": 0, "opted_out": 0}

    def add(self, messages: list, answer: Answer, sampling: dict, acceptance: dict | None):
        from eagle3.traffic.record import redact_record

        rec = redact_record(
            {
                "model": self.model,
                "champion_version": str(self.version),
                "engine": "vllm",
                "target": self.target,
                "messages": messages,
                "completion": {
                    "text": answer.text,
                    "token_ids": answer.token_ids if answer.has_ids else None,
                    "finish_reason": answer.finish_reason,
                },
                "sampling": sampling,
                "acceptance": acceptance,
            },
            self.patterns,
        )
        with self.lock:
            self.pending.append(rec)
            self.counts["recorded"] += 1

    def spool_now(self) -> Path | None:
        from eagle3.traffic.store import spool

        with self.lock:
            batch, self.pending = self.pending, []
        if not batch:
            return None
        path = spool(batch, self.spool_dir)
        self.counts["spooled"] += len(batch)
        return path

    def upload_now(self) -> list[str]:
        if self.s is None:
            return []
        from eagle3.traffic.store import flush

        try:  # flush keeps what fails spooled and says so; the next pass retries it
            keys, _ = flush(self.s, self.model, self.spool_dir, say=self.say)
        except Exception as e:  # noqa: BLE001 - a batch that would overwrite another: say, keep
            self.say(f"traffic: upload stopped, kept in {self.spool_dir}: {type(e).__name__}: {e}")
            return []
        self.counts["uploaded"] += len(keys)
        return keys

    def _loop(self) -> None:
        last_upload = time.monotonic()
        while not self.stopping.wait(self.spool_every_s):
            self.spool_now()
            if time.monotonic() - last_upload >= self.upload_every_s:
                self.upload_now()
                last_upload = time.monotonic()

    def start(self) -> Recorder:
        self.thread = threading.Thread(target=self._loop, name="traffic-recorder", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Spool what is in memory and try one last upload (what fails stays spooled)."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.spool_now()
        self.upload_now()


class Exclusive:
    """Whether a request ran with no other in flight from its start to its end: only then do the
    server's counters, diffed around it, belong to it alone."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.started = 0

    def begin(self) -> tuple[bool, int]:
        self.in_flight += 1
        self.started += 1
        return self.in_flight == 1, self.started

    def end(self, ticket: int) -> bool:
        alone = self.in_flight == 1 and self.started == ticket
        self.in_flight -= 1
        return alone


def acceptance_of(before, after) -> dict | None:
    d = after - before
    if d.drafts <= 0:
        return None
    return {
        "drafts": int(d.drafts),
        "accepted": int(d.accepted),
        "per_pos": [int(x) for x in d.per_pos],
        "source": "vllm-counters",
    }


def build_app(upstream: str, recorder: Recorder | None, measure_acceptance: bool = True) -> Any:
    """The Starlette app: a pass-through to `upstream` that records chat completions."""
    import httpx
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    from eagle3.infer.vllm_client import parse_spec_counters

    client = httpx.AsyncClient(base_url=upstream, timeout=None)
    gate = Exclusive()

    async def counters():
        r = await client.get("/metrics")
        return parse_spec_counters(r.text) if r.status_code == 200 else None

    async def proxy(request: Request):
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP_HEADERS}
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        record = (
            recorder is not None
            and request.method == "POST"
            and request.url.path == "/v1/chat/completions"
        )
        payload = None
        if record:
            if not wants_capture(request.headers):
                recorder.counts["opted_out"] += 1
                record = False
            else:
                try:
                    payload = json.loads(body)
                    record = isinstance(payload, dict) and (payload.get("n") or 1) == 1
                except ValueError:  # vLLM answers the bad body; nothing to record
                    record = False
        if record and not payload.get("return_token_ids"):
            body = json.dumps({**payload, "return_token_ids": True}).encode()
        ticket, before = 0, None
        if record and measure_acceptance:
            first, ticket = gate.begin()
            before = await counters() if first else None
        upstream_req = client.build_request(request.method, path, headers=headers, content=body)
        resp = await client.send(upstream_req, stream=True)
        out_headers = {
            k: v
            for k, v in resp.headers.items()
            if k.lower() not in DROP_HEADERS | {"content-encoding"}
        }
        streamed = resp.headers.get("content-type", "").startswith("text/event-stream")
        parser = StreamParser()

        async def finish(answer_fn):
            acceptance = None
            if record and measure_acceptance:
                alone = gate.end(ticket)
                if alone and before is not None:
                    after = await counters()
                    acceptance = acceptance_of(before, after) if after is not None else None
            if record and resp.status_code == 200:
                answer = answer_fn()
                if answer.choices == 1:
                    recorder.add(payload["messages"], answer, sampling_of(payload), acceptance)

        if streamed:

            async def relay():
                try:
                    async for chunk in resp.aiter_raw():
                        if record:
                            parser.feed(chunk)
                        yield chunk
                finally:
                    await resp.aclose()

            return StreamingResponse(
                relay(),
                status_code=resp.status_code,
                headers=out_headers,
                background=BackgroundTask(finish, lambda: parser.answer),
            )
        content = await resp.aread()
        await resp.aclose()
        return Response(
            content,
            status_code=resp.status_code,
            headers=out_headers,
            background=BackgroundTask(finish, lambda: answer_of_body(content)),
        )

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
    app = Starlette(routes=[Route("/{path:path}", proxy, methods=methods)])
    app.state.client = client
    return app


@dataclass
class RecordingServer:
    """The proxy run by uvicorn in a thread (tests, benchmarks and `eagle3 serve --record`)."""

    app: Any
    port: int
    server: Any = None
    thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        from eagle3.ops.procs import loopback_url

        return loopback_url(self.port)

    def start(self, timeout: float = 30.0) -> RecordingServer:
        import uvicorn

        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="recording-proxy", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"recording proxy did not start on 127.0.0.1:{self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
