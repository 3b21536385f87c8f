"""File I/O for local paths and gs:// (through tf.io.gfile, imported only then).

Everything the pipeline writes goes through `write_atomic`: a temp file in the
same directory, fsync, then rename over the target, so a reader (or a resumed
run) sees either the old file or the complete new one, never a partial one.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterable


def is_remote(path: str) -> bool:
  return os.fspath(path).startswith("gs://")


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def join(*parts: str) -> str:
  return os.path.join(*parts) if not is_remote(parts[0]) else "/".join(p.rstrip("/") for p in parts)


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def makedirs(path: str) -> None:
  if is_remote(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  return sorted(_gfile().listdir(path) if is_remote(path) else os.listdir(path))


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    with _gfile().GFile(path, "rb") as f:
      return f.read()
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def write_atomic(path: str, chunks: Iterable[bytes]) -> int:
  """Writes the concatenated chunks atomically; returns how many chunks were written.

  On any error (including one raised while producing the chunks) the temp file
  is removed and an existing file at `path` is left unchanged.
  """
  path = os.fspath(path)
  n = 0
  if is_remote(path):
    gf = _gfile()
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
      with gf.GFile(tmp, "wb") as f:
        for chunk in chunks:
          f.write(chunk)
          n += 1
      gf.rename(tmp, path, overwrite=True)
    except BaseException:
      if gf.exists(tmp):
        gf.remove(tmp)
      raise
    return n
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      for chunk in chunks:
        f.write(chunk)
        n += 1
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return n


def write_text_atomic(path: str, text: str) -> None:
  write_atomic(path, [text.encode("utf-8")])


def read_json(path: str):
  return json.loads(read_text(path))


def write_json_atomic(path: str, obj) -> None:
  """`obj` as indented, key-sorted JSON, written atomically (see `write_text_atomic`)."""
  write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))
