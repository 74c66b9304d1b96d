"""Data: corpora -> token blocks for context extension; SFT records -> prompts with masked labels.

Context extension (the paper's recipe): documents are tokenised once, joined with EOS and cut into blocks of exactly
`context_length` tokens; the tail that does not fill a block is dropped. Two packings:
- "concat": blocks of input_ids (labels = input_ids); attention runs across document boundaries inside a block, as
  in the paper.
- "documents": the same blocks plus `position_ids` that restart at 0 at every document start, so transformers'
  packed-sequence detection (and S2-Attn, which counts groups from each packed document's start) keeps documents
  apart. The label of each document's first token is -100: the previous document's last token must not learn to
  predict the next document.
`transformers.default_data_collator` stacks either kind of block (position_ids included).

SFT (LongAlpaca format): records {"instruction", "input" (optional), "output"} or {"messages": [...]} become
prompt + answer + EOS with labels -100 on every prompt token. Records longer than `context_length` are either cut in
their *material* (the long part of the prompt, cut in the middle so that the head and the closing question stay) or
dropped. `sft_collator` packs a batch into one padding-free row (transformers' DataCollatorWithFlattening).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that the loss ignores (transformers' and PyTorch's convention)."""

PACKINGS = ("concat", "documents")
PROMPT_TEMPLATES = ("auto", "llama2", "alpaca", "chat_template")
TRUNCATIONS = ("material", "drop")

# Local files loaded as records (one row per record) rather than as one text document per file.
_STRUCTURED_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# Suffixes that make a name that does not exist on disk "a missing file" rather than "a Hugging Face dataset name".
_FILE_SUFFIXES = set(_STRUCTURED_SUFFIXES) | {".txt", ".md", ".rst", ".text", ".py", ".tex", ".html", ".xml"}
_BATCH = 100  # documents per tokeniser call and per write: 100 books of 100k tokens stay well under a GB
_BLOCKS_VERSION = "longlora-blocks-1"  # bump when the blocking changes, so cached blocks are rebuilt
_AUTO_NUM_PROC_DOCS = 50_000  # below this many documents, one process tokenises faster than a pool starts


# --------------------------------------------------------------------------------------------------------------------
# Loading documents
# --------------------------------------------------------------------------------------------------------------------


def load_documents(
    data: str | os.PathLike,
    *,
    text_field: str = "text",
    split: str = "train",
    dataset_config: str | None = None,
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset | IterableDataset:
    """Load a corpus as a dataset with one `text` column, one row per document.

    `data` is one of:
    - a text file (any suffix other than the ones below): one document;
    - a directory: every non-hidden file below it (recursive, sorted by path), one document per file; binary files
      (a NUL byte in their first 8 KiB) are skipped. A directory holding only .json/.jsonl (or only .parquet / .csv)
      files is read as records instead;
    - a .json / .jsonl / .parquet / .csv file of records; `text_field` names the field holding the document;
    - a directory written by `Dataset.save_to_disk` (`split` picks from a DatasetDict);
    - otherwise a Hugging Face dataset name, with `dataset_config`, `split` and `text_field`.
    Local files always form a single split, so `split` only applies to the last two.
    `streaming=True` returns an IterableDataset that reads as it goes.
    """
    source = str(data)
    path = Path(source).expanduser()
    if path.exists():
        dataset = _load_local_documents(path, text_field, split, streaming, cache_dir)
    elif _looks_like_path(source):
        raise ValueError(f"no such file or directory: {source}")
    else:
        dataset = _load_hub_dataset(source, dataset_config, split, streaming, cache_dir)
    return _select_text_column(dataset, text_field, source)


def _looks_like_path(source: str) -> bool:
    """A name that cannot be a Hub dataset ("name" or "org/name") is a local path that is missing."""
    return (
        source.startswith(("/", ".", "~"))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).suffix.lower() in _FILE_SUFFIXES
    )


