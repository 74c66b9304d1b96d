"""Perplexity at a given context length, in the paper's protocol or the standard sliding-window one.

Token sources (`load_token_stream`):
- a flat `.bin` file of token ids (uint16 or uint32, as the paper's PG19 / proof-pile files): ONE stream, windows
  run across the whole file, as in the paper;
- text: a text file (one document), a JSONL / JSON file (one document per record's "text" field), or a directory of
  such files (each file one document, JSONL files one per record). Each document is tokenised with the model's
  tokenizer (BOS prepended when the tokenizer has one) and evaluated SEPARATELY: windows never cross documents,
  and documents shorter than the evaluated length are skipped (and counted in `skipped_documents`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.corpus import decode_text
from ..io import atomic_path

PROTOCOLS = ("window", "sliding")
TOKEN_DTYPES = ("uint16", "uint32")


@dataclass
class TokenStream:
    """Token documents to evaluate on. A `.bin` file is a single document."""

    documents: list[np.ndarray]
    """1-D integer arrays (a `.bin` stays a read-only memmap)."""
    source: str = ""
    """Where the tokens came from (a path), for the report."""
    skipped: int = 0
    """Documents dropped while loading (shorter than `min_length`, empty, or binary files in a directory)."""
    kind: str = "text"
    """'bin' (one stream) or 'text' (documents evaluated separately)."""

    @property
    def num_tokens(self) -> int:
        return int(sum(len(d) for d in self.documents))


# ----------------------------------------------------------------------------------------------------- loading


def save_token_bin(tokens: Sequence[int] | np.ndarray, path: str | os.PathLike, dtype: str = "uint16") -> Path:
    """Write token ids as a flat binary file (the paper's .bin format), refusing ids the dtype cannot hold."""
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"dtype must be one of {TOKEN_DTYPES}, got {dtype!r}")
    array = np.asarray(tokens, dtype=np.int64)
    if array.size and (array.min() < 0 or array.max() > np.iinfo(dtype).max):
        raise ValueError(f"token ids span [{array.min()}, {array.max()}], which {dtype} cannot hold; use uint32")
    path = Path(path)
    with atomic_path(path) as tmp:
        array.astype(dtype).tofile(tmp)
    return path


def _load_bin(path: Path, dtype: str) -> np.ndarray:
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"token dtype must be one of {TOKEN_DTYPES}, got {dtype!r}")
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{str(path)!r} is empty")
    if size % itemsize:
        raise ValueError(
            f"{str(path)!r} has {size} bytes, not a multiple of {itemsize} ({dtype}); is the token dtype right?"
        )
    return np.memmap(path, dtype=dtype, mode="r")


def _texts_in_file(path: Path) -> Iterator[str]:
    """One text per document: the whole file, or each JSONL/JSON record's 'text' field."""
    if path.suffix in (".jsonl", ".json"):
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            records = json.loads(raw)
            records = records if isinstance(records, list) else [records]
        else:
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        for i, record in enumerate(records):
            if isinstance(record, str):
                yield record
            elif isinstance(record, dict) and isinstance(record.get("text"), str):
                yield record["text"]
            else:
                raise ValueError(f"{str(path)!r} record {i} is neither a string nor an object with a 'text' field")
    else:
        yield decode_text(path.read_bytes(), path)


def check_not_empty(data: str | os.PathLike) -> None:
    """Fail before any model loads when the evaluation data holds nothing (an empty or blank file, a directory of
    them); load_token_stream says the same for anything this cheap look misses."""
    path = Path(data)
    files = [path] if path.is_file() else [
        f for f in path.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
    ]

    def blank(f: Path) -> bool:
        size = f.stat().st_size
        return size == 0 or (size < 1 << 20 and f.suffix != ".bin" and not f.read_bytes().strip())

    if all(blank(f) for f in files):
        what = "is empty" if path.is_file() else ("holds no files" if not files else "holds only empty files")
        raise ValueError(f"evaluation data {str(path)!r} {what}: pass text (or a .bin token file) to evaluate on")


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\x00" in f.read(8192)


