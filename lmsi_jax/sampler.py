"""Batched temperature sampling: one jitted function, prefill + while_loop decode.

`decode` is pure and jitted: it prefills left-padded prompts into an explicit
KV cache in one pass, then runs a `lax.while_loop` that samples one token per
row per step until every row has hit EOS or a stop sequence, or
`max_decode_steps` is reached. Each row has its own PRNG key, so a sample
depends only on (seed, prompt index, sample index), not on the batch it
landed in or the mesh. `generate` is the text-level API used by notebooks and
the round pipeline.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental import multihost_utils

from lmsi_jax import model as model_lib
from lmsi_jax import sharding

STOP_LENGTH, STOP_EOS, STOP_SEQUENCE = 0, 1, 2
STOP_REASONS = {STOP_LENGTH: "length", STOP_EOS: "eos", STOP_SEQUENCE: "stop"}
NEG_INF = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Static sampling settings (part of the compiled function's key)."""
  temperature: float = 0.7
  top_k: int = 0                 # 0 = off
  top_p: float = 1.0             # 1 = off
  max_decode_steps: int = 256

  def __post_init__(self):
    if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
      raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
    if not (isinstance(self.top_k, int) and self.top_k >= 0):
      raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
    if not (0.0 < self.top_p <= 1.0):
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
    if not (isinstance(self.max_decode_steps, int) and self.max_decode_steps >= 1):
      raise ValueError(f"max_decode_steps must be an int >= 1, got {self.max_decode_steps!r}")


