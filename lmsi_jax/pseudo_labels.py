"""From unlabeled questions to pseudo-labeled training records.

1. `sample_pool`: m paths per question at temperature T, written shard by
   shard (`shard_00000.jsonl`, ...) so a killed run resumes at the first
   missing shard. Sample j of question i always uses the same PRNG key.
2. `vote_pool`: majority vote per question, keep the majority paths (LMSI
   §3.1; options: min vote share, path cap, dedup, log-prob weights), and
   expand each kept path into the configured formats (LMSI Table 2).

Gold answers are carried along for diagnostics (precision, calibration)
and never used to select anything.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np

from lmsi_jax import distributed
from lmsi_jax import fileio
from lmsi_jax import formats as formats_lib
from lmsi_jax import generation
from lmsi_jax import voting
from lmsi_jax.data import jsonl


@dataclasses.dataclass(frozen=True)
class VoteSettings:
  answer_type: str = "number"
  cue: str = "The answer is"
  stop: str = "\nQ:"
  min_vote_share: float = 0.0
  max_paths: int = 0              # 0 = keep every majority path (the paper)
  dedup: bool = False
  weighted: bool = False          # weight votes by length-normalised path probability
  fallback_last_number: bool = False
  extractor: str = "lmsi"         # a lmsi_jax.extractors.EXTRACTORS name (task.extractor)

  @classmethod
  def from_config(cls, cfg) -> "VoteSettings":
    t, v = cfg.task, cfg.voting
    return cls(answer_type=t.answer_type, cue=t.cue, stop=t.stop,
               min_vote_share=v.min_vote_share, max_paths=v.max_paths, dedup=v.dedup,
               weighted=v.weighted, fallback_last_number=v.fallback_last_number,
               extractor=t.extractor)


def sample_pool(sampler, questions: Sequence[dict], prompts: Sequence[str], out_dir: str,
                settings: generation.SamplingSettings, *, seed: int, questions_per_shard: int,
                progress: Callable[[int], None] | None = None) -> list[dict]:
  """Samples every question with `sampler` (a generation.Sampler; resumable per shard).
  Returns one record per question."""
  num_samples = settings.num_samples
  records: list[dict] = []
  for start in range(0, len(questions), questions_per_shard):
    path = os.path.join(out_dir, f"shard_{start // questions_per_shard:05d}.jsonl")
    qs = questions[start:start + questions_per_shard]
    if distributed.agreed_exists(path):
      shard = jsonl.read_jsonl(path, required_keys=("id",))
      if [r["id"] for r in shard] != [q["id"] for q in qs]:
        raise ValueError(f"{path}: holds other questions than this config samples; "
                         "use a fresh --workdir for a different task or pool")
      records.extend(shard)
      if progress:
        progress(len(qs) * num_samples)
      continue
    out = sampler.generate(prompts[start:start + questions_per_shard], settings, seed=seed,
                           prompt_offset=start, progress=progress)
    shard = [{"id": q["id"], "question": q["question"],
              "samples": [{"text": s.text, "mean_logprob": round(s.mean_logprob, 6),
                           "num_tokens": len(s.tokens), "stop_reason": s.stop_reason}
                          for s in row]}
             for q, row in zip(qs, out)]
    if jax.process_index() == 0:
      jsonl.write_jsonl_atomic(path, shard)
    records.extend(shard)
  return records


def vote_record(rec: dict, s: VoteSettings):
  """One question's sample record -> (texts, vote, kept path indices, per-path answers)."""
  texts = [x["text"] for x in rec["samples"]]
  weights = None
  if s.weighted:
    weights = [float(np.exp(x["mean_logprob"])) for x in rec["samples"]]
  vote, kept, answers = voting.vote_question(
      texts, s.answer_type, s.cue, stop=s.stop or None,
      fallback_last_number=s.fallback_last_number, logprob_weights=weights,
      min_vote_share=s.min_vote_share, max_paths=s.max_paths or None, dedup=s.dedup,
      extractor=s.extractor)
  return texts, vote, kept, answers


def vote_pool(sample_records: Sequence[dict], questions: Sequence[dict], s: VoteSettings, *,
              exemplars: formats_lib.Exemplars | None, formats: Sequence[str], round_index: int,
              source_step: int) -> tuple[list[dict], list[dict]]:
  """Returns (pseudo-label records, per-question vote records)."""
  by_id = {q["id"]: q for q in questions}
  labels, votes = [], []
  for rec in sample_records:
    q = by_id[rec["id"]]
    texts, vote, kept, answers = vote_record(rec, s)
    gold = voting.normalize_answer(q.get("answer"), s.answer_type) if q.get("answer") else None
    votes.append({
        "id": q["id"], "answer": vote.answer, "count": vote.count, "share": vote.share,
        "total": vote.total, "kept": len(kept),
        "distinct_answers": len({a for a in answers if a is not None}),
        "distinct_paths": len({" ".join(t.split()) for t in texts}),
        "pass_at_k": None if gold is None else any(a == gold for a in answers),
        "correct": None if gold is None else vote.answer == gold,
    })
    labels += _path_records(q, texts, kept, vote.answer, vote, s.stop, exemplars, formats,
                            round_index, source_step)
  logging.info("voting: %d questions, %d with a majority answer, %d kept paths -> %d records",
               len(votes), sum(v["answer"] is not None for v in votes),
               sum(v["kept"] for v in votes), len(labels))
  return labels, votes


