"""Ask a long-context model about a document: `longlora ask` (one question) and `longlora chat` (several turns).

    model, tokenizer = load_model_and_tokenizer("models/llama-32k")
    answer = ask(model, tokenizer, read_material("paper.pdf"), "What is the main contribution?")

Generation uses ordinary full attention with the KV cache (docs/method.md, "The four parts": S2-Attn is a training-time
approximation; the weights are used with full attention). The answer streams to the terminal as it is decoded.

A prompt longer than the model's context (max_position_embeddings) is *not* truncated: the model still runs, and a
warning says by how many tokens the prompt is over, so a user never gets an answer to a silently shortened document.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .data.corpus import decode_text
from .prompts import CHAT_TEMPLATES, encode_prompt, render_conversation, user_message
from .prompts import MATERIAL_PROMPT, TEMPLATES, build_prompt  # noqa: F401  (importable from here, as before)

EXIT_WORDS = ("exit", "quit")
"""Typing one of these (or end of input) ends `longlora chat`."""


class ContextLengthWarning(UserWarning):
    """The prompt (or the prompt plus the tokens to generate) is longer than the model's context."""


# --------------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str, template: str):
    """Token ids (1, T) of a prompt text, encoded as SFT training encoded it (`longlora.prompts.encode_prompt`)."""
    import torch

    return torch.tensor([encode_prompt(tokenizer, text, template)], dtype=torch.long)


# --------------------------------------------------------------------------------------------------------------------
# Material
# --------------------------------------------------------------------------------------------------------------------


def read_material(path: str | Path) -> str:
    """The text of a .txt / .md (any text file) or .pdf (needs `pypdf`) document."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"material file {str(path)!r} does not exist")
    if path.suffix.lower() == ".pdf":
        text = _read_pdf(path)
    else:
        data = path.read_bytes()
        if b"\x00" in data[:8192]:
            raise ValueError(
                f"{str(path)!r} looks like a binary file; pass the material as text (.txt, .md) or a .pdf"
            )
        text = decode_text(data, path)
    if not text.strip():
        raise ValueError(f"material file {str(path)!r} has no text")
    return text


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
    except ImportError as error:
        raise ImportError(
            f"reading {path.name} needs the `pypdf` package: pip install pypdf  (or convert the PDF to text)"
        ) from error
    reader = PdfReader(str(path))
    return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages)


# --------------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------------


def context_warning(prompt_tokens: int, max_new_tokens: int, context: int) -> str | None:
    """The warning for a prompt that does not fit the model's context (None when it fits)."""
    if prompt_tokens > context:
        return (
            f"the prompt is {prompt_tokens} tokens, {prompt_tokens - context} tokens more than the model's context "
            f"of {context} (max_position_embeddings). It is not truncated, but positions past the context were "
            "never trained: expect a poor answer. Use a model extended to a longer context (longlora train, or "
            "--rope-factor at load time) or shorten the material."
        )
    if prompt_tokens + max_new_tokens > context:
        over = prompt_tokens + max_new_tokens - context
        return (
            f"the prompt ({prompt_tokens} tokens) plus up to {max_new_tokens} new tokens is {over} tokens more than "
            f"the model's context of {context} (max_position_embeddings); the end of a long answer runs past the "
            "trained positions."
        )
    return None


def _warn(message: str) -> None:
    """Printed to stderr as one clean line, and issued as a ContextLengthWarning for callers that catch it."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
    warnings.warn(message, ContextLengthWarning, stacklevel=4)  # the caller of ask / chat


def _make_streamer(tokenizer, out: IO[str]):
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        """transformers' TextStreamer (decodes as tokens arrive, holds back half words) writing to `out`."""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _stop_ids(model, tokenizer) -> list[int]:
    """End-of-turn ids: the model's generation config ones (chat models list theirs there) and the tokenizer's."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in ([configured] if isinstance(configured, int) else list(configured or [])) + [tokenizer.eos_token_id]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


def _cache_argument(model) -> str:
    """The keyword a model's forward takes its KV cache by: 'cache' (recent transformers 5) or 'past_key_values'."""
    import inspect

    forward = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _event_stopping(event):
    """A StoppingCriteria that ends generation once `event` is set (the stop button, a closed connection)."""
    import torch
    from transformers import StoppingCriteria

    class EventStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return EventStop()


