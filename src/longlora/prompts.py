"""Prompt templates: how a conversation becomes the text and token ids a model reads before its answer.

The one place that renders prompts, for `longlora sft` (training records, `longlora.data.sft`) and for `longlora ask`
/ `chat` (`longlora.generate`), so a model is asked exactly the way it was trained. Templates:

- 'chat_template': the tokenizer's own chat template with the generation prompt. The template writes its special
  tokens (BOS included) itself, so the text is tokenised without adding any.
- 'llama2': Llama-2 chat's form, `[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]`, with
  DEFAULT_SYSTEM_PROMPT when the conversation has no system message; later turns are
  ` {answer} </s><s>[INST] {user} [/INST]`. The tokenizer adds the first BOS.
- 'alpaca': the Stanford Alpaca prompt ending "### Response:", with an "### Input:" section when the record has an
  input. One turn only, and no system message (one is ignored). The tokenizer adds BOS.
- 'auto': 'chat_template' when the tokenizer has one, else 'llama2'.

`sft` and `ask` accept all four. `chat` accepts 'auto', 'chat_template' and 'llama2' (CHAT_TEMPLATES): Alpaca has no
form for a follow-up question. `sft` trains multi-turn records with 'chat_template' only.

A conversation is a list of {"role", "content"} messages: an optional system message, then user / assistant turns
alternating, ending with the user's turn. An instruction record's separate `input` ("### Input:" in Alpaca) is
passed as `input=`; the other templates append it to the last user turn after a newline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATES = ("auto", "llama2", "alpaca", "chat_template")
"""Every prompt template (see the module docstring)."""
CHAT_TEMPLATES = ("auto", "chat_template", "llama2")
"""The templates with a multi-turn form (what `longlora chat` accepts)."""

DEFAULT_SYSTEM_PROMPT = "You are a helpful, respectful and honest assistant."
"""The Llama-2 form's system prompt when the conversation has none."""

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)

# How `ask` puts the material and the question to the model (LongAlpaca's long-QA prompts have this shape: the
# document, an explicit end marker, then the question).
MATERIAL_PROMPT = (
    "Below is some material. Read it and answer my question after it.\n"
    "The material begins.\n{material}\nNow the material ends.\n{question}"
)


def user_message(material: str, question: str) -> str:
    """The first user turn of `ask` / `chat`: the material, an end marker, then the question."""
    return MATERIAL_PROMPT.format(material=material.strip(), question=question.strip())


def resolve_template(tokenizer: PreTrainedTokenizerBase, template: str) -> str:
    """The concrete template ('chat_template', 'llama2' or 'alpaca') that `template` means for this tokenizer."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}: prompt_template must be one of {TEMPLATES}")
    has_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat_template" if has_chat_template else "llama2"
    if template == "chat_template" and not has_chat_template:
        raise ValueError("template 'chat_template' but the tokenizer has no chat template; use 'llama2', 'alpaca' "
                         "or 'auto'")
    return template


def check_conversation(messages: list[dict]) -> None:
    """Raise a ValueError unless `messages` is an optional system message, then alternating user / assistant turns
    ending with the user's."""
    roles = [m.get("role") for m in messages]
    turns = roles[1:] if roles and roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if not turns or turns != expected[: len(turns)] or turns[-1] != "user":
        raise ValueError(
            f"a conversation alternates user / assistant turns (after an optional system message) and ends with the "
            f"user's question; got roles {roles}"
        )


def render_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], template: str = "auto", *, input: str = ""
) -> str:
    """The prompt text for a conversation ending with a user turn, ready for the assistant's answer.

    input: an instruction record's separate input (Alpaca's "### Input:"); the other templates append it to the
        last user turn after a newline.
    """
    check_conversation(messages)
    template = resolve_template(tokenizer, template)
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else list(messages)
    if template == "alpaca":
        if len(turns) > 1:
            raise ValueError(f"template 'alpaca' has one turn only; use one of {CHAT_TEMPLATES[1:]} for a "
                             "multi-turn conversation")
        prompt = ALPACA_PROMPT_WITH_INPUT if input else ALPACA_PROMPT
        return prompt.format(instruction=turns[0]["content"], input=input)
    if input:
        turns = turns[:-1] + [{"role": "user", "content": f"{turns[-1]['content']}\n{input}"}]
    if template == "chat_template":
        head = [{"role": "system", "content": system}] if system is not None else []
        return tokenizer.apply_chat_template(head + turns, tokenize=False, add_generation_prompt=True)
    return _llama2(tokenizer, DEFAULT_SYSTEM_PROMPT if system is None else system, turns)


def _llama2(tokenizer: PreTrainedTokenizerBase, system: str, turns: list[dict]) -> str:
    """Llama-2 chat's multi-turn form (the tokenizer adds the first BOS):
    [INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST]"""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    text = ""
    for i in range(0, len(turns), 2):
        user = turns[i]["content"]
        if i == 0:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        text += f"{bos if i else ''}[INST] {user} [/INST]"
        if i + 1 < len(turns):
            text += f" {turns[i + 1]['content'].strip()} {eos}"
    return text


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, template: str = "auto") -> list[int]:
    """Token ids of a prompt text rendered with `template`: a chat template's text already holds its special tokens;
    the other forms rely on the tokenizer adding BOS."""
    add_special_tokens = resolve_template(tokenizer, template) != "chat_template"
    # verbose=False: long-context prompts past the tokenizer's model_max_length are expected here
    return tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], template: str = "auto", *, input: str = ""
) -> list[int]:
    """Token ids of everything before the assistant's answer: `render_conversation` then `encode_prompt`."""
    return encode_prompt(tokenizer, render_conversation(tokenizer, messages, template, input=input), template)


def build_prompt(tokenizer: PreTrainedTokenizerBase, material: str, question: str, template: str = "auto") -> str:
    """The prompt text for one question about `material` (the first turn of `ask` / `chat`)."""
    if not question or not question.strip():
        raise ValueError("the question is empty")
    return render_conversation(tokenizer, [{"role": "user", "content": user_message(material, question)}], template)
