"""GSM8K: JSONL and TFDS loaders into the question-pool schema, and SeqIO tasks.

Records are ``{"id", "question", "answer", "cot", "source"}``: ``answer`` is
the gold final number (text after ``####``, commas removed), ``cot`` the
reference solution without ``<<...>>`` calculator annotations, lines joined by
spaces, ending in ``"The answer is X."`` (the LMSI exemplar format); ``source``
says where the record came from (``"path:line"``, or the TFDS split and index)
so later checks (e.g. prompt length) can name it.
"""

from __future__ import annotations

import logging
import os
import re
from decimal import Decimal
from typing import Any, Iterator

from lmsi_jax.data import jsonl as jsonl_lib

TFDS_NAME = "gsm8k:1.0.0"
TASK_NAMES = {"jsonl": "gsm8k_jsonl", "tfds": "gsm8k_tfds"}
SPLITS = ("train", "test")
# SeqIO split -> JSONL file / TFDS split (SeqIO evaluates on "validation").
SEQIO_SPLITS = {"train": "train", "validation": "test"}
TRIGGER = "The answer is"
_KEYS = ("question", "answer")

# One pattern set shared by the Python and the TF (RE2) code paths, so both
# build byte-identical targets; RE2's \s lacks \v, hence the explicit class.
_ANNOTATION_RE = r"<<[^>]*>>"
_WS_RE = r"[ \t\n\r\f\v]+"
_WS = " \t\n\r\f\v"
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+", re.ASCII)
_PLAIN_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)", re.ASCII)


def format_input(question: str) -> str:
  """The zero-shot prompt used by the SeqIO tasks: ``"Q: {question}\\nA:"``."""
  return f"Q: {question}\nA:"


def normalize_number(text: str) -> str:
  """Strips whitespace, ``,``, ``$`` and a trailing ``.``; integral numbers -> int text.

  ``"1,200"`` -> ``"1200"``, ``"$18."`` -> ``"18"``, ``"5.50"`` -> ``"5.5"``;
  text that is not a number comes back stripped but otherwise unchanged.
  """
  s = text.strip().replace(",", "").replace("$", "").rstrip(".")
  num = s[1:] if s.startswith("+") else s
  if not _PLAIN_NUMBER_RE.fullmatch(num):
    return s
  d = Decimal(num)
  if d == d.to_integral_value():
    return str(int(d))
  return format(d.normalize(), "f")


def gold_answer(solution: str) -> str:
  """The normalised final answer after the last ``####`` of a GSM8K solution."""
  if "####" not in solution:
    raise ValueError("answer has no '#### <final answer>' line")
  final = solution.rsplit("####", 1)[1].strip(_WS)
  if not final:
    raise ValueError("empty final answer after '####'")
  ans = normalize_number(final)
  if not _PLAIN_NUMBER_RE.fullmatch(ans):
    raise ValueError(f"final answer {final[:40]!r} is not a number")
  return ans


def gold_cot(solution: str) -> str:
  """GSM8K solution -> CoT ending in ``"The answer is X."`` (no ``<<...>>``)."""
  ans = gold_answer(solution)
  body = re.sub(_ANNOTATION_RE, "", solution).split("####", 1)[0]
  body = re.sub(_WS_RE, " ", body).strip(_WS)
  return f"{body} {TRIGGER} {ans}.".strip(_WS)


def extract_answer(text: str | bytes) -> str:
  """The normalised final number of a model output, or ``""`` if there is none.

  The pipeline's one parser (`lmsi_jax.voting.extract_answer`: the first "The
  answer is", its line); without that cue, the number after ``####``; otherwise
  the last number in the text.
  """
  from lmsi_jax import voting  # pylint: disable=g-import-not-at-top
  if isinstance(text, bytes):
    text = text.decode("utf-8", errors="replace")
  for cue in (TRIGGER, "####"):
    if cue.lower() in text.lower():
      return voting.extract_answer(text, "number", cue, stop=None) or ""
  return voting.extract_answer(text, "number", TRIGGER, stop=None,
                               fallback_last_number=True) or ""


def postprocess_fn(output: str | bytes, example: Any = None, is_target: bool = False) -> str:
  """SeqIO postprocessor for predictions and targets alike: the final number."""
  del example, is_target
  return extract_answer(output)


def metric_fn(targets: list[str], predictions: list[str]) -> dict[str, float]:
  """Exact match (in %) of normalised final numbers; an empty prediction is wrong."""
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets vs {len(predictions)} predictions")
  hits = sum(bool(p) and normalize_number(p) == normalize_number(t)
             for t, p in zip(targets, predictions))
  return {"accuracy": 100.0 * hits / max(len(targets), 1)}


