"""The target rewrites the assistant turns: EAGLE-3 must learn what the TARGET would say.

Turn by turn: the answer to user turn k is generated with the target's own answers to turns < k in
the context, so a multi-turn sample is exactly a conversation the target could have had. Two
backends, same contract (conversations in, regenerated conversations + skips + stats out):
- `regenerate_hf`: the loaded target answers `batch_size` prompts at a time with continuous
  batching (`decode.py`: a finished answer's slot takes the next prompt; left padding, KV cache,
  prompts sorted by length so the batch wastes little padding);
- `regenerate_openai`: any OpenAI-compatible server (vLLM, SGLang) through the `openai` client
  (its retries with backoff), with bounded concurrency.
A turn whose prompt no longer fits `max_len` ends the conversation there; a conversation with no
answered turn is skipped with the reason.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from eagle3.data.chat import TemplateError, encode_chat
from eagle3.data.sources import Conversation, Skip


@dataclass
class RegenStats:
    turns: int = 0  # answers generated
    new_tokens: int = 0
    hit_max_new_tokens: int = 0  # answers cut by max_new_tokens (or by max_len)
    turns_cut: int = 0  # later turns dropped because the prompt outgrew max_len
    errors: int = 0  # failed requests (openai) after retries
    seconds: float = 0.0

    def add(self, other: RegenStats) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RegenResult:
    conversations: list[Conversation] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    stats: RegenStats = field(default_factory=RegenStats)


def user_turns(messages: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The prompt pieces to answer: the system message rides with the first; original assistant
    messages are dropped; consecutive user messages form one turn."""
    turns: list[list[dict[str, Any]]] = []
    pending: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant":
            if pending and any(p["role"] == "user" for p in pending):
                turns.append(pending)
                pending = []
            continue
        pending.append({"role": m["role"], "content": m["content"]})
    if any(p["role"] == "user" for p in pending):
        turns.append(pending)
    return turns


class _Dialog:
    """One conversation being regenerated: the context so far and the turns still to answer."""

    def __init__(self, conv: Conversation):
        self.conv = conv
        self.turns = user_turns(conv.messages)
        self.context: list[dict[str, Any]] = []
        self.answered = 0
        self.reason: str | None = None  # why it stopped early

    def next_prompt(self) -> list[dict[str, Any]] | None:
        if self.reason is not None or self.answered >= len(self.turns):
            return None
        return self.context + self.turns[self.answered]

    def answer(self, text: str) -> None:
        self.context = (
            self.context + self.turns[self.answered] + [{"role": "assistant", "content": text}]
        )
        self.answered += 1

    def result(self) -> Conversation | Skip:
        if self.answered == 0:
            return Skip(self.conv.id, self.reason or "no user turn")
        return Conversation(self.conv.id, self.context, self.conv.source)


def _fit(dialog: _Dialog, tokenizer, max_len: int, stats: RegenStats) -> list[int] | None:
    """Prompt ids for the dialog's next turn, or None (and the reason) when it cannot go on."""
    msgs = dialog.next_prompt()
    if msgs is None:
        return None
    try:
        ids = encode_chat(tokenizer, msgs, add_generation_prompt=True)
    except TemplateError as e:
        dialog.reason = f"template: {e}"
        return None
    if len(ids) >= max_len:
        dialog.reason = f"too long: prompt of {len(ids)} tokens >= max_len {max_len}"
        if dialog.answered:
            stats.turns_cut += len(dialog.turns) - dialog.answered
        return None
    return ids


# --- HF backend ---------------------------------------------------------------------------------------
def prompt_seed(seed: int, i: int) -> int:
    """The sampling seed of prompt i of a call: each answer draws from its own generator."""
    return seed * 1_000_003 + i


