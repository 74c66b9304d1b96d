"""Corpora -> token blocks for context extension.

Documents are tokenised once, joined with EOS and cut into blocks of exactly `context_length` tokens; the tail that
does not fill a block is dropped (the paper's recipe). Two packings:
- "concat": blocks of input_ids (labels = input_ids); attention runs across document boundaries inside a block, as
  in the paper.
- "documents": the same blocks plus `position_ids` that restart at 0 at every document start, so transformers'
  packed-sequence detection (and S2-Attn, which counts groups from each packed document's start) keeps documents
  apart. The label of each document's first token is -100: the previous document's last token must not learn to
  predict the next document.
`transformers.default_data_collator` stacks either kind of block (position_ids included). A Dataset is blocked into
a cached arrow file; a streamed (iterable) dataset is blocked as it is read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..io import atomic_path

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that the loss ignores (transformers' and PyTorch's convention)."""

PACKINGS = ("concat", "documents")

_BATCH = 100  # documents per tokeniser call and per write: 100 books of 100k tokens stay well under a GB
_BLOCKS_VERSION = "longlora-blocks-1"  # bump when the blocking changes, so cached blocks are rebuilt
_AUTO_NUM_PROC_DOCS = 50_000  # below this many documents, one process tokenises faster than a pool starts


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
    eos_id = eos_token_id(tokenizer)
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


def eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
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

    with atomic_path(path) as partial:
        with ArrowWriter(features=features, path=str(partial)) as writer:
            for table in tables:
                writer.write_table(table)
            writer.finalize()


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
