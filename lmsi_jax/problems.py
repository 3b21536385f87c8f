"""The question sets a run works on: seed (labeled), pool (unlabeled), eval.

`load_problem(cfg)` returns a `Problem` for the configured task. Records use
one schema: {"id", "question", "answer" (gold, hidden: diagnostics and the
oracle only), "cot" (a gold chain of thought or None)}, plus "source"
("path:line") for records read from files. `fit_context` then drops or
rejects the pool/eval questions whose prompt and decode budget do not fit the
model's context.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from lmsi_jax import formats as formats_lib
from lmsi_jax.data import gsm8k
from lmsi_jax.data import synthetic
from lmsi_jax.data import vocab as vocab_lib

PROMPTS_DIR = os.path.join(os.path.dirname(__file__), "prompts")


@dataclasses.dataclass(frozen=True)
class Problem:
  name: str
  seed: list[dict]          # labeled (gold CoT): stage 0 and seed-data mixing
  pool: list[dict]          # unlabeled questions LMSI samples on
  eval: list[dict]          # held-out questions, gold hidden from training
  exemplars: formats_lib.Exemplars | None
  answer_type: str = "number"
  cue: str = "The answer is"
  # Per split, records dropped under data.on_error="skip": {"pool": {"bad_records": n,
  # "too_long": m}, "eval": {...}} (report.json "skipped").
  skipped: dict = dataclasses.field(default_factory=dict)
  # Unlabeled questions held out of the pool for the collapse guard (lmsi_jax/guard.py).
  probe: list[dict] = dataclasses.field(default_factory=list)


def _limit(records, n):
  return records[:n] if n else records


def load_problem(cfg) -> Problem:
  """Builds the configured task's splits (deterministic given cfg.seed)."""
  if cfg.task.name == "synthetic":
    s = cfg.synthetic
    splits = synthetic.build_splits(
        seed=cfg.seed, seed_easy_n=s.seed_easy_n, seed_easy_terms=tuple(s.seed_easy_terms),
        seed_hard_n=s.seed_hard_n, hard_terms=s.hard_terms, pool_n=s.pool_n, eval_n=s.eval_n,
        seed_hard_repeat=s.seed_hard_repeat)
    exemplars = None
    if s.num_exemplars:
      # Exemplars come from the labeled seed data (easy sums), never from pool/eval.
      pairs = [(r["question"], r["cot"], r["answer"]) for r in splits["seed"][:s.num_exemplars]]
      exemplars = formats_lib.exemplars_from_pairs(pairs)
    return Problem("synthetic", splits["seed"], splits["pool"], splits["eval"], exemplars,
                   cfg.task.answer_type, cfg.task.cue)
  if cfg.task.name == "gsm8k":
    d = cfg.data
    if d.source == "jsonl":
      load = lambda split, st: gsm8k.load_split(d.dir, split, on_error=d.on_error, stats=st)
    else:
      load = lambda split, st: gsm8k.load_tfds(split, on_error=d.on_error, stats=st)
    stats = {"pool": {}, "eval": {}}
    pool = _limit(load(d.pool_split, stats["pool"]), d.pool_limit)
    evals = _limit(load(d.eval_split, stats["eval"]), d.eval_limit)
    exemplars = formats_lib.load_exemplars(
        d.cot_exemplars or os.path.join(PROMPTS_DIR, "gsm8k_cot_8shot.txt"),
        d.standard_exemplars or os.path.join(PROMPTS_DIR, "gsm8k_standard_8shot.txt"))
    return Problem("gsm8k", [], pool, evals, exemplars, cfg.task.answer_type, cfg.task.cue,
                   {k: {"bad_records": v.get("skipped", 0)} for k, v in stats.items()})
  raise ValueError(f"config.task.name={cfg.task.name!r}: expected 'synthetic' or 'gsm8k'")


def hold_out_probe(problem: Problem, n: int) -> Problem:
  """Moves the pool's last `n` questions to `probe` (never sampled for training labels)."""
  if n <= 0 or not problem.pool:      # an empty pool is reported as such by the pipeline
    return problem
  if n >= len(problem.pool):
    raise ValueError(f"config.guard.probe_n={n}: the pool has only {len(problem.pool)} "
                     "questions; the probe must leave some to train on")
  return dataclasses.replace(problem, pool=problem.pool[:-n], probe=problem.pool[-n:])


def prompt_for(problem: Problem, question: str, prompt_format: str) -> str:
  """The text the model continues when sampling / evaluating a question."""
  return formats_lib.build_input(prompt_format, question, problem.exemplars)


def prompt_tokens(problem: Problem, vocab, prompt_format: str, question: str) -> int:
  """Length of `question`'s prompt as the sampler feeds it (`vocab.encode_prompt`)."""
  return len(vocab_lib.encode_prompt(vocab, prompt_for(problem, question, prompt_format)))


def fit_context(problem: Problem, vocab, prompt_format: str, context: int,
                decode_steps: dict[str, int], on_error: str) -> Problem:
  """Checks that each pool/eval prompt plus its decode budget fits the model's context.

  `decode_steps` maps a split ("pool", "eval") to its max decode steps. A prompt
  is measured as the sampler feeds it (`vocab.encode_prompt`, exemplars
  included). A question that does not fit raises a ValueError naming its
  file:line (synthetic: split and index), or with on_error="skip" is dropped,
  counted in a warning and in `problem.skipped[split]["too_long"]`.
  """
  changes, skipped = {}, {k: dict(v) for k, v in problem.skipped.items()}
  for split, steps in decode_steps.items():
    kept, first = [], None
    for i, q in enumerate(getattr(problem, split)):
      n = prompt_tokens(problem, vocab, prompt_format, q["question"])
      if n + steps <= context:
        kept.append(q)
        continue
      where = q.get("source") or f"{problem.name} {split} question {i} (id {q['id']})"
      msg = f"{where}: prompt is {n} tokens + {steps} decode steps > model context {context}"
      if on_error == "raise":
        raise ValueError(f"{msg} (set config.data.on_error='skip' to skip such records)")
      first = first or msg
    dropped = len(getattr(problem, split)) - len(kept)
    if dropped:
      logging.warning("%s %s: skipped %d question(s) whose prompt + decode steps exceed the "
                      "model context (first: %s)", problem.name, split, dropped, first)
    changes[split] = kept
    counts = skipped.setdefault(split, {})
    counts["too_long"] = counts.get("too_long", 0) + dropped
  return dataclasses.replace(problem, skipped=skipped, **changes)


def with_gold_cot(problem: Problem, questions: list[dict], seed: int) -> list[dict]:
  """Questions with a gold chain of thought (the oracle arm's labels).

  The synthetic task draws a fresh random summation order per question
  (seeded); GSM8K records already carry their reference solution.
  """
  if problem.name == "synthetic":
    rng = np.random.default_rng(seed)
    return [{**q, "cot": synthetic.gold_cot(synthetic.parse_question(q["question"]), rng)}
            for q in questions]
  return list(questions)
