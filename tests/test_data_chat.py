"""Loss masks for three real chat templates (ChatML as SmolLM2, Llama-3, Qwen3), token by token.

Each case writes the expected rendering as (text, trainable) segments. The test groups the produced
tokens into runs of equal mask value and decodes each run: the runs must reproduce the segments
exactly, so every single token is checked to be on the right side of every boundary.
"""

from __future__ import annotations

import copy

import pytest
import torch

from eagle3.data.chat import TemplateError, build_sample, encode_chat, render

pytestmark = pytest.mark.unit

# The Llama-3-Instruct template.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# The Qwen3 template (its tool-call branches left out): it drops the <think> block of assistant turns
# before the last user query and always opens one in the final turn.
QWEN3 = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "And again?"},
    {"role": "assistant", "content": "Yes, again."},
]


@pytest.fixture(scope="module")
def tok(tiny_target):
    return copy.deepcopy(tiny_target.tokenizer)  # the fixture's tokenizer stays untouched


@pytest.fixture(scope="module")
def llama3_tok(tok):
    t = copy.deepcopy(tok)
    t.add_special_tokens(
        {
            "additional_special_tokens": [
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ]
        }
    )
    t.bos_token = "<|begin_of_text|>"
    t.chat_template = LLAMA3
    return t


@pytest.fixture(scope="module")
def qwen3_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = QWEN3
    return t


def runs(tokenizer, sample) -> list[tuple[str, bool]]:
    """Decode maximal runs of tokens with the same mask value."""
    out: list[tuple[list[int], bool]] = []
    for t, m in zip(sample.input_ids.tolist(), sample.loss_mask.tolist(), strict=True):
        if out and out[-1][1] == m:
            out[-1][0].append(t)
        else:
            out.append(([t], m))
    return [
        (tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False), m)
        for ids, m in out
    ]


def check(tokenizer, messages, segments, turns="all"):
    full = render(tokenizer, messages)
    assert full == "".join(s for s, _ in segments)  # the template renders what the case says
    sample = build_sample(tokenizer, messages, "s0", turns=turns)
    assert sample.input_ids.tolist() == encode_chat(tokenizer, messages)
    assert sample.input_ids.dtype == torch.int64 and sample.loss_mask.dtype == torch.bool
    merged: list[tuple[str, bool]] = []
    for s, m in segments:
        if merged and merged[-1][1] == m:
            merged[-1] = (merged[-1][0] + s, m)
        else:
            merged.append((s, m))
    assert runs(tokenizer, sample) == merged
    return sample


def test_chatml_smollm2(tok):
    check(
        tok,
        CONV,
        [
            (
                "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\n",
                False,
            ),
            ("Hello there<|im_end|>", True),
            ("\n<|im_start|>user\nAnd again?<|im_end|>\n<|im_start|>assistant\n", False),
            ("Yes, again.<|im_end|>", True),
            ("\n", False),
        ],
    )


def test_chatml_default_system_and_last_turn_only(tok):
    # SmolLM2 inserts its own system prompt when none is given; turns=last trains the final answer.
    check(
        tok,
        CONV[1:],
        [
            (
                "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there<|im_end|>\n"
                "<|im_start|>user\nAnd again?<|im_end|>\n<|im_start|>assistant\n",
                False,
            ),
            ("Yes, again.<|im_end|>", True),
            ("\n", False),
        ],
        turns="last",
    )


def test_llama3(llama3_tok):
    h = "<|start_header_id|>{}<|end_header_id|>\n\n"
    check(
        llama3_tok,
        CONV,
        [
            (
                "<|begin_of_text|>"
                + h.format("system")
                + "You are terse.<|eot_id|>"
                + h.format("user")
                + "Hi<|eot_id|>"
                + h.format("assistant"),
                False,
            ),
            ("Hello there<|eot_id|>", True),
            (h.format("user") + "And again?<|eot_id|>" + h.format("assistant"), False),
            ("Yes, again.<|eot_id|>", True),
        ],
    )


def test_qwen3_reasoning(qwen3_tok):
    conv = [dict(m) for m in CONV]
    conv[2]["content"] = "<think>\nfirst thoughts\n</think>\n\nHello there"
    conv[4]["content"] = "<think>\nsecond thoughts\n</think>\n\nYes, again."
    check(
        qwen3_tok,
        conv,
        [
            (
                "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\n",
                False,
            ),
            ("Hello there<|im_end|>", True),  # history: Qwen3 drops the reasoning of earlier turns
            ("\n<|im_start|>user\nAnd again?<|im_end|>\n<|im_start|>assistant\n", False),
            ("<think>\nsecond thoughts\n</think>\n\nYes, again.<|im_end|>", True),
            ("\n", False),
        ],
    )


def test_qwen3_empty_think_block_is_trained(qwen3_tok):
    # The last turn always opens a (here empty) think block: the model must learn to emit it.
    check(
        qwen3_tok,
        CONV[1:3],
        [
            ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
            ("<think>\n\n</think>\n\nHello there<|im_end|>", True),
            ("\n", False),
        ],
    )


def test_generation_prompt_is_the_mask_start(tok):
    prompt = encode_chat(tok, CONV[:2], add_generation_prompt=True)
    sample = build_sample(tok, CONV[:3], "s")
    assert sample.input_ids[: len(prompt)].tolist() == prompt
    assert not sample.loss_mask[: len(prompt)].any() and sample.loss_mask[len(prompt)]


def test_too_long_truncate_and_drop(tok):
    full = build_sample(tok, CONV, "s")
    n = len(full) - 3
    cut = build_sample(tok, CONV, "s", max_len=n)
    assert cut.input_ids.tolist() == full.input_ids[:n].tolist()
    assert cut.loss_mask.tolist() == full.loss_mask[:n].tolist()
    with pytest.raises(ValueError, match=f"too long: {len(full)} tokens > max_len {n}"):
        build_sample(tok, CONV, "s", max_len=n, long_policy="drop")
    with pytest.raises(ValueError, match="no trainable token within max_len"):
        build_sample(tok, CONV, "s", max_len=5)


def test_bad_conversations(tok):
    with pytest.raises(ValueError, match="no assistant turn"):
        build_sample(tok, CONV[:2], "s")
    bad = copy.deepcopy(tok)
    bad.chat_template = "{{ raise_exception('only user and assistant roles are supported') }}"
    with pytest.raises(TemplateError, match="only user and assistant roles"):
        build_sample(bad, CONV, "s")
    # A template that re-renders earlier turns differently cannot be split into prompt + answer.
    odd = copy.deepcopy(tok)
    odd.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="assistant turn 0"):
        build_sample(odd, CONV, "s")
