"""Passkey retrieval (LongLoRA paper, section 4.2): find a number hidden at some depth of a long filler text.

Two prompt templates, the same length x depth grid, JSON and plots.

'paper' (the default; the paper's English prompt):

    <instruction> <filler> x k  The pass key is K. Remember it. K is the pass key.  <filler> x (n - k)
    What is the pass key? The pass key is

with n filler repetitions chosen so the prompt is as long as possible without exceeding the requested length
(so within one filler repetition of it), k = round(n * depth), K uniform in [1, 50000) from a seeded RNG.

'code' (for models that have only read source code, such as the embedded model): n lines of Python source from the
held-out split of the embedded model's standard-library corpus (never its training split), starting at a seeded
random line, with the line `PASSKEY = K` (K uniform in [10000, 100000): five digits) inserted after the k-th, and
the prompt ends with the line the model completes:

    <source lines 1..k>
    PASSKEY = 48213
    <source lines k+1..n>
    assert PASSKEY ==

(no trailing space: a byte-level BPE attaches the space to the number that follows, ' 48213', so a prompt ending
in a space would ask the model to continue from a token split it never saw). n is the largest that fits `length`.

The answer is decoded greedily; it is right when the first integer in it equals K.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

import numpy as np

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEY_RANGE = (1, 50000)  # [low, high), as in the paper
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

TEMPLATES = ("paper", "code")
CODE_KEY_LINE = "PASSKEY = {key}\n"
CODE_QUESTION = "assert PASSKEY =="
CODE_KEY_RANGE = (10000, 100000)  # [low, high): always five digits


def _compose(n: int, k: int, key: int) -> tuple[str, str]:
    """(full prompt, text before the key line) with n filler repetitions, the key line after the k-th."""
    before = " ".join([INSTRUCTION] + [FILLER] * k)
    after = " ".join([KEY_LINE.format(key=key)] + [FILLER] * (n - k) + [QUESTION])
    return before + " " + after, before


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, verbose=False)["input_ids"])


def build_passkey_prompt(tokenizer, length: int, depth: float, key: int) -> tuple[str, int]:
    """The passkey prompt of (at most, and within one filler repetition of) `length` tokens.

    depth in [0, 1]: 0 puts the key line right after the instruction, 1 right before the question.
    Returns (prompt text, index of the key line's first token in the tokenised prompt).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if not KEY_RANGE[0] <= key < KEY_RANGE[1]:
        raise ValueError(f"key must be in [{KEY_RANGE[0]}, {KEY_RANGE[1]}), got {key}")

    def tokens_with(n: int) -> int:
        return _count(tokenizer, _compose(n, round(n * depth), key)[0])

    fixed = tokens_with(0)
    if fixed > length:
        raise ValueError(f"length {length} is shorter than the passkey prompt without filler ({fixed} tokens)")
    probe = 16
    per_filler = (tokens_with(probe) - fixed) / probe  # tokens per filler repetition
    n = max(0, int((length - fixed) / per_filler))
    # The estimate can be off at word junctions: step to the largest n whose prompt still fits.
    while n > 0 and tokens_with(n) > length:
        n -= 1
    while tokens_with(n + 1) <= length:
        n += 1
    text, before = _compose(n, round(n * depth), key)
    # Tokenizers attach the separating space to the next word, so the prefix's tokens end right before the key line.
    return text, _count(tokenizer, before)


@functools.lru_cache(maxsize=1)
def code_filler_lines() -> tuple[str, ...]:
    """The held-out split of the embedded model's corpus (standard-library sources), as lines with their newlines,
    files in split order. Never the training split, so a model trained on that split has not seen the filler."""
    from longlora.embedded import stdlib_texts

    lines = []
    for text in stdlib_texts("heldout"):
        lines.extend(text.splitlines(keepends=True))
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
    return tuple(lines)


def _compose_code(lines: Sequence[str], start: int, n: int, k: int, key: int) -> tuple[str, str]:
    """(full prompt, text before the key line): n filler lines from `start` (wrapping), the key line after k."""
    filler = [lines[(start + i) % len(lines)] for i in range(n)]
    before = "".join(filler[:k])
    return before + CODE_KEY_LINE.format(key=key) + "".join(filler[k:]) + CODE_QUESTION, before


def build_code_passkey_prompt(
    tokenizer, length: int, depth: float, key: int, start: int = 0, lines: Sequence[str] | None = None
) -> tuple[str, int]:
    """The 'code' passkey prompt of at most `length` tokens (within one source line of it).

    depth in [0, 1]: 0 puts `PASSKEY = key` first, 1 right before the final `assert PASSKEY ==`.
    start: index of the first filler line in `lines` (default `code_filler_lines()`, the held-out stdlib sources);
    trials draw it at random so each hides the key in different code.
    Returns (prompt text, index of the key line's first token in the tokenised prompt).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if not CODE_KEY_RANGE[0] <= key < CODE_KEY_RANGE[1]:
        raise ValueError(f"key must be in [{CODE_KEY_RANGE[0]}, {CODE_KEY_RANGE[1]}), got {key}")
    lines = code_filler_lines() if lines is None else lines
    if not lines:
        raise ValueError("no filler lines")
    start %= len(lines)

    def tokens_with(n: int) -> int:
        return _count(tokenizer, _compose_code(lines, start, n, round(n * depth), key)[0])

    fixed = tokens_with(0)
    if fixed > length:
        raise ValueError(f"length {length} is shorter than the code passkey prompt without filler ({fixed} tokens)")
    # Grow by doubling, then bisect: the largest n that fits (token counts grow with n, one line at a time).
    low, high = 0, 1
    while tokens_with(high) <= length:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if tokens_with(middle) <= length else (low, middle)
    text, before = _compose_code(lines, start, low, round(low * depth), key)
    # `before` ends with a newline, a token boundary: its tokens end right before the key line's first token.
    return text, _count(tokenizer, before)


def build_prompt(tokenizer, template: str, length: int, depth: float, key: int, start: int = 0) -> tuple[str, int]:
    """One passkey prompt of either template: (prompt text, key line's first token index)."""
    if template == "paper":
        return build_passkey_prompt(tokenizer, length, depth, key)
    if template == "code":
        return build_code_passkey_prompt(tokenizer, length, depth, key, start)
    raise ValueError(f"unknown passkey template {template!r}; choose one of {', '.join(TEMPLATES)}")


def score_answer(answer_text: str, key: int) -> bool:
    """True when the first integer in the answer is the key (so ' 4213.' is right, ' 42' or ' 4,213' are wrong)."""
    match = re.search(r"\d+", answer_text)
    return match is not None and int(match.group()) == key


def make_generate_fn(model, tokenizer, max_new_tokens: int = 8) -> Callable[[str], str]:
    """Greedy decoding of a few tokens with full attention; returns the decoded continuation only."""
    import torch
    from transformers import GenerationConfig

    from longlora.evaluate.perplexity import model_device

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id
    )

    def generate(prompt: str) -> str:
        inputs = tokenizer(prompt, return_tensors="pt", verbose=False).to(model_device(model))
        with torch.inference_mode():
            out = model.generate(**inputs, generation_config=config)  # (1, prompt + new)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    return generate


def _label(value: float) -> str:
    return f"{value:g}"


def run_passkey(
    model,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 5,
    seed: int = 0,
    generate_fn: Callable[[str], str] | None = None,
    *,
    max_new_tokens: int = 8,
    progress: bool = True,
    template: str = "paper",
) -> dict[str, Any]:
    """Passkey accuracy for every length x depth, `trials` random keys each.

    template: 'paper' (the paper's English prompt) or 'code' (`PASSKEY = K` in held-out Python source; each trial
    also draws where in that source its filler starts).

    generate_fn(prompt) -> answer text; defaults to greedy decoding with `model` (tests pass a stub, model may then
    be None). Lengths above the model's max_position_embeddings raise a ValueError (pass --rope-factor).
    Returns {template, lengths, depths, trials, seed, accuracy: {length: acc},
    accuracy_by_depth: {length: {depth: acc}},
    grid: [[acc per depth] per length], overall_accuracy, records: [{length, depth, trial, key, key_position,
    prompt_tokens, answer, correct}]}; dict keys are strings so the result is JSON as is.
    """
    from tqdm.auto import tqdm

    lengths = [int(length) for length in lengths]
    depths = [float(depth) for depth in depths]
    if not lengths or not depths:
        raise ValueError("pass at least one length and one depth")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if template not in TEMPLATES:
        raise ValueError(f"unknown passkey template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if model is not None:
        from longlora.evaluate.perplexity import check_length

        for length in lengths:
            check_length(model, length)
    if generate_fn is None:
        if model is None:
            raise ValueError("pass a model or a generate_fn")
        model.eval()
        generate_fn = make_generate_fn(model, tokenizer, max_new_tokens=max_new_tokens)

    rng = np.random.default_rng(seed)
    records = []
    total = len(lengths) * len(depths) * trials
    with tqdm(total=total, desc="passkey", disable=not progress) as bar:
        for length in lengths:
            for depth in depths:
                for trial in range(trials):
                    if template == "paper":  # the same draws as before the code template existed
                        key, start = int(rng.integers(*KEY_RANGE)), 0
                    else:
                        key = int(rng.integers(*CODE_KEY_RANGE))
                        start = int(rng.integers(len(code_filler_lines())))
                    prompt, key_position = build_prompt(tokenizer, template, length, depth, key, start)
                    answer = generate_fn(prompt)
                    records.append({
                        "length": length, "depth": depth, "trial": trial, "key": key, "key_position": key_position,
                        "prompt_tokens": _count(tokenizer, prompt), "answer": answer,
                        "correct": score_answer(answer, key),
                    })
                    bar.update(1)

    def accuracy(rows) -> float:
        return sum(r["correct"] for r in rows) / len(rows)

    by_depth = {
        str(length): {
            _label(depth): accuracy([r for r in records if r["length"] == length and r["depth"] == depth])
            for depth in depths
        }
        for length in lengths
    }
    return {
        "template": template,
        "lengths": lengths,
        "depths": depths,
        "trials": trials,
        "seed": seed,
        "accuracy": {str(length): accuracy([r for r in records if r["length"] == length]) for length in lengths},
        "accuracy_by_depth": by_depth,
        "grid": [[by_depth[str(length)][_label(depth)] for depth in depths] for length in lengths],
        "overall_accuracy": accuracy(records),
        "records": records,
    }

