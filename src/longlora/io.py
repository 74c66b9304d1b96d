"""Atomic file writes: a reader (or a crash) never sees half a JSON, PNG or model directory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` (os.replace), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write `obj` as JSON atomically (numpy scalars and paths are converted); returns the path."""

    def default(value):
        if hasattr(value, "item"):  # numpy / torch scalars
            return value.item()
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, default=default, sort_keys=sort_keys) + "\n")
    return Path(path)


def update_json(path: str | os.PathLike, update: Callable[[dict], dict]) -> Path:
    """Rewrite the JSON object in `path` as `update(values)`, atomically and with sorted keys (as transformers
    writes its config files); returns the path."""
    values = json.loads(Path(path).read_text())
    return write_json(path, update(values), sort_keys=True)


def _is_within(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def check_output_dir(output: Path, overwrite: bool, inputs: list[str] = ()) -> None:
    """Refuse an output that is a file, a non-empty directory (unless overwrite), or holds one of the inputs."""
    for source in inputs:
        if os.path.exists(source) and _is_within(Path(source), output):
            raise ValueError(
                f"output {str(output)!r} contains the input {source!r}; writing there would destroy it: "
                "choose another output directory"
            )
    if output.is_file():
        raise FileExistsError(f"output {str(output)!r} is a file; pass a directory path for the merged model")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output directory {str(output)!r} exists and is not empty; choose another one or pass overwrite "
            "(--overwrite) to replace it"
        )


@contextmanager
def atomic_directory(output: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `output`; on success it becomes `output`, on error it is removed.

    With overwrite, an existing `output` is replaced only once the new directory is complete (moved aside, the new
    one renamed into place, then the old one deleted), so a failure at any point leaves the old one as it was.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        yield tmp
        check_output_dir(output, overwrite)  # again: something may have appeared there meanwhile
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        replace_directory(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(new: str | os.PathLike, target: str | os.PathLike, aside: str | os.PathLike | None = None,
                      *, overwrite: bool = True) -> None:
    """Rename the complete directory `new` to `target`; an existing non-empty `target` is first moved to `aside`
    (default: a hidden name beside it) and deleted only once `new` is in place, and moved back if that rename fails.
    overwrite=False keeps a non-empty `target` (the rename raises OSError): the first of two racing writers wins."""
    new, target = Path(new), Path(target)
    old = None
    if overwrite and target.is_dir() and any(target.iterdir()):
        old = Path(aside) if aside is not None else target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        shutil.rmtree(old, ignore_errors=True)  # left by an attempt killed earlier
        os.replace(target, old)
    try:
        os.replace(new, target)  # also replaces an empty directory
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def move_into(staging: str | os.PathLike, output: str | os.PathLike,
              after_first: Callable[[], None] | None = None) -> None:
    """Move every entry of the complete directory `staging` into `output` (an entry of the same name is replaced:
    a file by os.replace, a directory by `replace_directory`), then remove `staging`; `after_first` runs once the
    first entry has moved (the crash tests' hook)."""
    staging, output = Path(staging), Path(output)
    for i, item in enumerate(sorted(staging.iterdir())):
        target = output / item.name
        if item.is_dir() and target.is_dir():
            replace_directory(item, target)
        else:
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        if i == 0 and after_first is not None:
            after_first()
    staging.rmdir()