def _load_local_documents(path: Path, text_field: str, split: str, streaming: bool, cache_dir) -> Any:
    if path.is_dir():
        if _is_saved_dataset(path):
            return _load_saved_dataset(path, split, streaming)
        files = _list_files(path)
        if not files:
            raise ValueError(f"empty corpus: the directory {path} holds no files")
        kinds = {_STRUCTURED_SUFFIXES.get(f.suffix.lower()) for f in files}
        if len(kinds) == 1 and None not in kinds:
            return _load_structured(files, kinds.pop(), text_field, streaming, cache_dir)
        return _load_text_files(files, streaming, cache_dir, source=path)
    kind = _STRUCTURED_SUFFIXES.get(path.suffix.lower())
    if kind is not None:
        return _load_structured([path], kind, text_field, streaming, cache_dir)
    return _load_text_files([path], streaming, cache_dir, source=path)


def _list_files(directory: Path) -> list[Path]:
    """Every regular file below `directory` whose path has no hidden part, sorted."""
    files = []
    for f in directory.rglob("*"):
        relative = f.relative_to(directory).parts
        if f.is_file() and not any(part.startswith(".") for part in relative):
            files.append(f)
    return sorted(files)


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


_ESCAPED = re.compile("[\udc80-\udcff]")


def _undecodable_bytes(path: Path) -> int:
    """How many bytes of a text file are not valid UTF-8 (reading it replaces each with U+FFFD)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        return 0
    except UnicodeDecodeError:
        # surrogateescape maps each undecodable byte to one code point in U+DC80..U+DCFF
        return len(_ESCAPED.findall(data.decode("utf-8", errors="surrogateescape")))


def _warn_undecodable(files: list[Path]) -> None:
    bad = [(f, n) for f in files if (n := _undecodable_bytes(f))]
    for f, n in bad[:5]:
        logger.warning("%s: %d byte(s) are not valid UTF-8 and were replaced with U+FFFD; if the file is in another "
                       "encoding, convert it first (iconv -f latin1 -t utf-8 ...)", f, n)
    if len(bad) > 5:
        logger.warning("... and %d more file(s) with bytes that are not valid UTF-8 (%d bytes in all)",
                       len(bad) - 5, sum(n for _, n in bad[5:]))


def _read_text_files(files: list[str]) -> Iterator[dict]:
    """Generator for `from_generator`: one row per file. Module level so that datasets can pickle and hash it."""
    for file in files:
        # errors="replace": one stray non-UTF-8 byte should not stop a training run.
        yield {"text": Path(file).read_text(encoding="utf-8", errors="replace")}


def _load_text_files(files: list[Path], streaming: bool, cache_dir, *, source: Path) -> Any:
    from datasets import Dataset, Features, IterableDataset, Value
    from datasets.fingerprint import Hasher

    text_files = [f for f in files if not _is_binary(f)]
    if len(text_files) < len(files):
        logger.info("skipped %d binary file(s) under %s", len(files) - len(text_files), source)
    if not text_files:
        raise ValueError(f"empty corpus: {source} holds no text files (all {len(files)} look binary)")
    if all(f.stat().st_size == 0 for f in text_files):
        raise ValueError(f"empty corpus: every text file under {source} is empty")
    _warn_undecodable(text_files)
    names = [str(f) for f in text_files]
    features = Features({"text": Value("string")})
    if streaming:
        return IterableDataset.from_generator(_read_text_files, features=features, gen_kwargs={"files": names})
    # The cache key covers each file's path, size and modification time: an edited file is read again.
    stamps = [(name, f.stat().st_size, f.stat().st_mtime_ns) for name, f in zip(names, text_files)]
    return Dataset.from_generator(
        _read_text_files,
        features=features,
        gen_kwargs={"files": names},
        cache_dir=_str_or_none(cache_dir),
        fingerprint=Hasher.hash(["longlora-text-files-1", stamps]),
    )


def _peek_fields(path: Path, kind: str) -> list[str] | None:
    """The fields of a records file, read cheaply before loading it whole; None when that is not cheap."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if kind == "json" and path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        first = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: the first record is not valid JSON ({e})") from e
                    return list(first) if isinstance(first, dict) else None
    return None