def argmax_last(x):
  """`jnp.argmax(x, -1)` (first maximal index) from two plain reductions.

  XLA:CPU lowers argmax to a variadic (value, index) reduce that costs ~10x a
  max; at batch 512 it was the largest op of a small model's decode step.
  """
  m = jnp.max(x, -1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  first = jnp.min(jnp.where(x == m, iota, x.shape[-1]), -1)
  return jnp.minimum(first, x.shape[-1] - 1)       # all-NaN rows: the last index


def sample_tokens(logits, keys, params: SamplingParams):
  """logits [B,V] f32 (already masked); keys: one typed PRNG key per row."""
  if params.temperature == 0:
    return argmax_last(logits).astype(jnp.int32)
  x = logits / params.temperature
  idx = None
  if params.top_k:
    x, idx = jax.lax.top_k(x, min(params.top_k, x.shape[-1]))          # sorted, descending
  elif params.top_p < 1.0:
    idx = jnp.argsort(-x, axis=-1)
    x = jnp.take_along_axis(x, idx, -1)
  if params.top_p < 1.0:
    p = jax.nn.softmax(x, -1)
    keep = (jnp.cumsum(p, -1) - p) < params.top_p                      # always keeps the best
    x = jnp.where(keep, x, NEG_INF)
  # Gumbel-max: argmax(x + Gumbel noise) ~ softmax(x), as jax.random.categorical.
  gumbel = jax.vmap(lambda k: jax.random.gumbel(k, x.shape[-1:], x.dtype))(keys)
  choice = argmax_last(x + gumbel).astype(jnp.int32)
  if idx is None:
    return choice
  return jnp.take_along_axis(idx, choice[:, None], -1)[:, 0].astype(jnp.int32)


@struct.dataclass
class _State:
  step: jax.Array
  cache: list
  last: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  done: jax.Array
  reason: jax.Array
  lengths: jax.Array
  tail: jax.Array


def decode(graphdef, state, prompt, prompt_mask, keys, *, params: SamplingParams, eos_id: int,
           pad_id: int, vocab_limit: int, stop_sequences: tuple[tuple[int, ...], ...],
           cache_sharding=None):
  """prompt [B,Tp] left-padded; returns dict of tokens/logprobs [B,N], lengths, stop_reason, steps."""
  model = model_lib.nnx.merge(graphdef, state)
  b, tp = prompt.shape
  n = params.max_decode_steps
  s = tp + n
  constrain = ((lambda c: jax.lax.with_sharding_constraint(c, cache_sharding))
               if cache_sharding is not None else (lambda c: c))
  s_idx = jnp.arange(s)
  valid_kv = jnp.concatenate([prompt_mask, jnp.ones((b, n), bool)], -1)
  plen = prompt_mask.sum(-1).astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, -1) - 1, 0).astype(jnp.int32)
  # Prefill into a prompt-length cache (no attention over the empty decode slots), then
  # extend it; only the last prompt position's logits are needed.
  mask = (jnp.arange(tp)[None, None, :] <= jnp.arange(tp)[None, :, None]) & prompt_mask[:, None, :]
  hidden, cache = model.hidden(prompt, positions, mask, constrain(model.init_cache(b, tp)), 0)
  cache = [{k: constrain(jnp.pad(c, ((0, 0), (0, n), (0, 0), (0, 0)))) for k, c in layer.items()}
           for layer in cache]
  logits = model.logits(hidden[:, -1:])
  max_stop = max([len(q) for q in stop_sequences] + [1])
  stops = [jnp.asarray(q, jnp.int32) for q in stop_sequences]

  def pick(logits_last, step):
    logits_last = jnp.where(jnp.arange(logits_last.shape[-1]) < vocab_limit, logits_last, NEG_INF)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    tok = sample_tokens(logits_last, step_keys, params)
    lse = jax.nn.logsumexp(logits_last, -1)      # log_softmax at the sampled token only
    lp = jnp.take_along_axis(logits_last, tok[:, None], -1)[:, 0] - lse
    return tok, lp

  def advance(st: _State, tok, lp, cache):
    tok = jnp.where(st.done, pad_id, tok)
    lp = jnp.where(st.done, 0.0, lp)
    tail = jnp.concatenate([st.tail[:, 1:], tok[:, None]], -1)
    hit_stop = jnp.zeros((b,), bool)
    for q in stops:
      hit_stop |= jnp.all(tail[:, -q.shape[0]:] == q[None], -1)
    is_eos = tok == eos_id
    new_done = ~st.done & (is_eos | hit_stop)
    reason = jnp.where(new_done, jnp.where(is_eos, STOP_EOS, STOP_SEQUENCE), st.reason)
    tokens = jax.lax.dynamic_update_slice_in_dim(st.tokens, tok[:, None], st.step, axis=1)
    logprobs = jax.lax.dynamic_update_slice_in_dim(st.logprobs, lp[:, None], st.step, axis=1)
    lengths = jnp.where(st.done, st.lengths, st.step + 1)   # up to and including the stop token
    return _State(st.step + 1, constrain(cache), tok, tokens, logprobs, st.done | new_done, reason,
                  lengths, tail)

  init = _State(jnp.array(0, jnp.int32), cache, jnp.zeros((b,), jnp.int32),
                jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
                jnp.zeros((b,), bool), jnp.full((b,), STOP_LENGTH, jnp.int32),
                jnp.zeros((b,), jnp.int32), jnp.full((b, max_stop), -1, jnp.int32))
  tok, lp = pick(logits[:, -1], 0)
  st = advance(init, tok, lp, cache)

  def cond(st):
    return (st.step < n) & ~jnp.all(st.done)

  def body(st):
    idx = tp + st.step - 1
    m = ((s_idx <= idx)[None, :] & valid_kv)[:, None, :]
    logits, cache = model(st.last[:, None], (plen + st.step - 1)[:, None], m, st.cache, idx)
    tok, lp = pick(logits[:, -1], st.step)
    return advance(st, tok, lp, cache)

  st = jax.lax.while_loop(cond, body, st)
  return {"tokens": st.tokens, "logprobs": st.logprobs, "lengths": st.lengths,
          "stop_reason": st.reason, "steps": st.step}


_STATIC = ("params", "eos_id", "pad_id", "vocab_limit", "stop_sequences", "cache_sharding")
_decode_jit = jax.jit(decode, static_argnums=(0,), static_argnames=_STATIC)
# XLA:CPU's default copy insertion cannot prove that the decode step's reads of
# the old KV cache precede its in-place update inside the while loop, and
# copies every layer's K and V each step; the region analysis drops those copies.
_decode_jit_cpu = jax.jit(decode, static_argnums=(0,), static_argnames=_STATIC,
                          compiler_options={"xla_cpu_copy_insertion_use_region_analysis": True})