def load_token_stream(
    data: str | os.PathLike,
    tokenizer=None,
    *,
    dtype: str = "uint16",
    min_length: int | None = None,
    max_tokens: int | None = None,
) -> TokenStream:
    """Read evaluation tokens from a `.bin` file, a text / JSONL file, or a directory of them (see module doc).

    dtype: element type of a `.bin` file ('uint16' for vocabularies < 65536, else 'uint32').
    min_length: text documents with fewer tokens are skipped (counted in `.skipped`).
    max_tokens: stop after this many tokens in total (a `.bin` is cut; the document crossing the limit is cut).
    """
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"evaluation data {str(path)!r} does not exist")
    if path.is_file() and path.suffix == ".bin":
        stream = _load_bin(path, dtype)
        if max_tokens is not None:
            stream = stream[:max_tokens]
        return TokenStream([stream], source=str(path), kind="bin")

    if tokenizer is None:
        raise ValueError(f"{str(path)!r} is text: pass the model's tokenizer to tokenise it")
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    else:
        files = [path]
    documents, skipped, total, empty = [], 0, 0, 0
    bos = getattr(tokenizer, "bos_token_id", None)
    for file in files:
        if file.suffix == ".bin" or _is_binary(file):
            skipped += 1
            continue
        for text in _texts_in_file(file):
            if not text.strip():
                empty += 1
                skipped += 1
                continue
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if bos is not None:
                ids = [bos] + list(ids)
            if max_tokens is not None:
                ids = ids[: max_tokens - total]
            if not ids or (min_length is not None and len(ids) < min_length):
                skipped += 1
                continue
            documents.append(np.asarray(ids, dtype=np.int64))
            total += len(ids)
            if max_tokens is not None and total >= max_tokens:
                return TokenStream(documents, source=str(path), skipped=skipped, kind="text")
    if not documents and empty == skipped:
        what = "is empty" if path.is_file() else ("holds no files" if not files else "holds only empty files")
        raise ValueError(f"evaluation data {str(path)!r} {what}: pass text (or a .bin token file) to evaluate on")
    if not documents:
        raise ValueError(
            f"no usable documents in {str(path)!r}"
            + (f" ({skipped} shorter than {min_length} tokens or binary)" if skipped else "")
        )
    return TokenStream(documents, source=str(path), skipped=skipped, kind="text")


def _as_stream(tokens) -> TokenStream:
    """Accept a TokenStream, one sequence of ids (array, tensor, list of ints) or a list of such documents."""
    if isinstance(tokens, TokenStream):
        return tokens
    if isinstance(tokens, torch.Tensor):
        return TokenStream([tokens.detach().cpu().reshape(-1).numpy()], kind="bin")
    if isinstance(tokens, np.ndarray):
        return TokenStream([tokens.reshape(-1)], kind="bin")
    tokens = list(tokens)
    if tokens and isinstance(tokens[0], (int, np.integer)):
        return TokenStream([np.asarray(tokens, dtype=np.int64)], kind="bin")
    docs = [t.detach().cpu().reshape(-1).numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in tokens]
    return TokenStream(docs, kind="text")


# ----------------------------------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class Window:
    document: int
    start: int
    """First token of the window; the window is tokens [start, start + length)."""
    score_from: int
    """Index inside the window of the first scored token (>= 1: token 0 has no context)."""


def window_starts(n: int, length: int, stride: int, protocol: str) -> list[tuple[int, int]]:
    """(start, score_from) of every window over a document of n tokens; see `perplexity` for the rules."""
    if n < length:
        return []
    if protocol == "window":
        return [(start, 1) for start in range(0, n - length + 1, stride)]
    starts = list(range(0, n - length + 1, stride))
    if starts[-1] + length < n:
        starts.append(n - length)  # one last full-length window reaching the end of the document
    windows, scored_until = [], 0  # tokens [0, scored_until) are scored (token 0 never is)
    for start in starts:
        windows.append((start, max(1, scored_until - start)))
        scored_until = start + length
    return windows


# ----------------------------------------------------------------------------------------------------- scoring


