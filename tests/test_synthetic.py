"""The built-in synthetic sum task: exact text, arithmetic, determinism, disjoint splits."""
import itertools

import numpy as np
import pytest

from lmsi_jax.data import synthetic as syn

SMALL = dict(seed_easy_n=300, seed_hard_n=20, pool_n=200, eval_n=100)


def test_exact_text_format():
  terms = [3, 5, 2, 7, 1]
  assert syn.question_text(terms) == "3+5+2+7+1"
  assert syn.cot_text(terms, (5, 7, 3, 2, 1)) == (
      "5+7=12, 12+3=15, 15+2=17, 17+1=18. The answer is 18.")
  assert syn.cot_text([4, 9], (9, 4)) == "9+4=13. The answer is 13."
  assert syn.answer_of(terms) == "18"
  assert syn.parse_question("3+5+2+7+1") == terms


def test_cot_arithmetic_for_random_permutations():
  rng = np.random.default_rng(0)
  for _ in range(300):
    terms = syn.make_question(rng, int(rng.integers(2, 8)))
    order = [terms[i] for i in rng.permutation(len(terms))]
    q, cot = syn.question_text(terms), syn.cot_text(terms, order)
    assert syn.verify_cot(q, cot), (q, cot)
    assert cot.endswith(f". The answer is {sum(terms)}.")
    assert syn.answer_of(terms) == str(sum(terms))
    assert all(1 <= t <= 9 for t in terms)


def test_every_order_of_a_question_is_valid_and_reaches_the_sum():
  terms = [3, 3, 8, 1]
  cots = {syn.cot_text(terms, p) for p in itertools.permutations(terms)}
  assert len(cots) == 12  # 4! / 2! distinct paths.
  assert all(syn.verify_cot("3+3+8+1", c) and c.endswith("The answer is 15.") for c in cots)


@pytest.mark.parametrize("bad", [
    "5+7=12, 12+3=15, 15+2=17, 17+1=19. The answer is 19.",  # wrong sum
    "5+7=12, 12+3=15, 15+2=17, 17+1=18. The answer is 17.",  # wrong final
    "5+7=12, 12+3=15, 15+2=17. The answer is 17.",  # missing term
    "5+7=12, 12+3=15, 15+2=17, 17+1=18, 18+1=19. The answer is 19.",  # extra term
    "5+7=12, 12+3=15, 15+5=20, 20+1=21. The answer is 21.",  # 5 twice, 2 never
    "5+7=12, 13+3=16, 16+2=18, 18+1=19. The answer is 19.",  # does not continue
    "5+7=12, 12+3=15, 15+2=17, 17+1=18 The answer is 18.",  # format
    "5+7=12,12+3=15, 15+2=17, 17+1=18. The answer is 18.",  # format
    "The answer is 18.",
    "",
])
def test_verify_cot_rejects_corrupted_paths(bad):
  assert syn.verify_cot("3+5+2+7+1", "5+7=12, 12+3=15, 15+2=17, 17+1=18. The answer is 18.")
  assert not syn.verify_cot("3+5+2+7+1", bad)


def test_verify_cot_rejects_bad_question():
  assert not syn.verify_cot("3 + 5", "3+5=8. The answer is 8.")


def test_cot_text_rejects_non_permutation():
  with pytest.raises(ValueError):
    syn.cot_text([1, 2, 3], (1, 2, 2))
  with pytest.raises(ValueError):
    syn.make_question(np.random.default_rng(0), 1)


def test_splits_are_deterministic_and_seed_dependent():
  a, b = syn.build_splits(seed=3, **SMALL), syn.build_splits(seed=3, **SMALL)
  assert a == b
  c = syn.build_splits(seed=4, **SMALL)
  assert [r["question"] for r in a["eval"]] != [r["question"] for r in c["eval"]]
  assert syn.make_split(1, 50, 3, split_name="x") == syn.make_split(1, 50, 3, split_name="x")
  assert syn.make_split(1, 50, 3, split_name="x") != syn.make_split(2, 50, 3, split_name="x")


