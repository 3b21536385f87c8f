"""Packed decoder-only training batches from SeqIO tasks/mixtures.

Each example is tokenized as the sampler tokenizes a prompt
(`vocab.encode_prompt`): with a start id (the byte vocabulary's 0, or the
BOS of a tokenizer that adds one) the segment is `[start] inputs targets[:-1]`
predicting `inputs targets`; for a tokenizer that adds no BOS (SmolLM2, Qwen2)
it is `inputs targets[:-1]` predicting `inputs[1:] targets`, positions from 0
at the first input token, exactly as a prompt of those inputs is fed (targets
end with EOS). Examples are packed into rows of exactly `seq_len` tokens with
SeqIO's `PrefixLMFeatureConverter(pack=True)`.
Loss weights cover target tokens only. An example whose inputs + targets
exceed `seq_len` is truncated on the right (never dropped) and counted.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from lmsi_jax.data import vocab as vocab_lib

_log = logging.getLogger(__name__)
Batch = dict[str, np.ndarray]
Provider = str | seqio.Task | seqio.Mixture
_STATE_VERSION = 1


class _DropUncachedSourceWarning(logging.Filter):
  """SeqIO warns on every shuffled FunctionDataSource read; ours permutes fully per seed."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using an uncached FunctionDataset")


logging.getLogger("absl").addFilter(_DropUncachedSourceWarning())


def _provider(p: Provider) -> seqio.Task | seqio.Mixture:
  return seqio.get_mixture_or_task(p) if isinstance(p, str) else p


def _deterministic(ds: tf.data.Dataset) -> tf.data.Dataset:
  opts = tf.data.Options()
  opts.deterministic = True
  # tf.data's autotuner stalls the end of an epoch for 14-24 s while JAX trains in the
  # same process (measured on the demo's 2-core CPU; 0.03 s without it). The pipeline
  # is light (~10 ms per 16 x 128 batch), so fixed parallelism costs nothing.
  opts.autotune.enabled = False
  return ds.with_options(opts)


