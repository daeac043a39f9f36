"""One served request, as the traffic capture records it (docs/CONTRACTS.md §9).

A record says what was asked (messages, sampling), what the target answered (text and token ids),
who answered (engine, champion version, target) and how well the head drafted it (acceptance:
verify steps that carried drafts, accepted draft tokens, accepted per draft position). The same
quantity is read from our engine (per request, exact) and from vLLM (its counters diffed around the
request). Redaction runs before a record exists: `redact_record` is the only way in.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import Field

from eagle3.contract import Contract

VERSION = 1


class Acceptance(Contract):
    """How the head drafted one request: acceptance length = 1 + accepted / drafts."""

    drafts: int = Field(description="verify steps that carried draft tokens")
    accepted: int = Field(description="draft tokens accepted over those steps")
    per_pos: list[int] = Field(
        default_factory=list, description="steps whose draft position i was accepted"
    )
    source: Literal["engine", "vllm-counters"] = "engine"

    @property
    def length(self) -> float:
        return 1.0 + self.accepted / self.drafts if self.drafts else 0.0


class Sampling(Contract):
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int
    seed: int | None = None


class Completion(Contract):
    text: str
    token_ids: list[int] | None = Field(
        default=None, description="the target's new token ids; dropped when redaction changed text"
    )
    finish_reason: str | None = None


class TrafficRecord(Contract):
    version: int = VERSION
    id: str = Field(description="unique per served request (uuid4 hex)")
    time: str = Field(description="UTC, ISO 8601, when the answer was complete")
    model: str = Field(description="registered model name (the S3 prefix's <model>)")
    champion_version: str
    engine: Literal["eagle3", "vllm"]
    target: str = Field(description="the target's slug: answers are reused only for this target")
    messages: list[dict[str, Any]]
    completion: Completion
    sampling: Sampling
    acceptance: Acceptance | None = None
    redacted: bool = Field(default=False, description="a redaction pattern changed some text")

    @property
    def when(self) -> datetime:
        return parse_time(self.time)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """An ISO 8601 time (a bare date is midnight UTC); naive times are UTC."""
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def acceptance_of_lengths(accept_lengths: list[int]) -> Acceptance:
    """Our engine's per-cycle gains (accepted drafts + 1 bonus token) as an Acceptance."""
    accepted = [max(a - 1, 0) for a in accept_lengths]
    depth = max(accepted, default=0)
    return Acceptance(
        drafts=len(accepted),
        accepted=sum(accepted),
        per_pos=[sum(1 for a in accepted if a > i) for i in range(depth)],
        source="engine",
    )


def compile_patterns(patterns: list[str]) -> list[re.Pattern]:
    """The recipe's redaction regexes, compiled; a bad one is named."""
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"traffic.redact: pattern {p!r} is not a regex: {e}") from None
    return out


def redact_text(text: str, patterns: list[re.Pattern]) -> str:
    for p in patterns:
        text = p.sub("[REDACTED]", text)
    return text


def redact_content(content: Any, patterns: list[re.Pattern]) -> Any:
    """A message's content redacted: a string, or OpenAI content parts (each part's `text`)."""
    if isinstance(content, str):
        return redact_text(content, patterns)
    if isinstance(content, list):
        return [
            {**p, "text": redact_text(p["text"], patterns)}
            if isinstance(p, dict) and isinstance(p.get("text"), str)
            else p
            for p in content
        ]
    return content


def redact_record(fields: dict[str, Any], patterns: list[re.Pattern]) -> TrafficRecord:
    """The record of `fields` with every message and the completion redacted. When redaction
    changed anything, the token ids go too (they would spell the secret back) and `redacted` says
    so: such an answer is no longer the target's answer to the recorded prompt."""
    msgs = [
        {**m, "content": redact_content(m.get("content"), patterns)} for m in fields["messages"]
    ]
    comp = dict(fields["completion"])
    text = redact_text(comp["text"], patterns)
    changed = text != comp["text"] or msgs != fields["messages"]
    comp["text"] = text
    if changed:
        comp["token_ids"] = None
    return TrafficRecord.model_validate(
        {
            "id": uuid.uuid4().hex,
            "time": now_iso(),
            **fields,
            "messages": msgs,
            "completion": comp,
            "redacted": changed,
        }
    )
