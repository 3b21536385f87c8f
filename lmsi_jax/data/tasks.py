"""SeqIO task and mixture factories over JSONL records {"inputs", "targets", ...}."""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from lmsi_jax.data import jsonl
from lmsi_jax.data import vocab as vocab_lib  # noqa: F401  (hides GPUs from TF)

REQUIRED_KEYS = ("inputs", "targets")
RecordsFn = Callable[[], Sequence[Mapping[str, Any]]]


def round_task_name(task: str, r: int) -> str:
  """Name of the training task built from round `r`'s pseudo-labels."""
  return f"lmsi_{task}_round_{r}"


def seed_task_name(task: str) -> str:
  """Name of the task over the seed (human-labelled or initial) data."""
  return f"lmsi_{task}_seed"


def output_features(vocab: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """Prompt without EOS, target with EOS, one shared vocabulary."""
  return {
      "inputs": seqio.Feature(vocab, add_eos=False),
      "targets": seqio.Feature(vocab, add_eos=True),
  }


def _string_columns(records: Sequence[Mapping[str, Any]]) -> dict[str, tf.Tensor]:
  return {k: tf.constant([r[k] for r in records], dtype=tf.string, shape=[len(records)])
          for k in REQUIRED_KEYS}


def records_source(
    source: str | os.PathLike[str] | RecordsFn, split: str = "train"
) -> seqio.FunctionDataSource:
  """A `FunctionDataSource` with string features "inputs" and "targets".

  Args:
    source: a JSONL path (read and validated now, so errors surface at
      registration) or a zero-argument callable returning records (called on
      every `get_dataset`). Keys other than inputs/targets are dropped.
    split: the single split name the source provides.

  With `shuffle_files=True` the records are fully permuted in Python with
  `seed` (the same permutation in every shard, so `ds.shard` partitions it).
  """
  if callable(source):
    load: RecordsFn = source
    num_examples = None
  else:
    records = jsonl.read_jsonl(source, required_keys=REQUIRED_KEYS)
    load = lambda: records
    num_examples = {split: len(records)}

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del split
    recs = list(load())
    for i, r in enumerate(recs):
      for k in REQUIRED_KEYS:
        if not isinstance(r.get(k), str):
          raise ValueError(f"record {i}: key {k!r} must be a string")
    if shuffle_files:
      perm = np.random.default_rng(seed).permutation(len(recs))
      recs = [recs[i] for i in perm]
    return tf.data.Dataset.from_tensor_slices(_string_columns(recs))

  return seqio.FunctionDataSource(dataset_fn, splits=[split], num_input_examples=num_examples)


def make_task(
    name: str,
    source: str | os.PathLike[str] | RecordsFn | seqio.DataSource,
    vocab: seqio.Vocabulary,
    split: str = "train",
) -> seqio.Task:
  """An unregistered Task: tokenize, (cache point), append EOS to targets."""
  if not isinstance(source, seqio.DataSource):
    source = records_source(source, split=split)
  return seqio.Task(
      name,
      source=source,
      output_features=output_features(vocab),
      preprocessors=[
          seqio.preprocessors.tokenize,
          seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim,
      ],
      metric_fns=[],
  )


def register_task(
    name: str,
    jsonl_path: str | os.PathLike[str] | RecordsFn,
    vocab: seqio.Vocabulary,
    split: str = "train",
) -> seqio.Task:
  """Registers (replacing any task of the same name) a Task over a JSONL file."""
  task = make_task(name, jsonl_path, vocab, split=split)
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add_provider(name, task)
  return task


def register_mixture(
    name: str, tasks: Sequence[tuple[str | seqio.Task, float]]
) -> seqio.Mixture:
  """Registers (replacing) a Mixture; weights are relative sampling rates (> 0)."""
  if not tasks:
    raise ValueError(f"mixture {name!r} needs at least one task")
  for task, weight in tasks:
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
      raise ValueError(f"mixture {name!r}: weight of {task!r} must be a positive number, got {weight!r}")
  mixture = seqio.Mixture(name, [(t, float(w)) for t, w in tasks])
  seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add_provider(name, mixture)
  return mixture
