"""iadkit's own files: written so that a crash never leaves half of one (a temporary file
beside it, flushed to disk, renamed over the old one: atomic on POSIX and Windows), and read
back with one :class:`~iadkit.errors.CheckpointError` naming the file, the field and the problem
when one is damaged.

Example:
    >>> write_text_atomic(Path("run/run.json"), json.dumps(record))
    >>> record = read_json_record(Path("run/run.json"), {"config": dict, "tasks": list})
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import CheckpointError


def write_text_atomic(path: Path, text: str, encoding: str = "utf-8",
                      errors: str = "strict") -> None:
    """Replace ``path`` with ``text``: readers see the old file or the new one, never a part."""
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", encoding=encoding, errors=errors, newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def read_json_record(path: Path, fields: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """A JSON object from ``path`` with at least ``fields`` (name -> type).

    Raises:
        CheckpointError: the file is missing, empty, truncated or not JSON, not an object, or a
            field is missing or of the wrong type (the message names the file and the field).
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: damaged, not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: damaged, expected a JSON object, found "
                              f"{type(record).__name__}")
    for name, kind in fields.items():
        if name not in record:
            raise CheckpointError(f"{path}: damaged, field {name!r} is missing")
        if not isinstance(record[name], kind):
            raise CheckpointError(f"{path}: damaged, field {name!r} is "
                                  f"{type(record[name]).__name__}, not {_names(kind)}")
    return record


def _names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)
