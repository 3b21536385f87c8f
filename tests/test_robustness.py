"""Issue 14's pieces: the seeds aggregate, the spurious-label arm, the collapse guard, gold-free data."""
import math
import statistics

import numpy as np
import pytest

from lmsi_jax import guard as guard_lib
from lmsi_jax import multiseed
from lmsi_jax import pseudo_labels as pl
from lmsi_jax import seeds
from lmsi_jax import voting


# ----------------------------------------------------------------------------- seeds aggregate
def _report(seed, base, rounds, oracle, control, spurious):
  b = {"greedy_acc": base[0], "sc_acc": base[1]}
  rs = [{"round": i + 1, "greedy_acc": g, "sc_acc": s, "pseudo_label_precision": p}
        for i, (g, s, p) in enumerate(rounds)]
  last = rs[-1]
  arms = {k: {"greedy_acc": v[0], "sc_acc": v[1]} for k, v in
          (("oracle", oracle), ("control", control), ("spurious", spurious))}
  return {"base": b, "rounds": rs, **arms,
          "final": {"round": len(rs), "greedy_acc": last["greedy_acc"], "sc_acc": last["sc_acc"]},
          "gains": {f"over_{k}": last["greedy_acc"] - v["greedy_acc"]
                    for k, v in (("base", b), ("control", arms["control"]),
                                 ("spurious", arms["spurious"]))},
          "pgr": (last["greedy_acc"] - base[0]) / (oracle[0] - base[0]), "pgr_sc": None,
          "wall_s": 100.0 + seed}


REPORTS = {
    0: _report(0, (0.30, 0.60), [(0.50, 0.70, 0.6), (0.70, 0.80, 0.7)], (0.90, 0.95), (0.40, 0.6), (0.2, 0.3)),
    3: _report(3, (0.40, 0.62), [(0.55, 0.72, 0.65), (0.75, 0.85, 0.8)], (0.95, 0.97), (0.45, 0.6), (0.25, 0.35)),
    7: _report(7, (0.35, 0.58), [(0.52, 0.69, 0.62), (0.72, 0.81, 0.75)], (0.92, 0.96), (0.41, 0.59), (0.3, 0.3)),
}


def test_aggregate_mean_and_sd_recomputed_from_the_per_seed_reports():
  agg = multiseed.aggregate(REPORTS)
  assert agg["seeds"] == [0, 3, 7]
  assert [row["seed"] for row in agg["per_seed"]] == [0, 3, 7]
  for key, get in (("base_greedy", lambda r: r["base"]["greedy_acc"]),
                   ("round2_sc", lambda r: r["rounds"][1]["sc_acc"]),
                   ("round1_precision", lambda r: r["rounds"][0]["pseudo_label_precision"]),
                   ("final_greedy", lambda r: r["final"]["greedy_acc"]),
                   ("spurious_greedy", lambda r: r["spurious"]["greedy_acc"]),
                   ("gain_over_control", lambda r: r["gains"]["over_control"]),
                   ("pgr", lambda r: r["pgr"]), ("wall_s", lambda r: r["wall_s"])):
    xs = [get(REPORTS[s]) for s in (0, 3, 7)]
    assert [row[key] for row in agg["per_seed"]] == xs, key
    assert agg["mean"][key] == pytest.approx(statistics.mean(xs)), key
    assert agg["sd"][key] == pytest.approx(statistics.stdev(xs)), key
    assert agg["n"][key] == 3
  assert "pgr_sc" not in agg["mean"]          # None on every seed: no mean, not a zero


def test_aggregate_one_seed_has_no_sd_and_markdown_lists_every_seed(tmp_path):
  agg = multiseed.aggregate({0: REPORTS[0]})
  assert agg["sd"]["base_greedy"] is None
  md = multiseed.to_markdown(multiseed.aggregate(REPORTS))
  assert "| seed 0 | seed 3 | seed 7 | mean ± sd |" in md
  row = next(l for l in md.splitlines() if l.startswith("| final_greedy |"))
  m, sd = statistics.mean([0.70, 0.75, 0.72]), statistics.stdev([0.70, 0.75, 0.72])
  assert row.endswith(f"| {100 * m:.1f}% ± {100 * sd:.1f} |")
  multiseed.write(multiseed.aggregate(REPORTS), str(tmp_path))
  assert (tmp_path / "accuracy.png").stat().st_size > 1000
  assert (tmp_path / "aggregate.json").exists() and (tmp_path / "aggregate.md").exists()


@pytest.mark.parametrize("spec,seeds", [("0-4", [0, 1, 2, 3, 4]), ("3", [3]), ("0,2, 5", [0, 2, 5]),
                                        ("0-1,4", [0, 1, 4])])
