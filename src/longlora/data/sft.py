"""SFT records (LongAlpaca format) -> prompts with masked labels, and their collator.

Records {"instruction", "input" (optional), "output"} or {"messages": [...]} become prompt + answer + EOS with labels
-100 on every prompt token; the prompt is rendered by `longlora.prompts`, as `longlora ask` renders it. Records
longer than `context_length` are either cut in their *material* (the long part of the prompt, cut in the middle so
that the head and the closing question stay) or dropped. `sft_collator` packs a batch into one padding-free row
(transformers' DataCollatorWithFlattening).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..prompts import TEMPLATES, prompt_ids, resolve_template
from .blocks import IGNORE_INDEX, eos_token_id

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PROMPT_TEMPLATES = TEMPLATES
"""The prompt templates `build_sft_example` accepts (see `longlora.prompts`)."""
TRUNCATIONS = ("material", "drop")


@dataclass
class SFTStats:
    """What `build_sft_dataset` did with the records, for the caller to log."""

    kept: int = 0
    """Examples in the dataset, truncated ones included."""
    truncated: int = 0
    """Kept examples whose material was cut to fit context_length."""
    dropped: int = 0
    """Records left out: too long with truncation="drop", or the answer (with the fixed prompt) alone does not fit."""

    def __str__(self) -> str:
        return f"kept {self.kept} SFT examples ({self.truncated} truncated), dropped {self.dropped}"


@dataclass
class _Conversation:
    """One SFT record in a template-neutral form. The user's last turn is `instruction` + "\\n" + `input`."""

    system: str | None
    history: list[dict]  # earlier {"role", "content"} turns (chat records only), alternating user / assistant
    instruction: str
    input: str
    answer: str


def _parse_record(record: dict) -> _Conversation:
    messages = record.get("messages")
    if messages:
        return _parse_messages(messages)
    for name in ("instruction", "output"):
        if not isinstance(record.get(name), str):
            raise ValueError(
                f"SFT record has no {name!r} text (needs instruction, output, optional input): {_short(record)}"
            )
    system = record.get("system")
    return _Conversation(
        system=system if isinstance(system, str) and system else None,
        history=[],
        instruction=record["instruction"],
        input=record.get("input") or "",
        answer=record["output"],
    )


def _parse_messages(messages: list[dict]) -> _Conversation:
    for message in messages:
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("content"), str)
            or message.get("role") not in ("system", "user", "assistant")
        ):
            raise ValueError(f"each message needs a role (system/user/assistant) and a text content: {_short(message)}")
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
        roles = [m["role"] for m in messages]
        raise ValueError(f"a chat record must end with a user turn then the assistant's answer, got roles {roles}")
    history = [{"role": m["role"], "content": m["content"]} for m in messages[:-2]]
    return _Conversation(system, history, instruction=messages[-2]["content"], input="", answer=messages[-1]["content"])


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _prompt_ids(conv: _Conversation, tokenizer: PreTrainedTokenizerBase, template: str) -> list[int]:
    """Token ids of everything before the answer, rendered by `longlora.prompts` (as `longlora ask` renders them)."""
    if conv.history and template != "chat_template":
        raise ValueError(f"multi-turn conversations need prompt_template='chat_template', not {template!r}")
    system = [{"role": "system", "content": conv.system}] if conv.system else []
    messages = system + conv.history + [{"role": "user", "content": conv.instruction}]
    return prompt_ids(tokenizer, messages, template, input=conv.input)


def _material_slot(conv: _Conversation) -> tuple[str, int | None]:
    """Where the material is: the longest text of the prompt (the input, the instruction or an earlier turn)."""
    slots: list[tuple[int, tuple[str, int | None]]] = [
        (len(conv.instruction), ("instruction", None)),
        (len(conv.input), ("input", None)),
    ]
    slots += [(len(turn["content"]), ("history", i)) for i, turn in enumerate(conv.history)]
    return max(slots, key=lambda s: s[0])[1]


def _get_material(conv: _Conversation, slot: tuple[str, int | None]) -> str:
    name, index = slot
    return conv.history[index]["content"] if name == "history" else getattr(conv, name)


def _with_material(conv: _Conversation, slot: tuple[str, int | None], text: str) -> _Conversation:
    name, index = slot
    if name != "history":
        return dataclasses.replace(conv, **{name: text})
    history = [dict(turn) for turn in conv.history]
    history[index]["content"] = text
    return dataclasses.replace(conv, history=history)


def _cut_middle(tokenizer: PreTrainedTokenizerBase, ids: list[int], keep: int) -> str:
    """The text of `ids` with all but `keep` tokens removed from the middle: the head and the tail (where the
    question usually sits, e.g. LongAlpaca's "Now the paper ends. {question}") stay."""
    tail = keep // 2
    head_ids, tail_ids = ids[: keep - tail], ids[len(ids) - tail :] if tail else []
    decode = lambda part: tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    return decode(head_ids) + decode(tail_ids)


