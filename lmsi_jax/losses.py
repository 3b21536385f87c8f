"""Training losses beyond plain cross-entropy (each a `train.LossFn`).

`ConfidenceLoss` is the auxiliary confidence loss of weak-to-strong training
(Burns et al. 2023; notes: lmsi-method.md §6.2), written for a generative LM.
For every target token (loss_weights > 0: the answer side of each example,
the whole chain of thought and its final answer sentence, never the prompt)
with label y (the teacher's token) and student distribution p:

  loss = (1 - a) * CE(p, y) + a * CE(p, h)   where max(p) >= threshold
  loss = CE(p, y)                             elsewhere

  h = argmax(p), the student's own hardened prediction (no gradient flows
      through h or through the confidence test)
  a = alpha_max * min(1, step / (warmup_frac * num_steps))   (the smooth ramp;
      warmup_frac = 0 gives alpha_max from step 0)

Where h == y the two terms coincide, so the auxiliary term acts only on
tokens where a confident student disagrees with its teacher. The threshold is
fixed (Burns et al. pick one per batch to match the weak labels' class
balance; a next-token vocabulary has no such balance). With alpha_max = 0 the
loss is exactly `train.cross_entropy_loss`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from lmsi_jax import train as train_lib


@dataclasses.dataclass(frozen=True)
class ConfidenceLoss:
  """A hashable LossFn (equal settings share one compiled train step)."""
  alpha_max: float = 0.5
  warmup_frac: float = 0.2
  threshold: float = 0.0

  def __post_init__(self):
    for key in ("alpha_max", "warmup_frac", "threshold"):
      v = getattr(self, key)
      if not 0 <= v <= 1:
        raise ValueError(f"w2s.conf_{key}={v!r}: must be in [0, 1]")

  def alpha(self, step, num_steps: int):
    """The weight of the hardened-prediction term at optimizer step `step` (0-based)."""
    warm = self.warmup_frac * num_steps
    ramp = 1.0 if warm <= 0 else jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warm)
    return self.alpha_max * ramp

  def __call__(self, logits, batch, ctx: train_lib.LossContext):
    logits = logits.astype(jnp.float32)
    labels = batch["targets"]
    w = batch["loss_weights"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    probs = jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))
    hard = jnp.argmax(probs, axis=-1)
    confident = (jnp.max(probs, axis=-1) >= self.threshold).astype(jnp.float32)
    ce_hard = optax.softmax_cross_entropy_with_integer_labels(logits, hard)
    alpha = self.alpha(ctx.step, ctx.num_steps)
    a = alpha * confident
    loss = (1.0 - a) * ce + a * ce_hard
    wsum = jnp.sum(w)
    frac = lambda m: jnp.sum(m * w) / jnp.maximum(wsum, 1.0)
    aux = {"conf_alpha": alpha * jnp.ones((), jnp.float32),
           "conf_confident_frac": frac(confident),
           "conf_disagree_frac": frac(confident * (hard != labels).astype(jnp.float32))}
    return jnp.sum(loss * w), wsum, aux


LOSSES = ("xent", "confidence")


def make_loss(name: str, *, alpha_max: float = 0.5, warmup_frac: float = 0.2,
              threshold: float = 0.0) -> train_lib.LossFn:
  """"xent" (plain target-token cross-entropy) or "confidence" (above)."""
  if name == "xent":
    return train_lib.cross_entropy_loss
  if name == "confidence":
    return ConfidenceLoss(alpha_max, warmup_frac, threshold)
  raise ValueError(f"w2s.losses: unknown loss {name!r} (expected one of {LOSSES})")
