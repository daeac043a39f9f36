"""A recording proxy in front of vLLM's OpenAI routes (`eagle3 serve --record`), on 127.0.0.1.

Every route is passed through unchanged; `POST /v1/chat/completions` answered with 200 and one
choice is also recorded (docs/CONTRACTS.md §9): messages, the answer's text and token ids (the
proxy asks vLLM for `return_token_ids`, so responses carry that vLLM field), sampling, and the
acceptance of that request when it ran alone (the server's spec-decode counters diffed around it;
with other requests in flight the counters cannot be split, and acceptance is left out).

Nothing is recorded on the request path beyond an append to a list: a background thread appends the
list to the spool's open batch every `spool_every_s` (fsynced), and every `upload_every_s` seals
that batch (one object per period) and uploads the spooled batches; a failed upload stays spooled. A request opts out with `X-Eagle3-Capture: off`.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHAT = "/v1/chat/completions"
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
    """Records -> memory -> the spool's open batch -> sealed batches -> S3, off the request path."""

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
        from eagle3.traffic.store import append_open

        with self.lock:
            batch, self.pending = self.pending, []
        if not batch:
            return None
        path = append_open(batch, self.spool_dir)
        self.counts["spooled"] += len(batch)
        return path

    def upload_now(self) -> list[str]:
        from eagle3.traffic.store import flush, seal_open

        seal_open(self.spool_dir)  # what was appended since the last upload: one batch
        if self.s is None:
            return []
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
    """Which requests' acceptance the server's counters can tell: a request is `alone` when no
    other generating request (recorded, opted out or passed through) was in flight from its start
    to its end. Its "before" is a snapshot read while the server was idle after the previous
    request, and valid only if nothing started since; its "after" is read once it has ended, off
    the request path, and becomes the next snapshot. So no counter read ever delays a request,
    and a request without a valid snapshot simply goes without an acceptance."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.started = 0
        self.snapshot = None  # (counters, the `started` count when it was read)
        self.idle_start = 0  # the last ticket that began with nothing in flight

    def begin(self) -> tuple[int, object]:
        """(ticket, the counters before this request or None)."""
        idle = self.in_flight == 0
        base = None
        if idle and self.snapshot is not None and self.snapshot[1] == self.started:
            base = self.snapshot[0]
        self.in_flight += 1
        self.started += 1
        if idle:
            self.idle_start = self.started
        return self.started, base

    def end(self, ticket: int) -> bool:
        """Whether the request of `ticket` ran alone."""
        alone = self.idle_start == ticket and self.started == ticket and self.in_flight == 1
        self.in_flight -= 1
        return alone

    def idle_since(self, ticket: int) -> bool:
        """Nothing in flight and nothing started since `ticket`: counters read now are exact."""
        return self.in_flight == 0 and self.started == ticket

    def keep(self, counters, ticket: int) -> None:
        self.snapshot = (counters, ticket)


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
        try:
            r = await client.get("/metrics")
        except httpx.HTTPError:
            return None
        return parse_spec_counters(r.text) if r.status_code == 200 else None

    async def proxy(request: Request):
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP_HEADERS}
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        # Every request that may generate moves the counters, recorded or not.
        generating = request.method == "POST"
        record = recorder is not None and generating and request.url.path == CHAT
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
        ticket, before = gate.begin() if generating and measure_acceptance else (0, None)
        try:
            upstream_req = client.build_request(request.method, path, headers=headers, content=body)
            resp = await client.send(upstream_req, stream=True)
        except httpx.HTTPError as e:
            if ticket:
                gate.end(ticket)
            return Response(f"upstream {upstream}: {type(e).__name__}: {e}", status_code=502)
        state = {"alone": False}

        def ended() -> None:
            """The upstream answer is complete (or abandoned): the request no longer generates.
            Called from the relay's `finally`, so a client that hangs up mid-stream ends it too."""
            if ticket:
                state["alone"] = gate.end(ticket)

        drop = DROP_HEADERS | {"content-encoding"}
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in drop}
        streamed = resp.headers.get("content-type", "").startswith("text/event-stream")
        parser = StreamParser()

        async def finish(answer_fn):
            """After the response went out: the acceptance, the next snapshot, the record."""
            acceptance = None
            if ticket and gate.idle_since(ticket):
                after = await counters()
                if after is not None and gate.idle_since(ticket):
                    gate.keep(after, ticket)
                    if state["alone"] and before is not None:
                        acceptance = acceptance_of(before, after)
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
                    ended()
                    await resp.aclose()

            return StreamingResponse(
                relay(),
                status_code=resp.status_code,
                headers=out_headers,
                background=BackgroundTask(finish, lambda: parser.answer),
            )
        try:
            content = await resp.aread()
        finally:
            ended()
            await resp.aclose()
        return Response(
            content,
            status_code=resp.status_code,
            headers=out_headers,
            background=BackgroundTask(finish, lambda: answer_of_body(content)),
        )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        first = await counters()  # the idle server's counters: the first request's "before"
        if first is not None:
            gate.keep(first, 0)
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
    app = Starlette(routes=[Route("/{path:path}", proxy, methods=methods)], lifespan=lifespan)
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