def _token_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood in fp32: (B, L) ids -> (B, L-1), entry j = -log p(x[j+1] | x[:j+1])."""
    logits = model(input_ids=input_ids, use_cache=False).logits  # (B, L, V) in the model's dtype
    B, L, V = logits.shape
    targets = input_ids[:, 1:]  # (B, L-1)
    nll = torch.empty(B, L - 1, dtype=torch.float32, device=logits.device)
    # fp32 log-softmax over a bounded chunk of positions at a time: full fp32 logits at 32k x 32k would be 4 GB
    chunk = max(1, (1 << 26) // max(1, B * V))
    for i in range(0, L - 1, chunk):
        j = min(i + chunk, L - 1)
        chunk_logits = logits[:, i:j].float()  # (B, c, V)
        nll[:, i:j] = F.cross_entropy(
            chunk_logits.reshape(-1, V), targets[:, i:j].reshape(-1), reduction="none"
        ).view(B, j - i)
    return nll


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def perplexity(
    model,
    tokens,
    length: int,
    *,
    protocol: str = "window",
    stride: int = 256,
    max_windows: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of `model` on `tokens` with windows of `length` tokens, always with full causal attention.

    tokens: a TokenStream (from `load_token_stream`), one sequence of ids, or a list of documents. Windows never
        cross documents; documents shorter than `length` are skipped (counted in `skipped_documents`).

    protocol='window' (the paper's / LongLoRA repository's): in a document of n tokens the windows start at
        0, stride, 2*stride, ... while start + length <= n. Every next-token prediction of a window is scored
        (length - 1 targets; the repository feeds length tokens and scores length targets, one more token per
        window — a negligible difference). Windows overlap when stride < length, so tokens are scored many times.
        nll = mean over windows of the window's mean loss; perplexity = exp(nll).
    protocol='sliding' (the standard strided evaluation, stride <= length): windows start at 0, stride, 2*stride,
        ... while start + length <= n, plus one last window starting at n - length when the previous one does not
        reach the end. Each token is scored exactly once, by the first window that contains it with context:
        the first window scores its length - 1 predictions, each later window only the tokens after the previous
        window's end (the last `stride` tokens for a regular window). nll = total NLL / scored tokens;
        perplexity = exp(nll).

    max_windows: evaluate only the first windows (in document order). max_tokens: use only the first tokens.
    The loss is computed in fp32 from the logits; `batch_size` windows go through the model at once.
    Returns {length, perplexity, nll, scored_tokens, windows, protocol, stride, documents, skipped_documents}.
    """
    from tqdm.auto import tqdm

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if length < 2:
        raise ValueError(f"length must be >= 2 (one token of context, one to predict), got {length}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if protocol == "sliding" and stride > length:
        raise ValueError(f"sliding-window stride ({stride}) must be <= length ({length}) or tokens go unscored")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    stream = _as_stream(tokens)
    documents = stream.documents
    if max_tokens is not None:
        documents, left = [], max_tokens
        for doc in stream.documents:
            if left <= 0:
                break
            documents.append(doc[:left])
            left -= len(documents[-1])
    usable = [i for i, doc in enumerate(documents) if len(doc) >= length]
    skipped = len(documents) - len(usable)
    windows = [Window(i, s, f) for i in usable for s, f in window_starts(len(documents[i]), length, stride, protocol)]
    if max_windows is not None:
        windows = windows[:max_windows]
    if not windows:
        longest = max((len(d) for d in documents), default=0)
        raise ValueError(
            f"no window of {length} tokens fits the data (longest document: {longest} tokens); "
            "use a smaller length or more data"
        )

    model.eval()
    device = model_device(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    window_losses: list[float] = []  # per-window mean loss ('window')
    total_nll, scored = 0.0, 0  # summed over scored tokens (both protocols)
    batches = range(0, len(windows), batch_size)
    with torch.inference_mode():
        for b in tqdm(batches, desc=f"ppl@{length}", unit="batch", disable=not progress):
            batch = windows[b : b + batch_size]
            ids = np.stack([np.asarray(documents[w.document][w.start : w.start + length]) for w in batch])
            if ids.max() >= vocab:
                raise ValueError(
                    f"token id {int(ids.max())} >= the model's vocabulary ({vocab}): the data was tokenised with "
                    "another tokenizer, or the .bin dtype is wrong"
                )
            input_ids = torch.from_numpy(ids.astype(np.int64)).to(device)  # (B, L)
            nll = _token_nll(model, input_ids).cpu()  # (B, L-1)
            for w, row in zip(batch, nll):
                kept = row[w.score_from - 1 :].double()  # targets at window positions score_from .. L-1
                window_losses.append(kept.mean().item())
                total_nll += kept.sum().item()
                scored += kept.numel()

    mean_nll = sum(window_losses) / len(window_losses) if protocol == "window" else total_nll / scored
    return {
        "length": length,
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "scored_tokens": scored,
        "windows": len(windows),
        "protocol": protocol,
        "stride": stride,
        "documents": len(usable),
        "skipped_documents": skipped + stream.skipped,
    }


def check_length(model, length: int) -> None:
    """Refuse a length beyond the model's positions, pointing at position interpolation."""
    from longlora.modeling import max_context, model_config

    limit = max_context(model)
    if length > limit:
        try:
            from longlora.rope import original_context_length

            original = original_context_length(model_config(model))
        except Exception:  # rope helpers unavailable or config without the information: suggest from the limit
            original = limit
        factor = math.ceil(length / original)
        raise ValueError(
            f"length {length} exceeds the model's context of {limit} positions (max_position_embeddings); "
            f"pass --rope-factor {factor} (rope_factor={factor} in Python) to evaluate with position "
            "interpolation, or use a model fine-tuned for that length"
        )


def evaluate_perplexity(
    model,
    tokenizer,
    data,
    lengths: Sequence[int],
    *,
    protocol: str = "window",
    stride: int = 256,
    max_windows: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    token_dtype: str = "uint16",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Perplexity at each of `lengths` (one dict per length, as `perplexity` returns, plus 'data').

    data: a path for `load_token_stream`, or tokens already loaded (TokenStream / ids / documents).
    Lengths above the model's max_position_embeddings raise a ValueError (pass --rope-factor).
    """
    lengths = sorted({int(length) for length in lengths})
    if not lengths:
        raise ValueError("pass at least one evaluation length")
    for length in lengths:
        check_length(model, length)
    if isinstance(data, (str, os.PathLike)):
        stream = load_token_stream(data, tokenizer, dtype=token_dtype, max_tokens=max_tokens)
    else:
        stream = _as_stream(data)
    results = []
    for length in lengths:
        result = perplexity(
            model, stream, length, protocol=protocol, stride=stride, max_windows=max_windows,
            max_tokens=max_tokens, batch_size=batch_size, progress=progress,
        )
        result["data"] = stream.source
        results.append(result)
    return results
