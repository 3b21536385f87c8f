"""Tests for answer extraction, normalisation and self-consistency voting."""
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmsi_jax import voting
from lmsi_jax.voting import Vote, extract_answer, majority_vote, normalize_answer, select_paths

NOT_POSSIBLE = "it is not possible to tell"

# (text, answer_type, expected) with the default cue "The answer is" and stop "\nQ:".
EXTRACTION_CASES = [
    # number
    ("... 21 - 15 = 6. The answer is 6.", "number", "6"),
    ("The answer is 1,234.", "number", "1234"),
    ("The answer is $18.", "number", "18"),
    ("The answer is $18.00.", "number", "18"),
    ("The answer is $1,234.50.", "number", "1234.5"),
    ("The answer is -3.", "number", "-3"),
    ("The answer is \u22123.", "number", "-3"),  # Unicode minus sign.
    ("The answer is -$5.", "number", "-5"),
    ("The answer is $-5.", "number", "-5"),
    ("The answer is -0.", "number", "0"),
    ("The answer is 3.50", "number", "3.5"),
    ("The answer is 3.0", "number", "3"),
    ("The answer is 0.25.", "number", "0.25"),
    ("The answer is .5", "number", "0.5"),
    ("The answer is 1000.", "number", "1000"),
    ("The answer is 1/2.", "number", "0.5"),
    ("The answer is 2/6.", "number", "1/3"),
    ("The answer is 3/0.", "number", None),
    ("The answer is 5 apples.", "number", "5"),
    ("The answer is 50%.", "number", "50"),
    ("The answer is: 42", "number", "42"),
    ("the answer is 7", "number", "7"),  # cue is case-insensitive
    ("So the answer is 14.8.", "number", "14.8"),
    ("The answer is 10 - 3 = 7.", "number", "10"),  # first number after the cue
    ("The answer is 12. The answer is 13.", "number", "12"),  # first cue wins
    ("The answer is 12.\nQ: Tom has 3 cats. A: The answer is 3.", "number", "12"),
    ("There are 5 cars.\nQ: The answer is 9.", "number", None),  # cue only after stop
    ("There are 5 cars, so 5 + 3 = 8.", "number", None),  # cue missing
    ("The answer is five.", "number", None),
    ("The answer is\n7", "number", None),  # only the cue's own line is parsed
    ("", "number", None),
    ("The answer is", "number", None),
    # choice
    ("The answer is (B).", "choice", "b"),
    ("The answer is (a).", "choice", "a"),
    ("The answer is ( e ).", "choice", "e"),
    ("The answer is the sandwich (c).", "choice", "c"),
    ("The answer is D.", "choice", "d"),
    ("The answer is (f).", "choice", None),
    ("The answer is a car.", "choice", None),
    ("No cue here (a).", "choice", None),
    # yesno
    ("The answer is yes.", "yesno", "yes"),
    ("The answer is No.", "yesno", "no"),
    ("The answer is YES, because...", "yesno", "yes"),
    ("The answer is maybe.", "yesno", None),
    ("The answer is nothing.", "yesno", None),
    # nli
    ("The answer is it is not possible to tell.", "nli", NOT_POSSIBLE),
    ("The answer is It is not possible to tell", "nli", NOT_POSSIBLE),
    ("The answer is yes.", "nli", "yes"),
    ("The answer is no.", "nli", "no"),
    ("The answer is not sure.", "nli", None),
    # span (DROP)
    ("So the answer is The Eagles.", "span", "eagles"),
    ("So the answer is eagles", "span", "eagles"),
    ("So the answer is 14.8.", "span", "14.8"),
    ("So the answer is 1,000.", "span", "1000"),
    ("So the answer is $7.00.", "span", "7"),
    ("So the answer is 1,000 yards.", "span", "1000 yards"),
    ("So the answer is an apple, a pear!", "span", "apple pear"),
    ("So the answer is  Tom   Brady .", "span", "tom brady"),
    ("So the answer is the.", "span", None),
    ("", "span", None),
]


@pytest.mark.parametrize("text,answer_type,expected", EXTRACTION_CASES)
def test_extract_answer(text, answer_type, expected):
  assert extract_answer(text, answer_type) == expected


def test_extraction_table_covers_all_types():
  assert len(EXTRACTION_CASES) >= 45
  assert {t for _, t, _ in EXTRACTION_CASES} == set(voting.ANSWER_TYPES)