def _load_structured(files: list[Path], kind: str, field: str, streaming: bool, cache_dir) -> Any:
    if all(f.stat().st_size == 0 for f in files):
        raise ValueError(f"empty corpus: {', '.join(map(str, files[:3]))} {'is' if len(files) == 1 else 'are'} empty")
    fields = _peek_fields(files[0], kind)
    if fields is not None and field not in fields:
        raise ValueError(_missing_field_message(field, fields, files[0]))
    return _load_records(kind, files, streaming=streaming, cache_dir=cache_dir)


def _load_records(kind: str, files: list[Path], *, streaming: bool = False, cache_dir=None) -> Any:
    """datasets' json / parquet / csv loader; a file it cannot parse is a ValueError naming the file (and, for JSON,
    the line), without the traceback and error log that datasets gives."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    datasets_logger = logging.getLogger("datasets")
    level = datasets_logger.level
    datasets_logger.setLevel(logging.CRITICAL)  # it logs the parse error at ERROR before raising it
    try:
        return load_dataset(kind, data_files=[str(f) for f in files], split="train", streaming=streaming,
                            cache_dir=_str_or_none(cache_dir))
    except DatasetGenerationError as err:
        if kind == "json":
            for f in files:
                _check_json_file(f)
        cause = err.__cause__ or err
        raise ValueError(f"{', '.join(map(str, files[:3]))}: cannot read the {kind} records ({cause}); fix the "
                         "file") from err
    finally:
        datasets_logger.setLevel(level)


def _check_json_file(path: Path) -> None:
    """Raise a ValueError naming the first line of a .json / .jsonl file that is not valid JSON (or UTF-8)."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix.lower() == ".jsonl":
                for number, line in enumerate(f, 1):
                    if line.strip():
                        json.loads(line)
            else:
                json.load(f)
    except json.JSONDecodeError as e:
        where = number if path.suffix.lower() == ".jsonl" else e.lineno
        raise ValueError(f"{path}: line {where} is not valid JSON ({e.msg}); fix the file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; JSON records must be UTF-8") from None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (
        (path / "state.json").exists() and (path / "dataset_info.json").exists()
    )


def _load_saved_dataset(path: Path, split: str, streaming: bool) -> Any:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise ValueError(f"{path} has no split {split!r}; its splits are {sorted(dataset)}")
        dataset = dataset[split]
    return dataset.to_iterable_dataset() if streaming else dataset


def _load_hub_dataset(name: str, config: str | None, split: str, streaming: bool, cache_dir) -> Any:
    from datasets import load_dataset

    try:
        return load_dataset(name, config, split=split, streaming=streaming, cache_dir=_str_or_none(cache_dir))
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; the user needs to know which source failed
        raise ValueError(
            f"{name!r} is not a local file or directory, and loading it as a Hugging Face dataset "
            f"(config={config!r}, split={split!r}) failed: {type(e).__name__}: {e}"
        ) from e


def _missing_field_message(field: str, fields: Sequence[str], source: Any) -> str:
    return (
        f"{source}: the records have no field {field!r}; their fields are {list(fields)}. Pick one with text_field=..."
    )


def _select_text_column(dataset: Any, text_field: str, source: str) -> Any:
    """Keep only `text_field`, renamed to "text"; check it exists, holds strings, and the corpus is not empty."""
    from datasets import IterableDataset, Value

    fields = dataset.column_names
    if fields is None:  # a streamed dataset whose features are unknown until read: look at the first record
        first = next(iter(dataset), None)
        if first is None:
            raise ValueError(f"empty corpus: {source} has no records")
        fields = list(first)
    if text_field not in fields:
        raise ValueError(_missing_field_message(text_field, fields, source))
    feature = dataset.features[text_field] if dataset.features is not None else None
    if feature is not None and not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(
            f"{source}: field {text_field!r} holds {feature}, not text; pick a text field with text_field="
        )
    if not isinstance(dataset, IterableDataset) and len(dataset) == 0:
        raise ValueError(f"empty corpus: {source} has no records")
    dataset = dataset.select_columns([text_field])
    if text_field != "text":
        dataset = dataset.rename_column(text_field, "text")
    return dataset