def test_default_splits_sizes_disjoint_and_well_formed():
  sp = syn.build_splits(seed=0)
  assert {k: len(v) for k, v in sp.items()} == {"seed": 3020, "pool": 1000, "eval": 500}
  qs = {k: [r["question"] for r in v] for k, v in sp.items()}
  for k in ("pool", "eval"):
    assert len(set(qs[k])) == len(qs[k]), k
  hard = [r["question"] for r in sp["seed"] if r["id"].startswith("seed_hard")]
  assert len(set(hard)) == len(hard) == 20
  assert not set(qs["seed"]) & set(qs["pool"])
  assert not set(qs["seed"]) & set(qs["eval"])
  assert not set(qs["pool"]) & set(qs["eval"])
  ids = [r["id"] for v in sp.values() for r in v]
  assert len(set(ids)) == len(ids)
  assert sp["eval"][0]["id"] == "eval-0" and sp["pool"][0]["id"] == "pool-0"
  for r in sp["seed"]:
    assert set(r) == {"id", "question", "answer", "cot"}
    assert syn.verify_cot(r["question"], r["cot"])
    assert r["answer"] == str(sum(syn.parse_question(r["question"])))
  for r in sp["pool"] + sp["eval"]:
    assert r["cot"] is None
    assert len(syn.parse_question(r["question"])) == 5
    assert r["answer"] == str(sum(syn.parse_question(r["question"])))
  lens = [len(syn.parse_question(r["question"])) for r in sp["seed"]]
  assert sum(n == 5 for n in lens) == 20 and set(lens) == {2, 3, 4, 5}
  # Eval does not depend on the other splits' sizes.
  assert syn.build_splits(seed=0, **SMALL)["eval"][:100] == sp["eval"][:100]


def test_difficulty_range_and_exclude():
  recs = syn.make_split(5, 400, (3, 6), split_name="r")
  lens = {len(syn.parse_question(r["question"])) for r in recs}
  assert lens == {3, 4, 5, 6}
  exclude = {r["question"] for r in syn.make_split(6, 60, 2, split_name="e")}
  rest = syn.make_split(7, 81 - 60, 2, split_name="r", exclude=exclude)
  assert not {r["question"] for r in rest} & exclude  # The 2-term space is now exhausted.
  with pytest.raises(ValueError, match="unique questions"):
    syn.make_split(7, 82 - 60, 2, split_name="r", exclude=exclude)


def test_exemplar_pairs():
  pairs = syn.make_exemplar_pairs(0, 8, 3)
  assert len(pairs) == 8 and len({q for q, _, _ in pairs}) == 8
  for q, cot, ans in pairs:
    assert syn.verify_cot(q, cot) and cot.endswith(f"The answer is {ans}.")
  assert pairs == syn.make_exemplar_pairs(0, 8, 3)


def test_gold_cot_orders_vary():
  rng = np.random.default_rng(0)
  terms = [1, 2, 3, 4, 5]
  cots = {syn.gold_cot(terms, rng) for _ in range(50)}
  assert len(cots) > 10 and all(syn.verify_cot("1+2+3+4+5", c) for c in cots)


def test_drill_repeats_questions_with_other_orders_in_proportion_to_the_question_space():
  recs = syn.make_drill(0, 6000, (2, 4), split_name="d", exclude={"1+1"})
  assert [r["id"] for r in recs[:2]] == ["d-0", "d-1"] and recs == syn.make_drill(0, 6000, (2, 4), split_name="d", exclude={"1+1"})
  lens = [len(syn.parse_question(r["question"])) for r in recs]
  share = {k: lens.count(k) / len(lens) for k in (2, 3, 4)}
  total = 81 + 729 + 6561
  for k, n in ((2, 81), (3, 729), (4, 6561)):
    assert abs(share[k] - n / total) < 0.02, (k, share)
  assert all(syn.verify_cot(r["question"], r["cot"]) for r in recs)
  assert "1+1" not in {r["question"] for r in recs}
  two = [r for r in recs if len(syn.parse_question(r["question"])) == 2]
  by_q = {}
  for r in recs:
    by_q.setdefault(r["question"], set()).add(r["cot"])
  assert len(by_q) < len(recs)                                   # questions repeat ...
  assert any(len(c) > 1 for q, c in by_q.items() if len(set(q.split("+"))) > 1)   # ... in other orders
  assert two


def test_seed_hard_repeat_copies_the_labeled_hard_examples():
  sp = syn.build_splits(seed=1, **{**SMALL, "seed_hard_n": 5}, seed_hard_repeat=3)
  hard = [r for r in sp["seed"] if r["id"].startswith("seed_hard")]
  assert len(hard) == 15 and len({r["id"] for r in hard}) == 15
  firsts = [r for r in hard if "." not in r["id"]]
  for r in hard:
    base = next(f for f in firsts if r["id"].split(".")[0] == f["id"])
    assert (r["question"], r["cot"], r["answer"]) == (base["question"], base["cot"], base["answer"])
  with pytest.raises(ValueError, match="seed_hard_repeat"):
    syn.build_splits(seed=1, **SMALL, seed_hard_repeat=0)
