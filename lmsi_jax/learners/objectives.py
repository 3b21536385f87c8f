"""The learners' math: vote rewards, group advantages, the clipped PG and DPO losses.

Pure functions (numpy on the host, jnp inside the jitted step), tested against
hand computations in tests/test_learners.py.

- `vote_rewards(answers)`: TTRL's reward. The majority of the m answers is the
  label; a path earns 1 if its answer equals it, else 0 (unparsed answers: 0;
  no parsed answer at all: every path 0). It sees the sampled answers only:
  there is no gold argument to read.
- `group_advantages(rewards)`: GRPO. Per question, reward minus the group's
  mean, divided by the group's std (unbiased, as TRL and verl compute it) plus
  `eps`; `std_normalize=False` is Dr. GRPO (mean-centred only).
- `ClippedPolicyGradient`: PPO's clipped surrogate per target token,
  -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) with ratio =
  exp(logp - old_logp) (old_logp: the sampler's own log-probs), plus
  `kl_coef` * k3 KL to the frozen base (exp(d) - d - 1, d = ref_logp - logp).
  Summed over the batch's completion tokens; the train step divides by their
  count (token-mean aggregation). With one update per batch the ratio is 1 and
  the gradient is REINFORCE with the group-mean baseline: -A * grad logp.
- `DirectPreference`: ScPO's loss over (chosen, rejected) rows 2i, 2i+1 of a
  batch: -w_i * log sigmoid(beta * ((c - c_ref) - (r - r_ref)))
  - nll_coef * w_i * c / |c|, the log-probs summed over each completion, w_i
  the pair's weight (ScPO: the vote margin), |c| the chosen completion's token
  count. The second term is ScPO's (and IRPO's) length-normalised NLL of the
  chosen path; nll_coef=0 is plain (weighted) DPO.
- `select_pair(answers, vote)`: ScPO's pair: the first path reaching the
  most-voted answer and the first reaching the least-voted one (ties: the
  lexicographically largest answer, the mirror of the vote's own tie rule),
  weighted by (count(most) - count(least)) / m; none when that margin is 0.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = float(jnp.finfo(jnp.float32).min)


# ------------------------------------------------------------------ host side
def vote_rewards(answers: Sequence[str | None]) -> tuple[str | None, list[float]]:
  """(majority answer, per-path 0/1 rewards) from one question's sampled answers."""
  from lmsi_jax import voting  # pylint: disable=g-import-not-at-top
  vote = voting.majority_vote(list(answers))
  return vote.answer, [float(a is not None and a == vote.answer) for a in answers]


def group_advantages(rewards, *, std_normalize: bool = True, eps: float = 1e-6) -> np.ndarray:
  """rewards [questions, m] -> advantages [questions, m] (see the module docstring)."""
  r = np.asarray(rewards, np.float64)
  adv = r - r.mean(axis=1, keepdims=True)
  if std_normalize:
    std = r.std(axis=1, ddof=1, keepdims=True) if r.shape[1] > 1 else np.zeros_like(r[:, :1])
    adv = adv / (std + eps)
  return adv.astype(np.float32)


def select_pair(answers: Sequence[str | None]) -> tuple[int, int, float] | None:
  """(chosen path, rejected path, weight), or None when the vote prefers nothing (fewer
  than two distinct parsed answers, or the most- and least-voted tie)."""
  counts = Counter(a for a in answers if a is not None)
  if len(counts) < 2:
    return None
  most = min(counts, key=lambda a: (-counts[a], a))       # = voting.majority_vote's winner
  least = min(counts, key=lambda a: (counts[a], _desc(a)))
  if counts[most] == counts[least]:
    return None
  chosen = next(i for i, a in enumerate(answers) if a == most)
  rejected = next(i for i, a in enumerate(answers) if a == least)
  return chosen, rejected, (counts[most] - counts[least]) / len(answers)


def _desc(a: str):
  """A key that sorts strings in descending order."""
  return tuple(-ord(ch) for ch in a) + (1,)


# ---------------------------------------------------------------- device side
def token_logprobs(logits, targets, vocab_limit: int | None = None):
  """log p(target) per position, f32, over the first `vocab_limit` logits (the sampler's
  masking: padded vocabulary rows never count)."""
  logits = logits.astype(jnp.float32)
  if vocab_limit is not None and vocab_limit < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, NEG_INF)
  lse = jax.nn.logsumexp(logits, -1)
  return jnp.take_along_axis(logits, targets[..., None], -1)[..., 0] - lse


@dataclasses.dataclass(frozen=True)
class ClippedPolicyGradient:
  """A hashable train.LossFn. Batch: targets, loss_weights (completion tokens),
  old_logprobs [B,T], advantages [B] (and ref_logprobs [B,T] when kl_coef > 0)."""
  clip_eps: float = 0.2
  kl_coef: float = 0.0
  vocab_limit: int | None = None

  def __call__(self, logits, batch, ctx=None):
    del ctx
    lp = token_logprobs(logits, batch["targets"], self.vocab_limit)
    w = batch["loss_weights"].astype(jnp.float32)
    adv = batch["advantages"].astype(jnp.float32)[:, None]
    ratio = jnp.exp(lp - batch["old_logprobs"])
    clipped = jnp.clip(ratio, 1.0 - self.clip_eps, 1.0 + self.clip_eps)
    per_tok = -jnp.minimum(ratio * adv, clipped * adv)
    aux = {}
    if self.kl_coef:
      d = batch["ref_logprobs"] - lp
      kl = jnp.exp(d) - d - 1.0
      per_tok = per_tok + self.kl_coef * kl
      aux["kl"] = jnp.sum(kl * w) / jnp.maximum(jnp.sum(w), 1.0)
    wsum = jnp.sum(w)
    aux["ratio_mean"] = jnp.sum(ratio * w) / jnp.maximum(wsum, 1.0)
    aux["clip_frac"] = jnp.sum((jnp.abs(ratio - 1.0) > self.clip_eps) * w) / jnp.maximum(wsum, 1.0)
    return jnp.sum(per_tok * w), wsum, aux


@dataclasses.dataclass(frozen=True)
class DirectPreference:
  """A hashable train.LossFn. Batch rows 2i (chosen) and 2i+1 (rejected): targets,
  loss_weights (completion tokens), ref_logprob [B] (the frozen reference's summed
  completion log-prob), pair_weight [B] (a pair's weight on both its rows; 0 = padding)."""
  beta: float = 0.1
  nll_coef: float = 0.0
  vocab_limit: int | None = None

  def __call__(self, logits, batch, ctx=None):
    del ctx
    lp = token_logprobs(logits, batch["targets"], self.vocab_limit)
    tw = batch["loss_weights"].astype(jnp.float32)
    seq = jnp.sum(lp * tw, -1)                                              # [B]
    rel = (seq - batch["ref_logprob"]).reshape(-1, 2)                       # [pairs, 2]
    margin = self.beta * (rel[:, 0] - rel[:, 1])
    w = batch["pair_weight"].astype(jnp.float32).reshape(-1, 2)[:, 0]
    chosen_nll = -seq.reshape(-1, 2)[:, 0] / jnp.maximum(jnp.sum(tw, -1).reshape(-1, 2)[:, 0], 1.0)
    loss = -jax.nn.log_sigmoid(margin) + self.nll_coef * chosen_nll
    real = (w > 0).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(real), 1.0)
    aux = {"dpo_accuracy": jnp.sum((margin > 0) * real) / n,
           "dpo_margin": jnp.sum(margin * real) / n,
           "chosen_nll": jnp.sum(chosen_nll * real) / n}
    return jnp.sum(w * loss), jnp.sum(real), aux