def answer_prompts(
    target,
    prompts: list[list[int]],
    limits: list[int],
    batch_size: int,
    temperature: float = 0.0,
    seeds: list[int] | None = None,
    on_done: Callable[[int, list[int], bool], None] | None = None,
) -> list[tuple[list[int], bool]]:
    """Per prompt (new ids up to and incl. EOS, cut by its limit?), `batch_size` in flight.

    Continuous batching (`decode.py`) when the model's cache is plain K/V; otherwise HF `generate`
    over static left-padded batches of prompts sorted by length.
    """
    from eagle3.data.decode import decode_continuous

    out = decode_continuous(target, prompts, limits, batch_size, temperature, seeds, on_done)
    if out is not None:
        return out
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    res: dict[int, tuple[list[int], bool]] = {}
    for b in range(0, len(order), batch_size):
        chunk = order[b : b + batch_size]
        seed = seeds[chunk[0]] if seeds else b
        got = generate_static(
            target, [prompts[i] for i in chunk], [limits[i] for i in chunk], temperature, seed
        )
        for i, r in zip(chunk, got, strict=True):
            res[i] = r
            if on_done:
                on_done(i, *r)
    return [res[i] for i in range(len(prompts))]


def generate_batch(
    target,
    prompts: list[list[int]],
    max_new_tokens: list[int] | int,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[tuple[list[int], bool]]:
    """All prompts in flight at once; per prompt (new ids up to and incl. EOS, cut?)."""
    n = len(prompts)
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    seeds = [prompt_seed(seed, i) for i in range(n)]
    return answer_prompts(target, prompts, limits, n, temperature, seeds)


@torch.inference_mode()
def generate_static(target, prompts, limits, temperature, seed):
    """One left-padded HF `generate` over a batch (the fallback for sliding / recurrent caches)."""
    from transformers import GenerationConfig

    n = len(prompts)
    eos = target.eos_token_ids
    tok = target.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every row's next token is at the same column
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    sample = temperature > 0
    gen = GenerationConfig(
        max_new_tokens=max(limits),
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=None,
        top_p=None,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
    )
    if sample:
        torch.manual_seed(seed)
    dev = target.device
    out = target.model.generate(
        input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gen
    )
    results = []
    for i in range(n):
        new = out[i, width:].tolist()[: limits[i]]
        stop = next((k for k, t in enumerate(new) if t in eos), None)
        results.append((new[: stop + 1], False) if stop is not None else (new, True))
    return results


def _turn_seed(seed: int, d: _Dialog) -> int:
    """Stable per (run seed, conversation, turn): a sampled answer does not depend on its batch."""
    return zlib.crc32(f"{seed}:{d.conv.id}:{d.answered}".encode())


def _decode(tokenizer, ids: list[int]) -> str:
    # The end-of-turn token is the template's to add back; special tokens are not content.
    return tokenizer.decode(ids, skip_special_tokens=True)


def regenerate_hf(
    target,
    conversations: list[Conversation],
    cfg,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> RegenResult:
    """Batched generation turn by turn; `on_batch(answers, new_tokens)` as answers end."""
    t0 = time.perf_counter()
    stats = RegenStats()
    dialogs = [_Dialog(c) for c in conversations]

    def done(i: int, ids: list[int], cut: bool) -> None:
        stats.turns += 1
        stats.hit_max_new_tokens += cut
        stats.new_tokens += len(ids)
        if on_batch:
            on_batch(1, len(ids))

    while True:
        ready = []
        for d in dialogs:
            ids = _fit(d, target.tokenizer, cfg.max_len, stats)
            if ids is not None:
                ready.append((d, ids))
        if not ready:
            break
        ready.sort(key=lambda x: len(x[1]))  # similar lengths share the padded width
        outs = answer_prompts(
            target,
            [ids for _, ids in ready],
            [min(cfg.max_new_tokens, cfg.max_len - len(ids)) for _, ids in ready],
            cfg.batch_size,
            cfg.temperature,
            [_turn_seed(seed, d) for d, _ in ready],
            on_done=done,
        )
        for (d, _), (ids, _) in zip(ready, outs, strict=True):
            d.answer(_decode(target.tokenizer, ids))
    stats.seconds = time.perf_counter() - t0
    return _collect(dialogs, stats)


def _collect(dialogs: list[_Dialog], stats: RegenStats) -> RegenResult:
    res = RegenResult(stats=stats)
    for d in dialogs:
        item = d.result()
        (res.skipped if isinstance(item, Skip) else res.conversations).append(item)
    return res


# --- OpenAI-compatible backend -------------------------------------------------------------------------
# vLLM and SGLang serve without a key unless started with --api-key: a placeholder, never
# OPENAI_API_KEY, which must not travel to a local server.
_NO_KEY = "EMPTY"
_RETRIES = 2  # after the first try: connection errors, 408, 409, 429 and 5xx, with backoff


class EndpointError(RuntimeError):
    pass


def _client(endpoint: str, timeout: float):
    from openai import OpenAI

    return OpenAI(base_url=endpoint, api_key=_NO_KEY, timeout=timeout, max_retries=_RETRIES)


def _where(endpoint: str) -> str:
    """The endpoint for messages, without any user:password@ it carries."""
    from eagle3.names import redact

    return redact(endpoint.rstrip("/"), mask="")


def _api_error(e: Exception) -> str:
    import openai

    if isinstance(e, openai.APIStatusError):  # "Error code: 400 - <the server's message>"
        return e.message
    return f"{type(e).__name__}: {e}"


def served_model(endpoint: str, timeout: float = 30.0, client=None) -> str:
    """The first model the server lists (vLLM/SGLang serve one)."""
    import openai

    try:
        if client is None:
            with _client(endpoint, timeout) as c:
                models = list(c.models.list())
        else:
            models = list(client.with_options(timeout=timeout).models.list())
    except openai.APIError as e:
        raise EndpointError(f"{_where(endpoint)}/models: {_api_error(e)}") from e
    if not models:
        raise EndpointError(f"{_where(endpoint)}/models lists no model")
    return models[0].id


def regenerate_openai(
    endpoint: str,
    tokenizer,
    conversations: list[Conversation],
    cfg,
    seed: int = 0,
    model: str | None = None,
    timeout: float = 600.0,
    on_batch: Callable[[int, int], None] | None = None,
) -> RegenResult:
    """At most `cfg.concurrency` conversations in flight; each goes turn by turn.

    The tokenizer only measures prompts against max_len (the server renders the template itself,
    which for vLLM/SGLang is the same template the target's tokenizer carries). A request that
    still fails after the client's retries ends its conversation, with the endpoint and the
    server's reason as the skip reason of that sample.
    """
    import openai

    t0 = time.perf_counter()
    url = f"{_where(endpoint)}/chat/completions"
    dialogs = [_Dialog(c) for c in conversations]
    with _client(endpoint, timeout) as client:  # thread-safe: one connection pool for all
        model = model or served_model(endpoint, client=client)

        def run(d: _Dialog) -> RegenStats:
            st = RegenStats()
            while (ids := _fit(d, tokenizer, cfg.max_len, st)) is not None:
                limit = min(cfg.max_new_tokens, cfg.max_len - len(ids))
                try:
                    reply = client.chat.completions.create(
                        model=model,
                        messages=d.next_prompt(),
                        max_tokens=limit,
                        temperature=cfg.temperature,
                        seed=seed,
                    )
                    choice = reply.choices[0]
                    msg = choice.message
                except (openai.APIError, IndexError, AttributeError, TypeError) as e:
                    st.errors += 1
                    d.reason = f"endpoint error: {url}: {_api_error(e)}"
                    break
                d.answer(_with_reasoning(msg))
                n = int(getattr(reply.usage, "completion_tokens", 0) or 0)
                st.turns += 1
                st.new_tokens += n
                st.hit_max_new_tokens += choice.finish_reason == "length"
                if on_batch:
                    on_batch(1, n)
            return st

        stats = RegenStats()
        with ThreadPoolExecutor(max_workers=max(1, cfg.concurrency)) as pool:
            for st in pool.map(run, dialogs):
                stats.add(st)
    stats.seconds = time.perf_counter() - t0
    return _collect(dialogs, stats)


def _with_reasoning(msg) -> str:
    """The answer as the target wrote it: a reasoning parser splits the thinking out (vLLM names
    it `reasoning`, SGLang and older vLLM `reasoning_content`); put it back in front."""
    text = msg.content or ""
    extra = msg.model_extra or {}
    thinking = extra.get("reasoning") or extra.get("reasoning_content")
    return f"<think>\n{thinking}\n</think>\n\n{text}" if thinking else text
