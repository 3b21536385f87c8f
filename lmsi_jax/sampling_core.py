"""Token choice: sampling settings, stop codes, temperature / top-k / top-p draws.

Independent of the model; `engine` (device programs) and `sampler` (text API)
both import it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

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