@pytest.mark.parametrize("text,expected", [
    ("There are 5 cars, so 5 + 3 = 8.", "8"),
    ("5 + 3 = 8 and then 10 - 3", "3"),  # spaced minus is subtraction, not a sign
    ("it drops to -4", "-4"),
    ("8 so the answer is five.", "8"),  # unparseable cue falls back as well
    ("Total $1,200.\nQ: 99 bottles", "1200"),  # numbers after the stop are ignored
    ("no numbers at all", None),
])
def test_fallback_last_number(text, expected):
  assert extract_answer(text, "number", fallback_last_number=True) == expected


def test_fallback_prefers_cue_and_ignores_other_types():
  assert extract_answer("The answer is 3. Later 9.", fallback_last_number=True) == "3"
  assert extract_answer("yes 5", "yesno", fallback_last_number=True) is None


def test_custom_cue_and_stop():
  assert extract_answer("Therefore: 4\nQ: x", cue="Therefore:") == "4"
  assert extract_answer("The answer is 3.\nQ: The answer is 4.", stop=None) == "3"
  assert voting.truncate_at_stop("a\nQ: b\nQ: c") == "a"
  assert voting.truncate_at_stop("a\nQ: b", stop=None) == "a\nQ: b"


def test_unknown_answer_type_is_named():
  with pytest.raises(ValueError, match="'date'"):
    extract_answer("The answer is 3.", "date")
  with pytest.raises(ValueError, match="'date'"):
    normalize_answer("3", "date")


@pytest.mark.parametrize("gold,answer_type,expected", [
    ("1,200", "number", "1200"), ("72", "number", "72"), ("$18", "number", "18"),
    ("18.00", "number", "18"), ("(b)", "choice", "b"), ("B", "choice", "b"),
    ("True", "yesno", "yes"), ("false", "yesno", "no"),
    ("entailment", "nli", "yes"), ("neutral", "nli", NOT_POSSIBLE),
    ("contradiction", "nli", "no"), ("The Eagles", "span", "eagles"),
    (None, "span", None), ("  ", "number", None),
])
def test_normalize_gold(gold, answer_type, expected):
  assert normalize_answer(gold, answer_type) == expected


def test_currency_and_decimal_forms_vote_together():
  texts = ["The answer is $18.", "The answer is 18.00.", "The answer is 18", "The answer is 17."]
  answers = [extract_answer(t) for t in texts]
  assert majority_vote(answers) == Vote("18", 3, 0.75, 4, 3.0)


# ------------------------------------------------------------------ voting
def test_majority_vote_basics():
  assert majority_vote(["108", "108", "26"]) == Vote("108", 2, 2 / 3, 3, 2.0)
  assert majority_vote([None, None]) == Vote(None, 0, 0.0, 2, 0.0)
  assert majority_vote(["5", None, None, None]) == Vote("5", 1, 0.25, 4, 1.0)
  assert majority_vote(["9", "10", "10", "9"]).answer == "10"  # smallest string
  with pytest.raises(ValueError):
    majority_vote([])
  with pytest.raises(ValueError):
    majority_vote(["1"], weights=[1.0, 2.0])
  with pytest.raises(ValueError):
    majority_vote(["1"], weights=[-1.0])


def test_weighted_vote_can_overturn_count():
  v = majority_vote(["a", "a", "b"], weights=[0.1, 0.2, 0.9])
  assert (v.answer, v.count, v.weight) == ("b", 1, 0.9)
  assert v.share == pytest.approx(1 / 3)


def test_sequence_weight():
  assert voting.sequence_weight([math.log(0.5)] * 4) == pytest.approx(0.5)
  lp = np.array([math.log(0.25), math.log(0.25), -100.0])
  assert voting.sequence_weight(lp, 2) == pytest.approx(0.25)
  with pytest.raises(ValueError):
    voting.sequence_weight(lp, 0)
  with pytest.raises(ValueError):
    voting.sequence_weight(lp, 4)


