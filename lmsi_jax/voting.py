"""Answer extraction, normalisation and self-consistency voting (LMSI §3.1, SC §2).

Conventions (see the module tests for the full table):
- Outputs are truncated at the first ``stop`` string ("\\nQ:"), as in SC App. A.2.
- The cue ("The answer is") is matched case-insensitively, so DROP's
  "So the answer is 7." parses with the default cue. When the cue occurs more
  than once, the FIRST occurrence after truncation is parsed (the answer the
  model committed to; the same choice as lm-evaluation-harness's strict-match
  filter). Only the rest of that line is parsed.
- Numbers are canonicalised exactly (``Decimal``/``Fraction``, no floats):
  "$1,234.50" -> "1234.5", "18.00" -> "18", "-0" -> "0", "1/2" -> "0.5"; a
  fraction without a finite decimal expansion stays a reduced "n/d" ("2/6" ->
  "1/3").
- Majority-vote ties are broken by the lexicographically smallest normalised
  answer, which does not depend on the order of the samples.
- ``extract_answer`` is the default extractor ("lmsi"); the others
  (``task.extractor``: lm-eval strict/flexible, boxed, math-verify) live in
  lmsi_jax/extractors.py and normalise their spans with ``normalize_answer``.
"""
from __future__ import annotations

import dataclasses
import decimal
import fractions
import math
import re
import string
from typing import Sequence

import numpy as np

ANSWER_TYPES = ("number", "choice", "yesno", "nli", "span")
NOT_POSSIBLE = "it is not possible to tell"

_MINUS = "-\u2212\u2013"  # ASCII hyphen, Unicode minus sign, en dash.
_UNSIGNED = r"(?:\d(?:[\d,]*\d)?(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(
    rf"(?:(?<![\w)])(?P<sign>[{_MINUS}]))?(?:\$\s?(?P<sign2>[{_MINUS}])?)?"
    rf"(?P<num>{_UNSIGNED})(?:\s?/\s?(?P<den>{_UNSIGNED}))?")
_CHOICE_PAREN_RE = re.compile(r"\(\s*([a-eA-E])\s*\)")
_CHOICE_BARE_RE = re.compile(r"^([a-eA-E])(?:[.):]|$)")
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"\u2019", "\u2018", "\u201c", "\u201d"}
_YESNO_ALIASES = {"yes": "yes", "no": "no", "true": "yes", "false": "no"}
_NLI_ALIASES = {
    "entailment": "yes", "contradiction": "no", "neutral": NOT_POSSIBLE,
    "it's not possible to tell": NOT_POSSIBLE, "not possible to tell": NOT_POSSIBLE,
}


def _check_type(answer_type: str) -> None:
  if answer_type not in ANSWER_TYPES:
    raise ValueError(
        f"unknown answer_type {answer_type!r}; expected one of {ANSWER_TYPES}")


def truncate_at_stop(text: str, stop: str | None = "\nQ:") -> str:
  """Returns the text before the first ``stop`` (all of it if absent or stop is None)."""
  if not stop:
    return text
  i = text.find(stop)
  return text if i < 0 else text[:i]


def _canonical_number(m: re.Match) -> str | None:
  """Formats a ``_NUMBER_RE`` match canonically; None for a zero denominator."""
  negative = bool(m.group("sign")) != bool(m.group("sign2"))
  value = fractions.Fraction(decimal.Decimal(m.group("num").replace(",", "")))
  if m.group("den") is not None:
    den = fractions.Fraction(decimal.Decimal(m.group("den").replace(",", "")))
    if den == 0:
      return None
    value /= den
  if negative:
    value = -value
  d = value.denominator
  while d % 2 == 0:
    d //= 2
  while d % 5 == 0:
    d //= 5
  if d != 1:  # No finite decimal expansion: keep the reduced fraction.
    return f"{value.numerator}/{value.denominator}"
  with decimal.localcontext() as ctx:
    ctx.prec = 200
    dec = decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator)
    out = format(dec.normalize(), "f")
  return "0" if out in ("-0", "0") else out


def _first_number(text: str) -> str | None:
  m = _NUMBER_RE.search(text)
  return None if m is None else _canonical_number(m)


def last_number(text: str) -> str | None:
  """The canonical form of the last number in ``text`` (None if it has none)."""
  matches = list(_NUMBER_RE.finditer(text))
  return None if not matches else _canonical_number(matches[-1])


def _squash(s: str) -> str:
  return " ".join(s.split())


