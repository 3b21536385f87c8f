"""Answer extractors (task.extractor): case tables, lm-eval parity, config checks, disagreements."""
import importlib.util
import os
import re

import pytest

from lmsi_jax import config as config_lib
from lmsi_jax import extractors
from lmsi_jax import voting

HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None

# One row per text: the answer each extractor reads (default cue, stop "\nQ:").
#        text                                        lmsi    strict  flexible boxed  math_verify
CASES = [
    ("... 21 - 15 = 6. The answer is 6.",            "6",    "6",    "6",    "6",    "6"),
    ("The answer is 1,234.",                         "1234", "1234", "1234", "1234", "1234"),
    ("The answer is 1,234,567.",                     "1234567", "1234567", "1234567", "1234567",
     "1234567"),
    ("The answer is $18.",                           "18",   None,   "18",   "18",   "18"),
    ("The answer is $18.00.",                        "18",   None,   "18",   "18",   "18"),
    ("The answer is 18.00.",                         "18",   "18",   "18",   "18",   "18"),
    ("The answer is -3.",                            "-3",   "-3",   "-3",   "-3",   "-3"),
    ("The answer is -$5.",                           "-5",   None,   "-5",   "-5",   None),
    # lm-eval's strict pattern ends in "." (any character): at the very end it takes "4".
    ("The answer is 42",                             "42",   "4",    "42",   "42",   "42"),
    ("The answer is 42.\n",                          "42",   "42",   "42",   "42",   "42"),
    ("the answer is 7.",                             "7",    None,   "7",    "7",    "7"),
    # several cues: lmsi/strict take the first; flexible the last number; boxed the last cue.
    ("The answer is 3. The answer is 4.",            "3",    "3",    "4",    "4",    "4"),
    ("The answer is 3.\nQ: Next? The answer is 9.",  "3",    "3",    "3",    "3",    "3"),
    ("So 5 + 4 = 9.",                                None,   None,   "9",    "9",    "9"),
    ("I do not know.",                               None,   None,   None,   None,   None),
    ("The answer is five.",                          None,   None,   None,   None,   None),
    ("It costs $1,200. The answer is 1200.",         "1200", "1200", "1200", "1200", "1200"),
    # flexible's last match is "..." (lm-eval scores it wrong; here it is unextracted).
    ("The answer is 12. Hmm...",                     "12",   "12",   None,   "12",   "12"),
    ("\\boxed{\\frac{1}{2}}",                        None,   None,   "2",    "0.5",  "0.5"),
    ("So \\boxed{1{,}234}.",                         None,   None,   "234",  "1234", "1234"),
    ("\\boxed{\\frac{\\frac{1}{2}}{2}}",             None,   None,   "2",    "0.25", "0.25"),
    ("First \\boxed{3}, then \\boxed{\\dfrac{3}{4}}.", None, None,   "4",    "0.75", None),
    ("\\boxed{\\text{18 dollars}}",                  None,   None,   "18",   "18",   None),
    ("\\boxed{-7}",                                  None,   None,   "-7",   "-7",   "-7"),
    ("\\boxed 5$",                                   None,   None,   "5",    "5",    "5"),
    ("\\boxed{}. The answer is 6.",                  "6",    "6",    "6",    "6",    "6"),
    ("\\boxed{\\sqrt{2}}",                           None,   None,   "2",    "2",    None),
    ("\\boxed{2^{10}}",                               None,   None,   "10",   "2",    "1024"),
]
NAMES = ("lmsi", "lm_eval_strict", "lm_eval_flexible", "boxed", "math_verify")


def test_registry():
  assert tuple(extractors.EXTRACTORS) == NAMES
  assert extractors.DEFAULT == "lmsi"
  assert config_lib.base_config().task.extractor == "lmsi"


@pytest.mark.parametrize("name", NAMES)
def test_case_table(name):
  if name == "math_verify" and not HAS_MATH_VERIFY:
    pytest.skip("math-verify is not installed")
  col = NAMES.index(name) + 1
  got = [(row[0], extractors.extract(row[0], name)) for row in CASES]
  assert got == [(row[0], row[col]) for row in CASES]


