"""Atomic file writes: a reader (or a crash) never sees half a JSON or PNG."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


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


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write `obj` as JSON atomically (numpy scalars and paths are converted); returns the path."""

    def default(value):
        if hasattr(value, "item"):  # numpy / torch scalars
            return value.item()
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, default=default) + "\n")
    return Path(path)