def _strip_punct(s: str) -> str:
  return "".join(ch for ch in s if ch not in _PUNCT)


def _normalize_span(s: str) -> str | None:
  s = _squash(s).rstrip(".").strip()
  m = _NUMBER_RE.fullmatch(s)
  if m is not None:
    return _canonical_number(m)
  tokens = []
  for tok in s.lower().split():
    m = _NUMBER_RE.fullmatch(tok.rstrip(".,;:!?"))
    tokens.append((_canonical_number(m) or "") if m else _strip_punct(tok))
  out = _squash(_ARTICLES_RE.sub(" ", " ".join(tokens)))
  return out or None


def _first_word(s: str) -> str:
  words = _squash(s).lower().split(" ")
  return _strip_punct(words[0]) if words else ""


def normalize_answer(s: str | None, answer_type: str) -> str | None:
  """Normalises one answer string (a parsed prediction or a gold label).

  Returns the canonical string, or None when ``s`` does not hold an answer of
  ``answer_type``. Gold aliases are accepted: "true"/"false" for yesno and
  "entailment"/"neutral"/"contradiction" for nli.
  """
  _check_type(answer_type)
  if s is None:
    return None
  s = s.strip()
  if not s:
    return None
  if answer_type == "number":
    return _first_number(s)
  if answer_type == "choice":
    m = _CHOICE_PAREN_RE.search(s) or _CHOICE_BARE_RE.match(s)
    return m.group(1).lower() if m else None
  if answer_type == "yesno":
    return _YESNO_ALIASES.get(_first_word(s))
  if answer_type == "nli":
    phrase = _squash(s).lower().rstrip(".!").strip()
    for alias, label in _NLI_ALIASES.items():
      if phrase.startswith(alias):
        return label
    if phrase.startswith(NOT_POSSIBLE):
      return NOT_POSSIBLE
    word = _first_word(s)
    return word if word in ("yes", "no") else None
  return _normalize_span(s)


def extract_answer(text: str, answer_type: str = "number",
                   cue: str = "The answer is", stop: str | None = "\nQ:",
                   fallback_last_number: bool = False) -> str | None:
  """Parses the normalised answer after ``cue`` in a sampled output.

  The text is truncated at ``stop``; the first (case-insensitive) occurrence of
  ``cue`` is used and the rest of its line is normalised. With
  ``fallback_last_number`` (number type only; ignored for other types), an
  output whose cue is missing or unparseable yields the last number in the
  truncated text (the "flexible" extraction).
  """
  _check_type(answer_type)
  text = truncate_at_stop(text, stop)
  i = text.lower().find(cue.lower()) if cue else -1
  answer = None
  if i >= 0:
    rest = text[i + len(cue):].lstrip(" \t")
    answer = normalize_answer(rest.split("\n", 1)[0], answer_type)
  if answer is None and fallback_last_number and answer_type == "number":
    answer = last_number(text)
  return answer


@dataclasses.dataclass(frozen=True)
class Vote:
  """Result of a vote over one question's sampled answers.

  answer: the winner (None when no sample parsed); count: samples voting for
  it; share: count / total (unparseable samples included in total);
  total: number of samples; weight: summed weight of the winner (= count when
  the vote is unweighted).
  """
  answer: str | None
  count: int
  share: float
  total: int
  weight: float


def majority_vote(answers: Sequence[str | None],
                  weights: Sequence[float] | None = None) -> Vote:
  """Self-consistency vote: argmax over answers of the count (or summed weight).

  None never wins. Ranking: higher summed weight (count when unweighted), then
  higher count, then the lexicographically smallest answer, so the result is
  independent of the order of ``answers``. Weights are summed with
  ``math.fsum`` (exact, order independent).
  """
  n = len(answers)
  if n == 0:
    raise ValueError("majority_vote needs at least one answer")
  if weights is not None:
    weights = [float(w) for w in weights]
    if len(weights) != n:
      raise ValueError(f"{len(weights)} weights for {n} answers")
    if any(not math.isfinite(w) or w < 0 for w in weights):
      raise ValueError("weights must be finite and non-negative")
  counts: dict[str, int] = {}
  parts: dict[str, list[float]] = {}
  for k, a in enumerate(answers):
    if a is None:
      continue
    counts[a] = counts.get(a, 0) + 1
    parts.setdefault(a, []).append(1.0 if weights is None else weights[k])
  if not counts:
    return Vote(None, 0, 0.0, n, 0.0)
  sums = {a: math.fsum(p) for a, p in parts.items()}
  best = min(counts, key=lambda a: (-sums[a], -counts[a], a))
  return Vote(best, counts[best], counts[best] / n, n, sums[best])