def _path_records(q: dict, texts: Sequence[str], paths: Sequence[int], answer: str,
                  vote: voting.Vote, stop: str, exemplars, formats: Sequence[str],
                  round_index: int, source_step: int) -> list[dict]:
  """One training record per path index × format (`answer` is the label they reach)."""
  out = []
  for k in paths:
    for ex in formats_lib.make_examples(q["question"], voting.truncate_at_stop(texts[k], stop),
                                        answer, exemplars, formats):
      out.append({**ex, "id": q["id"], "path_index": k, "answer": answer,
                  "vote_share": vote.share, "vote_count": vote.count,
                  "round": round_index, "source_step": source_step})
  return out


def spurious_pool(sample_records: Sequence[dict], s: VoteSettings, *, seed: int,
                  exemplars: formats_lib.Exemplars | None, formats: Sequence[str],
                  round_index: int, source_step: int) -> list[dict]:
  """The spurious-label arm's records from the same samples `vote_pool` votes over.

  Each question keeps as many paths as LMSI keeps, but those reaching a random
  non-majority answer (`voting.select_spurious`; the majority only when no
  other answer was sampled). The answer is drawn with a generator seeded by
  (seed, round, question position): deterministic, and gold is never read
  (sample records carry no gold). `vote_share`/`vote_count` stay the
  majority's (what LMSI saw).
  """
  labels = []
  for i, rec in enumerate(sample_records):
    texts, vote, kept, answers = vote_record(rec, s)
    rng = np.random.default_rng(np.random.SeedSequence([seed, round_index, i]))
    answer, paths = voting.select_spurious(answers, vote, kept, rng)
    labels += _path_records(rec, texts, paths, answer, vote, s.stop, exemplars, formats,
                            round_index, source_step)
  return labels


def read_samples(out_dir: str) -> list[dict]:
  """Every sample record `sample_pool` wrote under `out_dir`, in shard order."""
  shards = sorted(f for f in fileio.listdir(out_dir) if f.startswith("shard_") and f.endswith(".jsonl"))
  if not shards:
    raise FileNotFoundError(f"{out_dir}: no sample shards")
  return [r for f in shards for r in jsonl.read_jsonl(os.path.join(out_dir, f), required_keys=("id",))]


def gold_records(questions: Sequence[dict], *, exemplars, formats: Sequence[str],
                 round_index: int) -> list[dict]:
  """Training records from gold chains of thought (the seed data and the oracle arm)."""
  out = []
  for q in questions:
    if not q.get("cot"):
      raise ValueError(f"question {q['id']} has no gold chain of thought")
    for ex in formats_lib.make_examples(q["question"], q["cot"], q["answer"], exemplars, formats):
      out.append({**ex, "id": q["id"], "answer": q["answer"], "round": round_index})
  return out


def summarize_votes(votes: Sequence[dict], bins: int) -> dict:
  """Pool diagnostics: precision of pseudo-labels vs hidden gold, shares, exploration."""
  from lmsi_jax import evaluate  # pylint: disable=g-import-not-at-top
  answered = [v for v in votes if v["answer"] is not None]
  scored = [v for v in answered if v["correct"] is not None]
  out = {
      "num_questions": len(votes),
      "num_voted": len(answered),
      "num_pseudo_labels": int(sum(v["kept"] for v in votes)),
      "mean_vote_share": float(np.mean([v["share"] for v in votes])) if votes else 0.0,
      "mean_distinct_answers": float(np.mean([v["distinct_answers"] for v in votes])) if votes else 0.0,
      "mean_distinct_paths": float(np.mean([v["distinct_paths"] for v in votes])) if votes else 0.0,
      "pseudo_label_precision": None, "pass_at_k": None, "maj_at_k": None,
      "pool_calibration": None,
  }
  if scored:
    out["pseudo_label_precision"] = float(np.mean([v["correct"] for v in scored]))
    out["maj_at_k"] = float(np.mean([bool(v["correct"]) for v in votes if v["correct"] is not None]))
    out["pass_at_k"] = float(np.mean([v["pass_at_k"] for v in votes if v["pass_at_k"] is not None]))
    out["pool_calibration"] = evaluate.calibration(
        [v["share"] for v in scored], [v["correct"] for v in scored], bins)
  return out
