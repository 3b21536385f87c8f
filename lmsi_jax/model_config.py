"""The model's architecture options: `ModelConfig`, its named family options and presets.

`lmsi_jax.model` re-exports everything here (`model.ModelConfig`, `model.preset`, ...).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}
ROPE_TYPES = ("default", "llama3", "linear")
INITS = ("normal", "fan_in")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture. `vocab_size` is the padded embedding size (multiple of 128)."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  head_dim: int = 0                 # 0 -> hidden_size // num_heads
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  qkv_bias: bool = False
  max_seq_len: int = 2048
  param_dtype: str = "float32"
  dtype: str = "float32"            # compute dtype
  # Architecture options (defaults: the Llama path, unchanged).
  qk_norm: bool = False             # RMSNorm over head_dim of q and k before RoPE (Qwen3, Gemma 3)
  norm_offset: float = 0.0          # RMSNorm multiplies by (norm_offset + w): Gemma's 1 + w
  post_norms: bool = False          # RMSNorm on the attention and MLP outputs too (Gemma 2/3)
  mlp_activation: str = "silu"      # gate activation: "silu" (SwiGLU) | "gelu_tanh" (GeGLU)
  embed_scale: bool = False         # embeddings times sqrt(hidden_size) (Gemma)
  query_pre_attn_scalar: float = 0.0  # scores scaled by this**-0.5 (0 -> head_dim**-0.5)
  attn_logit_softcap: float = 0.0   # cap * tanh(scores / cap) (0 -> off)
  final_logit_softcap: float = 0.0  # cap * tanh(logits / cap) (0 -> off)
  rope_type: str = "default"        # "default" | "llama3" | "linear" (global layers)
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  sliding_window: int = 0           # window of "sliding_attention" layers (0 -> none)
  layer_types: tuple[str, ...] = ()  # per layer: "full_attention" | "sliding_attention"; () -> all full
  rope_local_theta: float = 0.0     # RoPE base of sliding layers (0 -> rope_theta), default RoPE
  # Per-frequency divisors of the global layers' inverse frequencies ([head_dim/2]; () -> none):
  # llama.cpp's rope_freqs.weight, how a GGUF stores Llama 3.1+ `llama3` scaling.
  rope_freq_factors: tuple[float, ...] = ()
  # How fresh (not loaded) weights are drawn: "normal" = N(0, 0.02) everywhere (HF's
  # initializer_range); "fan_in" = projections N(0, 1/fan_in), the residual-writing ones
  # (o_proj, down_proj) also divided by sqrt(2 * num_layers) (GPT-2), embeddings N(0, 0.02).
  init: str = "normal"

  def __post_init__(self):
    if self.head_dim == 0:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    object.__setattr__(self, "rope_freq_factors", tuple(float(f) for f in self.rope_freq_factors))
    if self.rope_freq_factors and len(self.rope_freq_factors) != self.head_dim // 2:
      raise ValueError(f"model.rope_freq_factors has {len(self.rope_freq_factors)} entries; "
                       f"expected head_dim/2 = {self.head_dim // 2}")
    if self.layer_types and len(self.layer_types) != self.num_layers:
      raise ValueError(f"model.layer_types has {len(self.layer_types)} entries for "
                       f"model.num_layers={self.num_layers}")
    bad = set(self.layer_types) - set(LAYER_TYPES)
    if bad:
      raise ValueError(f"model.layer_types: unknown {sorted(bad)} (expected {list(LAYER_TYPES)})")
    if "sliding_attention" in self.layer_types and self.sliding_window <= 0:
      raise ValueError("model.layer_types has sliding_attention layers but model.sliding_window is 0")
    if self.mlp_activation not in ACTIVATIONS:
      raise ValueError(f"model.mlp_activation={self.mlp_activation!r}: expected one of "
                       f"{sorted(ACTIVATIONS)}")
    if self.init not in INITS:
      raise ValueError(f"model.init={self.init!r}: expected one of {list(INITS)}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"model.rope_type={self.rope_type!r}: expected one of {list(ROPE_TYPES)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of "
                       f"model.num_kv_heads={self.num_kv_heads}")
    for k in ("param_dtype", "dtype"):
      if getattr(self, k) not in DTYPES:
        raise ValueError(f"model.{k}={getattr(self, k)!r}: expected one of {sorted(DTYPES)}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(d).items() if k in names})

  def is_local(self, i: int) -> bool:
    """Whether layer `i` is a sliding-window layer."""
    return bool(self.layer_types) and self.layer_types[i] == "sliding_attention"

  def num_params(self) -> int:
    d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
    attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    per_layer += 2 * self.head_dim * self.qk_norm + 2 * d * self.post_norms
    head = 0 if self.tie_embeddings else self.vocab_size * d
    return l * per_layer + self.vocab_size * d + head + d


PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo size: ~100k parameters over a byte vocabulary (259 -> 384).
    "tiny": dict(vocab_size=384, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=192, rope_theta=10_000.0, max_seq_len=512),
    # The demo's weak-to-strong student: ~0.84M parameters, twice as deep, twice as wide.
    "small": dict(vocab_size=384, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                  intermediate_size=384, rope_theta=10_000.0, max_seq_len=512),
    "smollm2_135m": dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                         num_kv_heads=3, intermediate_size=1536, rope_theta=100_000.0,
                         norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192),
}


def preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"model.preset={name!r}: expected one of {sorted(PRESETS)}")
  return ModelConfig(**{**PRESETS[name], **overrides})
