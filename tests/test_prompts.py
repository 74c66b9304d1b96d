"""longlora.prompts: a record trained by `longlora sft` and the same material + question put by `longlora ask` give
the model the same prompt token ids, for every template; the texts match the published forms written out here."""

import pytest
import torch
from tokenizers import processors
from transformers import AutoModelForCausalLM

from longlora.data import IGNORE_INDEX, build_sft_example
from longlora.generate import ask, chat, generate_answer
from longlora.prompts import (
    DEFAULT_SYSTEM_PROMPT,
    TEMPLATES,
    render_conversation,
    resolve_template,
    user_message,
)
from tiny_models import tiny_config, tiny_tokenizer

MATERIAL = "def wrap(text, width=70):\n    return TextWrapper(width=width).wrap(text)\n"
QUESTION = "What is the default width?"
ANSWER = "70"
SYSTEM = "Answer in one word."
# A Zephyr-like chat template that writes BOS itself: encoding its text must not add a second one.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _adds_bos(tokenizer):
    """Make `tokenizer` put BOS in front when it adds special tokens, as Llama's tokenizers do."""
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    return tokenizer


def _tokenizers():
    with_chat = _adds_bos(tiny_tokenizer())  # a template that writes BOS, on a tokenizer that would add another
    with_chat.chat_template = CHAT_TEMPLATE
    return {"plain": tiny_tokenizer(), "llama_like": _adds_bos(tiny_tokenizer()), "chat_template": with_chat}


TOKENIZERS = _tokenizers()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=len(TOKENIZERS["plain"]), max_position_embeddings=1024)
    return AutoModelForCausalLM.from_config(config).eval()


def fed_ids(model, run) -> list[int]:
    """The token ids of the first forward pass that `run()` makes: the whole prompt (ask keeps no cache)."""
    seen = []

    def hook(module, args, kwargs):
        if not seen:
            seen.append(kwargs["input_ids"][0].tolist())

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def sft_prompt_ids(record, tokenizer, template) -> list[int]:
    """The part of an SFT example before the answer (labels -100), as `build_sft_example` makes it."""
    example = build_sft_example(record, tokenizer, 4096, prompt_template=template)
    n_prompt = sum(1 for t in example["labels"] if t == IGNORE_INDEX)
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["input_ids"][n_prompt:] == tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    return example["input_ids"][:n_prompt]


def expected_text(tokenizer, template: str, system: str | None) -> str:
    """The prompt text written out from the published forms (independent of longlora.prompts)."""
    user = user_message(MATERIAL, QUESTION)
    if template == "llama2":
        return f"[INST] <<SYS>>\n{system or DEFAULT_SYSTEM_PROMPT}\n<</SYS>>\n\n{user} [/INST]"
    if template == "alpaca":
        return (
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{user}\n\n### Response:"
        )
    head = f"<|system|>\n{system}</s>\n" if system else ""
    return f"<s>{head}<|user|>\n{user}</s>\n<|assistant|>\n"


@pytest.mark.parametrize("system", [None, SYSTEM], ids=["no_system", "system"])
@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_sft_record_and_ask_prompt_are_the_same_ids(model, kind, template, system):
    tokenizer = TOKENIZERS[kind]
    record = {"instruction": user_message(MATERIAL, QUESTION), "output": ANSWER}
    messages = [{"role": "user", "content": record["instruction"]}]
    if system:
        record["system"] = system
        messages = [{"role": "system", "content": system}] + messages
    if template == "chat_template" and kind != "chat_template":
        with pytest.raises(ValueError, match="no chat template"):
            build_sft_example(record, tokenizer, 4096, prompt_template=template)
        with pytest.raises(ValueError, match="no chat template"):
            ask(model, tokenizer, MATERIAL, QUESTION, template=template, max_new_tokens=1, stream=False)
        return

    trained = sft_prompt_ids(record, tokenizer, template)
    chat_record = {"messages": messages + [{"role": "assistant", "content": ANSWER}]}
    if system is None:
        asked = fed_ids(model, lambda: ask(model, tokenizer, MATERIAL, QUESTION, template=template,
                                           max_new_tokens=1, stream=False))
    else:  # ask has no system prompt argument: generate_answer is what it calls, with the system turn in front
        asked = fed_ids(model, lambda: generate_answer(model, tokenizer, messages, template=template,
                                                       max_new_tokens=1, stream=False))
    assert asked == trained
    assert sft_prompt_ids(chat_record, tokenizer, template) == trained  # a chat record of the same turn

    resolved = resolve_template(tokenizer, template)
    assert resolved == {"auto": "chat_template" if kind == "chat_template" else "llama2"}.get(template, template)
    bos = tokenizer.bos_token_id
    adds_bos = kind != "plain" and resolved != "chat_template"
    assert trained.count(bos) == (1 if adds_bos or resolved == "chat_template" else 0)  # never a doubled BOS
    text = expected_text(tokenizer, resolved, system if resolved != "alpaca" else None)
    assert tokenizer.decode(trained) == ("<s>" if adds_bos else "") + text


def test_alpaca_has_no_follow_up_turns(model):
    tokenizer = TOKENIZERS["plain"]
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    with pytest.raises(ValueError, match="one turn only"):
        render_conversation(tokenizer, turns, "alpaca")
    with pytest.raises(ValueError, match="follow-up turns"):
        chat(model, tokenizer, MATERIAL, [QUESTION, "and the height?"], template="alpaca", stream=False)
    with pytest.raises(ValueError, match="prompt_template must be one of"):
        resolve_template(tokenizer, "vicuna")
    llama2 = render_conversation(tokenizer, turns, "llama2")  # the multi-turn Llama-2 form chat uses
    assert llama2 == f"[INST] <<SYS>>\n{DEFAULT_SYSTEM_PROMPT}\n<</SYS>>\n\na [/INST] b </s><s>[INST] c [/INST]"
    assert render_conversation(tokenizer, turns[:1], "llama2", input="x") == (
        f"[INST] <<SYS>>\n{DEFAULT_SYSTEM_PROMPT}\n<</SYS>>\n\na\nx [/INST]"
    )
