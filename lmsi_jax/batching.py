"""Host side of the sampler: shared-prefix planning and refilled row slots.

`sample_prompts(lm, prompts, keys, ...)` decodes `keys.shape[1]` samples of
every prompt (token ids). The prompts' longest common token prefix (the
few-shot block) is prefilled once; each prompt's remaining tokens once, into
a question table slot that its rows read; each row keeps only its own
tokens' KV. Row slots are refilled between chunks of decode steps: when rows
finish, their slots take the next (question, sample) in order, so short
chains of thought do not wait for the longest. Once no row is pending and at
most half the slots still run (the longest paths), those rows move to half
the slots, and so on down to `min_slots`: a step's cost grows with its slots.
(Only while a running row may still outlast a `chunk` of steps: each new slot
count is one more compiled shape.) Every shape is a fixed bucket
(`engine.Spec`), so refills never recompile.

A sample's tokens depend only on its key and its prompt (not on the batch
size, slot, arrival order or mesh), as `sampler.row_keys` promises.
`share=False` decodes the same way with nothing shared (every row its own
whole prompt); the benchmark uses it as the baseline.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from lmsi_jax import engine
from lmsi_jax import model as model_lib
from lmsi_jax import sharding
from lmsi_jax.sampling_core import SamplingParams

_COMPILED: set[tuple] = set()


def bucket_length(n: int, minimum: int = 16, step: int = 128) -> int:
  """Lengths are padded to powers of two up to `step`, then to multiples of `step`, so a run
  compiles a handful of shapes and a long prompt (an 8-shot block of 730 tokens: 768, not
  1,024) does not attend over a third of padding every decode step."""
  p2 = max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
  return p2 if p2 <= step else -(-n // step) * step


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
  """Length of the longest common token prefix, leaving each prompt at least one own token."""
  n = min(len(p) for p in prompts) - 1
  first = prompts[0]
  for p in prompts[1:]:
    i = 0
    while i < n and p[i] == first[i]:
      i += 1
    n = i
  return max(n, 0)


@dataclasses.dataclass
class Row:
  tokens: np.ndarray
  logprobs: np.ndarray
  reason: int


@dataclasses.dataclass
class Stats:
  """Where the time went (filled when `sample_prompts(stats=...)` is given)."""
  prefix_tokens: int = 0
  question_tokens: int = 0
  generated_tokens: int = 0
  decode_steps: int = 0
  chunks: int = 0
  slots: int = 0            # row slots the call started with
  shrinks: int = 0          # times the tail moved to half the slots
  prefill_s: float = 0.0
  decode_s: float = 0.0


def _put(x: np.ndarray, shard) -> jax.Array:
  return jax.make_array_from_callback(x.shape, shard, lambda idx: x[idx])


def _host(xs):
  return [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in xs]


def compile_count() -> int:
  return len(_COMPILED)


def sample_prompts(lm: model_lib.LM, prompts: Sequence[Sequence[int]], keys: np.ndarray, *,
                   params: SamplingParams, eos_id: int, pad_id: int = 0,
                   vocab_limit: int | None = None,
                   stop_sequences: tuple[tuple[int, ...], ...] = (),
                   batch_size: int = 32, share: bool = True, chunk: int = 64,
                   min_slots: int = 8, stats: Stats | None = None,
                   progress: Callable[[int], None] | None = None) -> list[list[Row]]:
  """keys [Q, m, K] raw key data -> [Q][m] Rows (tokens/logprobs up to and incl. the stop)."""
  prompts = [list(map(int, p)) for p in prompts]
  keys = np.asarray(keys, np.uint32)
  if not prompts:
    raise ValueError("prompts must not be empty")
  if min(len(p) for p in prompts) == 0:
    raise ValueError("a prompt is empty (it must contain at least one token)")
  n_q, m = keys.shape[:2]
  if n_q != len(prompts):
    raise ValueError(f"keys has {n_q} prompts' keys for {len(prompts)} prompts")
  limit, steps = lm.cfg.max_seq_len, params.max_decode_steps
  longest = max(len(p) for p in prompts)
  if longest + steps > limit:
    raise ValueError(f"prompt length {longest} + max_decode_steps {steps} exceeds "
                     f"the model context model.max_seq_len={limit}")
  if not share:                     # every row its own whole prompt
    out = _decode(lm, [p for p in prompts for _ in range(m)], keys.reshape(n_q * m, 1, -1), 0,
                  params, eos_id, pad_id, vocab_limit, stop_sequences, batch_size, chunk,
                  min_slots, stats, progress)
    return [[out[i * m + j][0] for j in range(m)] for i in range(n_q)]
  return _decode(lm, prompts, keys, common_prefix(prompts), params, eos_id, pad_id, vocab_limit,
                 stop_sequences, batch_size, chunk, min_slots, stats, progress)


def _decode(lm, prompts, keys, lp, params, eos_id, pad_id, vocab_limit, stop_sequences,
            batch_size, chunk, min_slots, stats, progress) -> list[list[Row]]:
  n_q, m = keys.shape[:2]
  questions = [p[lp:] for p in prompts]
  div = sharding.batch_divisor(lm.mesh)
  # Row slots: batch_size, or fewer when the call has fewer rows (a greedy pass of 8 questions
  # runs 8 slots, not 32: a decode step costs about its slot count); a power of two, so calls
  # of different sizes compile a handful of shapes.
  b = -(-min(batch_size, bucket_length(n_q * m, 1, step=1 << 30)) // div) * div
  per_batch = -(-b // m)                             # questions that fill the row slots
  spec = engine.Spec(lm.mesh, b, per_batch + max(1, b // 4), per_batch, bucket_length(lp),
                     bucket_length(max(len(q) for q in questions)), params, eos_id, pad_id,
                     vocab_limit or lm.cfg.vocab_size, stop_sequences, chunk)
  key = (lm.graphdef, spec)
  if key not in _COMPILED:
    _COMPILED.add(key)
    logging.info("sampler: compiling batch=%d prefix=%d question=%d table=%d (%d so far)",
                 b, spec.prefix_len, spec.question_len, spec.table, len(_COMPILED))
  run_chunk = engine.chunk_program(lm.mesh.devices.flat[0].platform)
  rep, bs1, bs2 = (sharding.replicated(lm.mesh), sharding.batch_sharding(lm.mesh, 1),
                   sharding.batch_sharding(lm.mesh, 2))
  stats = stats if stats is not None else Stats()
  stats.slots = b
  t0 = time.perf_counter()
  with jax.set_mesh(lm.mesh):
    ptok = np.full((1, spec.prefix_len), pad_id, np.int32)
    ptok[0, :lp] = prompts[0][:lp]
    prefix = engine.JITS["prefix"](lm.graphdef, lm.state, _put(ptok, rep), np.int32(lp), spec=spec)
    table = engine.JITS["table"](lm.cfg, spec=spec)
    rows = engine.JITS["rows"](lm.cfg, keys.shape[-1], spec=spec)
    layers = engine.JITS["layers"](lm.graphdef, lm.state, prefix)
    jax.block_until_ready(prefix)
  stats.prefix_tokens += lp
  stats.prefill_s += time.perf_counter() - t0

  results: list[list[Row | None]] = [[None] * m for _ in range(n_q)]
  slot_row: list[tuple[int, int] | None] = [None] * b    # row slot -> (question, sample)
  q_slot: dict[int, int] = {}                            # resident question -> table slot
  free_tab = list(range(spec.table))
  unfinished = [m] * n_q
  next_q = 0            # next question to load
  next_row = 0          # next (question, sample) to assign, in order q * m + j
  total = n_q * m
  g_prev = 0
  row_t = np.zeros((b,), np.int64)      # tokens of each slot's row after the last chunk
  while True:
    idle = [r for r in range(b) if slot_row[r] is None]
    while next_q < n_q and free_tab and next_q * m - next_row < len(idle):
      n_load = min(spec.load, len(free_tab), n_q - next_q)
      tok = np.full((spec.load, spec.question_len), pad_id, np.int32)
      lens = np.ones((spec.load,), np.int32)
      slots = np.full((spec.load,), spec.table, np.int32)           # out of range: dropped
      for k in range(n_load):
        q = questions[next_q + k]
        tok[k, :len(q)], lens[k], slots[k] = q, len(q), free_tab[0]
        q_slot[next_q + k] = free_tab.pop(0)
        stats.question_tokens += len(q)
      t1 = time.perf_counter()
      with jax.set_mesh(lm.mesh):
        table = engine.JITS["questions"](lm.graphdef, lm.state, prefix, table, _put(tok, rep),
                                         _put(lens, rep), _put(slots, rep), spec=spec)
        jax.block_until_ready(table)
      stats.prefill_s += time.perf_counter() - t1
      next_q += n_load
    mask = np.zeros((b,), bool)
    qslot = np.zeros((b,), np.int32)
    kd = np.zeros((b, keys.shape[-1]), np.uint32)
    for r in idle:
      if next_row >= next_q * m:
        break
      i, j = divmod(next_row, m)
      mask[r], qslot[r], kd[r], row_t[r] = True, q_slot[i], keys[i, j], 0
      slot_row[r] = (i, j)
      next_row += 1
    if all(s is None for s in slot_row):
      break
    half = b // 2
    running = [r for r in range(b) if slot_row[r] is not None]
    # Worth a compiled shape only while a running row may outlast a chunk of steps.
    shrinks = (half >= min_slots and half % div == 0
               and params.max_decode_steps - min(int(row_t[r]) for r in running) > chunk)
    if next_row == total and shrinks and len(running) <= half:
      # The tail: nothing pending and at most half the slots running (the longest paths).
      # They go on in half the slots (one more compiled shape per halving).
      idx = running + [r for r in range(b) if slot_row[r] is None][:half - len(running)]
      spec = dataclasses.replace(spec, batch=half)
      _COMPILED.add((lm.graphdef, spec))
      with jax.set_mesh(lm.mesh):
        rows = engine.JITS["compact"](rows, _put(np.asarray(idx, np.int32), rep), spec=spec)
      slot_row = [slot_row[r] for r in idx]
      row_t = row_t[idx]
      b = half
      stats.shrinks += 1
      continue
    n_idle = b - len(running)
    if next_row < total:              # return to refill once b/8 more slots are free
      free_target = n_idle + max(1, b // 8)
    else:                             # nothing pending: return to shrink (above), or at the end
      free_target = b - half if shrinks else b + 1
    t1 = time.perf_counter()
    with jax.set_mesh(lm.mesh):
      rows = run_chunk(lm.graphdef, lm.state, layers, prefix, table, rows, _put(mask, bs1),
                       _put(qslot, bs1), _put(kd, bs2), np.int32(free_target), spec=spec)
      done, t, reason, toks, lps, g = _host([rows.done, rows.t, rows.reason, rows.tokens,
                                             rows.logprobs, rows.g.reshape(1)])
    stats.decode_s += time.perf_counter() - t1
    row_t = np.asarray(t).copy()
    stats.chunks += 1
    stats.decode_steps += int(g[0]) - g_prev
    g_prev = int(g[0])
    harvested = 0
    for r in range(b):
      if slot_row[r] is not None and done[r]:
        i, j = slot_row[r]
        n = int(t[r])
        results[i][j] = Row(toks[r, :n].copy(), lps[r, :n].copy(), int(reason[r]))
        stats.generated_tokens += n
        slot_row[r] = None
        harvested += 1
        unfinished[i] -= 1
        if unfinished[i] == 0:
          free_tab.append(q_slot.pop(i))
    if progress is not None and harvested:
      progress(harvested)
  return results  # type: ignore[return-value]
