"""One vote store, three learners: what a round learns from its majority votes.

A round's vote store is what its sampling stage wrote (DIR/round_<r>/samples:
question, sampled paths and their token counts and log-probs; votes.jsonl: the
vote). Each learner derives its own training signal from it; none re-samples
or re-votes behind it:

  sft       LMSI: the majority paths become pseudo-labels for fine-tuning
            (lmsi_jax/stages.py: sample_and_vote, mixture, train; unchanged).
  vote_rl   TTRL: on-policy GRPO whose reward is agreement with the majority of
            the current model's own samples (vote_rl.py; its store is its own
            per-batch rollouts, DIR/round_<r>/train/rollouts/).
  vote_dpo  ScPO: DPO on (most-voted, least-voted) path pairs weighted by the
            vote margin, against the round's starting model (vote_dpo.py).

`config.rounds.learner` picks one for a run (lmsi_jax/rounds.py);
`config.mode="learners"` runs `config.learners.compare` from one base model
(compare.py). The math is in objectives.py.
"""

from __future__ import annotations

LEARNERS = ("sft", "vote_rl", "vote_dpo")


def check_config(c) -> None:
  """The learners' own settings (one-line ValueErrors naming the key, without "config.")."""
  from lmsi_jax.learners import vote_rl  # pylint: disable=g-import-not-at-top
  vote_rl.RlSettings.from_config(c)
  d = c.vote_dpo
  if not d.beta > 0:
    raise ValueError(f"vote_dpo.beta={d.beta!r}: must be > 0")
  if not d.nll_coef >= 0:
    raise ValueError(f"vote_dpo.nll_coef={d.nll_coef!r}: must be >= 0")
  if not d.learning_rate >= 0:
    raise ValueError(f"vote_dpo.learning_rate={d.learning_rate!r}: must be >= 0")
