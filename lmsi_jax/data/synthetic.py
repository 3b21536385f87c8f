"""Built-in synthetic task: sums of single-digit numbers with order-free CoT paths.

A question is a sum of digits such as ``"3+5+2+7+1"``. A chain of thought adds
the terms one by one in any order, e.g. for order (5, 7, 3, 2, 1)::

  5+7=12, 12+3=15, 15+2=17, 17+1=18. The answer is 18.

Every permutation of the terms is a valid path, so temperature sampling yields
diverse paths that majority voting can agree on. Terms are drawn from 1-9: a
zero term makes a step trivial (``12+0=12``) and adds no reasoning.

Questions are identified by their exact text, so ``"3+5"`` and ``"5+3"`` are
different questions (there are only C(13, 5) = 1287 multisets of five digits,
fewer than a 1000-question pool plus a 500-question eval set need). Everything
is deterministic given a seed and needs no files or downloads.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

import numpy as np

MIN_TERM, MAX_TERM = 1, 9
_STEP_RE = re.compile(r"(\d+)\+(\d+)=(\d+)")
_COT_RE = re.compile(r"(.+)\. The answer is (\d+)\.")
_QUESTION_RE = re.compile(r"\d+(?:\+\d+)+")

NumTerms = int | tuple[int, int]


def _check_num_terms(num_terms: int) -> None:
  if num_terms < 2:
    raise ValueError(f"num_terms must be at least 2, got {num_terms}")


def _terms_range(num_terms: NumTerms) -> tuple[int, int]:
  lo, hi = (num_terms, num_terms) if isinstance(num_terms, int) else tuple(num_terms)
  _check_num_terms(lo)
  if hi < lo:
    raise ValueError(f"num_terms range {num_terms} is empty")
  return int(lo), int(hi)


def make_question(rng: np.random.Generator, num_terms: int) -> list[int]:
  """Draws `num_terms` digits uniformly from 1-9."""
  _check_num_terms(num_terms)
  return [int(t) for t in rng.integers(MIN_TERM, MAX_TERM + 1, size=num_terms)]


def question_text(terms: Sequence[int]) -> str:
  """``[3, 5, 2]`` -> ``"3+5+2"``."""
  return "+".join(str(int(t)) for t in terms)


def parse_question(question: str) -> list[int]:
  """Inverse of `question_text`; raises ValueError on anything else."""
  if not _QUESTION_RE.fullmatch(question):
    raise ValueError(f"not a synthetic sum question: {question!r}")
  return [int(t) for t in question.split("+")]


def answer_of(terms: Sequence[int]) -> str:
  """The gold final answer (the sum) as a string."""
  return str(int(sum(int(t) for t in terms)))


def cot_text(terms: Sequence[int], order: Sequence[int]) -> str:
  """The CoT that adds `terms` in `order` (a permutation of the term values)."""
  _check_num_terms(len(terms))
  if Counter(int(t) for t in order) != Counter(int(t) for t in terms):
    raise ValueError(f"order {tuple(order)} is not a permutation of terms {tuple(terms)}")
  total, steps = int(order[0]), []
  for t in order[1:]:
    steps.append(f"{total}+{int(t)}={total + int(t)}")
    total += int(t)
  return f"{', '.join(steps)}. The answer is {total}."


def gold_cot(terms: Sequence[int], rng: np.random.Generator) -> str:
  """A gold CoT adding the terms in a uniformly random order."""
  order = [terms[i] for i in rng.permutation(len(terms))]
  return cot_text(terms, order)


def verify_cot(question: str, cot: str) -> bool:
  """True iff `cot` is a valid path for `question`.

  Valid means: the exact `cot_text` format, every step's arithmetic correct, each
  step continuing from the previous sum, each question term used exactly once,
  and the stated answer equal to the last sum.
  """
  try:
    terms = parse_question(question)
  except ValueError:
    return False
  m = _COT_RE.fullmatch(cot)
  if m is None:
    return False
  steps = m.group(1).split(", ")
  used, total = [], None
  for step in steps:
    sm = _STEP_RE.fullmatch(step)
    if sm is None:
      return False
    a, b, c = (int(g) for g in sm.groups())
    if a + b != c:
      return False
    if total is None:
      used.append(a)
    elif a != total:
      return False
    used.append(b)
    total = c
  return Counter(used) == Counter(terms) and int(m.group(2)) == total


def _capacity(lo: int, hi: int) -> int:
  base = MAX_TERM - MIN_TERM + 1
  return sum(base**k for k in range(lo, hi + 1))


def _in_range(question: str, lo: int, hi: int) -> bool:
  """Whether `question` is one that sampling with `lo`..`hi` terms could draw."""
  try:
    terms = parse_question(question)
  except ValueError:
    return False
  return lo <= len(terms) <= hi and all(MIN_TERM <= t <= MAX_TERM for t in terms)


def _unique_questions(rng: np.random.Generator, n: int, num_terms: NumTerms,
                      exclude: set[str]) -> list[list[int]]:
  """`n` term lists with distinct texts, none in `exclude` (rejection sampling)."""
  lo, hi = _terms_range(num_terms)
  blocked = sum(_in_range(q, lo, hi) for q in exclude)
  if n > _capacity(lo, hi) - blocked:
    raise ValueError(f"cannot draw {n} unique questions with {num_terms} terms "
                     f"({_capacity(lo, hi)} exist, {blocked} excluded)")
  seen, out = set(exclude), []
  max_tries = 200 * n + 10_000
  for _ in range(max_tries):
    if len(out) == n:
      break
    terms = make_question(rng, int(rng.integers(lo, hi + 1)))
    text = question_text(terms)
    if text not in seen:
      seen.add(text)
      out.append(terms)
  if len(out) < n:
    raise ValueError(f"drew only {len(out)} of {n} unique questions with {num_terms} terms; "
                     "widen the range or lower n")
  return out


def make_split(seed: int, n: int, num_terms: NumTerms, *, split_name: str,
               exclude: set[str] | None = None, labeled: bool = True) -> list[dict]:
  """`n` records ``{id, question, answer, cot}`` with unique questions.

  Args:
    seed: RNG seed; the split is a pure function of the arguments.
    n: number of records.
    num_terms: terms per question, or an inclusive ``(lo, hi)`` range sampled
      uniformly per draw (the difficulty). Uniqueness caps short lengths (only
      81 two-term questions exist), so a wide range skews toward long ones.
    split_name: id prefix, ids are ``f"{split_name}-{i}"``.
    exclude: question texts that must not appear (e.g. the eval set).
    labeled: if False, ``cot`` is None (an unlabeled pool); the gold answer is
      always kept for evaluation and oracles.
  """
  rng = np.random.default_rng(seed)
  questions = _unique_questions(rng, n, num_terms, set(exclude or ()))
  records = []
  for i, terms in enumerate(questions):
    cot = gold_cot(terms, rng) if labeled else None
    records.append({"id": f"{split_name}-{i}", "question": question_text(terms),
                    "answer": answer_of(terms), "cot": cot})
  return records


def make_drill(seed: int, n: int, num_terms: NumTerms, *, split_name: str,
               exclude: set[str] | None = None) -> list[dict]:
  """`n` labeled drill records; questions may repeat, each with its own gold order.

  Each record is a question drawn uniformly from all questions with `num_terms`
  terms (so a count k is drawn in proportion to the 9^k questions that have
  it: longer sums dominate, as they do among distinct questions), with a fresh
  random summation order. Unlike `make_split`, a question may come back: a
  drill of tens of thousands of sums repeats questions with other orders (many
  paths per question, as the rounds' samples have). Questions in `exclude` are
  redrawn.
  """
  lo, hi = _terms_range(num_terms)
  counts = np.array([float(MAX_TERM - MIN_TERM + 1) ** k for k in range(lo, hi + 1)])
  rng = np.random.default_rng(seed)
  ks = lo + rng.choice(hi - lo + 1, size=n, p=counts / counts.sum())
  blocked = set(exclude or ())
  records = []
  for i, k in enumerate(ks):
    for _ in range(1000):
      terms = make_question(rng, int(k))
      if question_text(terms) not in blocked:
        break
    else:
      raise ValueError(f"cannot draw a {k}-term question outside `exclude`")
    records.append({"id": f"{split_name}-{i}", "question": question_text(terms),
                    "answer": answer_of(terms), "cot": gold_cot(terms, rng)})
  return records


def make_exemplar_pairs(seed: int, k: int, num_terms: NumTerms) -> list[tuple[str, str, str]]:
  """`k` few-shot exemplars ``(question, cot, answer)`` with distinct questions."""
  recs = make_split(seed, k, num_terms, split_name="exemplar")
  return [(r["question"], r["cot"], r["answer"]) for r in recs]


def _sub_seed(seed: int, index: int) -> int:
  return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def build_splits(*, seed: int = 0, seed_easy_n: int = 3000,
                 seed_easy_terms: NumTerms = (2, 4), seed_hard_n: int = 20,
                 hard_terms: NumTerms = 5, pool_n: int = 1000,
                 eval_n: int = 500, seed_hard_repeat: int = 1) -> dict[str, list[dict]]:
  """The demo's disjoint splits.

  Returns:
    ``"seed"``: labeled, `seed_easy_n` easy drill examples (ids ``seed_easy-i``,
    `make_drill`: term counts balanced, questions may repeat with other orders)
    followed by `seed_hard_n` hard ones (``seed_hard-i``, unique), each listed
    `seed_hard_repeat` times (copies ``seed_hard-i.k``: oversampled, the same
    labels); ``"pool"``: unlabeled hard questions (``cot`` None); ``"eval"``:
    held-out hard questions (``cot`` None, gold answer kept). Eval is drawn
    first, so its questions do not depend on the sizes of the other splits;
    every later split excludes all earlier questions.
  """
  if seed_hard_repeat < 1:
    raise ValueError(f"seed_hard_repeat must be >= 1, got {seed_hard_repeat}")
  evals = make_split(_sub_seed(seed, 0), eval_n, hard_terms, split_name="eval", labeled=False)
  taken = {r["question"] for r in evals}
  pool = make_split(_sub_seed(seed, 1), pool_n, hard_terms, split_name="pool",
                    exclude=taken, labeled=False)
  taken |= {r["question"] for r in pool}
  hard = make_split(_sub_seed(seed, 2), seed_hard_n, hard_terms, split_name="seed_hard",
                    exclude=taken)
  taken |= {r["question"] for r in hard}
  easy = make_drill(_sub_seed(seed, 3), seed_easy_n, seed_easy_terms, split_name="seed_easy",
                    exclude=taken)
  copies = [{**r, "id": f"{r['id']}.{k}"} for k in range(1, seed_hard_repeat) for r in hard]
  return {"seed": easy + hard + copies, "pool": pool, "eval": evals}
