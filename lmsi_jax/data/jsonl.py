"""Validated JSONL reading and crash-safe (atomic) JSONL writing.

Local and `gs://` paths alike, through lmsi_jax.fileio.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from lmsi_jax import fileio

_log = logging.getLogger(__name__)


def _parse_line(raw: bytes, required_keys: Sequence[str]) -> dict[str, Any]:
  """Parses one line; raises ValueError('<what is wrong>') without location."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"invalid UTF-8 byte 0x{raw[e.start]:02x} at byte {e.start + 1}") from None
  try:
    rec = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"malformed JSON: {e.msg} (column {e.colno})") from None
  if not isinstance(rec, dict):
    raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
  for key in required_keys:
    if key not in rec:
      raise ValueError(f"missing required key {key!r}")
    value = rec[key]
    if not isinstance(value, str):
      raise ValueError(f"key {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
      raise ValueError(f"key {key!r} is empty")
  return rec


def read_jsonl(
    path: str | os.PathLike[str],
    required_keys: Sequence[str] = (),
    on_error: Literal["raise", "skip"] = "raise",
    stats: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
  """Reads a JSONL file of objects; blank lines are ignored.

  Args:
    path: local path or `gs://` URL.
    required_keys: keys every record must have, each a non-empty string.
    on_error: "raise": the first bad line raises
      `ValueError("{path}:{lineno}: <what is wrong>")`; "skip": bad lines are
      skipped, counted and logged once as a warning.
    stats: if given, filled with `{"read": n_records, "skipped": n_bad}`.

  Returns:
    The records, in file order.
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  path = os.fspath(path)
  records: list[dict[str, Any]] = []
  skipped, first_error = 0, ""
  for lineno, raw in enumerate(fileio.read_bytes(path).split(b"\n"), start=1):
    if not raw.strip():
      continue
    try:
      records.append(_parse_line(raw.rstrip(b"\r"), required_keys))
    except ValueError as e:
      msg = f"{path}:{lineno}: {e}"
      if on_error == "raise":
        raise ValueError(msg) from None
      skipped += 1
      first_error = first_error or msg
  if skipped:
    _log.warning("read_jsonl: skipped %d bad line(s) in %s (first: %s)", skipped, path, first_error)
  if stats is not None:
    stats["read"] = len(records)
    stats["skipped"] = skipped
  return records


def _dump_line(rec: Mapping[str, Any]) -> bytes:
  # sort_keys + fixed separators: identical records give byte-identical files.
  line = json.dumps(rec, ensure_ascii=False, sort_keys=True, allow_nan=False)
  return (line + "\n").encode("utf-8")


def write_jsonl_atomic(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> int:
  """Writes `records` as JSONL so readers see the old file or the complete new one.

  Writes a temp file in the same directory, fsyncs it and `os.replace`s it
  over `path` (gs://: temp object + rename). On any error (e.g. a record that
  is not JSON serialisable) the temp file is removed, an existing file at
  `path` is left unchanged, and the error is re-raised. Lines are
  `json.dumps(rec, ensure_ascii=False, sort_keys=True)`. Returns the count.
  """
  return fileio.write_atomic(os.fspath(path), (_dump_line(r) for r in records))