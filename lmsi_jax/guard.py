"""A collapse guard that uses no labels: stop the rounds when the model grows sure, not right.

Self-training on majority votes can make a model more confident in its own
systematic errors: each round's vote share rises while its answers drift
(measured on the demo: pseudo-label precision 39% -> 26% over three rounds
while the model grew more certain). The guard watches a small held-out
*unlabeled* probe set. After stage 0 and after every round it samples the
probe with the round's sampling settings and records label-free signals
(`probe_signals`):

  mean_vote_share   share of the majority answer (confidence)
  answer_entropy    entropy (nats) of each question's answer distribution
                    (an unparsed sample counts as its own answer)
  distinct_paths    distinct sampled texts per question / samples
  parse_rate        samples that reached a parseable answer
  agreement         share of probe questions whose majority answer equals
                    the previous model's (stage 0's for round 1)

The rule (`decide`): round r is flagged when it grew more confident
(mean_vote_share rose by at least `min_share_rise` over the previous model)
while its answers were not kept: agreement fell below
`mean_vote_share - max_gap`. An improving model keeps most of its previous
majority answers (the right ones are a fixed point of voting); a collapsing
one rewrites them while growing more certain. A flagged round stops the
rounds; the kept model is the last unflagged one (stage 0 when round 1 is
flagged). Gold answers never enter a signal or a decision.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence

from lmsi_jax import voting

SIGNALS = ("mean_vote_share", "answer_entropy", "distinct_paths", "parse_rate", "agreement")


@dataclasses.dataclass(frozen=True)
class GuardSettings:
  probe_n: int = 0              # probe questions held out of the pool (0 = guard off)
  min_share_rise: float = 0.0   # "more confident": the vote share rose by at least this
  max_gap: float = 0.25         # "not consistent": agreement < mean_vote_share - max_gap

  def __post_init__(self):
    if self.probe_n < 0:
      raise ValueError(f"guard.probe_n={self.probe_n}: must be >= 0 (0 = off)")
    if not 0 <= self.max_gap <= 1:
      raise ValueError(f"guard.max_gap={self.max_gap}: must be in [0, 1]")
    if not -1 <= self.min_share_rise <= 1:
      raise ValueError(f"guard.min_share_rise={self.min_share_rise}: must be in [-1, 1]")

  @classmethod
  def from_config(cls, c) -> "GuardSettings":
    return cls(probe_n=c.probe_n, min_share_rise=c.min_share_rise, max_gap=c.max_gap)

  @property
  def enabled(self) -> bool:
    return self.probe_n > 0


def _entropy(answers: Sequence[str | None]) -> float:
  n = len(answers)
  return -sum(c / n * math.log(c / n) for c in Counter(answers).values()) if n else 0.0


def probe_signals(answers: Sequence[Sequence[str | None]], texts: Sequence[Sequence[str]],
                  previous: Sequence[str | None] | None) -> dict:
  """Label-free signals of one model on the probe (per question: its samples' answers, texts).

  `previous` is the previous model's majority answer per question (None for
  stage 0). Returns the `SIGNALS` (agreement None without `previous`) and the
  per-question `majorities` the next round compares with.
  """
  if not answers:
    raise ValueError("the probe set is empty")
  votes = [voting.majority_vote(a) for a in answers]
  majorities = [v.answer for v in votes]
  n = len(answers)
  out = {
      "mean_vote_share": sum(v.share for v in votes) / n,
      "answer_entropy": sum(_entropy(a) for a in answers) / n,
      "distinct_paths": sum(len({" ".join(t.split()) for t in ts}) / len(ts) for ts in texts) / n,
      "parse_rate": sum(sum(x is not None for x in a) / len(a) for a in answers) / n,
      "agreement": None,
  }
  if previous is not None:
    if len(previous) != n:
      raise ValueError(f"{len(previous)} previous majorities for {n} probe questions")
    out["agreement"] = sum(m is not None and m == p for m, p in zip(majorities, previous)) / n
  return {**out, "majorities": majorities}


def decide(history: Sequence[dict], s: GuardSettings) -> dict:
  """The rule applied to the latest entry of `history` (stage 0 first, then rounds).

  Returns {"flagged", "share_rise", "gap", "reason"}; stage 0 is never flagged.
  """
  if len(history) < 2:
    return {"flagged": False, "share_rise": None, "gap": None, "reason": "stage 0"}
  prev, cur = history[-2], history[-1]
  rise = cur["mean_vote_share"] - prev["mean_vote_share"]
  gap = cur["mean_vote_share"] - cur["agreement"]
  flagged = rise >= s.min_share_rise and gap > s.max_gap
  if flagged:
    reason = (f"vote share rose {rise:+.3f} to {cur['mean_vote_share']:.3f} while only "
              f"{cur['agreement']:.3f} of the probe kept its previous majority answer "
              f"(gap {gap:.3f} > max_gap {s.max_gap})")
  else:
    reason = f"share rise {rise:+.3f}, gap {gap:.3f} <= max_gap {s.max_gap}" if gap <= s.max_gap \
        else f"gap {gap:.3f} > max_gap but share rise {rise:+.3f} < {s.min_share_rise}"
  return {"flagged": flagged, "share_rise": rise, "gap": gap, "reason": reason}


@dataclasses.dataclass
class CollapseGuard:
  """The guard's state over one run: signals per model, decisions, the kept round."""
  settings: GuardSettings
  history: list = dataclasses.field(default_factory=list)   # stage 0, round 1, ...
  stopped_after: int | None = None

  def update(self, signals: dict) -> bool:
    """Records the next model's signals (stage 0 first); True when the rounds should stop."""
    entry = {k: signals[k] for k in SIGNALS}
    entry.update(decide(self.history + [entry], self.settings))
    self.history.append(entry)
    if entry["flagged"] and self.stopped_after is None:
      self.stopped_after = len(self.history) - 1
      return True
    return False

  @property
  def kept_round(self) -> int:
    """The last round before the first flagged one (0 = stage 0)."""
    n = len(self.history) - 1
    return n if self.stopped_after is None else self.stopped_after - 1

  def report(self) -> dict:
    """report.json's "collapse_guard" entry."""
    return {"probe_n": self.settings.probe_n, "min_share_rise": self.settings.min_share_rise,
            "max_gap": self.settings.max_gap,
            "rounds": [{"round": r, **e} for r, e in enumerate(self.history)],
            "stopped_after_round": self.stopped_after, "kept_round": self.kept_round}
