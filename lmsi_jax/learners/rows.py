"""Prompt + completion token rows for the learners' train steps, and log-probs under a model.

A row is `prompt_ids + completion_ids`, right-padded to `seq_len`: `tokens` =
row[:-1], `targets` = row[1:], positions from 0 at the first prompt token (as
the sampler feeds a prompt), one segment, `loss_weights` 1 exactly where a
target is a completion token. Per-completion-token values (the sampler's
log-probs) land at the same positions (`place`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np

from lmsi_jax import model as model_lib
from lmsi_jax import sharding
from lmsi_jax.learners import objectives


def row_length(prompt_lens: Sequence[int], max_completion: int, multiple: int = 16) -> int:
  """A fixed row length for every batch of a stage (one compiled step)."""
  n = max(prompt_lens) + max_completion
  return -(-n // multiple) * multiple


def build(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
          seq_len: int) -> tuple[dict[str, np.ndarray], int]:
  """(rows, number truncated). A completion cut at seq_len keeps its first tokens."""
  b = len(prompts)
  out = {k: np.zeros((b, seq_len), np.int32) for k in ("tokens", "targets", "positions",
                                                        "segment_ids")}
  out["loss_weights"] = np.zeros((b, seq_len), np.float32)
  cut = 0
  for i, (p, c) in enumerate(zip(prompts, completions)):
    full = list(p) + list(c)
    if len(full) - 1 > seq_len:
      full, cut = full[:seq_len + 1], cut + 1
    n = len(full) - 1
    out["tokens"][i, :n] = full[:-1]
    out["targets"][i, :n] = full[1:]
    out["positions"][i, :n] = np.arange(n)
    out["segment_ids"][i, :n] = 1
    out["loss_weights"][i, len(p) - 1:n] = 1.0
  return out, cut


def place(prompts: Sequence[Sequence[int]], values: Sequence[Sequence[float]],
          seq_len: int) -> np.ndarray:
  """Per-completion-token values at their rows' target positions ([B, seq_len], f32)."""
  out = np.zeros((len(prompts), seq_len), np.float32)
  for i, (p, v) in enumerate(zip(prompts, values)):
    v = np.asarray(v, np.float32)[:max(seq_len - len(p) + 1, 0)]
    out[i, len(p) - 1:len(p) - 1 + len(v)] = v
  return out


@functools.lru_cache(maxsize=8)
def _logprob_fn(graphdef, vocab_limit):
  def f(params, batch):
    logits, _ = model_lib.forward(graphdef, params, batch["tokens"], batch["positions"],
                                  model_lib.segment_mask(batch["segment_ids"]))
    return objectives.token_logprobs(logits, batch["targets"], vocab_limit)
  return jax.jit(f)


def token_logprobs(lm, rows: dict[str, np.ndarray], vocab_limit: int | None,
                   batch_size: int) -> np.ndarray:
  """log p(target) at every position of `rows` under `lm` (its own sharded weights; read
  only), in chunks of `batch_size` rows (a multiple of the mesh's batch divisor)."""
  fn, bsh = _logprob_fn(lm.graphdef, vocab_limit), sharding.batch_sharding(lm.mesh, 1)
  keys = ("tokens", "targets", "positions", "segment_ids")
  n, out = len(rows["tokens"]), []
  with jax.set_mesh(lm.mesh):
    for s in range(0, n, batch_size):
      chunk = {k: np.asarray(rows[k][s:s + batch_size]) for k in keys}
      real = len(chunk["tokens"])
      if real < batch_size:      # pad the last chunk (its rows are dropped)
        chunk = {k: np.concatenate([v, np.zeros((batch_size - real,) + v.shape[1:], v.dtype)])
                 for k, v in chunk.items()}
      arr = {k: jax.make_array_from_callback(v.shape, bsh, lambda idx, v=v: v[idx])
             for k, v in chunk.items()}
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      lp = np.asarray(multihost_utils.process_allgather(fn(lm.state, arr), tiled=True))
      out.append(lp[:real])
  return np.concatenate(out) if out else np.zeros((0, rows["tokens"].shape[1]), np.float32)