def test_parse_seeds(spec, seeds):
  assert multiseed.parse_seeds(spec) == seeds


@pytest.mark.parametrize("spec", ["", "a", "4-2", "0,0", "1-"])
def test_parse_seeds_rejects_in_one_line(spec):
  with pytest.raises(ValueError, match=r"^--seeds="):
    multiseed.parse_seeds(spec)


# ------------------------------------------------------------------------------- spurious arm
def _texts(answers):
  return [f"1+2=3. The answer is {a}." if a is not None else "no idea" for a in answers]


@pytest.mark.parametrize("answers", [
    ["5", "5", "5", "7", "9", None, "5", "7"],
    ["5", "7"] * 6 + ["5"],
    ["5", "5", "5", "5", "3"],
])
def test_spurious_never_picks_the_majority_when_another_answer_was_sampled(answers):
  vote = voting.majority_vote(answers)
  kept = voting.select_paths(answers, vote)
  picked = set()
  for i in range(40):
    answer, paths = voting.select_spurious(answers, vote, kept, np.random.default_rng(i))
    assert answer != vote.answer and answer is not None
    assert len(paths) == len(kept)                         # as many examples as LMSI keeps
    assert all(answers[k] == answer for k in paths)
    picked.add(answer)
  assert picked == {a for a in answers if a not in (None, vote.answer)}   # uniform over others


def test_spurious_falls_back_to_the_majority_only_when_nothing_else_was_sampled():
  answers = ["4", "4", None, "4"]
  vote = voting.majority_vote(answers)
  kept = voting.select_paths(answers, vote)
  assert voting.select_spurious(answers, vote, kept, np.random.default_rng(0)) == ("4", kept)
  none = voting.majority_vote([None, None])
  assert voting.select_spurious([None, None], none, [], np.random.default_rng(0)) == (None, [])


def _records():
  rng = np.random.default_rng(0)
  out = []
  for i in range(30):
    answers = [str(int(x)) for x in rng.integers(10, 14, size=8)]
    out.append({"id": f"pool-{i}", "question": f"{i}+1",
                "samples": [{"text": t, "mean_logprob": -0.5} for t in _texts(answers)]})
  return out


def test_spurious_pool_matches_lmsi_example_count_and_is_deterministic():
  recs, s = _records(), pl.VoteSettings()
  qs = [{"id": r["id"], "question": r["question"], "answer": "11"} for r in recs]
  kw = dict(exemplars=None, formats=("zero_shot_cot", "zero_shot_direct"), round_index=1,
            source_step=0)
  lmsi, votes = pl.vote_pool(recs, qs, s, **kw)
  spur = pl.spurious_pool(recs, s, seed=seeds.stream(0, "spurious"), **kw)
  assert len(spur) == len(lmsi)
  by_q = lambda labels: {i: sum(x["id"] == i for x in labels) for i in {x["id"] for x in labels}}
  assert by_q(spur) == by_q(lmsi)                          # per question, too
  majority = {v["id"]: v["answer"] for v in votes}
  for x in spur:
    assert x["answer"] != majority[x["id"]]
    assert x["targets"].endswith(f"The answer is {x['answer']}.")
  assert spur == pl.spurious_pool(recs, s, seed=seeds.stream(0, "spurious"), **kw)
  assert spur != pl.spurious_pool(recs, s, seed=seeds.stream(1, "spurious"), **kw)


def test_gold_never_changes_training_data():
  """Pseudo-labels, spurious labels and guard signals are identical whatever the gold says."""
  recs, s = _records(), pl.VoteSettings()
  kw = dict(exemplars=None, formats=("zero_shot_cot",), round_index=2, source_step=7)
  golds = [{r["id"]: "11" for r in recs}, {r["id"]: "999" for r in recs}, {r["id"]: None for r in recs}]
  outs = []
  for gold in golds:
    qs = [{"id": r["id"], "question": r["question"], "answer": gold[r["id"]]} for r in recs]
    labels, votes = pl.vote_pool(recs, qs, s, **kw)
    voted = [pl.vote_record(r, s) for r in recs]
    sig = guard_lib.probe_signals([a for *_, a in voted], [t for t, *_ in voted], None)
    outs.append((labels, [{k: v for k, v in x.items() if k not in ("correct", "pass_at_k")}
                          for x in votes], pl.spurious_pool(recs, s, seed=3, **kw), sig))
  assert outs[0] == outs[1] == outs[2]


def test_seed_streams_are_named_and_stable():
  assert seeds.stream(0, "probe", 1) == seeds.stream(0, "probe", 1)
  assert len({seeds.stream(0, "probe", 1), seeds.stream(0, "probe", 2), seeds.stream(1, "probe", 1),
              seeds.stream(0, "spurious", 1)}) == 4
  assert 0 <= seeds.stream(123, "x") < 2**31


