"""Answer extractors: which span of a sampled output is its final answer (``task.extractor``).

Model cards report GSM8K under different extraction protocols, and the same
outputs can score very differently under them. Each extractor here finds the
answer span its protocol would take; ``voting.normalize_answer`` then
canonicalises it, so votes and scores compare answers one way whichever
extractor is chosen (voting.py stays the single place answers are normalised
and compared). Pure Python: no JAX.

Extractors (``EXTRACTORS``; every one first cuts the text at ``stop``):

- ``lmsi``: the first case-insensitive ``cue`` ("The answer is"), the rest of
  its line (``voting.extract_answer``; the default, and the paper's).
  ``voting.fallback_last_number`` applies to this one only.
- ``lm_eval_strict`` / ``lm_eval_flexible``: lm-evaluation-harness's GSM8K
  chain-of-thought filters ``strict-match`` / ``flexible-extract``
  (``LM_EVAL_STRICT_RE`` / ``LM_EVAL_FLEXIBLE_RE``, ``findall`` then
  ``group_select`` 0 / -1, as its ``RegexFilter``), then its ``exact_match``
  normalisation (``LM_EVAL_IGNORE``, lower case). Number answers only.
  The strict pattern is lm-eval's with "The answer is" replaced by ``cue``
  (identical for the default cue); it is case-sensitive and, as in lm-eval, its
  final ``.`` needs one more character, so a text ending "The answer is 42"
  yields "4".
  Two differences from lm-eval's score: a span holding no number (flexible's
  "..") counts as unextracted (lm-eval scores it wrong, so accuracy agrees), and
  the number is compared canonically ("18.00" equals gold "18"; lm-eval
  compares strings).
- ``boxed``: Qwen2.5-Math's parser: the content of the last ``\\boxed{...}``
  (balanced braces; ``\\fbox`` too) with light LaTeX clean-up (``\\frac{a}{b}``
  -> a/b, nested and mixed fractions exactly, ``{,}``, ``\\text{}``, ``\\$``,
  ``\\%``); else (no box, or one that does not read as an answer) the LAST
  ``cue`` (as its ``split("he answer is")[-1]``); else the last number. Any
  answer type (the last-number step: number type only).
- ``math_verify``: HF ``math-verify``'s ``parse`` (LaTeX and plain
  expressions); an answer sympy evaluates to a number is canonicalised
  exactly, anything else counts as unextracted. Needs ``pip install
  math-verify``; number answers only. ``parse``'s 5 s timeout uses SIGALRM,
  which works in the main thread only; elsewhere it runs without one.

Source of the lm-eval strings: ``lm_eval/tasks/gsm8k/gsm8k-cot.yaml`` in
lm-eval 0.4.13 (PyPI), the same text as EleutherAI/lm-evaluation-harness at
commit b8d1d4fd057f6223c4490613f0a38cb5d75a3183.
"""

from __future__ import annotations

import decimal
import fractions
import functools
import importlib.util
import re
import threading
from collections.abc import Callable

from lmsi_jax import voting

DEFAULT = "lmsi"
DEFAULT_CUE = "The answer is"

# lm-evaluation-harness, lm_eval/tasks/gsm8k/gsm8k-cot.yaml (see the module docstring).
LM_EVAL_STRICT_RE = r"The answer is (\-?[0-9\.\,]+)."
LM_EVAL_FLEXIBLE_RE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
LM_EVAL_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")     # metric_list regexes_to_ignore
LM_EVAL_IGNORE_CASE = True
LM_EVAL_IGNORE_PUNCTUATION = False

NUMBER_ONLY = ("lm_eval_strict", "lm_eval_flexible", "math_verify")
NEEDS_PACKAGE = {"math_verify": "math_verify"}     # extractor -> importable module


