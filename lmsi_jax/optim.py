"""Optimisation settings and the optimizer: TrainConfig, learning-rate schedule, AdamW/Adafactor."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lmsi_jax import checkpoint as ckpt_lib
from lmsi_jax import model as model_lib


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation settings. Defaults follow LMSI (10k steps, lr 5e-5, batch 32)."""
  optimizer: str = "adamw"          # adamw | adafactor (adafactor ignores b1/b2/eps)
  learning_rate: float = 5e-5       # peak
  schedule: str = "cosine"          # cosine | constant (both after linear warmup)
  warmup_steps: int = 100
  num_steps: int = 10_000
  batch_size: int = 32              # global, in packed sequences
  seq_len: int = 512
  grad_accum: int = 1               # micro-batches per optimizer step
  clip_norm: float = 1.0            # global-norm clipping; 0 = off
  weight_decay: float = 0.0
  decay_embeddings: bool = False
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  end_lr_ratio: float = 0.1         # cosine floor, as a fraction of the peak
  log_every: int = 50
  checkpoint_every: int = 1000
  max_to_keep: int = 2
  remat: str = "none"               # per-block rematerialisation: none | full | dots (model.py)
  seed: int = 0

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      want = {"int": int, "float": (int, float), "bool": bool, "str": str}[f.type]
      if not isinstance(v, want) or (f.type != "bool" and isinstance(v, bool)):
        raise ValueError(f"train.{f.name}={v!r}: expected {f.type}")

    positive = ("num_steps", "batch_size", "grad_accum", "log_every", "checkpoint_every",
                "max_to_keep")
    for key, ok, what in (
        ("optimizer", self.optimizer in ("adamw", "adafactor"), "expected 'adamw' or 'adafactor'"),
        ("schedule", self.schedule in ("cosine", "constant"), "expected 'cosine' or 'constant'"),
        ("remat", self.remat in model_lib.REMAT_POLICIES,
         f"expected one of {list(model_lib.REMAT_POLICIES)}"),
        ("learning_rate", 0 <= self.learning_rate < math.inf, "must be finite and >= 0"),
        *((k, getattr(self, k) > 0, "must be > 0") for k in positive),
        ("seq_len", self.seq_len >= 2, "must be >= 2"),
        ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
        ("batch_size", self.grad_accum > 0 and self.batch_size % self.grad_accum == 0,
         f"must be divisible by train.grad_accum={self.grad_accum}"),
        ("clip_norm", self.clip_norm >= 0, "must be >= 0 (0 = off)"),
        ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
        ("b1", 0 <= self.b1 < 1, "must be in [0, 1)"),
        ("b2", 0 <= self.b2 < 1, "must be in [0, 1)"),
        ("eps", self.eps > 0, "must be > 0"),
        ("end_lr_ratio", 0 <= self.end_lr_ratio <= 1, "must be in [0, 1]")):
      if not ok:
        raise ValueError(f"train.{key}={getattr(self, key)!r}: {what}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
    """From a mapping (or ConfigDict); an unknown key is an error."""
    d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
      if k not in names:
        raise ValueError(f"train.{k}: unknown key (expected one of {sorted(names)})")
    return cls(**d)


def learning_rate_schedule(tcfg: TrainConfig) -> optax.Schedule:
  """Linear warmup to the peak over `warmup_steps` (step 0 already > 0), then cosine/constant."""
  peak, warm = tcfg.learning_rate, tcfg.warmup_steps
  floor, decay = peak * tcfg.end_lr_ratio, max(tcfg.num_steps - warm, 1)

  def schedule(count):
    s = jnp.asarray(count, jnp.float32)
    warmup = peak * jnp.minimum(1.0, (s + 1.0) / max(warm, 1))
    if tcfg.schedule == "constant":
      return warmup
    frac = jnp.clip((s - warm) / decay, 0.0, 1.0)
    cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(s < warm, warmup, cosine)
  return schedule


def decay_mask(tcfg: TrainConfig) -> Callable[[Any], Any]:
  """params -> bool tree: no decay on norms/biases (ndim < 2 per layer, or name has
  norm/bias); embeddings (`embed`, `lm_head`) only if `decay_embeddings`."""
  def leaf(path, x) -> bool:
    parts = [ckpt_lib.key_str(k) for k in path]
    per_layer_ndim = x.ndim - (parts[:1] == ["layers"])       # stacked layers' leading axis
    if per_layer_ndim < 2 or any("norm" in p or "bias" in p for p in parts):
      return False
    return tcfg.decay_embeddings or not {"embed", "lm_head"} & set(parts)
  return lambda params: jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
  """Clipping + AdamW/Adafactor on the warmup+cosine/constant schedule, masked decay."""
  sched, mask = learning_rate_schedule(tcfg), decay_mask(tcfg)
  if tcfg.optimizer == "adamw":
    opt = optax.adamw(sched, b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps,
                      weight_decay=tcfg.weight_decay, mask=mask)
  else:
    opt = optax.adafactor(sched, multiply_by_parameter_scale=False, clipping_threshold=None,
                          weight_decay_rate=tcfg.weight_decay or None, weight_decay_mask=mask)
  return optax.chain(optax.clip_by_global_norm(tcfg.clip_norm), opt) if tcfg.clip_norm else opt


def train_config(cfg, base: bool = False) -> TrainConfig:
  """The rounds' (or, with `base`, stage 0's) TrainConfig; a bad value names its own key."""
  d = dict(cfg.train)
  d.pop("data_shards")            # an input-pipeline setting (see Pipeline.train)
  d.pop("lora", None)             # lora.LoraConfig (lmsi_jax/lora.py)
  if base:
    b = cfg.base_train
    d.update(num_steps=b.num_steps, learning_rate=b.learning_rate, warmup_steps=b.warmup_steps,
             schedule=b.schedule, batch_size=b.batch_size, weight_decay=b.weight_decay,
             checkpoint_every=b.checkpoint_every or d["checkpoint_every"])
  d["seed"] = cfg.seed
  try:
    return TrainConfig.from_dict(d)
  except ValueError as e:
    msg = str(e)
    key = msg.split("=", 1)[0].split(":", 1)[0]
    if base and key.startswith("train.") and key[6:] in (
        "num_steps", "learning_rate", "warmup_steps", "schedule", "batch_size", "weight_decay",
        "checkpoint_every"):
      if key[6:] != "checkpoint_every" or cfg.base_train.checkpoint_every:
        msg = "base_train." + msg[6:]
    raise ValueError(f"config.{msg}") from None