def _record(rec_id: str, question: Any, solution: Any) -> dict:
  """Validates one raw example; raises a one-line ValueError without location."""
  if not isinstance(question, str):
    raise ValueError("'question' is not a string")
  if not question.strip(_WS):
    raise ValueError("empty question")
  if not isinstance(solution, str):
    raise ValueError("'answer' is not a string")
  return {"id": rec_id, "question": question, "answer": gold_answer(solution),
          "cot": gold_cot(solution)}


def _iter_jsonl(path: str, on_error: str,
                stats: dict | None = None) -> Iterator[tuple[tuple[str, str], dict]]:
  """Yields ``((question, solution), record)``; bad lines raise or are skipped.

  Line-level parsing (UTF-8, JSON object, non-empty string keys) is
  `lmsi_jax.data.jsonl`'s, so errors read like `read_jsonl`'s; on top of it each
  answer must carry a numeric ``####`` final answer.
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  stem = os.path.splitext(os.path.basename(path))[0]
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  skipped = 0
  try:
    for lineno, raw in enumerate(lines, 1):
      if not raw.strip():
        continue
      try:
        obj = jsonl_lib._parse_line(raw.rstrip(b"\r"), _KEYS)  # pylint: disable=protected-access
        pair = (obj["question"], obj["answer"])
        rec = {**_record(f"{stem}-{lineno}", *pair), "source": f"{path}:{lineno}"}
      except ValueError as e:
        if on_error == "raise":
          raise ValueError(f"{path}:{lineno}: {e}") from None
        skipped += 1
        continue
      yield pair, rec
  finally:
    if stats is not None:
      stats["skipped"] = skipped
    if skipped:
      logging.warning("%s: skipped %d bad line(s)", path, skipped)


def load_jsonl(path: str, *, on_error: str = "raise", limit: int | None = None,
               stats: dict | None = None) -> list[dict]:
  """Reads a GSM8K JSONL file (keys question, answer) into records.

  Ids are ``f"{basename-without-extension}-{lineno}"`` (1-based); blank lines
  are ignored. A bad line (non-UTF-8, malformed JSON, missing key, empty
  question, answer without a numeric ``####`` line) raises
  ``ValueError("{path}:{lineno}: ...")``, or with ``on_error="skip"`` is
  skipped, counted in a warning and in ``stats["skipped"]`` if `stats` is given. `limit` caps the
  number of records returned.
  """
  out = []
  if limit is not None and limit <= 0:
    return out
  it = _iter_jsonl(path, on_error, stats)
  for _, rec in it:
    out.append(rec)
    if limit is not None and len(out) >= limit:
      it.close()
      break
  return out


def split_path(data_dir: str, split: str) -> str:
  """``{data_dir}/{split}.jsonl`` after checking that it exists."""
  if split not in SPLITS:
    raise ValueError(f"unknown GSM8K split {split!r}; expected one of {SPLITS}")
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(
        f"GSM8K data directory {data_dir} does not exist (config key data.dir)")
  path = os.path.join(data_dir, f"{split}.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GSM8K file {path} is missing (config key data.dir={data_dir})")
  return path


def load_split(data_dir: str, split: str, *, on_error: str = "raise",
               limit: int | None = None, stats: dict | None = None) -> list[dict]:
  """Records of ``{data_dir}/{split}.jsonl``, split "train" or "test"."""
  return load_jsonl(split_path(data_dir, split), on_error=on_error, limit=limit, stats=stats)


def _hide_gpus_from_tf() -> None:
  """Keeps TF off the accelerators so it does not take JAX's memory."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices.
    pass


def load_tfds(split: str, data_dir: str | None = None, *, on_error: str = "raise",
              limit: int | None = None, stats: dict | None = None) -> list[dict]:
  """Records from TFDS ``gsm8k:1.0.0`` (downloads on first use).

  Ids are ``f"tfds_{split}-{i}"`` in TFDS read order, which is not the JSONL
  line order. Skipped examples are counted in ``stats["skipped"]`` if given.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _hide_gpus_from_tf()
  ds = tfds.load(TFDS_NAME, split=split, data_dir=data_dir, shuffle_files=False)
  out, skipped = [], 0
  for i, ex in enumerate(tfds.as_numpy(ds)):
    if limit is not None and len(out) >= limit:
      break
    where = f"TFDS {TFDS_NAME} split {split}, example {i}"
    try:
      out.append({**_record(f"tfds_{split}-{i}", ex["question"].decode("utf-8"),
                            ex["answer"].decode("utf-8")), "source": where})
    except (ValueError, UnicodeDecodeError) as e:
      if on_error == "raise":
        raise ValueError(f"{where}: {e}") from None
      skipped += 1
  if stats is not None:
    stats["skipped"] = skipped
  if skipped:
    logging.warning("TFDS %s split %s: skipped %d bad example(s)", TFDS_NAME, split, skipped)
  return out


def _inputs_targets_tf(ex: dict) -> dict:
  """TF twin of `format_input` / `gold_cot` over raw ``question``/``answer``.

  Identical on all of GSM8K (tested); the final answer only loses ``,``/``$``/a
  trailing ``.`` here, so a non-canonical final such as ``05`` would differ.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  sol = tf.strings.regex_replace(ex["answer"], _ANNOTATION_RE, "")
  final = tf.strings.regex_replace(sol, r"(?s)^.*####", "")
  final = tf.strings.regex_replace(tf.strings.strip(final), r"[,$]", "")
  final = tf.strings.regex_replace(final, r"\.+$", "")
  body = tf.strings.regex_replace(sol, r"(?s)####.*$", "")
  body = tf.strings.strip(tf.strings.regex_replace(body, _WS_RE, " "))
  targets = tf.strings.strip(tf.strings.join([body, f" {TRIGGER} ", final, "."]))
  inputs = tf.strings.join(["Q: ", ex["question"], "\nA:"])
  return {"inputs": inputs, "targets": targets}


def _to_inputs_targets(ds):
  """SeqIO preprocessor: raw GSM8K examples -> ``inputs``/``targets`` strings."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return ds.map(_inputs_targets_tf, num_parallel_calls=tf.data.AUTOTUNE)


def _jsonl_source(data_dir: str):
  """A `seqio.FunctionDataSource` over the JSONL files present in `data_dir`."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  paths = {s: os.path.join(data_dir, f"{f}.jsonl") for s, f in SEQIO_SPLITS.items()}
  paths = {s: p for s, p in paths.items() if os.path.isfile(p)}
  if not paths:
    raise FileNotFoundError(f"no train.jsonl/test.jsonl in {data_dir} (config key data.dir)")
  # Raw (question, solution) pairs, validated now; targets are built in TF.
  raw = {s: [pair for pair, _ in _iter_jsonl(p, "raise")] for s, p in paths.items()}

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed
    qs, ans = zip(*raw[split]) if raw[split] else ((), ())
    return tf.data.Dataset.from_tensor_slices(
        {"question": tf.constant(qs, tf.string), "answer": tf.constant(ans, tf.string)})

  return seqio.FunctionDataSource(dataset_fn, splits=list(paths),
                                  num_input_examples={s: len(r) for s, r in raw.items()})


def register_gsm8k_tasks(source: str = "jsonl", data_dir: str | None = None, vocab: Any = None):
  """Registers (replacing any previous one) and returns the GSM8K eval task.

  Args:
    source: "jsonl" -> task ``gsm8k_jsonl`` over ``{data_dir}/{train,test}.jsonl``
      (required `data_dir`, config key ``data.dir``); "tfds" -> ``gsm8k_tfds``
      over TFDS ``gsm8k:1.0.0`` (`data_dir` is the TFDS data dir, optional).
    data_dir: see `source`.
    vocab: a `seqio.Vocabulary`; default `seqio.ByteVocabulary()`.

  SeqIO splits are "train" and "validation" (= GSM8K test). Inputs are
  ``"Q: {question}\\nA:"`` (no EOS), targets the gold CoT (with EOS).
  """
  import seqio  # pylint: disable=g-import-not-at-top
  _hide_gpus_from_tf()
  if source == "jsonl":
    if data_dir is None:
      raise ValueError("source='jsonl' needs data_dir (config key data.dir)")
    if not os.path.isdir(data_dir):
      raise FileNotFoundError(
          f"GSM8K data directory {data_dir} does not exist (config key data.dir)")
    data_source = _jsonl_source(data_dir)
  elif source == "tfds":
    data_source = seqio.TfdsDataSource(tfds_name=TFDS_NAME, tfds_data_dir=data_dir,
                                       splits=dict(SEQIO_SPLITS))
  else:
    raise ValueError(f"source must be 'jsonl' or 'tfds', got {source!r}")
  vocab = vocab if vocab is not None else seqio.ByteVocabulary()
  name = TASK_NAMES[source]
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=data_source,
      output_features={"inputs": seqio.Feature(vocab, add_eos=False),
                       "targets": seqio.Feature(vocab, add_eos=True)},
      preprocessors=[_to_inputs_targets, seqio.preprocessors.tokenize,
                     seqio.CacheDatasetPlaceholder(),
                     seqio.preprocessors.append_eos_after_trim],
      postprocess_fn=postprocess_fn, metric_fns=[metric_fn])
