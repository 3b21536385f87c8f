"""Stopping the rounds when held-out greedy accuracy stops improving.

`rounds.early_stop_patience = k` (0 = off) ends the LMSI loop after the round
that makes k rounds in a row without a strictly higher greedy CoT accuracy
than the best so far (the base model counts as round 0). The reference arms
then train as many rounds as LMSI did. This is a model-selection decision made
on the evaluation set's labels, so with it on the eval set plays the role of
a validation set; training data still never sees a gold label.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class EarlyStop:
  patience: int                 # 0 = never stop early
  best_acc: float               # the base model's greedy accuracy
  best_round: int = 0
  since_best: int = 0
  stopped_after: int | None = None

  def update(self, r: int, greedy_acc: float) -> bool:
    """Records round r's accuracy; True when the loop should stop after it."""
    if greedy_acc > self.best_acc:
      self.best_acc, self.best_round, self.since_best = greedy_acc, r, 0
    else:
      self.since_best += 1
    if self.patience and self.since_best >= self.patience:
      self.stopped_after = r
      return True
    return False

  def report(self) -> dict | None:
    """report.json's "early_stop" entry (None when early stopping is off)."""
    if not self.patience:
      return None
    if self.stopped_after is None:
      reason = "ran every configured round"
    else:
      reason = (f"greedy accuracy did not improve on {self.best_acc:.4f} (round "
                f"{self.best_round}) for {self.patience} round(s)")
    return {"patience": self.patience, "stopped_after_round": self.stopped_after,
            "best_round": self.best_round, "best_greedy_acc": self.best_acc, "reason": reason}