_COMPILED: set[tuple] = set()


def bucket_length(n: int, minimum: int = 16) -> int:
  """Prompt lengths are padded to powers of two so a run compiles a handful of shapes."""
  return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def row_keys(seed: int, prompt_index: np.ndarray, sample_index: np.ndarray) -> np.ndarray:
  """Raw uint32 key data, one key per (prompt, sample): independent of batching and mesh."""
  base = jax.random.key(seed)
  f = jax.jit(jax.vmap(lambda i, j: jax.random.key_data(
      jax.random.fold_in(jax.random.fold_in(base, i), j))))
  return np.asarray(f(jnp.asarray(prompt_index, jnp.uint32), jnp.asarray(sample_index, jnp.uint32)))


def _global_array(x: np.ndarray, shard) -> jax.Array:
  return jax.make_array_from_callback(x.shape, shard, lambda idx: x[idx])


def decode_batch(lm: model_lib.LM, prompts: Sequence[Sequence[int]], keys: np.ndarray, *,
                 params: SamplingParams, eos_id: int, pad_id: int = 0, vocab_limit: int | None = None,
                 stop_sequences: tuple[tuple[int, ...], ...] = (), batch_size: int | None = None,
                 ) -> dict[str, np.ndarray]:
  """Decodes token-id prompts (one row each). Returns host numpy arrays for the real rows."""
  rows = len(prompts)
  if rows == 0:
    raise ValueError("prompts must not be empty")
  div = sharding.batch_divisor(lm.mesh)
  b = batch_size or rows
  b = -(-max(b, rows) // div) * div
  longest = max(len(p) for p in prompts)
  if min(len(p) for p in prompts) == 0:
    raise ValueError("a prompt is empty (it must contain at least one token)")
  tp = bucket_length(longest)
  limit = lm.cfg.max_seq_len
  if longest + params.max_decode_steps > limit:
    raise ValueError(f"prompt length {longest} + max_decode_steps {params.max_decode_steps} exceeds "
                     f"the model context model.max_seq_len={limit}")
  tp = min(tp, limit - params.max_decode_steps)
  tok = np.full((b, tp), pad_id, np.int32)
  msk = np.zeros((b, tp), bool)
  for i, p in enumerate(prompts):
    tok[i, tp - len(p):] = p
    msk[i, tp - len(p):] = True
  msk[rows:, -1] = True                         # padding rows: one dummy token
  kd = np.zeros((b, keys.shape[-1]), np.uint32)
  kd[:rows] = keys
  bs = sharding.batch_sharding(lm.mesh, 2)
  cache_sh = sharding.named_sharding(
      lm.mesh, model_lib.CACHE_LOGICAL,
      (b, tp + params.max_decode_steps, lm.cfg.num_kv_heads, lm.cfg.head_dim))
  key = (lm.graphdef, b, tp, params, eos_id, pad_id, vocab_limit, stop_sequences)
  if key not in _COMPILED:
    _COMPILED.add(key)
    logging.info("sampler: compiling batch=%d prompt_len=%d (%d sampler compiles so far)",
                 b, tp, len(_COMPILED))
  fn = _decode_jit_cpu if lm.mesh.devices.flat[0].platform == "cpu" else _decode_jit
  with jax.set_mesh(lm.mesh):
    out = fn(lm.graphdef, lm.state, _global_array(tok, bs), _global_array(msk, bs),
                      jax.random.wrap_key_data(_global_array(kd, bs)),
                      params=params, eos_id=eos_id, pad_id=pad_id,
                      vocab_limit=vocab_limit or lm.cfg.vocab_size,
                      stop_sequences=stop_sequences, cache_sharding=cache_sh)
  out = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in out.items()}
  return {k: (v[:rows] if v.ndim else v) for k, v in out.items()}


def compile_count() -> int:
  return len(_COMPILED)