class PromptCache:
    """The KV cache of the previous turn and the token ids it holds, so the next turn of a chat only runs its new
    tokens: the long material is encoded once per conversation, not once per question."""

    def __init__(self) -> None:
        self.past = None
        self.ids = None  # (1, C): the tokens whose keys/values `past` holds

    def reusable(self, input_ids):
        """The cache cut to the longest prefix it shares with `input_ids` (at least one token left to run),
        or None when nothing can be reused."""
        if self.past is None:
            return None
        cached, new = self.ids[0], input_ids[0].to(self.ids.device)
        limit = min(len(cached), len(new) - 1)
        differs = (cached[:limit] != new[:limit]).nonzero()
        shared = int(differs[0]) if len(differs) else limit
        past, self.past, self.ids = self.past, None, None
        if shared == 0:
            return None
        try:
            surplus = past.get_seq_length() - shared
            if surplus > 0:
                past.crop(-surplus)  # a negative count removes that many tokens from the end (every 5.x version)
        except (AttributeError, NotImplementedError, RuntimeError, ValueError):
            return None  # caches that cannot be cut back (a sliding window past its size): run the whole prompt
        return past

    def keep(self, past, sequence) -> None:
        """Remember the cache after generation: it holds every token but the last one generated."""
        self.past = past
        self.ids = sequence[:, : past.get_seq_length()] if past is not None else None


def generate_answer(
    model,
    tokenizer,
    messages: list[dict],
    *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, template: str = "auto",
    stream: bool = True, out: IO[str] | None = None,
    cache: PromptCache | None = None,
    streamer=None,
    stop_event=None,
) -> str:
    """The assistant's answer to a conversation ending with a user turn (full attention, KV cache).

    temperature 0 is greedy decoding; above 0 samples with that temperature and nucleus `top_p`.
    stream: write the answer to `out` (default stdout) token by token as it is generated.
    cache: the KV cache of an earlier turn of the same conversation (`chat` passes one): the part of the prompt it
        already holds (the material, earlier turns) is not run through the model again. Updated in place.
    streamer: a transformers streamer to use instead of writing to `out` (`longlora serve` passes a
        TextIteratorStreamer). stop_event: a threading.Event; once set, generation ends after the current token.
    """
    import torch
    from transformers import GenerationConfig

    from longlora.modeling import max_context

    check_generation_options(max_new_tokens, temperature, top_p)
    text = render_conversation(tokenizer, messages, template)
    input_ids = _encode(tokenizer, text, template)  # (1, T)
    message = context_warning(input_ids.shape[1], max_new_tokens, max_context(model))
    if message:
        _warn(message)

    stop = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    # Start from the model's generation config (chat models keep their defaults there) and set every decoding knob,
    # so none of its sampling defaults (Llama-2 chat: temperature 0.6, top_p 0.9) applies behind the user's back.
    config = copy.deepcopy(getattr(model, "generation_config", None) or GenerationConfig())
    config.update(
        max_new_tokens=max_new_tokens, max_length=None, min_new_tokens=None, eos_token_id=stop or None,
        pad_token_id=pad, use_cache=True, return_dict_in_generate=True, num_beams=1, do_sample=temperature > 0,
        # greedy: the neutral values (None would let the model's defaults back in); sampling: nucleus only, no top-k
        temperature=temperature if temperature > 0 else 1.0, top_p=top_p if temperature > 0 else 1.0,
        top_k=0 if temperature > 0 else 50,
    )
    if streamer is None and stream:
        streamer = _make_streamer(tokenizer, out if out is not None else sys.stdout)
    stopping = [_event_stopping(stop_event)] if stop_event is not None else None

    model.eval()  # full attention: S2-Attn (if it was switched on for training) is SDPA in eval mode
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    past = cache.reusable(input_ids) if cache is not None else None
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
            streamer=streamer, stopping_criteria=stopping,
            **({_cache_argument(model): past} if past is not None else {}),
        )
    sequence = output.sequences  # (1, T + new)
    if cache is not None:
        cache.keep(output.cache if hasattr(output, "cache") else output.past_key_values, sequence)
    return tokenizer.decode(sequence[0, input_ids.shape[1]:], skip_special_tokens=True).strip()


def ask(
    model,
    tokenizer,
    material: str,
    question: str,
    *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, template: str = "auto",
    stream: bool = True, out: IO[str] | None = None,
) -> str:
    """Answer one question about `material`; the answer streams to `out` (stdout) and is returned.

    Greedy by default (temperature 0). A prompt longer than the model's context is run anyway, with a warning
    (stderr and a ContextLengthWarning) saying by how many tokens it is over.
    """
    if not question or not question.strip():
        raise ValueError("the question is empty")
    messages = [{"role": "user", "content": user_message(material, question)}]
    return generate_answer(
        model, tokenizer, messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        template=template, stream=stream, out=out,
    )