# ------------------------------------------------------------------------------ collapse guard
def _signals(share, self_agreement, agreement):
  return {"mean_vote_share": share, "answer_entropy": 1.0, "distinct_paths": 0.9,
          "parse_rate": 1.0, "self_agreement": self_agreement, "agreement": agreement}


def _run(seq, settings=guard_lib.GuardSettings(probe_n=10, max_drop=0.05)):
  g = guard_lib.CollapseGuard(settings)
  stops = [g.update(sig) for sig in seq]
  return g, stops


def test_guard_fires_when_answers_move_more_than_resampling_explains():
  # The demo's collapsing run (lr 3e-3, no seed replay; BENCHMARKS.md): its rounds kept
  # fewer of their predecessor's majority answers than two halves of the predecessor's
  # own samples agree on.
  g, stops = _run([_signals(0.363, 0.59, None), _signals(0.335, 0.49, 0.43),
                   _signals(0.344, 0.41, 0.38), _signals(0.403, 0.54, 0.45)])
  assert stops == [False, True, False, False]         # stop once, at the first flag
  assert [e["flagged"] for e in g.history] == [False, True, True, False]
  assert g.stopped_after == 1 and g.kept_round == 0
  rep = g.report()
  assert rep["stopped_after_round"] == 1 and rep["kept_round"] == 0
  assert rep["rounds"][1]["drop"] == pytest.approx(0.59 - 0.43)
  assert rep["rounds"][1]["share_rise"] == pytest.approx(0.335 - 0.363)
  assert "below the previous model's split-half agreement" in rep["rounds"][1]["reason"]


def test_guard_quiet_on_healthy_rounds():
  # The demo recipe's round 1 on tuning seeds 0, 1, 2 (BENCHMARKS.md).
  for base, r1 in (((0.341, 0.555), (0.397, 0.505, 0.595)), ((0.36, 0.5), (0.416, 0.635, 0.575)),
                   ((0.532, 0.835), (0.673, 0.925, 0.87))):
    g, stops = _run([_signals(*base, None), _signals(*r1)])
    assert not any(stops) and g.stopped_after is None and g.kept_round == 1


def test_guard_boundary_and_later_round():
  # a drop under max_drop is not flagged; a later flag keeps the round before it
  g, stops = _run([_signals(0.4, 0.60, None), _signals(0.5, 0.70, 0.56),
                   _signals(0.6, 0.70, 0.66), _signals(0.7, 0.8, 0.64)])
  assert stops == [False, False, False, True] and g.kept_round == 2
  # without a split-half measure (one sample per question) nothing is flagged
  g, stops = _run([_signals(0.4, None, None), _signals(0.9, None, 0.0)])
  assert not any(stops)


def test_probe_signals_by_hand():
  answers = [["3", "3", "4", None], ["5", "5", "5", "5"]]
  texts = [["a", "a ", "b", "c"], ["x", "y", "x", "x"]]
  sig = guard_lib.probe_signals(answers, texts, previous=["3", "6"])
  # halves: q1 even ("3", "4") -> "3" (tie: smallest), odd ("3", None) -> "3"; q2 "5" and "5"
  assert sig["self_agreement"] == 1.0
  assert sig["mean_vote_share"] == pytest.approx((0.5 + 1.0) / 2)
  h1 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
  assert sig["answer_entropy"] == pytest.approx(h1 / 2)
  assert sig["distinct_paths"] == pytest.approx((3 / 4 + 2 / 4) / 2)
  assert sig["parse_rate"] == pytest.approx((0.75 + 1.0) / 2)
  assert sig["agreement"] == 0.5 and sig["majorities"] == ["3", "5"]
  assert guard_lib.probe_signals(answers, texts, None)["agreement"] is None
  with pytest.raises(ValueError, match="empty"):
    guard_lib.probe_signals([], [], None)


@pytest.mark.parametrize("kw,key", [({"probe_n": -1}, "guard.probe_n"),
                                    ({"max_drop": 2.0}, "guard.max_drop")])
def test_guard_settings_fail_in_one_line_naming_the_key(kw, key, demo_config):
  from lmsi_jax import config as config_lib
  c = demo_config("smoke", {f"guard.{k}": v for k, v in kw.items()})
  with pytest.raises(ValueError, match=rf"^config\.{key}="):
    config_lib.validate(c)


def test_model_init_fails_in_one_line_naming_the_key(demo_config):
  from lmsi_jax import config as config_lib
  config_lib.validate(demo_config("smoke"))      # the demo's "fan_in" is valid
  c = demo_config("smoke", {"model.init": "xavier"})
  with pytest.raises(ValueError, match=r"^config\.model\.init='xavier': expected '' \(the preset's\)"):
    config_lib.validate(c)
