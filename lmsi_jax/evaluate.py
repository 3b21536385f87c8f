"""Evaluation: greedy CoT accuracy, self-consistency accuracy, calibration.

Answers are read with the configured extractor (``task.extractor``,
lmsi_jax/extractors.py); every evaluation also records, under "extraction",
how many outputs it could not read and how often each other extractor reads
a greedy output differently (``compare_extractors``).

Gold answers are used here only to score; nothing in this module feeds
training data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lmsi_jax import extractors
from lmsi_jax import generation
from lmsi_jax import seeds
from lmsi_jax import voting


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  prompt_format: str
  num_samples: int = 32
  temperature: float = 1.2
  top_k: int = 40
  top_p: float = 1.0
  max_decode_steps: int = 256
  calibration_bins: int = 5
  batch_size: int = 256
  answer_type: str = "number"
  cue: str = "The answer is"
  stop: str = "\nQ:"
  fallback_last_number: bool = False
  extractor: str = extractors.DEFAULT

  def __post_init__(self):
    self.sampling()          # the sampling knobs are validated where they are set

  @classmethod
  def from_config(cls, cfg, temperature: float) -> "EvalSettings":
    """config.eval's settings at `temperature` (eval.temperature or eval.base_temperature)."""
    e, t = cfg.eval, cfg.task
    return cls(prompt_format=cfg.prompt_format, num_samples=e.num_samples,
               temperature=temperature, top_k=e.top_k, top_p=e.top_p,
               max_decode_steps=e.max_decode_steps, calibration_bins=e.calibration_bins,
               batch_size=cfg.sampling.batch_size, answer_type=t.answer_type, cue=t.cue,
               stop=t.stop, fallback_last_number=cfg.voting.fallback_last_number,
               extractor=t.extractor)

  def sampling(self) -> generation.SamplingSettings:
    """The self-consistency samples' settings (`.greedy()` for the greedy decode)."""
    return generation.SamplingSettings(
        num_samples=self.num_samples, temperature=self.temperature, top_k=self.top_k,
        top_p=self.top_p, max_decode_steps=self.max_decode_steps, stop_strings=(self.stop,),
        batch_size=self.batch_size)


def answers_of(texts: Sequence[str], s: EvalSettings,
               extractor: str | None = None) -> list[str | None]:
  """Normalised answers of `texts` under `extractor` (default: the settings' own)."""
  name = extractor or s.extractor
  return [extractors.extract(t, name, s.answer_type, s.cue, s.stop or None,
                             s.fallback_last_number) for t in texts]


def compare_extractors(texts: Sequence[str], answers: Sequence[str | None],
                       gold: Sequence[str], s: EvalSettings) -> dict:
  """How each other usable extractor reads the same outputs (one per question, e.g. greedy).

  `answers` are the chosen extractor's. Per other extractor: "acc" against
  `gold`, "unextracted" (no answer) and "disagree" (a different answer, an
  answer where the chosen one has none, or none where it has one). The
  fallback_last_number setting applies to "lmsi" only.
  """
  g = [voting.normalize_answer(x, s.answer_type) for x in gold]
  out = {}
  for name in extractors.usable(s.answer_type):
    if name == s.extractor:
      continue
    other = answers_of(texts, s, name)
    out[name] = {
        "acc": float(np.mean([a is not None and a == gi for a, gi in zip(other, g)]))
               if g else 0.0,
        "unextracted": sum(a is None for a in other),
        "disagree": sum(a != b for a, b in zip(other, answers)),
    }
  return out


def extraction_summary(greedy_texts: Sequence[str], greedy_answers: Sequence[str | None],
                       sc_answers: Sequence[Sequence[str | None]], gold: Sequence[str],
                       s: EvalSettings) -> dict:
  """The "extraction" entry of an evaluation (see the module docstring)."""
  return {
      "extractor": s.extractor,
      "greedy_unextracted": sum(a is None for a in greedy_answers),
      "greedy_paths": len(greedy_answers),
      "sc_unextracted": sum(a is None for row in sc_answers for a in row),
      "sc_paths": sum(len(row) for row in sc_answers),
      "greedy_others": compare_extractors(greedy_texts, greedy_answers, gold, s),
      "unavailable": [n for n in extractors.EXTRACTORS if not extractors.available(n)],
  }


def calibration(shares: Sequence[float], correct: Sequence[bool], bins: int) -> list[dict]:
  """Accuracy of the majority answer by vote-share bin (LMSI Fig. 2)."""
  shares, correct = np.asarray(shares, float), np.asarray(correct, bool)
  edges = np.linspace(0.0, 1.0, bins + 1)
  out = []
  for i in range(bins):
    lo, hi = edges[i], edges[i + 1]
    sel = (shares >= lo) & ((shares < hi) if i < bins - 1 else (shares <= hi))
    n = int(sel.sum())
    out.append({"lo": round(float(lo), 6), "hi": round(float(hi), 6), "count": n,
                "accuracy": float(correct[sel].mean()) if n else None})
  return out


def score_votes(votes: Sequence[voting.Vote], gold: Sequence[str], answer_type: str) -> np.ndarray:
  g = [voting.normalize_answer(x, answer_type) for x in gold]
  return np.array([v.answer is not None and v.answer == gi for v, gi in zip(votes, g)])


def greedy(sampler, questions: Sequence[dict], prompts: Sequence[str], s: EvalSettings, *,
           seed: int, progress=None):
  """Greedy decodes of `prompts` by `sampler` (a generation.Sampler):
  (samples [question][1], votes, correct bool array)."""
  out = sampler.generate(prompts, s.sampling().greedy(), seed=seed, progress=progress)
  votes = [voting.majority_vote(answers_of([x[0].text], s)) for x in out]
  return out, votes, score_votes(votes, [q["answer"] for q in questions], s.answer_type)


def evaluate(sampler, questions: Sequence[dict], prompts: Sequence[str], s: EvalSettings, *,
             seed: int, progress=None) -> dict:
  """Greedy and self-consistency accuracy of `sampler`'s model on `questions` (gold in
  "answer")."""
  gold = [q["answer"] for q in questions]
  greedy_out, g_votes, g_ok = greedy(sampler, questions, prompts, s, seed=seed,
                                     progress=progress)
  sc = sampler.generate(prompts, s.sampling(), seed=seeds.stream(seed, "self_consistency"),
                        progress=progress)
  sc_answers = [answers_of([x.text for x in row], s) for row in sc]
  votes = [voting.majority_vote(a) for a in sc_answers]
  ok = score_votes(votes, gold, s.answer_type)
  greedy_texts = [x[0].text for x in greedy_out]
  shares = [v.share for v in votes]
  return {
      "greedy_acc": float(g_ok.mean()),
      "sc_acc": float(ok.mean()),
      "num_questions": len(questions),
      "sc_num_samples": s.num_samples,
      "sc_temperature": s.temperature,
      "mean_vote_share": float(np.mean(shares)),
      "greedy_parse_rate": float(np.mean([v.answer is not None for v in g_votes])),
      "calibration": calibration(shares, ok, s.calibration_bins),
      "extraction": extraction_summary(greedy_texts, [v.answer for v in g_votes], sc_answers,
                                       gold, s),
      "examples": [{"id": q["id"], "question": q["question"], "gold": q["answer"],
                    "greedy": greedy_out[i][0].text, "sc_answer": votes[i].answer,
                    "sc_share": votes[i].share} for i, q in enumerate(questions[:5])],
  }