def chat(
    model,
    tokenizer,
    material: str,
    questions: Iterable[str],
    *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, template: str = "auto",
    stream: bool = True, out: IO[str] | None = None,
) -> list[dict[str, str]]:
    """Answer `questions` one after another about `material`, each turn seeing the whole conversation so far.

    The material goes into the first user turn only; later turns are the questions themselves, all rendered with
    the chat template (or the Llama-2 multi-turn form; Alpaca has none, so chat refuses it). The KV cache is kept
    from turn to turn, so the material is encoded once. Empty questions are skipped. Returns the conversation as
    [{"role": "user" | "assistant", "content"}, ...].
    """
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"chat needs a template with follow-up turns, one of {CHAT_TEMPLATES}; got {template!r}")
    messages: list[dict[str, str]] = []
    cache = PromptCache()
    for question in questions:
        question = question.strip()
        if not question:
            continue
        content = user_message(material, question) if not messages else question
        messages.append({"role": "user", "content": content})
        answer = generate_answer(
            model, tokenizer, messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            template=template, stream=stream, out=out, cache=cache,
        )
        messages.append({"role": "assistant", "content": answer})
    return messages


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def _load(model, adapter, rope_factor, dtype, device):
    from longlora.modeling import load_model_and_tokenizer

    return load_model_and_tokenizer(model, adapter, dtype=dtype, device=device, rope_factor=rope_factor)


def check_generation_options(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """A ValueError naming the option for values generation cannot use (the commands check before loading)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def cmd_ask(
    model: str | None, adapter: str | None = None, material: str | None = None, question: str | None = None,
    max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, rope_factor: float | None = None,
    dtype: str = "auto", *, template: str = "auto", device: str | None = None, out: IO[str] | None = None,
) -> str:
    """`longlora ask`: load the model (+ adapter), read the material, stream the answer to stdout; returns it."""
    if material is None:
        raise ValueError("pass the material to ask about (--material FILE: .txt, .md or .pdf)")
    if not question or not question.strip():
        raise ValueError("pass a question (--question '...')")
    check_generation_options(max_new_tokens, temperature, top_p)
    text = read_material(material)  # before the model loads: a bad path fails fast
    lm, tokenizer = _load(model, adapter, rope_factor, dtype, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ContextLengthWarning)  # already printed as one clean stderr line
        return ask(
            lm, tokenizer, text, question, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            template=template, stream=True, out=out,
        )


def _read_questions(stream: IO[str], prompt_to: IO[str] | None) -> Iterator[str]:
    """Lines of `stream` until end of input or an exit word; '> ' is shown before each when interactive."""
    while True:
        if prompt_to is not None:
            prompt_to.write("\n> ")
            prompt_to.flush()
        line = stream.readline()
        if not line:  # EOF (Ctrl-D)
            return
        question = line.strip()
        if question.lower() in EXIT_WORDS:
            return
        if question:
            yield question


def cmd_chat(
    model: str | None, adapter: str | None = None, material: str | None = None, max_new_tokens: int = 256,
    temperature: float = 0.0, top_p: float = 1.0, rope_factor: float | None = None, dtype: str = "auto", *,
    template: str = "auto", device: str | None = None, input: IO[str] | None = None, out: IO[str] | None = None,
) -> list[dict[str, Any]]:
    """`longlora chat`: questions about one material read from stdin, one per line, until EOF or 'exit'.

    Each answer streams to stdout; the conversation (chat template) carries over from turn to turn.
    Returns the conversation.
    """
    if material is None:
        raise ValueError("pass the material to talk about (--material FILE: .txt, .md or .pdf)")
    check_generation_options(max_new_tokens, temperature, top_p)  # not at the first question, after the load
    text = read_material(material)
    lm, tokenizer = _load(model, adapter, rope_factor, dtype, device)
    stream_in = input if input is not None else sys.stdin
    out = out if out is not None else sys.stdout
    interactive = hasattr(stream_in, "isatty") and stream_in.isatty()
    if interactive:
        print(f"Ask about {Path(material).name}; 'exit' or Ctrl-D to end.", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ContextLengthWarning)
        return chat(
            lm, tokenizer, text, _read_questions(stream_in, sys.stderr if interactive else None),
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, template=template, stream=True,
            out=out,
        )