def test_lmsi_is_extract_answer():
  """The default is voting.extract_answer, argument for argument (fallback, cue, stop, types)."""
  texts = [row[0] for row in CASES] + ["So the answer is (b).", "Yes. The answer is no.", "x 4 y"]
  for t in texts:
    for answer_type in ("number", "choice", "yesno", "span"):
      for fb in (False, True):
        for stop in ("\nQ:", None):
          assert extractors.extract(t, "lmsi", answer_type, "The answer is", stop, fb) == \
              voting.extract_answer(t, answer_type, "The answer is", stop, fb)


def test_boxed_braces_and_types():
  lb = extractors.last_boxed
  assert lb("\\boxed{a{b{c}}d} and \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
  assert lb("\\boxed{a{b{c}}d}") == "a{b{c}}d"
  assert lb("\\fbox{12}") == "12"
  assert lb("\\boxed{5") is None                   # unbalanced
  assert lb("no box") is None
  assert extractors.latex_to_plain("\\$1{,}234\\!.50") == "$1,234.50"
  assert extractors.latex_to_plain("-\\tfrac12") == "-1/2"
  # an unbalanced box falls through to the last cue, then to the last number
  assert extractors.extract("\\boxed{5 ... The answer is 6.", "boxed") == "6"
  assert extractors.extract("\\boxed{5", "boxed") == "5"
  # other answer types: the box content, then the last cue; no last-number step
  assert extractors.extract("So \\boxed{yes}.", "boxed", "yesno") == "yes"
  assert extractors.extract("The answer is no. The answer is yes.", "boxed", "yesno") == "yes"
  assert extractors.extract("So 3 of them.", "boxed", "yesno") is None
  assert extractors.extract("So \\boxed{(c)}.", "boxed", "choice") == "c"


# lm-evaluation-harness, lm_eval/tasks/gsm8k/gsm8k-cot.yaml: lm-eval 0.4.13 on PyPI, identical at
# EleutherAI/lm-evaluation-harness commit b8d1d4fd057f6223c4490613f0a38cb5d75a3183.
COPIED = {
    "strict-match": (r"The answer is (\-?[0-9\.\,]+).", 0),
    "flexible-extract": (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1),
    "regexes_to_ignore": [",", r"\$", "(?s).*#### ", r"\.$"],
    "ignore_case": True,
    "ignore_punctuation": False,
}


def _lm_eval_yaml() -> dict:
  """The installed lm_eval's gsm8k-cot filters and metric options (COPIED's shape)."""
  import yaml  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("lm_eval")
  path = os.path.join(spec.submodule_search_locations[0], "tasks", "gsm8k", "gsm8k-cot.yaml")
  with open(path) as f:
    task = yaml.safe_load(f)
  out = {}
  for flt in task["filter_list"]:
    regex = [x for x in flt["filter"] if x["function"] == "regex"][0]
    out[flt["name"]] = (regex["regex_pattern"], regex.get("group_select", 0))
  metric = [m for m in task["metric_list"] if m["metric"] == "exact_match"][0]
  out.update({k: metric[k] for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation")})
  return out


def test_lm_eval_strings():
  """Ours are the copied strings; where lm_eval is installed, they are also its yaml's."""
  ours = {
      "strict-match": (extractors.LM_EVAL_STRICT_RE, 0),
      "flexible-extract": (extractors.LM_EVAL_FLEXIBLE_RE, -1),
      "regexes_to_ignore": list(extractors.LM_EVAL_IGNORE),
      "ignore_case": extractors.LM_EVAL_IGNORE_CASE,
      "ignore_punctuation": extractors.LM_EVAL_IGNORE_PUNCTUATION,
  }
  assert ours == COPIED
  if HAS_LM_EVAL:
    assert _lm_eval_yaml() == COPIED


def _reference_filter(pattern: str, group_select: int):
  """lm-eval's RegexFilter (lm_eval/filters/extraction.py) when installed, else its logic copied."""
  if HAS_LM_EVAL:
    from lm_eval.filters.extraction import RegexFilter  # pylint: disable=g-import-not-at-top
    f = RegexFilter(regex_pattern=pattern, group_select=group_select)
    return lambda text: f.apply([[text]], [None])[0][0]

  def apply(text):
    match = re.compile(pattern).findall(text)
    if not match:
      return "[invalid]"
    match = match[group_select]
    if isinstance(match, tuple):
      match = [m for m in match if m]
      match = match[0] if match else "[invalid]"
    return match.strip()
  return apply


def _reference_exact_match(pred: str, gold: str) -> bool:
  """lm-eval's exact_match_hf_evaluate preprocessing with the yaml's options."""
  for r in COPIED["regexes_to_ignore"]:
    pred, gold = re.sub(r, "", pred), re.sub(r, "", gold)
  return pred.lower() == gold.lower()


MORE_TEXTS = ["The answer is 1.5.5.", "Answer: -.5 or ,,", "The answer is 7,", "a $ b $$ c",
              "The answer is 3,000. That is $3,000.00.", "x -4 y -", "#### 12"]


@pytest.mark.parametrize("filter_name", ["strict-match", "flexible-extract"])
def test_lm_eval_spans_match_lm_eval(filter_name):
  pattern, group = COPIED[filter_name]
  ref = _reference_filter(pattern, group)
  for text in [row[0] for row in CASES] + MORE_TEXTS:
    span = extractors.lm_eval_span(text, pattern, group)
    assert (span if span is not None else "[invalid]") == ref(text), text


@pytest.mark.parametrize("name", ["lm_eval_strict", "lm_eval_flexible"])
def test_lm_eval_verdicts(name):
  """Right/wrong as lm-eval scores it, except where its string comparison splits equal numbers."""
  pattern, group = COPIED["strict-match" if name == "lm_eval_strict" else "flexible-extract"]
  ref = _reference_filter(pattern, group)
  golds = ["6", "1234", "18", "-3", "42", "4", "7", "9", "1200", "12", "0.5", "2"]
  differ = []
  for text in [row[0] for row in CASES] + MORE_TEXTS:
    for gold in golds:
      theirs = _reference_exact_match(ref(voting.truncate_at_stop(text)), gold)  # lm-eval's `until`
      ours = extractors.extract(text, name) == voting.normalize_answer(gold, "number")
      if theirs != ours:
        differ.append((text, gold, ref(voting.truncate_at_stop(text))))
  # "18.00" vs "18" only: lm-eval compares strings, voting compares numbers.
  assert all(voting.normalize_answer(extractors.lm_eval_normalize(span), "number") == gold
             and extractors.lm_eval_normalize(span) != gold for _, gold, span in differ), differ
  assert {t for t, _, _ in differ} <= {"The answer is 18.00.", "The answer is $18.00.",
                                      "The answer is 3,000. That is $3,000.00."}


def test_strict_cue():
  assert extractors.extract("So the result is 8.", "lm_eval_strict", cue="So the result is") == "8"
  assert extractors.extract("The answer is 8.", "lm_eval_strict", cue="So the result is") is None


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math-verify is not installed")
def test_math_verify_forms():
  mv = lambda t: extractors.extract(t, "math_verify")
  assert mv("The final answer is $\\dfrac{3}{4}$") == "0.75"
  assert mv("\\boxed{\\frac{1}{3}}") == "1/3"
  assert mv("The answer is 0.50.") == "0.5"
  assert mv("\\boxed{x + 1}") is None
  assert mv("The answer is 5.\nQ: and \\boxed{9}") == "5"


def _cfg(**task):
  c = config_lib.base_config()
  for k, v in task.items():
    if "." in k:
      group, leaf = k.split(".")
      c[group][leaf] = v
    else:
      c.task[k] = v
  return c


def test_config_validation(monkeypatch):
  for name in NAMES:
    if extractors.available(name):
      config_lib.validate(_cfg(extractor=name))
  with pytest.raises(ValueError, match=r"^config\.task\.extractor='regex': expected one of"):
    config_lib.validate(_cfg(extractor="regex"))
  with pytest.raises(ValueError, match=r"^config\.task\.extractor='lm_eval_strict': reads number"):
    config_lib.validate(_cfg(extractor="lm_eval_strict", answer_type="yesno"))
  config_lib.validate(_cfg(extractor="boxed", answer_type="yesno"))
  with pytest.raises(ValueError, match=r"^config\.task\.extractor='boxed': voting\.fallback"):
    config_lib.validate(_cfg(extractor="boxed", **{"voting.fallback_last_number": True}))
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda n, *a: None if n == "math_verify" else _find_spec(n, *a))
  with pytest.raises(ValueError, match=r"^config\.task\.extractor='math_verify': needs the "
                                       r"math-verify package \(pip install math-verify\)$"):
    config_lib.validate(_cfg(extractor="math_verify"))
  assert "math_verify" not in extractors.usable("number")


_find_spec = importlib.util.find_spec


def test_vote_question_uses_extractor():
  texts = ["\\boxed{4}. The answer is 3.", "\\boxed{4}", "The answer is 3."]
  assert voting.vote_question(texts)[0].answer == "3"                 # lmsi: 3, None, 3
  vote, kept, answers = voting.vote_question(texts, extractor="boxed")
  assert (vote.answer, kept, answers) == ("4", [0, 1], ["4", "4", "3"])


# A hand-made evaluation: 4 questions, greedy outputs and 3 sampled paths each.
EVAL_GOLD = ["6", "1234", "0.5", "9"]
EVAL_GREEDY = ["The answer is 6.", "The answer is $1,234.", "\\boxed{\\frac{1}{2}}",
               "So 5 + 4 = 9. The answer is 8."]
EVAL_SC = [["The answer is 6.", "The answer is 6", "no idea"],
           ["The answer is 1234.", "hmm", "The answer is 1,234."],
           ["\\boxed{\\frac{1}{2}}", "The answer is 0.5.", "The answer is 1/2."],
           ["The answer is 9.", "The answer is 9.", "8"]]


def _fake_generate(prompts, settings, seed):
  del seed
  rows = [[t] for t in EVAL_GREEDY] if settings.temperature == 0.0 else EVAL_SC
  assert len(rows) == len(prompts) and all(len(r) == settings.num_samples for r in rows)
  return rows


def test_evaluation_reports_extraction():
  from lmsi_jax import evaluate as eval_lib  # pylint: disable=g-import-not-at-top  (imports JAX)
  from lmsi_jax import testing  # pylint: disable=g-import-not-at-top
  fake = testing.ScriptedSampler(_fake_generate)
  qs = [{"id": str(i), "question": f"q{i}", "answer": g} for i, g in enumerate(EVAL_GOLD)]
  s = eval_lib.EvalSettings("few_shot_cot", num_samples=3, calibration_bins=2)
  res = eval_lib.evaluate(fake, qs, ["p"] * 4, s, seed=0)
  # lmsi greedy: 6, 1234, None, 8 -> 2/4 right. SC votes: 6, 1234, 0.5 ("0.5" and "1/2"), 9;
  # unextracted paths: "no idea", "hmm", the box, "8" (no cue).
  assert res["greedy_acc"] == 0.5 and res["sc_acc"] == 1.0
  x = res["extraction"]
  others = {
      # strict: 6, None ("$"), None, 8 -> disagrees on question 1 only
      "lm_eval_strict": {"acc": 0.25, "unextracted": 2, "disagree": 1},
      # flexible: 6, 1234, 2, 8 -> disagrees on question 2 (None vs "2")
      "lm_eval_flexible": {"acc": 0.5, "unextracted": 0, "disagree": 1},
      # boxed: 6, 1234, 0.5, 8 -> disagrees on question 2, and gets it right
      "boxed": {"acc": 0.75, "unextracted": 0, "disagree": 1},
  }
  if HAS_MATH_VERIFY:     # math_verify: 6, 1234, 0.5, 8 (its last expression)
    others["math_verify"] = {"acc": 0.75, "unextracted": 0, "disagree": 1}
  assert x == {"extractor": "lmsi", "greedy_unextracted": 1, "greedy_paths": 4,
               "sc_unextracted": 4, "sc_paths": 12, "greedy_others": others,
               "unavailable": [] if HAS_MATH_VERIFY else ["math_verify"]}
  # The chosen extractor moves: boxed reads question 2, and lmsi becomes an "other".
  s2 = eval_lib.EvalSettings("few_shot_cot", num_samples=3, calibration_bins=2, extractor="boxed")
  res2 = eval_lib.evaluate(fake, qs, ["p"] * 4, s2, seed=0)
  assert res2["greedy_acc"] == 0.75
  assert res2["extraction"]["greedy_others"]["lmsi"] == {"acc": 0.5, "unextracted": 1,
                                                          "disagree": 1}
  assert res2["extraction"]["sc_unextracted"] == 2   # "no idea", "hmm": no number to fall back on