# ----------------------------------------------------------------- lm-eval
def lm_eval_span(text: str, pattern: str, group_select: int = 0) -> str | None:
  """lm-eval's ``RegexFilter`` on one response; None where it returns its fallback."""
  matches = re.findall(pattern, text)
  if not matches:
    return None
  m = matches[group_select]
  if isinstance(m, tuple):
    m = [g for g in m if g]
    if not m:
      return None
    m = m[0]
  return m.strip()


def lm_eval_normalize(s: str) -> str:
  """lm-eval's GSM8K ``exact_match`` preprocessing of a prediction (and of the gold)."""
  for r in LM_EVAL_IGNORE:
    s = re.sub(r, "", s)
  return s.lower() if LM_EVAL_IGNORE_CASE else s


@functools.lru_cache(maxsize=16)
def _strict_pattern(cue: str) -> str:
  return LM_EVAL_STRICT_RE if cue == DEFAULT_CUE else LM_EVAL_STRICT_RE.replace(
      DEFAULT_CUE, re.escape(cue))


def _lm_eval(text: str, pattern: str, group_select: int) -> str | None:
  span = lm_eval_span(text, pattern, group_select)
  return None if span is None else voting.normalize_answer(lm_eval_normalize(span), "number")


def lm_eval_strict(text, answer_type="number", cue=DEFAULT_CUE, stop="\nQ:", fallback=False):
  del answer_type, fallback
  return _lm_eval(voting.truncate_at_stop(text, stop), _strict_pattern(cue or DEFAULT_CUE), 0)


def lm_eval_flexible(text, answer_type="number", cue=DEFAULT_CUE, stop="\nQ:", fallback=False):
  del answer_type, cue, fallback
  return _lm_eval(voting.truncate_at_stop(text, stop), LM_EVAL_FLEXIBLE_RE, -1)


# ------------------------------------------------------------------- boxed
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT_RE = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
_MIXED_RE = re.compile(r"(?<![\d.,])(\d+)\s*\\[dt]?frac\s*\{(\d+)\}\s*\{(\d+)\}")   # 3\frac{1}{2}
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


def last_boxed(text: str) -> str | None:
  """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces).

  ``\\boxed 5`` (no brace) gives the rest up to "$" or the line end. None when
  there is no box or its braces do not close.
  """
  starts = list(_BOXED_RE.finditer(text))
  if not starts:
    return None
  i = starts[-1].end()
  if i >= len(text):
    return None
  if text[i] != "{":
    return re.split(r"[$\n]", text[i:], maxsplit=1)[0].strip() or None
  depth = 0
  for j in range(i, len(text)):
    if text[j] == "{":
      depth += 1
    elif text[j] == "}":
      depth -= 1
      if depth == 0:
        return text[i + 1:j]
  return None


def _exact(v: fractions.Fraction) -> str:
  return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


def _frac(m: re.Match) -> str:
  """``\\frac{a}{b}`` -> "a/b"; exact "n/d" when a and b are numbers (so fractions nest)."""
  a, b = m.group(1).strip(), m.group(2).strip()
  sep = " " if m.start() and m.string[m.start() - 1].isdigit() else ""   # 2.5\frac: not "2.51/2"
  try:
    return sep + _exact(fractions.Fraction(a.replace(",", "")) / fractions.Fraction(b.replace(",", "")))
  except (ValueError, ZeroDivisionError):
    return f"{sep}{a}/{b}"


def _mixed(m: re.Match) -> str:
  """A mixed number ``3\\frac{1}{2}`` -> "7/2"."""
  if int(m.group(3)) == 0:
    return m.group(0)
  return _exact(int(m.group(1)) + fractions.Fraction(int(m.group(2)), int(m.group(3))))


