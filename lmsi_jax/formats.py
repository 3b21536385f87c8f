"""The four LMSI training formats (Huang et al., §3.2, Table 2).

Every kept CoT path becomes one example per format:

| format           | inputs                                                  | targets            |
|------------------|---------------------------------------------------------|--------------------|
| few_shot_cot     | cot exemplars + "\\n\\n" + "Q: {q}\\nA:"                | " " + path         |
| few_shot_direct  | standard exemplars + "\\n\\n" + "Q: {q}\\nA:"           | " The answer is X." |
| zero_shot_cot    | "Q: {q}\\nA: Let's think step by step."                 | " " + path         |
| zero_shot_direct | "Q: {q}\\nA:"                                           | " The answer is X." |

Inputs end with "A:" (or the step-by-step cue) and targets start with a space,
so ``inputs + targets`` reads like the exemplars. ``Exemplars`` blocks carry no
trailing newline; the join "\\n\\n" equals Table 2's ``[examples] + '\\n'``
applied to the shipped file text, which ends with a newline, and puts the same
blank line between the last exemplar and the question as between exemplars
(data/prompts/SOURCES.md).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

FORMATS = ("few_shot_cot", "few_shot_direct", "zero_shot_cot", "zero_shot_direct")
FEW_SHOT_FORMATS = ("few_shot_cot", "few_shot_direct")
COT_FORMATS = ("few_shot_cot", "zero_shot_cot")
EXEMPLAR_SEP = "\n\n"
ZERO_SHOT_COT_CUE = "Let's think step by step."
ANSWER_CUE = "The answer is"


@dataclasses.dataclass(frozen=True)
class Exemplars:
  """Few-shot prompt prefixes: CoT exemplars and standard (reasoning-free) ones.

  Each block is "Q: ...\\nA: ..." exemplars joined by a blank line, with no
  trailing newline.
  """
  cot: str
  standard: str


def _read_block(path: str | os.PathLike) -> str:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"exemplar file not found: {path}")
  with open(path, encoding="utf-8") as f:
    text = f.read().rstrip()
  if not text:
    raise ValueError(f"exemplar file is empty: {path}")
  return text


def load_exemplars(cot_path: str | os.PathLike,
                   standard_path: str | os.PathLike) -> Exemplars:
  """Reads the CoT and standard exemplar files (trailing whitespace stripped)."""
  return Exemplars(cot=_read_block(cot_path), standard=_read_block(standard_path))


def _cot_answer_text(cot: str, answer: str) -> str:
  """The CoT answer text; appends "The answer is {answer}." when the cue is absent."""
  cot = cot.strip()
  if ANSWER_CUE.lower() in cot.lower():
    return cot
  return f"{cot} {ANSWER_CUE} {answer}." if cot else f"{ANSWER_CUE} {answer}."


def exemplars_from_pairs(pairs: Sequence[tuple[str, str, str]]) -> Exemplars:
  """Builds exemplar blocks from (question, cot_path, answer) triples.

  CoT exemplars are "Q: {q}\\nA: {cot}" (the cot path should end with "The
  answer is {a}."; the sentence is appended when the cue is missing) and
  standard exemplars "Q: {q}\\nA: The answer is {a}.", joined with a blank line
  like the shipped files.
  """
  if not pairs:
    raise ValueError("exemplars_from_pairs needs at least one pair")
  cot, standard = [], []
  for question, path, answer in pairs:
    q, a = question.strip(), str(answer).strip()
    if not q or not a:
      raise ValueError(f"empty question or answer in exemplar pair {(question, answer)!r}")
    cot.append(f"Q: {q}\nA: {_cot_answer_text(path, a)}")
    standard.append(f"Q: {q}\nA: {ANSWER_CUE} {a}.")
  return Exemplars(cot=EXEMPLAR_SEP.join(cot), standard=EXEMPLAR_SEP.join(standard))


def _check_formats(formats: Sequence[str] | str) -> tuple[str, ...]:
  if isinstance(formats, str):
    formats = (formats,)
  formats = tuple(formats)
  for fmt in formats:
    if fmt not in FORMATS:
      raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
  if len(set(formats)) != len(formats):
    raise ValueError(f"duplicate formats in {formats}")
  return formats


def question_line(question: str) -> str:
  """The question as written in the exemplars: "Q: {question}"."""
  return f"Q: {question.strip()}"


def build_input(fmt: str, question: str, exemplars: Exemplars | None = None) -> str:
  """The model input of one format for ``question`` (ends with "A:" or the cue)."""
  _check_formats(fmt)
  q = question_line(question)
  if fmt == "zero_shot_cot":
    return f"{q}\nA: {ZERO_SHOT_COT_CUE}"
  if fmt == "zero_shot_direct":
    return f"{q}\nA:"
  if exemplars is None:
    raise ValueError(f"format {fmt!r} needs exemplars, got None")
  block = exemplars.cot if fmt == "few_shot_cot" else exemplars.standard
  return f"{block.rstrip()}{EXEMPLAR_SEP}{q}\nA:"


def sampling_prompt(question: str, exemplars: Exemplars | None,
                    style: str = "few_shot_cot") -> str:
  """The prompt used to sample paths: format 1 input by default, or format 3."""
  return build_input(style, question, exemplars)


def cot_target(path: str) -> str:
  """Target of the CoT formats: " " + the stripped path (ends "The answer is X.")."""
  path = path.strip()
  if not path:
    raise ValueError("empty CoT path")
  return f" {path}"


def direct_target(answer: str) -> str:
  """Target of the direct formats: " The answer is {answer}."."""
  answer = str(answer).strip()
  if not answer:
    raise ValueError("empty answer")
  return f" {ANSWER_CUE} {answer}."


def make_examples(question: str, path: str, answer: str,
                  exemplars: Exemplars | None,
                  formats: Sequence[str] | str = FORMATS) -> list[dict[str, str]]:
  """One {"format", "inputs", "targets"} dict per format for a kept path.

  ``answer`` is the voted answer as written in the path's answer sentence; it
  fills the direct targets. Few-shot formats need ``exemplars``.
  """
  formats = _check_formats(formats)
  missing = [f for f in formats if f in FEW_SHOT_FORMATS]
  if exemplars is None and missing:
    raise ValueError(f"formats {missing} need exemplars, got None")
  out = []
  for fmt in formats:
    targets = cot_target(path) if fmt in COT_FORMATS else direct_target(answer)
    out.append({"format": fmt, "inputs": build_input(fmt, question, exemplars),
                "targets": targets})
  return out