def pack_examples(
    ds: tf.data.Dataset,
    seq_len: int,
    start_id: int | None,
    truncated: tf.Variable | None = None,
) -> tf.data.Dataset:
  """Tokenized {"inputs", "targets"} examples -> packed rows (int32/float32 [seq_len]).

  Rows have `tokens`, `targets`, `loss_weights`, `segment_ids`, `positions`;
  0 on padding (`segment_ids == 0`). With a `start_id`, `tokens` holds it at
  every segment start. With `start_id=None` (a tokenizer that adds no BOS) a
  segment's first token is its first input token, at position 0, and predicts
  nothing: SeqIO's slot in front of it (where `start_id` would be) becomes
  padding, so a segment of n tokens uses n + 1 slots of the row either way. If
  given, `truncated` (an int64 variable) is incremented for each example longer
  than `seq_len`.
  """
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")
  ds = ds.map(lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"]})
  if truncated is not None:
    def count(ex):
      too_long = tf.size(ex["inputs"]) + tf.size(ex["targets"]) > seq_len
      with tf.control_dependencies([truncated.assign_add(tf.cast(too_long, tf.int64))]):
        return {k: tf.identity(v) for k, v in ex.items()}
    ds = ds.map(count)  # sequential: exact counts
  # The converter uses only the SUM of the task lengths (concat length); with
  # the per-feature length check off, inputs/targets may split it freely and
  # over-long concatenations are trimmed on the right while packing.
  converter = seqio.PrefixLMFeatureConverter(pack=True, apply_length_check=False)
  ds = converter(ds, {"inputs": seq_len // 2, "targets": seq_len - seq_len // 2})

  def to_row(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    seg = tf.cast(ex["decoder_segment_ids"], tf.int32)
    pos = tf.cast(ex["decoder_positions"], tf.int32)
    tokens = tf.cast(ex["decoder_input_tokens"], tf.int32)
    targets = tf.cast(ex["decoder_target_tokens"], tf.int32)
    weights = tf.cast(ex["decoder_loss_weights"], tf.float32)
    if start_id is None:
      # SeqIO's slot 0 of a segment (input: its shifted-in 0; target: the first input
      # token) is dropped; slot p >= 1 (input token p-1 -> token p) moves to position p-1.
      seg = tf.where(pos == 0, tf.zeros_like(seg), seg)
      pos = tf.where(seg > 0, pos - 1, tf.zeros_like(pos))
      targets = tf.where(seg > 0, targets, tf.zeros_like(targets))
      weights = tf.where(seg > 0, weights, tf.zeros_like(weights))
    else:
      tokens = tf.where((pos == 0) & (seg > 0), tf.fill(tf.shape(tokens), start_id), tokens)
    tokens = tf.where(seg > 0, tokens, tf.zeros_like(tokens))
    return {
        "tokens": tokens,
        "targets": targets,
        "loss_weights": weights,
        "segment_ids": seg,
        "positions": pos,
    }
  return _deterministic(ds.map(to_row))


def packed_dataset(
    provider: Provider,
    seq_len: int,
    *,
    split: str = "train",
    shuffle: bool = True,
    seed: int | None = None,
    shard_info: seqio.ShardInfo | None = None,
    truncated: tf.Variable | None = None,
) -> tf.data.Dataset:
  """One epoch of packed rows (see `pack_examples`) from a task or mixture.

  A mixture's epoch ends when its first task runs out (SeqIO's
  `stop_on_empty_dataset=True`).
  """
  provider = _provider(provider)
  ds = provider.get_dataset(
      sequence_length=None,  # trimming happens on the concatenation, in packing
      split=split,
      use_cached=False,
      shuffle=shuffle,
      seed=seed,
      shard_info=shard_info,
      num_epochs=1,
  )
  return pack_examples(_deterministic(ds), seq_len,
                       start_id(provider.output_features["targets"].vocabulary), truncated)


def start_id(vocab: seqio.Vocabulary) -> int | None:
  """The id every training segment starts with (`vocab.prompt_prefix`), None for no prefix."""
  prefix = vocab_lib.prompt_prefix(vocab)
  if len(prefix) > 1:
    raise ValueError(f"{vocab!r} puts {len(prefix)} tokens before every text {list(prefix)}; "
                     "packing supports one (a BOS) or none")
  return prefix[0] if prefix else None


class BatchIterator(Iterator[Batch]):
  """Endless, deterministic, resumable iterator of local packed batches.

  Epoch `e` is `packed_dataset(..., shuffle=True, seed=seed + e)` over this
  process's shard (`seqio.ShardInfo(shard_index, num_shards)`); epochs are
  concatenated row by row, so no row is dropped at epoch ends. Each batch has
  `batch_size // num_shards` rows. `state()` is the (epoch, row) position of
  the next row; `restore(state)` rebuilds that epoch and skips to it.

  Building an epoch's pipeline (tracing SeqIO's maps, filling its shuffle
  buffer) takes seconds, so the next epoch is built on a background thread
  while this one is read: always when `num_batches` (the batches the consumer
  will draw in all) is None, else only once the previous epoch's length shows
  that the next epoch will be needed. Batches do not depend on it.
  """

  def __init__(
      self,
      provider: Provider,
      seq_len: int,
      batch_size: int,
      *,
      seed: int = 0,
      shard_index: int = 0,
      num_shards: int = 1,
      split: str = "train",
      num_batches: int | None = None,
  ):
    if batch_size <= 0 or batch_size % num_shards:
      raise ValueError(f"batch_size {batch_size} must be a positive multiple of num_shards {num_shards}")
    if not 0 <= shard_index < num_shards:
      raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
    self._provider = _provider(provider)
    self._seq_len, self._seed, self._split = seq_len, int(seed), split
    self._shard = seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None
    self.local_batch_size = batch_size // num_shards
    self._num_batches = num_batches
    self._truncated: tf.Variable | None = None   # the open epoch's over-long examples
    self.num_truncated = 0  # over-long examples seen in finished epochs
    self._epoch, self._row, self._batches = 0, 0, 0
    self._epoch_rows: int | None = None          # length of the last finished epoch
    self._it: Iterator[Batch] | None = None
    self._buf: Batch | None = None
    self._ahead: tuple[int, concurrent.futures.Future] | None = None  # (epoch, its build)
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None

  def _build(self, epoch: int, row: int) -> tuple[Iterator[Batch], tf.Variable]:
    """Epoch `epoch`'s batches from row `row`, its pipeline started (first batch pulled)."""
    truncated = tf.Variable(0, dtype=tf.int64, trainable=False)
    ds = packed_dataset(self._provider, self._seq_len, split=self._split, shuffle=True,
                        seed=self._seed + epoch, shard_info=self._shard, truncated=truncated)
    it = ds.skip(row).batch(self.local_batch_size).prefetch(2).as_numpy_iterator()
    try:
      first = next(it)
    except StopIteration:
      return iter(()), truncated
    return itertools.chain([first], it), truncated

  def _open(self) -> None:
    ahead, self._ahead = self._ahead, None
    if ahead is not None and ahead[0] == self._epoch and self._row == 0:
      self._it, self._truncated = ahead[1].result()
    else:
      self._it, self._truncated = self._build(self._epoch, self._row)
    if self._next_epoch_needed():
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="next_epoch")
      self._ahead = (self._epoch + 1, self._pool.submit(self._build, self._epoch + 1, 0))

  def _next_epoch_needed(self) -> bool:
    if self._num_batches is None:
      return True
    if self._epoch_rows is None:
      return False
    rows_wanted = (self._num_batches - self._batches) * self.local_batch_size
    return rows_wanted > self._epoch_rows - self._row

  def _end_epoch(self) -> None:
    n = int(self._truncated.numpy())
    self.num_truncated += n
    if n:
      _log.warning("epoch %d of %s: %d example(s) longer than seq_len=%d were truncated",
                   self._epoch, self._provider.name, n, self._seq_len)
    self._epoch_rows = self._row
    self._epoch, self._row, self._it, self._truncated = self._epoch + 1, 0, None, None

  def __next__(self) -> Batch:
    parts: list[Batch] = []
    need = self.local_batch_size
    while need:
      if self._buf is None:
        if self._it is None:
          self._open()
        try:
          self._buf = next(self._it)
        except StopIteration:
          if self._row == 0:
            raise ValueError(f"{self._provider.name}: shard {self._shard} of split "
                             f"{self._split!r} has no examples") from None
          self._end_epoch()
          continue
      take = min(need, len(self._buf["tokens"]))
      parts.append({k: v[:take] for k, v in self._buf.items()})
      rest = {k: v[take:] for k, v in self._buf.items()}
      self._buf = rest if len(rest["tokens"]) else None
      self._row += take
      need -= take
    self._batches += 1
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def __iter__(self) -> BatchIterator:
    return self

  @property
  def truncated(self) -> int:
    """Over-long (truncated) examples read so far, finished epochs and the current one."""
    return self.num_truncated + (int(self._truncated.numpy()) if self._truncated is not None else 0)

  def state(self) -> dict[str, Any]:
    """JSON-serialisable position: the next row is row `row` of epoch `epoch`."""
    return {"version": _STATE_VERSION, "epoch": self._epoch, "row": self._row,
            "batches": self._batches, "seed": self._seed,
            "shard": [self._shard.index, self._shard.num_shards] if self._shard else [0, 1],
            "seq_len": self._seq_len, "local_batch_size": self.local_batch_size}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Resumes exactly at `state` (taken from an identically configured iterator)."""
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"unsupported iterator state version: {state.get('version')!r}")
    mine = self.state()
    for key in ("seed", "shard", "seq_len"):
      if list(np.atleast_1d(state[key])) != list(np.atleast_1d(mine[key])):
        raise ValueError(f"iterator state {key}={state[key]!r} does not match {mine[key]!r}")
    self._epoch, self._row = int(state["epoch"]), int(state["row"])
    self._batches = int(state["batches"])
    self._it, self._buf, self._truncated, self._ahead = None, None, None, None


class GlobalBatches(Iterator[Batch]):
  """A process's rows of a global batch that does not depend on the process count.

  The global batch is the concatenation of `num_shards` logical shards'
  batches (each `batch_size // num_shards` rows, its own `BatchIterator`).
  Process p of P reads only shards [p*K/P, (p+1)*K/P), which are exactly the
  rows its devices hold under a batch sharding over (data, fsdp). So 1 process
  and 2 processes with the same `num_shards` train on identical batches.
  `num_batches` is as for `BatchIterator` (the global batches to be drawn).
  """

  def __init__(self, provider: Provider, seq_len: int, batch_size: int, *, seed: int = 0,
               num_shards: int = 0, process_index: int = 0, process_count: int = 1,
               num_batches: int | None = None):
    num_shards = num_shards or process_count
    if num_shards % process_count or batch_size % num_shards:
      raise ValueError(f"train.data_shards={num_shards} must be a multiple of the process count "
                       f"{process_count} and divide train.batch_size={batch_size}")
    per = num_shards // process_count
    self.iterators = [BatchIterator(provider, seq_len, batch_size, seed=seed, shard_index=s,
                                    num_shards=num_shards, num_batches=num_batches)
                      for s in range(process_index * per, (process_index + 1) * per)]
    self.local_batch_size = batch_size // process_count

  def __next__(self) -> Batch:
    parts = [next(it) for it in self.iterators]
    return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts])
                                             for k in parts[0]}

  def __iter__(self) -> GlobalBatches:
    return self

  @property
  def truncated(self) -> int:
    """This process's over-long examples so far (see `BatchIterator.truncated`)."""
    return sum(it.truncated for it in self.iterators)

  def state(self) -> dict[str, Any]:
    return {"shards": [it.state() for it in self.iterators]}

  def restore(self, state: Mapping[str, Any]) -> None:
    if len(state["shards"]) != len(self.iterators):
      raise ValueError(f"iterator state has {len(state['shards'])} shards, expected "
                       f"{len(self.iterators)} (train.data_shards or the process count changed)")
    for it, st in zip(self.iterators, state["shards"]):
      it.restore(st)