@dataclasses.dataclass(frozen=True)
class Sample:
  """One sampled continuation."""
  text: str
  tokens: tuple[int, ...]
  logprobs: tuple[float, ...]
  stop_reason: str          # "eos" | "stop" | "length"

  @property
  def sum_logprob(self) -> float:
    return float(sum(self.logprobs))

  @property
  def mean_logprob(self) -> float:
    return self.sum_logprob / max(len(self.logprobs), 1)


def stop_token_sequences(vocab, stop_strings: Sequence[str]) -> tuple[tuple[int, ...], ...]:
  """Token sequences checked inside the decode loop (the text is truncated on the host too)."""
  return tuple(tuple(int(t) for t in vocab.encode(s)) for s in stop_strings if s)


def generate(lm: model_lib.LM, vocab, prompts: Sequence[str], *, num_samples: int = 1,
             temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0,
             max_decode_steps: int = 256, stop_strings: Sequence[str] = ("\nQ:",), seed: int = 0,
             batch_size: int = 32, prompt_offset: int = 0,
             progress: Callable[[int], None] | None = None) -> list[list[Sample]]:
  """Samples `num_samples` continuations for each prompt. Returns [prompt][sample].

  Sample j of prompt i uses the key fold_in(fold_in(key(seed), prompt_offset + i), j),
  so results do not depend on batch size, prompt order or mesh shape.

  Prompts are tokenized as the checkpoint's tokenizer does (`vocab.encode_prompt`:
  a BOS only where the tokenizer adds one); rows are left-padded and positions
  count from 0 at each row's first real token, so no start token is needed.
  """
  from lmsi_jax.data import vocab as vocab_lib   # pylint: disable=g-import-not-at-top
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
  params = SamplingParams(float(temperature), int(top_k), float(top_p), int(max_decode_steps))
  if isinstance(prompts, str):
    raise ValueError("prompts must be a sequence of strings, not a single string")
  ids = [vocab_lib.encode_prompt(vocab, p) or _empty_prompt(vocab, i) for i, p in enumerate(prompts)]
  for i, p in enumerate(ids):
    if len(p) + max_decode_steps > lm.cfg.max_seq_len:
      raise ValueError(f"prompt {i} has {len(p)} tokens; with max_decode_steps={max_decode_steps} "
                       f"it exceeds the model context model.max_seq_len={lm.cfg.max_seq_len}")
  stops = stop_token_sequences(vocab, stop_strings)
  rows = [(i, j) for i in sorted(range(len(ids)), key=lambda i: -len(ids[i]))
          for j in range(num_samples)]
  results: list[list[Sample | None]] = [[None] * num_samples for _ in ids]
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    pi = np.array([prompt_offset + i for i, _ in chunk])
    sj = np.array([j for _, j in chunk])
    out = decode_batch(lm, [ids[i] for i, _ in chunk], row_keys(seed, pi, sj), params=params,
                       eos_id=vocab.eos_id, pad_id=0, vocab_limit=vocab.vocab_size,
                       stop_sequences=stops, batch_size=batch_size)
    for r, (i, j) in enumerate(chunk):
      results[i][j] = _to_sample(vocab, out, r, stop_strings)
    if progress is not None:
      progress(len(chunk))
  return results  # type: ignore[return-value]


def _empty_prompt(vocab, i: int) -> list[int]:
  """An empty prompt of a tokenizer that adds no BOS starts from its BOS token, as
  transformers' `generate()` without input ids does; without one there is nothing to
  condition on."""
  try:
    bos = vocab.bos_id
  except (AttributeError, NotImplementedError):
    bos = None
  if bos is None or int(bos) < 0:
    raise ValueError(f"prompt {i} is empty and the tokenizer has no BOS token to start from")
  return [int(bos)]


def _to_sample(vocab, out, r: int, stop_strings: Sequence[str]) -> Sample:
  n = int(out["lengths"][r])
  toks = [int(t) for t in out["tokens"][r, :n]]
  reason = STOP_REASONS[int(out["stop_reason"][r])]
  body = toks[:-1] if reason == "eos" else toks
  text = vocab.decode(body)
  for s in stop_strings:
    if s and s in text:
      text, reason = text[:text.index(s)], "stop"
  return Sample(text, tuple(toks), tuple(float(x) for x in out["logprobs"][r, :n]), reason)