answer_lists = st.lists(st.one_of(st.none(), st.sampled_from(["1", "2", "3", "10", "x"])),
                        min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(answer_lists, st.randoms(use_true_random=False))
def test_vote_permutation_invariant(answers, rnd):
  shuffled = list(answers)
  rnd.shuffle(shuffled)
  a, b = majority_vote(answers), majority_vote(shuffled)
  assert (a.answer, a.count, a.share, a.total) == (b.answer, b.count, b.share, b.total)


@settings(max_examples=150, deadline=None)
@given(answer_lists)
def test_vote_invariants(answers):
  v = majority_vote(answers)
  assert 0.0 <= v.share <= 1.0 and v.total == len(answers)
  parsed = [a for a in answers if a is not None]
  if not parsed:
    assert v == Vote(None, 0, 0.0, len(answers), 0.0)
    return
  assert v.answer is not None  # None never wins, even when most samples are None
  counts = {a: parsed.count(a) for a in parsed}
  top = max(counts.values())
  assert v.count == top == v.weight
  # Ties: the smallest tied string, whatever the order.
  assert v.answer == min(a for a, c in counts.items() if c == top)
  if 2 * top > len(parsed):
    assert counts[v.answer] == top


@settings(max_examples=100, deadline=None)
@given(answer_lists, st.sampled_from(["1", "2", "x"]))
def test_strict_majority_wins(answers, winner):
  others = len([a for a in answers if a is not None and a != winner])
  forced = answers + [winner] * (others + 1)
  assert majority_vote(forced).answer == winner


@settings(max_examples=100, deadline=None)
@given(answer_lists, st.floats(min_value=0.01, max_value=5.0))
def test_equal_weights_equal_unweighted(answers, w):
  a, b = majority_vote(answers), majority_vote(answers, weights=[w] * len(answers))
  assert (a.answer, a.count, a.share, a.total) == (b.answer, b.count, b.share, b.total)


@settings(max_examples=100, deadline=None)
@given(answer_lists, st.data())
def test_weighted_vote_permutation_invariant(answers, data):
  weights = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(answers),
                               max_size=len(answers)))
  perm = data.draw(st.permutations(range(len(answers))))
  a = majority_vote(answers, weights)
  b = majority_vote([answers[i] for i in perm], [weights[i] for i in perm])
  assert a == b


def test_ties_order_independent_exhaustive():
  for perm in itertools.permutations(["7", "7", "3", "3", None]):
    assert majority_vote(perm).answer == "3"


# ------------------------------------------------------------------ selection
@settings(max_examples=150, deadline=None)
@given(answer_lists)
def test_select_paths_keeps_exactly_majority(answers):
  v = majority_vote(answers)
  kept = select_paths(answers, v)
  assert kept == sorted(kept)
  assert all(answers[i] == v.answer for i in kept)
  assert len(kept) == v.count
  unanimous = select_paths(answers, v, min_vote_share=1.0)
  if v.share == 1.0:
    assert unanimous == list(range(len(answers)))
  else:
    assert unanimous == []


def test_select_paths_options():
  answers = ["4", "4", None, "5", "4", "4"]
  v = majority_vote(answers)
  assert select_paths(answers, v) == [0, 1, 4, 5]
  assert select_paths(answers, v, max_paths=2) == [0, 1]
  assert select_paths(answers, v, max_paths=0) == []
  assert select_paths(answers, v, min_vote_share=4 / 6) == [0, 1, 4, 5]
  assert select_paths(answers, v, min_vote_share=0.7) == []
  texts = ["2+2=4.", "2 + 2 = 4.", "x", "y", "2+2=4. ", "2 + 2  =\n4."]
  assert select_paths(answers, v, dedup_texts=texts) == [0, 1]
  assert select_paths(answers, v, dedup_texts=texts, max_paths=1) == [0]
  assert select_paths([None], majority_vote([None])) == []
  with pytest.raises(ValueError):
    select_paths(answers, v, max_paths=-1)
  with pytest.raises(ValueError):
    select_paths(answers, v, dedup_texts=texts[:2])


def test_vote_question_pipeline():
  texts = [
      "Stefan paid 100 + 8 = 108. The answer is $108.\nQ: next question",
      "Total 108.00. The answer is 108.",
      "The tip is 26. The answer is 26.",
      "I do not know.",
      "Stefan paid 100 + 8 = 108. The answer is $108.\nQ: another continuation",
  ]
  vote, kept, answers = voting.vote_question(texts, "number")
  assert answers == ["108", "108", "26", None, "108"]
  assert vote == Vote("108", 3, 0.6, 5, 3.0)
  assert kept == [0, 1, 4]
  _, kept, _ = voting.vote_question(texts, "number", dedup=True)
  assert kept == [0, 1]  # path 4 equals path 0 once truncated at "\nQ:"
  _, kept, _ = voting.vote_question(texts, "number", min_vote_share=0.8)
  assert kept == []
  _, kept, _ = voting.vote_question(texts, "number", max_paths=1)
  assert kept == [0]
  vote, kept, _ = voting.vote_question(texts, "number",
                                       logprob_weights=[0.1, 0.1, 0.9, 0.5, 0.1])
  assert (vote.answer, kept) == ("26", [2])
  vote, _, answers = voting.vote_question(texts, fallback_last_number=True)
  assert answers[3] is None and vote.answer == "108"