def sequence_weight(token_logprobs: Sequence[float] | np.ndarray,
                    length: int | None = None) -> float:
  """Length-normalised path probability exp(mean log p) over the first ``length`` tokens.

  This is SC's "normalized" weight (SC Table 1); ``length=None`` uses all tokens.
  """
  lp = np.asarray(token_logprobs, dtype=np.float64).reshape(-1)
  if length is None:
    length = lp.shape[0]
  if not 0 < length <= lp.shape[0]:
    raise ValueError(f"length must be in [1, {lp.shape[0]}], got {length}")
  return float(np.exp(np.mean(lp[:length])))


def select_paths(answers: Sequence[str | None], vote: Vote, *,
                 min_vote_share: float = 0.0, max_paths: int | None = None,
                 dedup_texts: Sequence[str] | None = None) -> list[int]:
  """Sorted indices of the paths kept for training (LMSI: every majority path).

  Nothing is kept when the vote has no answer or ``vote.share <
  min_vote_share``. With ``dedup_texts`` (the path texts) exact duplicates
  (after whitespace normalisation) are dropped, keeping the first; then
  ``max_paths`` keeps the first ones in index order.
  """
  if max_paths is not None and max_paths < 0:
    raise ValueError(f"max_paths must be >= 0, got {max_paths}")
  if dedup_texts is not None and len(dedup_texts) != len(answers):
    raise ValueError(f"{len(dedup_texts)} dedup_texts for {len(answers)} answers")
  if vote.answer is None or vote.share + 1e-12 < min_vote_share:
    return []
  kept, seen = [], set()
  for i, a in enumerate(answers):
    if a != vote.answer:
      continue
    if dedup_texts is not None:
      key = _squash(dedup_texts[i])
      if key in seen:
        continue
      seen.add(key)
    kept.append(i)
  return kept if max_paths is None else kept[:max_paths]


def select_spurious(answers: Sequence[str | None], vote: Vote, kept: Sequence[int],
                    rng: np.random.Generator) -> tuple[str | None, list[int]]:
  """The spurious-label arm's paths: a random non-majority answer's, as many as `kept`.

  The answer is drawn uniformly from the distinct parsed answers other than
  `vote.answer`; when no other answer was sampled it is the majority itself.
  Its paths are repeated in index order until there are ``len(kept)`` of them
  (the number LMSI keeps for the question), so the arm trains on as many
  examples as LMSI, from the same samples. Returns (answer, path indices).
  """
  if vote.answer is None or not kept:
    return None, []
  others = sorted({a for a in answers if a is not None and a != vote.answer})
  if not others:
    return vote.answer, list(kept)
  choice = others[int(rng.integers(len(others)))]
  paths = [i for i, a in enumerate(answers) if a == choice]
  return choice, [paths[k % len(paths)] for k in range(len(kept))]


def vote_question(texts: Sequence[str], answer_type: str = "number",
                  cue: str = "The answer is", *, stop: str | None = "\nQ:",
                  fallback_last_number: bool = False,
                  logprob_weights: Sequence[float] | None = None,
                  min_vote_share: float = 0.0, max_paths: int | None = None,
                  dedup: bool = False,
                  extractor: str = "lmsi") -> tuple[Vote, list[int], list[str | None]]:
  """Extracts, votes and selects for one question's sampled paths.

  ``logprob_weights`` are per-path weights (e.g. ``sequence_weight``) for the
  weighted vote; ``dedup`` removes duplicate paths (compared after truncation
  at ``stop``); ``extractor`` names the answer extractor
  (``lmsi_jax.extractors.EXTRACTORS``; "lmsi" is ``extract_answer``).
  Returns (vote, kept indices, per-path normalised answers).
  """
  if extractor == "lmsi":
    answers = [extract_answer(t, answer_type, cue, stop, fallback_last_number)
               for t in texts]
  else:
    from lmsi_jax import extractors  # pylint: disable=g-import-not-at-top  (it imports voting)
    answers = [extractors.extract(t, extractor, answer_type, cue, stop, fallback_last_number)
               for t in texts]
  vote = majority_vote(answers, logprob_weights)
  dedup_texts = [truncate_at_stop(t, stop) for t in texts] if dedup else None
  kept = select_paths(answers, vote, min_vote_share=min_vote_share,
                      max_paths=max_paths, dedup_texts=dedup_texts)
  return vote, kept, answers