def _str_or_none(path: str | os.PathLike | None) -> str | None:
    return None if path is None else str(path)


# --------------------------------------------------------------------------------------------------------------------
# Tokenising and blocking
# --------------------------------------------------------------------------------------------------------------------


def tokenize_and_block(
    documents: Dataset | IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    context_length: int,
    *,
    packing: str = "concat",
    num_proc: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset | IterableDataset:
    """Tokenise `documents` (a `text` column), join them with EOS and cut the stream into `context_length` blocks.

    Each document is encoded with the tokenizer's own special tokens (a BOS for Llama-style tokenizers) and followed
    by EOS; the tail that does not fill a whole block is dropped. Returns rows of `input_ids` and `labels` (equal, or
    -100 on document starts with packing="documents", which also adds `position_ids`).

    A Dataset is tokenised once with `Dataset.map` (cached by datasets' fingerprints; `cache_dir` keeps the caches
    of an in-memory dataset too) and blocked into a new cached Dataset. `num_proc=None` uses a process pool only for
    large corpora. An IterableDataset gives an IterableDataset that tokenises and blocks as it is read (one shard:
    read it in the main process, dataloader_num_workers=0, which is also what Trainer's batch dispatching does).
    """
    from datasets import IterableDataset

    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    if not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an integer >= 2, got {context_length!r}")
    eos_id = _eos_token_id(tokenizer)
    if isinstance(documents, IterableDataset):
        return IterableDataset.from_generator(
            _blocks_from_stream,
            features=_block_features(packing),
            gen_kwargs=dict(
                documents=documents,
                tokenizer=tokenizer,
                eos_id=eos_id,
                context_length=context_length,
                packing=packing,
            ),
        )
    return _blocks_from_dataset(documents, tokenizer, eos_id, context_length, packing, num_proc, cache_dir)


def _eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: set tokenizer.eos_token before building training data")
    return int(tokenizer.eos_token_id)


def _encode_documents(texts: Sequence[str | None], tokenizer: PreTrainedTokenizerBase, eos_id: int) -> list[list[int]]:
    """Token ids of each non-empty document, ending with EOS (appended unless the tokenizer already put one there)."""
    texts = [t for t in texts if t and not t.isspace()]
    if not texts:
        return []
    # verbose=False: documents longer than the tokenizer's model_max_length are expected here, no warning wanted.
    encoded = tokenizer(texts, add_special_tokens=True, return_attention_mask=False, verbose=False)["input_ids"]
    return [ids if ids and ids[-1] == eos_id else ids + [eos_id] for ids in encoded]


def _tokenize_batch(batch: dict, tokenizer: PreTrainedTokenizerBase, eos_id: int) -> dict:
    # Empty documents are skipped, so a batch may shrink (allowed: every input column is removed).
    return {"input_ids": _encode_documents(batch["text"], tokenizer, eos_id)}


def _block_features(packing: str):
    from datasets import Features, List, Value

    columns = ["input_ids", "labels"] + (["position_ids"] if packing == "documents" else [])
    return Features({name: List(Value("int32")) for name in columns})


def _auto_num_proc(num_docs: int) -> int | None:
    if num_docs < _AUTO_NUM_PROC_DOCS:
        return None
    return min(os.cpu_count() or 1, 8)


def _blocks_from_dataset(documents, tokenizer, eos_id, context_length, packing, num_proc, cache_dir) -> Dataset:
    import pyarrow.compute as pc
    from datasets import Dataset, Features, List, Value
    from datasets.fingerprint import Hasher

    if "text" not in documents.column_names:
        raise ValueError(f"documents need a 'text' column (load_documents makes one); got {documents.column_names}")
    if num_proc is None:
        num_proc = _auto_num_proc(len(documents))
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)

    # 1. Tokenise: one row of token ids (ending with EOS) per document, cached by datasets.
    tokenized_fingerprint = Hasher.hash([documents._fingerprint, tokenizer, eos_id, _BLOCKS_VERSION])
    tokenized = documents.map(
        _tokenize_batch,
        batched=True,
        batch_size=_BATCH,
        writer_batch_size=_BATCH,
        fn_kwargs={"tokenizer": tokenizer, "eos_id": eos_id},
        remove_columns=documents.column_names,
        features=Features({"input_ids": List(Value("int32"))}),
        num_proc=num_proc,
        cache_file_name=None
        if cache_dir is None
        else os.path.join(cache_dir, f"tokenized-{tokenized_fingerprint}.arrow"),
        new_fingerprint=tokenized_fingerprint,
        desc="Tokenising documents",
    )

    lengths = pc.list_value_length(tokenized.data.column("input_ids"))  # (num_docs,)
    total = int(pc.sum(lengths).as_py() or 0)
    num_blocks = total // context_length
    if num_blocks == 0:
        raise ValueError(_short_corpus_message(total, len(tokenized), context_length))
    logger.info(
        "%d documents, %d tokens -> %d blocks of %d tokens (%d tail tokens dropped)",
        len(tokenized),
        total,
        num_blocks,
        context_length,
        total - num_blocks * context_length,
    )

    # 2. Block: whole arrow tables of blocks at a time (a per-row generator would convert every token in Python).
    # Cached in cache_dir, else next to the tokenised documents' cache; kept in memory when those are in memory.
    blocks_fingerprint = Hasher.hash([tokenized._fingerprint, context_length, packing, _BLOCKS_VERSION])
    folder = cache_dir
    if folder is None and tokenized.cache_files:
        folder = os.path.dirname(tokenized.cache_files[0]["filename"])
    tables = (
        _arrow_block_table(_block_columns(ids, starts, packing))
        for ids, starts in _iter_block_batches(_tokenized_chunks(tokenized), context_length)
    )
    if folder is None:
        import pyarrow as pa
        from datasets.table import InMemoryTable

        return Dataset(InMemoryTable(pa.concat_tables(list(tables))), fingerprint=blocks_fingerprint)
    path = os.path.join(str(folder), f"blocks-{blocks_fingerprint}.arrow")
    if not os.path.exists(path):
        _write_arrow(tables, path, _block_features(packing))
    return Dataset.from_file(path)


