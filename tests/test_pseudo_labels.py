"""vote_pool: every voting option changes the pseudo-labels the way it claims; diagnostics."""
import pytest

from lmsi_jax import pseudo_labels as pl

FORMATS = ("zero_shot_cot", "zero_shot_direct")


def _path(answer, steps="1+2=3"):
  return f"{steps}. The answer is {answer}."


def _rec(qid, texts, logprobs=None):
  logprobs = logprobs or [-1.0] * len(texts)
  return {"id": qid, "samples": [{"text": t, "mean_logprob": lp} for t, lp in zip(texts, logprobs)]}


QUESTIONS = [{"id": "u", "question": "1+2", "answer": "3"},    # unanimous
             {"id": "m", "question": "2+2", "answer": "4"},    # 3 of 4
             {"id": "w", "question": "3+3", "answer": "6"}]    # weighted vote flips it
SAMPLES = [
    _rec("u", [_path(3), _path(3, "2+1=3"), _path(3), _path(3, "2+1=3")]),
    _rec("m", [_path(4, "2+2=4"), _path(5, "2+3=5"), _path(4, "2+2=4"), _path(4, "2 + 2=4")]),
    _rec("w", [_path(7, "3+4=7"), _path(7, "3+4=7"), _path(7, "4+3=7"), _path(6, "3+3=6")],
         logprobs=[-6.0, -6.0, -6.0, -0.05]),
]


def _vote(**kw):
  labels, votes = pl.vote_pool(SAMPLES, QUESTIONS, pl.VoteSettings(**kw), exemplars=None,
                               formats=FORMATS, round_index=1, source_step=10)
  return labels, {v["id"]: v for v in votes}


def _kept(labels):
  out = {}
  for l in labels:
    out.setdefault(l["id"], set()).add(l["path_index"])
  return {k: sorted(v) for k, v in out.items()}


def test_default_keeps_every_majority_path_in_every_format():
  labels, votes = _vote()
  assert _kept(labels) == {"u": [0, 1, 2, 3], "m": [0, 2, 3], "w": [0, 1, 2]}
  assert len(labels) == 10 * len(FORMATS)
  assert {l["format"] for l in labels} == set(FORMATS)
  assert votes["w"]["answer"] == "7" and votes["m"]["share"] == 0.75
  l = next(l for l in labels if l["id"] == "m" and l["format"] == "zero_shot_direct")
  assert l["targets"] == " The answer is 4." and l["vote_share"] == 0.75 and l["round"] == 1


def test_vote_share_one_keeps_only_unanimous_questions():
  labels, votes = _vote(min_vote_share=1.0)
  assert _kept(labels) == {"u": [0, 1, 2, 3]}
  assert votes["m"]["kept"] == 0 and votes["m"]["answer"] == "4"   # voted, but not kept
  labels, _ = _vote(min_vote_share=0.75)
  assert set(_kept(labels)) == {"u", "m", "w"}


def test_weighted_vote_uses_the_sample_log_probs():
  labels, votes = _vote(weighted=True)
  # exp(-0.05) = 0.95 outweighs 3 * exp(-6) = 0.0074: the single "6" path wins
  assert votes["w"]["answer"] == "6" and votes["w"]["count"] == 1
  assert _kept(labels)["w"] == [3]
  assert {l["answer"] for l in labels if l["id"] == "w"} == {"6"}
  assert _kept(labels)["u"] == [0, 1, 2, 3]   # equal weights change nothing


def test_dedup_drops_exact_duplicate_paths():
  labels, _ = _vote(dedup=True)
  # u: paths 2, 3 repeat 0, 1; m: path 2 repeats 0 ("2 + 2=4" differs); w: path 1 repeats 0
  assert _kept(labels) == {"u": [0, 1], "m": [0, 3], "w": [0, 2]}


def test_max_paths_caps_paths_per_question():
  labels, votes = _vote(max_paths=2)
  assert _kept(labels) == {"u": [0, 1], "m": [0, 2], "w": [0, 1]}
  assert votes["u"]["kept"] == 2
  labels, _ = _vote(max_paths=1, dedup=True)
  assert _kept(labels) == {"u": [0], "m": [0], "w": [0]}


def test_gold_never_changes_the_pseudo_labels():
  wrong = [{**q, "answer": "999"} for q in QUESTIONS]
  hidden = [{k: v for k, v in q.items() if k != "answer"} for q in QUESTIONS]
  ref, _ = pl.vote_pool(SAMPLES, QUESTIONS, pl.VoteSettings(), exemplars=None, formats=FORMATS,
                        round_index=1, source_step=0)
  for qs in (wrong, hidden):
    labels, _ = pl.vote_pool(SAMPLES, qs, pl.VoteSettings(), exemplars=None, formats=FORMATS,
                             round_index=1, source_step=0)
    assert labels == ref


def test_summary_diagnostics():
  _, votes = _vote()
  s = pl.summarize_votes(list(votes.values()), bins=2)
  # u right (majority 3), m right (4), w wrong (7 vs 6) but 6 was sampled once
  assert s["pseudo_label_precision"] == pytest.approx(2 / 3)
  assert s["maj_at_k"] == pytest.approx(2 / 3) and s["pass_at_k"] == 1.0
  assert s["num_pseudo_labels"] == 10 and s["num_questions"] == 3
  assert s["mean_distinct_answers"] == pytest.approx((1 + 2 + 2) / 3)
  assert s["mean_distinct_paths"] == pytest.approx((2 + 3 + 3) / 3)
  assert s["mean_vote_share"] == pytest.approx((1 + 0.75 + 0.75) / 3)
  assert [c["count"] for c in s["pool_calibration"]] == [0, 3]


def test_extractor_chooses_the_voted_answers():
  """task.extractor reaches the vote: boxed reads the boxes the default cue parser cannot."""
  samples = [_rec("m", ["2+2 = \\boxed{4}", "So \\boxed{4}.", "The answer is 5.", "2+2=4."])]
  labels, votes = pl.vote_pool(samples, QUESTIONS, pl.VoteSettings(), exemplars=None,
                               formats=FORMATS, round_index=1, source_step=0)
  assert votes[0]["answer"] == "5" and votes[0]["correct"] is False
  labels, votes = pl.vote_pool(samples, QUESTIONS, pl.VoteSettings(extractor="boxed"),
                               exemplars=None, formats=FORMATS, round_index=1, source_step=0)
  assert (votes[0]["answer"], votes[0]["count"], votes[0]["correct"]) == ("4", 3, True)
  assert sorted({l["path_index"] for l in labels}) == [0, 1, 3]
  labels, votes = pl.vote_pool(samples, QUESTIONS, pl.VoteSettings(extractor="lm_eval_flexible"),
                               exemplars=None, formats=FORMATS, round_index=1, source_step=0)
  assert (votes[0]["answer"], votes[0]["count"]) == ("4", 3)   # "2+2=4." -> "4."; "\boxed{4}" -> "4"
