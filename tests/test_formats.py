"""Tests for the four LMSI formats (Huang et al. Table 2)."""
import os

import pytest

from lmsi_jax import formats
from lmsi_jax.formats import FORMATS, Exemplars, make_examples
from lmsi_jax.voting import extract_answer

# LMSI Table 2 example.
AMY_Q = ("Amy is 10 years old. Jake is 8 years old. Alex's age is right in the middle. "
         "How old is Alex?")
AMY_PATH = ("Amy is 10 years old. Jake is 8 years old. Alex's age is in the middle of "
            "Amy and Jake, so Alex is ( 8 + 10 ) / 2 = 9 years old. The answer is 9.")
AMY_ANSWER = "9"


@pytest.fixture(scope="module")
def prompt_files(shared_dir):
  d = os.path.join(shared_dir, "data", "prompts")
  return os.path.join(d, "gsm8k_cot_8shot.txt"), os.path.join(d, "gsm8k_standard_8shot.txt")


@pytest.fixture(scope="module")
def exemplars(prompt_files):
  return formats.load_exemplars(*prompt_files)


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def test_zero_shot_formats_exact():
  ex = {e["format"]: e for e in make_examples(AMY_Q, AMY_PATH, AMY_ANSWER, None,
                                              formats=("zero_shot_cot", "zero_shot_direct"))}
  assert ex["zero_shot_cot"]["inputs"] == (
      "Q: Amy is 10 years old. Jake is 8 years old. Alex's age is right in the middle. "
      "How old is Alex?\nA: Let's think step by step.")
  assert ex["zero_shot_cot"]["targets"] == (
      " Amy is 10 years old. Jake is 8 years old. Alex's age is in the middle of Amy and "
      "Jake, so Alex is ( 8 + 10 ) / 2 = 9 years old. The answer is 9.")
  assert ex["zero_shot_direct"]["inputs"] == (
      "Q: Amy is 10 years old. Jake is 8 years old. Alex's age is right in the middle. "
      "How old is Alex?\nA:")
  assert ex["zero_shot_direct"]["targets"] == " The answer is 9."


def test_four_formats_table2(exemplars, prompt_files):
  cot_text, std_text = (_read(p) for p in prompt_files)
  assert cot_text.endswith(".\n") and not cot_text.endswith("\n\n")
  ex = make_examples(AMY_Q, "\n " + AMY_PATH + "  \n", AMY_ANSWER, exemplars)
  assert [e["format"] for e in ex] == list(FORMATS)
  by = {e["format"]: e for e in ex}
  q = "Q: " + AMY_Q
  # Table 2: [examples] + '\n' + [Question] + '\n' + 'A:' with the files' text.
  assert by["few_shot_cot"]["inputs"] == cot_text + "\n" + q + "\n" + "A:"
  assert by["few_shot_direct"]["inputs"] == std_text + "\n" + q + "\n" + "A:"
  assert by["zero_shot_cot"]["inputs"] == q + "\n" + "A: Let's think step by step."
  assert by["zero_shot_direct"]["inputs"] == q + "\n" + "A:"
  assert by["few_shot_cot"]["targets"] == by["zero_shot_cot"]["targets"] == " " + AMY_PATH
  assert by["few_shot_direct"]["targets"] == by["zero_shot_direct"]["targets"] == (
      " The answer is 9.")
  # The last exemplar and the question are separated by one blank line.
  assert "The answer is 8.\n\nQ: Amy is 10" in by["few_shot_cot"]["inputs"]
  assert "A: The answer is 8.\n\nQ: Amy is 10" in by["few_shot_direct"]["inputs"]
  for e in ex:
    assert e["inputs"].endswith(("A:", "step by step.")) and e["targets"].startswith(" ")
    assert not e["targets"].startswith("  ")
    assert extract_answer(e["targets"]) == "9"


