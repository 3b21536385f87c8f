"""Typed results of the stages; report.json and the stage files hold their `to_dict()`.

A misspelt key fails where a result is built or read back (`from_dict` takes
exactly the fields below), not at report time. The dicts keep the keys the
files and report.json have always had.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class _Result:
  """`to_dict()` / `from_dict()` for a flat dataclass (None-valued `_OPTIONAL` fields drop)."""
  _OPTIONAL: tuple[str, ...] = ()

  def to_dict(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
    return {k: v for k, v in d.items() if not (k in self._OPTIONAL and v is None)}

  @classmethod
  def from_dict(cls, d: dict):
    return cls(**d)

  def __getitem__(self, key: str):      # read like the dicts they replace: res["greedy_acc"]
    return getattr(self, key)

  def get(self, key: str, default=None):
    return getattr(self, key, default)


@dataclasses.dataclass(frozen=True)
class EvalResult(_Result):
  """An evaluation (DIR/.../eval.json): greedy and self-consistency accuracy, calibration."""
  greedy_acc: float
  sc_acc: float
  num_questions: int
  sc_num_samples: int
  sc_temperature: float
  mean_vote_share: float
  greedy_parse_rate: float
  calibration: list
  extraction: dict | None
  examples: list
  wall_s: float = 0.0

  def with_wall_s(self, wall_s: float) -> "EvalResult":
    return dataclasses.replace(self, wall_s=wall_s)


@dataclasses.dataclass(frozen=True)
class DirectEvalResult(_Result):
  """Greedy accuracy with the direct prompt (DIR/.../direct_eval.json)."""
  prompt_format: str
  greedy_acc: float
  wall_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class VoteSummary(_Result):
  """A round's pool after voting (DIR/round_<r>/vote_summary.json)."""
  num_questions: int
  num_voted: int
  num_pseudo_labels: int
  mean_vote_share: float
  mean_distinct_answers: float
  mean_distinct_paths: float
  pseudo_label_precision: float | None
  pass_at_k: float | None
  maj_at_k: float | None
  pool_calibration: list | None
  num_records: int = 0
  sample_wall_s: float = 0.0
  vote_wall_s: float = 0.0
  sampled_tokens: int = 0                 # tokens the round sampled (its learner's budget)
  reward_accuracy: float | None = None    # vote_rl: vote rewards that equal gold rewards
  mean_reward: float | None = None        # vote_rl: mean vote reward of its paths


@dataclasses.dataclass(frozen=True)
class RoundResult(_Result):
  """One LMSI round as report.json's "rounds" lists it."""
  _OPTIONAL = ("selfgen", "guard", "reward_accuracy", "mean_reward")
  round: int
  greedy_acc: float
  sc_acc: float
  num_questions: int
  num_pseudo_labels: int
  num_records: int
  pseudo_label_precision: float | None
  mean_vote_share: float
  pass_at_k: float | None
  maj_at_k: float | None
  mean_distinct_answers: float
  mean_distinct_paths: float
  pool_calibration: list | None
  calibration: list
  extraction: dict | None
  train_truncated: int
  wall_s: float
  selfgen: dict | None = None
  guard: dict | None = None
  sampled_tokens: int = 0
  reward_accuracy: float | None = None
  mean_reward: float | None = None

  @classmethod
  def of(cls, r: int, summary: VoteSummary, ev: EvalResult, train_done: dict,
         selfgen: dict | None) -> "RoundResult":
    return cls(round=r, greedy_acc=ev.greedy_acc, sc_acc=ev.sc_acc,
               num_questions=summary.num_questions,
               num_pseudo_labels=summary.num_pseudo_labels, num_records=summary.num_records,
               pseudo_label_precision=summary.pseudo_label_precision,
               mean_vote_share=summary.mean_vote_share, pass_at_k=summary.pass_at_k,
               maj_at_k=summary.maj_at_k, mean_distinct_answers=summary.mean_distinct_answers,
               mean_distinct_paths=summary.mean_distinct_paths,
               pool_calibration=summary.pool_calibration, calibration=ev.calibration,
               extraction=ev.get("extraction"),
               train_truncated=train_done.get("num_truncated", 0), selfgen=selfgen or None,
               sampled_tokens=summary.sampled_tokens, reward_accuracy=summary.reward_accuracy,
               mean_reward=summary.mean_reward,
               wall_s=summary.sample_wall_s + summary.vote_wall_s + train_done["wall_s"]
                      + ev.wall_s + (selfgen or {}).get("wall_s", 0.0))


@dataclasses.dataclass(frozen=True)
class BaseResult:
  """Stage 0: the model the rounds start from, its training steps, its evaluation, and the
  context the later stages use (with the seed task and any self-generated exemplars)."""
  ctx: Any
  lm: Any
  steps: int
  eval: EvalResult


@dataclasses.dataclass(frozen=True)
class LmsiResult:
  """The rounds: report rows, the kept model and the stopping rules' report entries."""
  rounds: list[RoundResult]
  final_round: int
  final_lm: Any
  round_records: dict          # round -> pseudo-label records (the spurious arm matches them)
  early_stop: dict | None = None
  collapse_guard: dict | None = None

  def rows(self) -> list[dict]:
    return [r.to_dict() for r in self.rounds]