def build_sft_example(
    record: dict,
    tokenizer: PreTrainedTokenizerBase,
    context_length: int,
    prompt_template: str = "auto",
    truncation: str = "material",
) -> dict | None:
    """One SFT record -> {"input_ids", "labels", "num_truncated_tokens"}, or None when it is dropped.

    input_ids = prompt + answer + EOS; labels are -100 on the prompt, so only the answer and its EOS are learned.
    A record longer than `context_length` is dropped (truncation="drop") or has its material cut in the middle
    (truncation="material"): the longest part of the prompt (LongAlpaca's paper inside the instruction, or the
    input) loses tokens until the whole fits; the rest of the prompt and the whole answer stay. A record whose
    answer does not fit even with no material is dropped. `num_truncated_tokens` counts the material tokens cut.
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    template = resolve_template(tokenizer, prompt_template)
    eos_id = eos_token_id(tokenizer)
    conv = _parse_record(record)
    answer_ids = tokenizer(conv.answer, add_special_tokens=False, verbose=False)["input_ids"] + [eos_id]
    prompt_ids = _prompt_ids(conv, tokenizer, template)
    if len(prompt_ids) + len(answer_ids) <= context_length:
        return _sft_row(prompt_ids, answer_ids, 0)
    if truncation == "drop":
        return None

    slot = _material_slot(conv)
    fixed = len(_prompt_ids(_with_material(conv, slot, ""), tokenizer, template))
    budget = context_length - len(answer_ids) - fixed  # tokens left for the material
    if budget <= 0:
        return None
    material_ids = tokenizer(_get_material(conv, slot), add_special_tokens=False, verbose=False)["input_ids"]
    keep = min(budget, len(material_ids))
    # Tokens merge differently at the cut and at the material's edges, so check the real length and cut a little
    # more when it is over (one retry is the usual case).
    for _ in range(8):
        material = _cut_middle(tokenizer, material_ids, keep) if keep > 0 else ""
        prompt_ids = _prompt_ids(_with_material(conv, slot, material), tokenizer, template)
        over = len(prompt_ids) + len(answer_ids) - context_length
        if over <= 0:
            return _sft_row(prompt_ids, answer_ids, len(material_ids) - keep)
        if keep == 0:
            break
        keep = max(0, keep - over)
    return None


def _sft_row(prompt_ids: list[int], answer_ids: list[int], num_truncated: int) -> dict:
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        "num_truncated_tokens": num_truncated,
    }


def _build_sft_batch(batch: dict, tokenizer, context_length: int, prompt_template: str, truncation: str) -> dict:
    columns = list(batch)
    out: dict[str, list] = {"input_ids": [], "labels": [], "num_truncated_tokens": []}
    for values in zip(*(batch[c] for c in columns)):
        row = build_sft_example(dict(zip(columns, values)), tokenizer, context_length, prompt_template, truncation)
        if row is not None:
            for key in out:
                out[key].append(row[key])
    return out


def build_sft_dataset(
    records: Dataset | Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    context_length: int,
    prompt_template: str = "auto",
    truncation: str = "material",
    *,
    num_proc: int | None = None,
) -> tuple[Dataset, SFTStats]:
    """Every record through `build_sft_example`: a Dataset of input_ids / labels, and what was kept, cut, dropped."""
    from datasets import Dataset, Features, List, Value

    if not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an integer >= 2, got {context_length!r}")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    resolve_template(tokenizer, prompt_template)  # fail before mapping
    eos_token_id(tokenizer)
    if not isinstance(records, Dataset):
        records = list(records)
        # Union of the keys: records may differ in optional fields ("input" present in some only).
        keys = list(dict.fromkeys(k for r in records for k in r))
        records = Dataset.from_dict({k: [r.get(k) for r in records] for k in keys})
    if len(records) == 0:
        raise ValueError("no SFT records")
    examples = records.map(
        _build_sft_batch,
        batched=True,
        batch_size=100,
        fn_kwargs=dict(
            tokenizer=tokenizer, context_length=context_length, prompt_template=prompt_template, truncation=truncation
        ),
        remove_columns=records.column_names,
        features=Features(
            {
                "input_ids": List(Value("int32")),
                "labels": List(Value("int32")),
                "num_truncated_tokens": Value("int64"),
            }
        ),
        num_proc=num_proc,
        desc="Building SFT examples",
    )
    cut = examples["num_truncated_tokens"]
    stats = SFTStats(kept=len(examples), truncated=sum(1 for n in cut if n > 0), dropped=len(records) - len(examples))
    if stats.kept == 0:
        raise ValueError(
            f"none of the {len(records)} SFT records fits context_length={context_length} "
            f"(truncation={truncation!r}): raise context_length or use truncation='material'"
        )
    logger.info("%s", stats)
    return examples.remove_columns("num_truncated_tokens"), stats


def sft_collator(tokenizer: PreTrainedTokenizerBase | None = None, *, packing: bool = True):
    """The data collator for SFT examples.

    packing=True: transformers' DataCollatorWithFlattening joins the batch's examples into one row (1, total) with
    `position_ids` restarting at 0 for each example (padding-free; S2-Attn and transformers' packed-sequence detection
    keep examples apart; train with use_cache=False). It sets the label of each example's first token to -100, so the
    previous example's last token never learns to predict the next example. The row's length is the sum of the
    batch's example lengths: per-device batch size times context_length at most.
    packing=False: DataCollatorForSeq2Seq pads input_ids with the pad token, labels with -100, and adds attention_mask.
    """
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    if tokenizer is None or tokenizer.pad_token is None:
        raise ValueError(
            "padding SFT examples needs a tokenizer with a pad token (e.g. tokenizer.pad_token = tokenizer.eos_token), "
            "or use packing=True"
        )
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)