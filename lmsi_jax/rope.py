"""Rotary position embeddings: default, `llama3` and `linear` scaling, per-frequency factors."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from lmsi_jax.model_config import ModelConfig


def rope_frequencies(cfg: ModelConfig, local: bool) -> np.ndarray | None:
  """Inverse frequencies [head_dim/2] of a scaled or local RoPE; None for the default one.

  Computed in float32 with transformers' formulas (`_compute_llama3_parameters`,
  `_compute_linear_scaling_rope_parameters`)."""
  d = cfg.head_dim
  if local:
    if not cfg.rope_local_theta or cfg.rope_local_theta == cfg.rope_theta:
      return None if cfg.rope_type == "default" else base_frequencies(cfg.rope_theta, d)
    return base_frequencies(cfg.rope_local_theta, d)
  if cfg.rope_freq_factors:
    scaled = dataclasses.replace(cfg, rope_freq_factors=())
    inv = rope_frequencies(scaled, False)
    inv = base_frequencies(cfg.rope_theta, d) if inv is None else inv
    return (inv / np.asarray(cfg.rope_freq_factors, np.float32)).astype(np.float32)
  if cfg.rope_type == "default":
    return None
  inv = base_frequencies(cfg.rope_theta, d)
  f = np.float32(cfg.rope_factor)
  if cfg.rope_type == "linear":
    return inv / f
  old = cfg.rope_original_max_len
  low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  wavelen = np.float32(2 * math.pi) / inv
  out = np.where(wavelen > old / low, inv / f, inv)
  smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
  smoothed = (1 - smooth) * out / f + smooth * out
  medium = ~(wavelen < old / high) & ~(wavelen > old / low)
  return np.where(medium, smoothed, out).astype(np.float32)


def base_frequencies(theta: float, d: int) -> np.ndarray:
  exps = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
  return (np.float32(1.0) / np.power(np.float32(theta), exps)).astype(np.float32)


def rope(x, positions, theta: float, freq=None):
  """Rotary embedding, half-split (HF Llama `rotate_half`) layout. x: [B,T,H,D].

  `freq` [D/2] overrides the inverse frequencies `theta**(-2i/D)` (scaled RoPE)."""
  d = x.shape[-1]
  if freq is None:
    freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  ang = positions.astype(jnp.float32)[..., None] * freq            # [B,T,D/2]
  cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)