def _write_arrow(tables: Iterable, path: str, features) -> None:
    """Write tables to `path` through a temporary file, so that an interrupted run leaves no half cache behind."""
    from datasets.arrow_writer import ArrowWriter

    partial = f"{path}.{os.getpid()}.partial"
    with ArrowWriter(features=features, path=partial) as writer:
        for table in tables:
            writer.write_table(table)
        writer.finalize()
    os.replace(partial, path)


def _short_corpus_message(total: int, num_docs: int, context_length: int) -> str:
    return (
        f"the corpus has {total} tokens ({num_docs} documents joined with EOS), fewer than one block of "
        f"context_length={context_length} tokens: add data or lower context_length"
    )


def _doc_starts(lengths: np.ndarray, total: int) -> np.ndarray:
    """(total,) flags on the first token of each document, from the documents' lengths (D,) (all > 0)."""
    starts = np.zeros(total, dtype=bool)
    starts[np.cumsum(lengths) - lengths] = True
    return starts


def _token_chunk(documents_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated token ids of some documents (N,) and the flags on each document's first token (N,)."""
    if not documents_ids:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    ids = np.concatenate([np.asarray(doc, dtype=np.int64) for doc in documents_ids])
    lengths = np.array([len(doc) for doc in documents_ids], dtype=np.int64)
    return ids, _doc_starts(lengths, len(ids))


def _tokenized_chunks(tokenized: Dataset) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The tokenised documents in order, `_BATCH` at a time, as (token ids, document-start flags)."""
    for table in tokenized.with_format("arrow").iter(batch_size=_BATCH):
        column = table.column("input_ids").combine_chunks()  # ListArray, one row per document
        ids = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)  # (N,)
        lengths = column.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)  # (D,)
        yield ids, _doc_starts(lengths, len(ids))


def _blocks_from_stream(documents, tokenizer, eos_id: int, context_length: int, packing: str) -> Iterator[dict]:
    """Generator for `IterableDataset.from_generator`: tokenises `_BATCH` documents at a time as they stream in."""

    def chunks():
        texts = []
        for row in documents:
            texts.append(row["text"])
            if len(texts) == _BATCH:
                yield _token_chunk(_encode_documents(texts, tokenizer, eos_id))
                texts = []
        if texts:
            yield _token_chunk(_encode_documents(texts, tokenizer, eos_id))

    counter = _Counter()
    num_blocks = 0
    for ids, starts in _iter_block_batches(chunks(), context_length, counter):
        columns = _block_columns(ids, starts, packing)
        for row in range(len(ids)):
            num_blocks += 1
            yield {name: values[row].tolist() for name, values in columns.items()}  # plain ints, as a Dataset gives
    if num_blocks == 0:
        raise ValueError(_short_corpus_message(counter.tokens, counter.documents, context_length))


@dataclass
class _Counter:
    tokens: int = 0
    documents: int = 0


def _iter_block_batches(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]], context_length: int, counter: _Counter | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Join (token ids, document-start flags) chunks into one stream and cut it into blocks of `context_length`.

    Yields, for each chunk that completes blocks, their ids (n, L) and document-start flags (n, L). The stream is
    never held whole: only the tokens not yet in a block are buffered. The tail that does not fill a block is dropped.
    """
    pending_ids: list[np.ndarray] = []
    pending_starts: list[np.ndarray] = []
    buffered = 0
    for ids, starts in chunks:
        if counter is not None:
            counter.tokens += len(ids)
            counter.documents += int(starts.sum())
        pending_ids.append(ids)
        pending_starts.append(starts)
        buffered += len(ids)
        if buffered < context_length:
            continue
        stream_ids = np.concatenate(pending_ids)  # (buffered,)
        stream_starts = np.concatenate(pending_starts)  # (buffered,)
        cut = buffered // context_length * context_length
        yield stream_ids[:cut].reshape(-1, context_length), stream_starts[:cut].reshape(-1, context_length)
        pending_ids, pending_starts = [stream_ids[cut:]], [stream_starts[cut:]]
        buffered -= cut


def _block_columns(ids: np.ndarray, starts: np.ndarray, packing: str) -> dict[str, np.ndarray]:
    """Training columns for blocks `ids` (n, L) whose document starts are flagged in `starts` (n, L)."""
    if packing == "concat":
        return {"input_ids": ids, "labels": ids}
    index = np.arange(ids.shape[1])  # (L,)
    # Position = distance to the latest document start at or before it; the block's first token counts as a start
    # (a document continued from the previous block restarts at 0, as it would when seen alone).
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)  # (n, L)
    return {
        "input_ids": ids,
        # The previous document's last token does not learn to predict the next document's first token.
        "labels": np.where(starts, IGNORE_INDEX, ids),
        "position_ids": index - last_start,
    }


