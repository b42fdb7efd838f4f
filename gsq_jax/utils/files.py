"""Atomic file writes (a reader -- gsq-collect, a resumed run, a launcher -- never sees half
a file) and file digests."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` via a temp file in the same folder and os.replace."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
  """`value` as indented JSON, written with `atomic_write_text`."""
  atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
  """Hex SHA-256 of a file, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()