def latex_to_plain(s: str) -> str:
  """Light LaTeX clean-up of a boxed answer so ``voting.normalize_answer`` reads it."""
  s = s.replace("{,}", ",").replace("\\!", "").replace("\\,", "").replace("\\;", " ")
  s = s.replace("\\ ", " ").replace("\\$", "$").replace("\\%", "%").replace("\\left", "")
  s = s.replace("\\right", "").replace("^\\circ", "").replace("^{\\circ}", "")
  s = _MIXED_RE.sub(_mixed, s)
  for _ in range(3):                  # \text{\frac{1}{2}}-style nesting, a few levels
    s = _TEXT_RE.sub(r"\1", s)
    s = _FRAC_RE.sub(_frac, s)
  s = _FRAC_SHORT_RE.sub(_frac, s)
  return s.strip()


def boxed(text, answer_type="number", cue=DEFAULT_CUE, stop="\nQ:", fallback=False):
  del fallback
  text = voting.truncate_at_stop(text, stop)
  content = last_boxed(text)
  if content is not None:
    answer = voting.normalize_answer(latex_to_plain(content), answer_type)
    if answer is not None:
      return answer
  i = text.lower().rfind(cue.lower()) if cue else -1
  if i >= 0:
    rest = text[i + len(cue):].lstrip(" \t").split("\n", 1)[0]
    answer = voting.normalize_answer(rest, answer_type)
    if answer is not None:
      return answer
  return voting.last_number(text) if answer_type == "number" else None


# ------------------------------------------------------------- math-verify
def math_verify(text, answer_type="number", cue=DEFAULT_CUE, stop="\nQ:", fallback=False):
  """``math_verify.parse``; a numeric result canonicalised exactly, else None."""
  del answer_type, cue, fallback
  import math_verify as mv  # pylint: disable=g-import-not-at-top
  import sympy  # pylint: disable=g-import-not-at-top
  main = threading.current_thread() is threading.main_thread()
  parsed = mv.parse(voting.truncate_at_stop(text, stop), parsing_timeout=5 if main else None)
  if not parsed:
    return None
  value = parsed[0]
  if isinstance(value, sympy.FiniteSet) and len(value) == 1:
    value = next(iter(value))
  if not isinstance(value, sympy.Basic) or not value.is_number:
    return None
  value = value.doit()                      # parse leaves (1/2)/2, sqrt(4), 2**10 unevaluated
  if isinstance(value, sympy.Float):       # a decimal literal, at its written precision
    return voting.normalize_answer(format(decimal.Decimal(str(value)), "f"), "number")
  if not isinstance(value, sympy.Rational):
    return None                             # e.g. sqrt(2), pi: no exact decimal or n/d
  s = str(value.p) if value.q == 1 else f"{value.p}/{value.q}"
  return voting.normalize_answer(s, "number")


# ---------------------------------------------------------------- registry
def _lmsi(text, answer_type="number", cue=DEFAULT_CUE, stop="\nQ:", fallback=False):
  return voting.extract_answer(text, answer_type, cue, stop, fallback)


Extractor = Callable[..., "str | None"]
EXTRACTORS: dict[str, Extractor] = {
    "lmsi": _lmsi,
    "lm_eval_strict": lm_eval_strict,
    "lm_eval_flexible": lm_eval_flexible,
    "boxed": boxed,
    "math_verify": math_verify,
}


def available(name: str) -> bool:
  """Whether ``name``'s optional package (if any) can be imported."""
  mod = NEEDS_PACKAGE.get(name)
  return mod is None or importlib.util.find_spec(mod) is not None


def extract(text: str, extractor: str = DEFAULT, answer_type: str = "number",
            cue: str = DEFAULT_CUE, stop: str | None = "\nQ:",
            fallback_last_number: bool = False) -> str | None:
  """The normalised answer of ``text`` under ``extractor`` (None: unextracted)."""
  return EXTRACTORS[extractor](text, answer_type, cue, stop, fallback_last_number)


def usable(answer_type: str = "number") -> list[str]:
  """The extractors that can read ``answer_type`` answers here (package installed)."""
  return [n for n in EXTRACTORS
          if available(n) and (answer_type == "number" or n not in NUMBER_ONLY)]