def _arrow_block_table(columns: dict[str, np.ndarray]):
    """(n, L) int columns -> an arrow table of n rows of int32 lists."""
    import pyarrow as pa

    n, length = next(iter(columns.values())).shape
    offsets = pa.array(np.arange(0, (n + 1) * length, length, dtype=np.int32))  # one chunk: far below 2**31 tokens
    return pa.table(
        {
            name: pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1).astype(np.int32)))
            for name, values in columns.items()
        }
    )


# --------------------------------------------------------------------------------------------------------------------
# SFT records
# --------------------------------------------------------------------------------------------------------------------

DEFAULT_SYSTEM_PROMPT = "You are a helpful, respectful and honest assistant."

_ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
_ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)


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


def load_sft_records(
    data: str | os.PathLike, split: str = "train", *, cache_dir: str | os.PathLike | None = None
) -> Dataset:
    """Load SFT records: a .json (array) / .jsonl / .parquet file, a directory of them, or a Hugging Face dataset.

    Each record is {"instruction", "input" (optional), "output"} (LongAlpaca / Alpaca) or {"messages": [{"role",
    "content"}, ...]} ending with the assistant's answer. Raises ValueError naming the first record that lacks a field.
    """
    source = str(data)
    path = Path(source).expanduser()
    if path.exists():
        files = _list_files(path) if path.is_dir() else [path]
        kinds = {_STRUCTURED_SUFFIXES.get(f.suffix.lower()) for f in files}
        if not files or len(kinds) != 1 or None in kinds or kinds == {"csv"}:
            raise ValueError(f"{source}: SFT records must be .json, .jsonl or .parquet files")
        if all(f.stat().st_size == 0 for f in files):
            raise ValueError(f"{source}: no SFT records (empty file)")
        records = _load_records(kinds.pop(), files, cache_dir=cache_dir)
    elif _looks_like_path(source):
        raise ValueError(f"no such file or directory: {source}")
    else:
        records = _load_hub_dataset(source, None, split, False, cache_dir)
    _check_sft_records(records, source)
    return records