def test_sampling_prompt(exemplars):
  assert formats.sampling_prompt(AMY_Q, exemplars) == make_examples(
      AMY_Q, AMY_PATH, "9", exemplars, "few_shot_cot")[0]["inputs"]
  assert formats.sampling_prompt(AMY_Q, None, style="zero_shot_cot") == (
      "Q: " + AMY_Q + "\nA: Let's think step by step.")
  with pytest.raises(ValueError, match="needs exemplars"):
    formats.sampling_prompt(AMY_Q, None)
  with pytest.raises(ValueError, match="'cot'"):
    formats.sampling_prompt(AMY_Q, exemplars, style="cot")


def _parse_blocks(text):
  pairs = []
  for block in text.rstrip("\n").split("\n\n"):
    q_line, a_line = block.split("\n")
    assert q_line.startswith("Q: ") and a_line.startswith("A: ")
    cot = a_line[len("A: "):]
    pairs.append((q_line[len("Q: "):], cot, extract_answer(cot)))
  return pairs


def test_programmatic_exemplars_match_files(exemplars, prompt_files):
  cot_text, std_text = (_read(p) for p in prompt_files)
  pairs = _parse_blocks(cot_text)
  assert len(pairs) == 8 and [a for *_, a in pairs] == ["6", "5", "39", "8", "9", "29", "33", "8"]
  built = formats.exemplars_from_pairs(pairs)
  assert built == exemplars
  assert built.cot + "\n" == cot_text and built.standard + "\n" == std_text
  # A rationale without the answer sentence gets it appended.
  rationale_only = [(q, cot.rsplit(" The answer is", 1)[0], a) for q, cot, a in pairs]
  assert formats.exemplars_from_pairs(rationale_only) == exemplars


def test_exemplars_from_pairs_layout():
  ex = formats.exemplars_from_pairs([("1+1?", "1+1=2. The answer is 2.", "2"),
                                     (" 2+3? ", "2+3=5.", 5)])
  assert ex == Exemplars(
      cot="Q: 1+1?\nA: 1+1=2. The answer is 2.\n\nQ: 2+3?\nA: 2+3=5. The answer is 5.",
      standard="Q: 1+1?\nA: The answer is 2.\n\nQ: 2+3?\nA: The answer is 5.")
  with pytest.raises(ValueError):
    formats.exemplars_from_pairs([])
  with pytest.raises(ValueError):
    formats.exemplars_from_pairs([("", "x", "1")])


def test_load_exemplars_errors(tmp_path):
  good = tmp_path / "cot.txt"
  good.write_text("Q: a\nA: The answer is 1.\n")
  empty = tmp_path / "empty.txt"
  empty.write_text("\n \n")
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    formats.load_exemplars(good, tmp_path / "missing.txt")
  with pytest.raises(ValueError, match="empty.txt"):
    formats.load_exemplars(good, empty)
  assert formats.load_exemplars(good, good).cot == "Q: a\nA: The answer is 1."


def test_format_selection_and_errors():
  ex = Exemplars(cot="Q: a\nA: b. The answer is 1.", standard="Q: a\nA: The answer is 1.")
  sel = make_examples("q?", "p. The answer is 2.", "2", ex,
                      formats=("zero_shot_direct", "few_shot_cot"))
  assert [e["format"] for e in sel] == ["zero_shot_direct", "few_shot_cot"]
  assert sel[1]["inputs"] == "Q: a\nA: b. The answer is 1.\n\nQ: q?\nA:"
  assert [e["format"] for e in make_examples("q?", "p.", "2", ex, "zero_shot_cot")] == [
      "zero_shot_cot"]
  with pytest.raises(ValueError, match="'few_shot'"):
    make_examples("q?", "p.", "2", ex, formats=("few_shot",))
  with pytest.raises(ValueError, match="few_shot_direct"):
    make_examples("q?", "p.", "2", None, formats=("zero_shot_cot", "few_shot_direct"))
  with pytest.raises(ValueError, match="duplicate"):
    make_examples("q?", "p.", "2", ex, formats=("zero_shot_cot", "zero_shot_cot"))
  with pytest.raises(ValueError):
    make_examples("q?", "  ", "2", ex)
  assert make_examples("q?", "p.", "2", None, formats=()) == []
  assert formats.direct_target("$18") == " The answer is $18."
