"""Chat-template rendering and the assistant loss mask, for ANY template (no separator strings).

How the mask is found: for assistant message i, the template renders the conversation before it
with the generation prompt (`p_i`: exactly what the model is prompted with) and the conversation
through it (`q_i`). The assistant's own text starts where `p_i` ends; it ends with the template's
end-of-turn marker, which we take to be the last special token that `q_i` adds after `p_i` (ChatML's
`<|im_end|>`, Llama-3's `<|eot_id|>`, Gemma's `<end_of_turn>`, ...). Whatever the template writes after
that marker (a newline) is not something the model emits, so it is not trained on.

Templates that rewrite history (Qwen3 drops the `<think>` block of earlier turns) make `q_i` differ
from the full rendering; there the turn ends at the first end-of-turn marker after `p_i` in the full
text. A template that does not render the conversation so far as a prefix of the whole cannot be
masked this way: `TemplateError` names the turn.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from eagle3.data.samples import TokenSample


class TemplateError(ValueError):
    """The chat template failed to render, or cannot be split into turns."""


def chat_template_text(tokenizer) -> str:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):  # several named templates: the default one is used
        tpl = tpl.get("default") or next(iter(tpl.values()))
    if not tpl:
        raise TemplateError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no chat template"
        )
    return tpl


def chat_template_sha256(tokenizer) -> str:
    return hashlib.sha256(chat_template_text(tokenizer).encode()).hexdigest()


def render(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja raises anything (TemplateError, TypeError, raise_exception())
        raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
    if not isinstance(text, str):
        raise TemplateError(f"chat template returned {type(text).__name__}, not text")
    return text


def tokenize(tokenizer, text: str) -> list[int]:
    # The rendered text already holds BOS and friends where the template wants them.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(
    tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = False
) -> list[int]:
    """Token ids of the rendered conversation (with the assistant header when asked)."""
    return tokenize(tokenizer, render(tokenizer, messages, add_generation_prompt))


def special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def _last_special(tokenizer, text: str, specials: set[int]) -> tuple[int, int] | None:
    """Character span of the last special token in text, if any."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [
        o for t, o in zip(enc["input_ids"], enc["offset_mapping"], strict=True) if t in specials
    ]
    return tuple(spans[-1]) if spans else None


def assistant_spans(
    tokenizer, messages: list[dict[str, Any]], full: str | None = None, turns: str = "all"
) -> list[tuple[int, int]]:
    """Character spans [start, end) of the trainable assistant text in the full rendering."""
    full = render(tokenizer, messages) if full is None else full
    specials = special_ids(tokenizer)
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if turns == "last":
        idx = idx[-1:]
    spans = []
    for k, i in enumerate(idx):
        p = render(tokenizer, messages[:i], add_generation_prompt=True)
        q = render(tokenizer, messages[: i + 1])
        if not (full.startswith(p) and q.startswith(p)):
            raise TemplateError(
                f"assistant turn {k} (message {i}): the template does not render "
                "the conversation before it as a prefix of the whole"
            )
        start = len(p)
        body = q[start:]
        marker = _last_special(tokenizer, body, specials)
        if (
            marker is None
        ):  # a template without an end-of-turn token: the whole body, sans trailing space
            if not full.startswith(q):
                raise TemplateError(
                    f"assistant turn {k} (message {i}): no end-of-turn token and "
                    "the template rewrites it later"
                )
            end = start + len(body.rstrip())
        elif full.startswith(q):
            end = start + marker[1]
        else:  # history rewritten (e.g. reasoning dropped): the next end-of-turn marker in the full text
            closing = body[marker[0] : marker[1]]
            at = full.find(closing, start)
            if at < 0:
                raise TemplateError(
                    f"assistant turn {k} (message {i}): end-of-turn {closing!r} "
                    "not found in the full rendering"
                )
            end = at + len(closing)
        if end > start:
            spans.append((start, end))
    return spans


def build_sample(
    tokenizer,
    messages: list[dict[str, Any]],
    sample_id: str,
    turns: str = "all",
    max_len: int | None = None,
    long_policy: str = "truncate",
) -> TokenSample:
    """input ids of the whole conversation + the loss mask over its assistant tokens.

    Raises TemplateError (cannot render/mask) or ValueError (no trainable token, too long).
    """
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn")
    full = render(tokenizer, messages)
    spans = assistant_spans(tokenizer, messages, full, turns)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    starts = torch.tensor([o[0] for o in enc["offset_mapping"]], dtype=torch.long)
    mask = torch.zeros(len(ids), dtype=torch.bool)
    for a, b in spans:  # a token is trainable when it starts inside an assistant span
        mask |= (starts >= a) & (starts < b)
    if max_len is not None and len(ids) > max_len:
        if long_policy == "drop":
            raise ValueError(f"too long: {len(ids)} tokens > max_len {max_len}")
        ids, mask = ids[:max_len], mask[:max_len]
    if not mask.any():
        raise ValueError("no trainable token" + (" within max_len" if max_len else ""))
    return TokenSample(sample_id, torch.tensor(ids, dtype=torch.long), mask)
