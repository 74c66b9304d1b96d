"""Loading data: a corpus as one `text` column (one row per document), or SFT records as they are.

A corpus comes from a text file, a directory of files, .json / .jsonl / .parquet / .csv records, a directory written
by `Dataset.save_to_disk`, or a Hugging Face dataset name (see `load_documents`). Text that is not valid UTF-8 is read
with U+FFFD in place of the bad bytes, and a warning names the file. `load_sft_records` reads instruction or chat
records from the same kinds of sources (no CSV).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

logger = logging.getLogger(__name__)

# Local files loaded as records (one row per record) rather than as one text document per file.
_STRUCTURED_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# Suffixes that make a name that does not exist on disk "a missing file" rather than "a Hugging Face dataset name".
_FILE_SUFFIXES = set(_STRUCTURED_SUFFIXES) | {".txt", ".md", ".rst", ".text", ".py", ".tex", ".html", ".xml"}


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
    return _count_undecodable(path.read_bytes())


def _count_undecodable(data: bytes) -> int:
    try:
        data.decode("utf-8")
        return 0
    except UnicodeDecodeError:
        # surrogateescape maps each undecodable byte to one code point in U+DC80..U+DCFF
        return len(_ESCAPED.findall(data.decode("utf-8", errors="surrogateescape")))


_UNDECODABLE = ("%s: %d byte(s) are not valid UTF-8 and were replaced with U+FFFD; if the file is in another "
                "encoding, convert it first (iconv -f latin1 -t utf-8 ...)")


def decode_text(data: bytes, source: str | os.PathLike) -> str:
    """UTF-8 text of a file's bytes, each invalid byte replaced with U+FFFD and counted in a warning naming `source`
    (evaluation text, documents to ask about: a stray byte should not stop the work, nor pass unseen)."""
    n = _count_undecodable(data)
    if n:
        logger.warning(_UNDECODABLE, source, n)
    return data.decode("utf-8", errors="replace")


def _warn_undecodable(files: list[Path]) -> None:
    bad = [(f, n) for f in files if (n := _undecodable_bytes(f))]
    for f, n in bad[:5]:
        logger.warning(_UNDECODABLE, f, n)
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