def _check_sft_records(records: Dataset, source: str) -> None:
    fields = records.column_names
    if len(records) == 0:
        raise ValueError(f"{source}: no SFT records")
    if "messages" in fields:
        for i, messages in enumerate(records["messages"]):
            if not messages:
                raise ValueError(f"{source}: record {i} has no messages")
        return
    if "instruction" not in fields or "output" not in fields:
        raise ValueError(
            f"{source}: SFT records need 'instruction' and 'output' (and optionally 'input'), or 'messages'; "
            f"their fields are {fields}"
        )
    for name in ("instruction", "output"):
        for i, value in enumerate(records[name]):
            if value is None:
                raise ValueError(f"{source}: record {i} has no {name!r}")


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


def _resolve_template(prompt_template: str, tokenizer: PreTrainedTokenizerBase) -> str:
    if prompt_template not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt_template must be one of {PROMPT_TEMPLATES}, got {prompt_template!r}")
    has_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_template == "auto":
        return "chat_template" if has_chat_template else "llama2"
    if prompt_template == "chat_template" and not has_chat_template:
        raise ValueError(
            "prompt_template='chat_template' but the tokenizer has no chat template; use 'llama2' or 'alpaca'"
        )
    return prompt_template


def _user_turn(conv: _Conversation) -> str:
    return f"{conv.instruction}\n{conv.input}" if conv.input else conv.instruction


def _prompt_ids(conv: _Conversation, tokenizer: PreTrainedTokenizerBase, template: str) -> list[int]:
    """Token ids of everything before the answer.

    llama2: "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{instruction}\\n{input} [/INST]" (Llama-2 chat's single-turn
    form; the tokenizer adds BOS). alpaca: the classic Stanford Alpaca prompt, ending "### Response:".
    chat_template: the tokenizer's template over [system] + history + user turn, with the generation prompt.
    """
    if template == "chat_template":
        messages = ([{"role": "system", "content": conv.system}] if conv.system else []) + conv.history
        messages = messages + [{"role": "user", "content": _user_turn(conv)}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if conv.history:
        raise ValueError(f"multi-turn conversations need prompt_template='chat_template', not {template!r}")
    if template == "llama2":
        system = conv.system or DEFAULT_SYSTEM_PROMPT
        text = f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{_user_turn(conv)} [/INST]"
    else:
        prompt = _ALPACA_PROMPT_WITH_INPUT if conv.input else _ALPACA_PROMPT
        text = prompt.format(instruction=conv.instruction, input=conv.input)
    return tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]


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
    template = _resolve_template(prompt_template, tokenizer)
    eos_id = _eos_token_id(tokenizer)
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
    _resolve_template(prompt_template, tokenizer)  # fail before mapping
    _eos_token_id(tokenizer)
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
