"""Round strategies through a Pipeline: restart vs continue, early stopping, wiring of options."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from lmsi_jax import early_stop
from lmsi_jax import pseudo_labels as pl
from lmsi_jax import results




@pytest.fixture(scope="module")
def pipe(tmp_path_factory, demo_config):
  from lmsi_jax import rounds
  cfg = demo_config("smoke")
  cfg.voting.update(min_vote_share=0.5, max_paths=3, dedup=True, weighted=True)
  cfg.train.update(num_steps=2, batch_size=8, log_every=1, checkpoint_every=2)
  cfg.guard.probe_n = 0        # these tests are about the round options; test_robustness guards
  return rounds.Pipeline(cfg, str(tmp_path_factory.mktemp("rounds")))


def _summary(n):
  return results.VoteSummary(
      num_questions=n, num_voted=0, num_pseudo_labels=0, num_records=0,
      pseudo_label_precision=None, mean_vote_share=0.0, pass_at_k=None, maj_at_k=None,
      mean_distinct_answers=0.0, mean_distinct_paths=0.0, pool_calibration=None)


def _ev(acc):
  return results.EvalResult(greedy_acc=acc, sc_acc=acc, num_questions=0, sc_num_samples=0,
                            sc_temperature=0.0, mean_vote_share=0.0, greedy_parse_rate=0.0,
                            calibration=[], extraction=None, examples=[], wall_s=0.0)


def _stages(**stand_ins):
  """The rounds' stage functions with some replaced (injected, not patched)."""
  from lmsi_jax import rounds
  return dataclasses.replace(rounds.STAGES, **stand_ins)


def _params(lm):
  return [np.asarray(x) for x in jax.tree.leaves(lm.state)]


def test_voting_config_reaches_the_vote(pipe):
  assert pipe.vote_settings == pl.VoteSettings(
      "number", "The answer is", "\nQ:", min_vote_share=0.5, max_paths=3, dedup=True,
      weighted=True, fallback_last_number=False)


def test_restart_mode_starts_every_round_from_the_base_weights(pipe):
  """Restart's round 2 starts from the base weights after round 1 really trained (its
  input buffers are donated), continue's from round 1's result."""
  from lmsi_jax import rounds, stages
  ctx = pipe.ctx.replace(seed_task=stages.seed_data(pipe.ctx))
  starts, ends = {}, {}

  def recording_train(c, lm, mixture, out_dir, **kw):
    key = (os.path.basename(c.workdir), os.path.relpath(out_dir, c.workdir))
    starts[key] = _params(lm)
    if key == ("restart", "round_1/train"):       # 2 real steps
      out = stages.train(c, lm, mixture, out_dir, **kw)
    else:                                          # any other change of the weights will do
      out = dataclasses.replace(lm, state=jax.tree.map(lambda x: x + 1.0, lm.state))
      os.makedirs(out_dir, exist_ok=True)
      with open(os.path.join(out_dir, "done.json"), "w") as f:
        json.dump({"wall_s": 0.0}, f)
    ends[key] = _params(out)
    return out

  st = _stages(train=recording_train,
               sample_and_vote=lambda c, lm, r, step, qs=None: _summary(len(qs)),
               evaluate=lambda c, lm, path, t, off: _ev(0.5))
  root, base = pipe.workdir, _params(pipe.base_lm)
  start = results.BaseResult(ctx, ctx.base_lm, 0, _ev(0.0))
  for init in ("restart", "continue"):
    pipe.cfg.rounds.update(init=init, num_rounds=2)
    assert len(rounds.run_lmsi(ctx.replace(workdir=os.path.join(root, init)), start,
                               st).rounds) == 2
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(a, b))
  r1, r2 = "round_1/train", "round_2/train"
  assert same(starts["restart", r1], base) and not same(ends["restart", r1], base)
  assert same(starts["restart", r2], base)
  assert not same(starts["restart", r2], ends["restart", r1])
  assert same(starts["continue", r1], base)
  assert same(starts["continue", r2], ends["continue", r1])
  assert not same(starts["continue", r2], base)


def test_early_stop_unit():
  s = early_stop.EarlyStop(patience=2, best_acc=0.5)
  assert [s.update(r, a) for r, a in enumerate((0.6, 0.6, 0.59), 1)] == [False, False, True]
  assert s.report()["stopped_after_round"] == 3 and s.report()["best_round"] == 1
  off = early_stop.EarlyStop(patience=0, best_acc=0.5)
  assert not any(off.update(r, 0.1) for r in range(1, 10)) and off.report() is None
  s = early_stop.EarlyStop(patience=1, best_acc=0.5)
  assert not s.update(1, 0.7) and not s.update(2, 0.8) and s.update(3, 0.8)


def test_run_stops_early_arms_match_and_generated_questions_join_the_pool(pipe):
  """The whole run() with stand-in stages: which rounds run, what the report says."""
  from lmsi_jax import rounds
  accs = {"base": 0.5, "round_1": 0.6, "round_2": 0.55, "round_3": 0.58, "round_4": 0.9,
          "oracle": 0.7, "control": 0.52}
  trained, sampled = [], {}

  def fake_train(c, lm, mixture, out_dir, **kw):
    trained.append(os.path.relpath(out_dir, c.workdir))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "done.json"), "w") as f:
      json.dump({"wall_s": 1.0}, f)
    return lm

  extra = [{"id": "gen-0", "question": "9+9+9+9+9", "answer": None, "cot": None}]
  st = _stages(
      train=fake_train,
      generate_questions=lambda c, lm, r: (extra, {"num_kept": 1, "wall_s": 2.0}),
      sample_and_vote=lambda c, lm, r, step, qs: sampled.setdefault(r, qs) and _summary(len(qs)),
      evaluate=lambda c, lm, path, t, off: _ev(accs[os.path.basename(os.path.dirname(path))]))
  pipe.cfg.rounds.update(num_rounds=4, early_stop_patience=2, init="continue")
  pipe.cfg.selfgen.questions = True
  pipe.cfg.eval.spurious = False       # it reads the rounds' samples, which are stand-ins here
  run = rounds.Pipeline.from_context(pipe.ctx.replace(workdir=os.path.join(pipe.workdir, "early")),
                                     st)
  rep = run.run()
  assert [r["round"] for r in rep["rounds"]] == [1, 2, 3]
  assert rep["early_stop"]["stopped_after_round"] == 3 and rep["early_stop"]["best_round"] == 1
  assert "did not improve" in rep["early_stop"]["reason"]
  assert trained == ["base/train"] + [f"round_{r}/train" for r in (1, 2, 3)] + [
      f"{arm}/round_{r}/train" for arm in ("oracle", "control") for r in (1, 2, 3)]
  assert sampled[1] == pipe.problem.pool + extra and sorted(sampled) == [1, 2, 3]
  assert rep["rounds"][0]["selfgen"]["num_kept"] == 1 and rep["rounds"][0]["wall_s"] == 3.0
  with open(os.path.join(run.workdir, "report.json")) as f:
    assert json.load(f)["early_stop"] == rep["early_stop"]
  with open(os.path.join(run.workdir, "report.md")) as f:
    md = f.read()
  assert "stopped after round 3" in md
