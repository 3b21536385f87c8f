"""A collapse guard that uses no labels: stop the rounds when the model stops being consistent.

Self-training on majority votes can make a model more confident in its own
systematic errors, or simply wreck it: each round it trains on its own
answers, and nothing tells it they are wrong (measured on the demo: pseudo-label
precision 39% -> 26% over three rounds on one machine; 53% -> 34% with a
learning rate too high). The guard watches a small held-out *unlabeled* probe
set. After stage 0 and after every round it samples the probe with the round's
sampling settings and records label-free signals (`probe_signals`):

  mean_vote_share   share of the majority answer (confidence)
  answer_entropy    entropy (nats) of each question's answer distribution
                    (an unparsed sample counts as its own answer)
  distinct_paths    distinct sampled texts per question / samples
  parse_rate        samples that reached a parseable answer
  self_agreement    split-half consistency: how often the majority of the even
                    samples equals the majority of the odd ones (how much the
                    model's answers move when it is just sampled again)
  agreement         share of probe questions whose majority answer equals
                    the previous model's (stage 0's for round 1)

The rule (`decide`): round r is flagged when its answers moved more than the
previous model's own resampling explains: agreement_r < self_agreement_{r-1} -
max_drop. A round of real self-improvement keeps the answers its model was
sure of and fixes some of the rest (the right answers are a fixed point of
voting), so it agrees with its predecessor at least as often as two halves of
the predecessor's samples agree with each other (measured on the demo: 0.58-0.87
against 0.45-0.84). A round that rewrites its answers while growing more (or
less) certain is not consistent: its confidence is not evidence. A flagged
round stops the rounds; the kept model is the last unflagged one (stage 0 when
round 1 is flagged). Gold answers never enter a signal or a decision.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence

from lmsi_jax import voting

SIGNALS = ("mean_vote_share", "answer_entropy", "distinct_paths", "parse_rate", "self_agreement",
           "agreement")


@dataclasses.dataclass(frozen=True)
class GuardSettings:
  probe_n: int = 0              # probe questions held out of the pool (0 = guard off)
  max_drop: float = 0.05        # flag when agreement < previous self_agreement - max_drop

  def __post_init__(self):
    if self.probe_n < 0:
      raise ValueError(f"guard.probe_n={self.probe_n}: must be >= 0 (0 = off)")
    if not 0 <= self.max_drop <= 1:
      raise ValueError(f"guard.max_drop={self.max_drop}: must be in [0, 1]")

  @classmethod
  def from_config(cls, c) -> "GuardSettings":
    return cls(probe_n=c.probe_n, max_drop=c.max_drop)

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
  halves = [(voting.majority_vote(a[0::2]).answer, voting.majority_vote(a[1::2]).answer)
            for a in answers if len(a) > 1]
  out = {
      "mean_vote_share": sum(v.share for v in votes) / n,
      "answer_entropy": sum(_entropy(a) for a in answers) / n,
      "distinct_paths": sum(len({" ".join(t.split()) for t in ts}) / len(ts) for ts in texts) / n,
      "parse_rate": sum(sum(x is not None for x in a) / len(a) for a in answers) / n,
      "self_agreement": (sum(e is not None and e == o for e, o in halves) / len(halves)
                         if halves else None),
      "agreement": None,
  }
  if previous is not None:
    if len(previous) != n:
      raise ValueError(f"{len(previous)} previous majorities for {n} probe questions")
    out["agreement"] = sum(m is not None and m == p for m, p in zip(majorities, previous)) / n
  return {**out, "majorities": majorities}


def decide(history: Sequence[dict], s: GuardSettings) -> dict:
  """The rule applied to the latest entry of `history` (stage 0 first, then rounds).

  Returns {"flagged", "share_rise", "drop", "reason"}; stage 0 is never flagged, nor is
  a round whose predecessor had no split-half measure (one sample per question).
  """
  if len(history) < 2 or history[-2]["self_agreement"] is None:
    return {"flagged": False, "share_rise": None, "drop": None, "reason": "no previous model"}
  prev, cur = history[-2], history[-1]
  rise = cur["mean_vote_share"] - prev["mean_vote_share"]
  drop = prev["self_agreement"] - cur["agreement"]
  flagged = drop > s.max_drop
  if flagged:
    reason = (f"only {cur['agreement']:.3f} of the probe kept its previous majority answer, "
              f"{drop:.3f} below the previous model's split-half agreement "
              f"{prev['self_agreement']:.3f} (> max_drop {s.max_drop}); vote share {rise:+.3f}")
  else:
    reason = (f"agreement {cur['agreement']:.3f} vs previous split-half "
              f"{prev['self_agreement']:.3f} (drop {drop:+.3f} <= {s.max_drop})")
  return {"flagged": flagged, "share_rise": rise, "drop": drop, "reason": reason}


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
    return {"probe_n": self.settings.probe_n, "max_drop": self.settings.max_drop,
            "rounds": [{"round": r, **e} for r, e in enumerate(self.history)],
            "stopped_after_round": self.stopped_after, "kept_round": self.kept_round}
