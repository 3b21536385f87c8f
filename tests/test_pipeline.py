"""The round pipeline end to end (demo :smoke), resume after SIGKILL, config errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lmsi_jax import config as config_lib
from lmsi_jax import problems
from lmsi_jax import voting
from lmsi_jax.data import jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = [sys.executable, "-m", "lmsi_jax.main", "--config=configs/demo.py:smoke"]
METRICS = ("greedy_acc", "sc_acc", "num_questions", "num_pseudo_labels", "pseudo_label_precision",
           "mean_vote_share")


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _run(workdir, *extra, timeout=900):
  p = subprocess.run(SMOKE + [f"--workdir={workdir}", *extra], cwd=REPO, env=_env(),
                     capture_output=True, text=True, timeout=timeout)
  assert p.returncode == 0, p.stderr[-4000:]
  return p


def _run_until(workdir, marker, timeout=600):
  """Starts the smoke run and SIGKILLs it as soon as `marker` exists."""
  log = open(os.path.join(str(workdir) + ".log"), "a")
  p = subprocess.Popen(SMOKE + [f"--workdir={workdir}"], cwd=REPO, env=_env(), stdout=log,
                       stderr=subprocess.STDOUT)
  t0 = time.time()
  try:
    while not os.path.exists(os.path.join(workdir, marker)):
      assert p.poll() is None, f"run ended before {marker} appeared"
      assert time.time() - t0 < timeout, f"{marker} did not appear in {timeout}s"
      time.sleep(0.05)
  finally:
    p.send_signal(signal.SIGKILL)
    p.wait()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("smoke") / "run")
  _run(workdir)
  with open(os.path.join(workdir, "report.json")) as f:
    return workdir, json.load(f)


@pytest.mark.slow
def test_smoke_report_contract(smoke):
  workdir, rep = smoke
  for key in ("config", "base", "rounds", "oracle", "control", "spurious", "final", "gains",
              "collapse_guard", "pgr", "calibration", "wall_s"):
    assert key in rep, key
  assert len(rep["rounds"]) == 2
  for r, row in enumerate(rep["rounds"], 1):
    assert row["round"] == r
    for k in ("greedy_acc", "sc_acc", "num_questions", "num_pseudo_labels",
              "pseudo_label_precision", "mean_vote_share", "wall_s"):
      assert k in row, k
    for k in ("greedy_acc", "sc_acc", "mean_vote_share"):
      assert 0.0 <= row[k] <= 1.0
    assert row["num_questions"] == 48 and row["wall_s"] > 0
  for arm in ("base", "oracle", "control"):
    assert 0.0 <= rep[arm]["greedy_acc"] <= 1.0 and 0.0 <= rep[arm]["sc_acc"] <= 1.0
  assert rep["wall_s"] > 0
  gap = rep["oracle"]["greedy_acc"] - rep["base"]["greedy_acc"]
  last_gain = rep["rounds"][-1]["greedy_acc"] - rep["base"]["greedy_acc"]
  assert rep["pgr"] == (pytest.approx(last_gain / gap) if gap > 1e-9 else None)


@pytest.mark.slow
def test_smoke_round_metrics_agree_with_the_files_and_hidden_gold(smoke):
  """Each round's vote share and pseudo-label precision recomputed from votes.jsonl, with
  correctness checked against the pool's gold answers (which training never sees)."""
  workdir, rep = smoke
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs", "demo.py"), "smoke")
  held_out = problems.hold_out_probe(problems.load_problem(cfg), cfg.guard.probe_n)
  gold = {q["id"]: q["answer"] for q in held_out.pool}
  for r, row in enumerate(rep["rounds"], 1):
    votes = jsonl.read_jsonl(os.path.join(workdir, f"round_{r}", "votes.jsonl"))
    assert sorted(v["id"] for v in votes) == sorted(gold)
    assert row["mean_vote_share"] == pytest.approx(sum(v["share"] for v in votes) / len(votes))
    voted = [v for v in votes if v["answer"] is not None]
    assert voted
    for v in voted:
      assert v["correct"] == (v["answer"] == gold[v["id"]])
    assert row["pseudo_label_precision"] == pytest.approx(
        sum(v["answer"] == gold[v["id"]] for v in voted) / len(voted))
  assert sum(c["count"] for c in rep["calibration"]) == 32
  for name in ("report.md", "accuracy.png", "calibration.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  assert os.listdir(os.path.join(workdir, "round_1", "train", "tb"))
  # stage 0 saves every base_train.checkpoint_every=50 steps (the rounds every 3), keeping 2
  kept = os.listdir(os.path.join(workdir, "base", "train", "checkpoints"))
  assert sorted(int(d) for d in kept if d.isdigit()) == [100, 150]


@pytest.mark.slow
def test_pseudo_labels_match_the_vote(smoke):
  workdir, rep = smoke
  min_share = rep["config"]["voting"]["min_vote_share"]
  assert min_share == 0.3     # the demo's threshold: a 1-of-4 majority is dropped, 2 of 4 kept
  for r in (1, 2):
    votes = {v["id"]: v for v in jsonl.read_jsonl(os.path.join(workdir, f"round_{r}", "votes.jsonl"))}
    labels = jsonl.read_jsonl(os.path.join(workdir, f"round_{r}", "pseudo_labels.jsonl"))
    assert labels, "the smoke base model must produce answers for the rounds to keep"
    samples = {}
    for name in sorted(os.listdir(os.path.join(workdir, f"round_{r}", "samples"))):
      for s in jsonl.read_jsonl(os.path.join(workdir, f"round_{r}", "samples", name)):
        samples[s["id"]] = s
    assert len(samples) == 48 and all(len(s["samples"]) == 4 for s in samples.values())
    assert len({(l["id"], l["path_index"]) for l in labels}) == rep["rounds"][r - 1]["num_pseudo_labels"]
    for l in labels:
      v = votes[l["id"]]
      text = samples[l["id"]]["samples"][l["path_index"]]["text"]
      # every kept path's answer is its question's majority answer
      assert voting.extract_answer(text) == v["answer"] == l["answer"]
      answers = [voting.extract_answer(s["text"]) for s in samples[l["id"]]["samples"]]
      assert voting.majority_vote(answers).answer == v["answer"]
      assert l["round"] == r and l["vote_share"] == v["share"]
    # and every majority path is kept (the paper keeps all of them) where the majority holds
    # the demo's minimum vote share; below it, none
    for qid, v in votes.items():
      if v["answer"] is not None:
        answers = [voting.extract_answer(s["text"]) for s in samples[qid]["samples"]]
        n = sum(a == v["answer"] for a in answers)
        assert v["share"] == n / 4
        assert v["kept"] == (n if v["share"] >= min_share else 0)


@pytest.mark.slow
def test_resume_after_sigkill_in_sampling_and_training(smoke, tmp_path):
  ref_dir, ref = smoke
  workdir = str(tmp_path / "killed")
  _run_until(workdir, os.path.join("round_1", "samples", "shard_00000.jsonl"))
  assert not os.path.exists(os.path.join(workdir, "round_1", "vote_summary.json"))
  _run_until(workdir, os.path.join("round_1", "train", "checkpoints", "3"))
  assert not os.path.exists(os.path.join(workdir, "round_1", "eval.json"))
  _run(workdir)
  with open(os.path.join(workdir, "report.json")) as f:
    rep = json.load(f)
  for a, b in zip(ref["rounds"], rep["rounds"]):
    assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}
  for arm in ("base", "oracle", "control"):
    assert rep[arm]["greedy_acc"] == ref[arm]["greedy_acc"] and rep[arm]["sc_acc"] == ref[arm]["sc_acc"]
  for r in (1, 2):
    for name in ("pseudo_labels.jsonl", "votes.jsonl"):
      with open(os.path.join(ref_dir, f"round_{r}", name), "rb") as f1, \
           open(os.path.join(workdir, f"round_{r}", name), "rb") as f2:
        assert f1.read() == f2.read(), (r, name)


def _digest(root):
  """Every file under root (but the lock) -> its bytes' hash: what a refusal must not touch."""
  import hashlib  # pylint: disable=g-import-not-at-top
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      if f != ".lock":
        with open(os.path.join(d, f), "rb") as fh:
          out[os.path.relpath(os.path.join(d, f), root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _one_error_line(p):
  assert p.returncode == 2, p.stderr[-3000:]
  err = [l for l in p.stderr.splitlines() if l.startswith("lmsi_jax: error:")]
  assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
  return err[0]


@pytest.mark.slow
def test_changed_config_on_resume_is_refused_then_restart_redoes_that_stage(smoke, tmp_path):
  """A finished workdir re-run with a changed config: one line naming the stage and the key,
  nothing touched; --restart_from redoes that stage and the ones after it, reusing the rest."""
  import shutil  # pylint: disable=g-import-not-at-top
  ref_dir, ref = smoke
  workdir = str(tmp_path / "run")
  shutil.copytree(ref_dir, workdir)
  before = _digest(workdir)
  change = "--config.rounds.early_stop_patience=5"      # shapes only the arms' evaluations
  p = subprocess.run(SMOKE + [f"--workdir={workdir}", change], cwd=REPO, env=_env(),
                     capture_output=True, text=True, timeout=300)
  line = _one_error_line(p)
  assert line == (f"lmsi_jax: error: stage oracle/eval in {workdir} was made with another "
                  "config: rounds.early_stop_patience 0 -> 5; rerun with "
                  "--restart_from=oracle/eval to start it and the stages after it over")
  assert _digest(workdir) == before
  _run(workdir, change, "--restart_from=oracle/eval")
  with open(os.path.join(workdir, "report.json")) as f:
    rep = json.load(f)
  for a, b in zip(ref["rounds"], rep["rounds"]):
    assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}
  for arm in ("base", "oracle", "control", "spurious"):
    assert (rep[arm]["greedy_acc"], rep[arm]["sc_acc"]) == (ref[arm]["greedy_acc"], ref[arm]["sc_acc"])
  after = _digest(workdir)
  for rel, h in before.items():       # the stages before oracle/eval were reused untouched
    if rel.startswith(("round_", "base/", "data/", "oracle/round_")) and "/tb/" not in rel:
      assert after.get(rel) == h, rel
  with open(os.path.join(workdir, "stages.json")) as f:
    stages = json.load(f)["stages"]
  assert stages["oracle/eval"]["config"]["rounds.early_stop_patience"] == 5
  n = rep["final"]["round"]          # the arms train as many rounds as the kept model had
  redone = list(stages)[list(stages).index("oracle/eval"):]
  assert redone == ["oracle/eval"] + [f"control/round_{r}/train" for r in range(1, n + 1)] + [
      "control/eval"] + [x for r in range(1, n + 1) for x in (f"spurious/round_{r}/labels",
                                                             f"spurious/round_{r}/train")] + [
      "spurious/eval"]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["rounds"]["early_stop_patience"] == 5


@pytest.mark.slow
def test_truncated_stage_output_is_refused_naming_the_file(smoke, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  ref_dir, _ = smoke
  workdir = str(tmp_path / "run")
  shutil.copytree(ref_dir, workdir)
  path = os.path.join(workdir, "round_1", "pseudo_labels.jsonl")
  with open(path) as f:
    lines = f.readlines()
  with open(path, "w") as f:
    f.writelines(lines[:-1])                          # lost its last line after it was written
  before = _digest(workdir)
  p = subprocess.run(SMOKE + [f"--workdir={workdir}"], cwd=REPO, env=_env(), capture_output=True,
                     text=True, timeout=300)
  line = _one_error_line(p)
  assert line.startswith(f"lmsi_jax: error: {path} has {len(lines) - 1} lines (sha256 ")
  assert f"but stage round_1/vote recorded {len(lines)} (sha256 " in line
  assert line.endswith("it changed after it was written; restore it or rerun with "
                       "--restart_from=round_1/vote to start it and the stages after it over")
  assert _digest(workdir) == before


@pytest.mark.parametrize("override,msg", [
    ("--config.sampling.num_sample=3", 'Did you mean "num_samples"'),
    ("--config.sampling.num_samples=abc", "invalid literal for int()"),
    ("--config.mesh.shape=(3,1,1)", "mesh.shape=(3, 1, 1) needs 3 devices but 8 are available"),
    ("--config.rounds.init=sideways", "config.rounds.init='sideways'"),
])
def test_config_errors_are_one_line(tmp_path, override, msg):
  p = subprocess.run(SMOKE + [f"--workdir={tmp_path}", override], cwd=REPO, env=_env(),
                     capture_output=True, text=True, timeout=300)
  assert p.returncode != 0
  err = [l for l in p.stderr.splitlines() if l.startswith("lmsi_jax: error:")]
  assert len(err) == 1 and msg in err[0], p.stderr[-2000:]
  assert "Traceback" not in p.stderr


def test_load_config_file_applies_overrides_and_names_bad_keys(demo_config):
  """The notebooks' loader: dotted overrides as on the command line, one clear error each."""
  c = demo_config("smoke", {"rounds.num_rounds": 1, "sampling.temperature": 0.5})
  assert (c.rounds.num_rounds, c.sampling.temperature) == (1, 0.5)
  assert demo_config("smoke").rounds.num_rounds == 2           # a fresh config every call
  with pytest.raises(ValueError, match="config.base_train.checkpoint_every=-1"):
    config_lib.validate(demo_config("smoke", {"base_train.checkpoint_every": -1}))
  with pytest.raises(KeyError, match="unknown config key 'rounds.num_round'"):
    demo_config("smoke", {"rounds.num_round": 1})
  with pytest.raises(KeyError, match="unknown config key 'round' in 'round.num_rounds'"):
    demo_config("smoke", {"round.num_rounds": 1})
  with pytest.raises(TypeError, match="num_rounds"):
    demo_config("smoke", {"rounds.num_rounds": "two"})
  with pytest.raises(FileNotFoundError, match="nope.py: no such config file"):
    config_lib.load_config_file(os.path.join(REPO, "configs", "nope.py"))


@pytest.mark.slow
def test_round_checkpoint_loads_as_model_checkpoint(smoke, mesh8):
  """A round's Orbax directory is a valid `model.checkpoint` for a new run."""
  import numpy as np
  from lmsi_jax import loading
  workdir, _ = smoke
  cfg = config_lib.base_config()
  cfg.model.checkpoint = os.path.join(workdir, "round_2", "train")
  lm, vocab = loading.build_model(cfg, mesh8)
  assert lm.cfg.hidden_size == 64 and vocab.vocab_size == 259
  from lmsi_jax import checkpoint as ckpt_lib
  ref = ckpt_lib.restore_params(cfg.model.checkpoint, lm.cfg, mesh8)
  np.testing.assert_array_equal(np.asarray(lm.state["embed"][...]), np.asarray(ref.state["embed"][...]))


# ------------------------------------------------- prompts that do not fit the context

GSM8K_SMOKE = [sys.executable, "-m", "lmsi_jax.main", "--config=configs/gsm8k.py:smoke"]
SOLUTION = "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"


def _gsm8k_dir(tmp_path, long_q: str, malformed: bool = True) -> str:
  """train.jsonl: 2 good, a too-long question (line 3), a malformed line (or a good one), 2 good;
  test.jsonl: 2 good, a too-long question (line 3), 1 good."""
  good = lambda i: json.dumps({"question": f"Ann has {i} apples and gets 4 more. How many?",
                               "answer": SOLUTION})
  long = json.dumps({"question": long_q, "answer": SOLUTION})
  d = tmp_path / "gsm8k"
  d.mkdir()
  fourth = "{oops" if malformed else good(0)
  (d / "train.jsonl").write_text("\n".join([good(1), good(2), long, fourth, good(3), good(4)]) + "\n")
  (d / "test.jsonl").write_text("\n".join([good(5), good(6), long, good(7)]) + "\n")
  return str(d)


def test_too_long_prompt_names_file_and_line(tmp_path):
  """gsm8k:smoke: tiny byte-level model, context 512, 24 decode steps, zero-shot CoT prompt."""
  data = _gsm8k_dir(tmp_path, "How many apples? " * 30, malformed=False)   # a 510-byte question
  p = subprocess.run(GSM8K_SMOKE + [f"--workdir={tmp_path / 'run'}", f"--config.data.dir={data}"],
                     cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert p.returncode != 0
  err = [l for l in p.stderr.splitlines() if l.startswith("lmsi_jax: error:")]
  # byte vocabulary: start + "Q: " + 509 (stripped) + "\nA: Let's think step by step." = 542
  want = (f"lmsi_jax: error: {data}/train.jsonl:3: prompt is 542 tokens + 24 decode steps > "
          "model context 512 (set config.data.on_error='skip' to skip such records)")
  assert err == [want], p.stderr[-3000:]
  assert "Traceback" not in p.stderr
  assert not os.path.exists(tmp_path / "run" / "base")      # failed before any work


def test_fit_context_synthetic_names_split_and_index(caplog):
  import logging  # pylint: disable=g-import-not-at-top
  from lmsi_jax import problems  # pylint: disable=g-import-not-at-top
  from lmsi_jax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  qs = [{"id": f"pool-{i}", "question": q} for i, q in enumerate(["1+2", "1+2+3+4+5+6", "3+4"])]
  prob = problems.Problem("synthetic", [], qs, qs[:1], None)
  v = vocab_lib.byte_vocabulary()
  n = len(vocab_lib.encode_prompt(v, problems.prompt_for(prob, qs[1]["question"], "zero_shot_cot")))
  with pytest.raises(ValueError, match=rf"^synthetic pool question 1 \(id pool-1\): prompt is {n} "
                                       rf"tokens \+ 8 decode steps > model context {n + 7} "):
    problems.fit_context(prob, v, "zero_shot_cot", n + 7, {"pool": 8, "eval": 8}, "raise")
  with caplog.at_level(logging.WARNING):
    out = problems.fit_context(prob, v, "zero_shot_cot", n + 7, {"pool": 8, "eval": 8}, "skip")
  assert [q["id"] for q in out.pool] == ["pool-0", "pool-2"] and out.eval == qs[:1]
  assert out.skipped == {"pool": {"too_long": 1}, "eval": {"too_long": 0}}
  assert any("skipped 1 question(s)" in m and "pool question 1" in m for m in caplog.messages)
  # exactly at the limit fits
  assert problems.fit_context(prob, v, "zero_shot_cot", n + 8, {"pool": 8}, "raise").pool == qs


@pytest.mark.slow
def test_too_long_prompts_skipped_and_counted(tmp_path):
  """on_error=skip: the run finishes; bad and too-long records are counted in report.json."""
  data = _gsm8k_dir(tmp_path, "How many apples? " * 30)
  workdir = tmp_path / "run"
  p = subprocess.run(GSM8K_SMOKE + [f"--workdir={workdir}", f"--config.data.dir={data}",
                                    "--config.data.on_error=skip",
                                    # a random model's digits are its only "answers"
                                    "--config.voting.fallback_last_number=True"],
                     cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-4000:]
  rep = json.loads((workdir / "report.json").read_text())
  assert rep["skipped"] == {"pool": {"bad_records": 1, "too_long": 1},
                            "eval": {"bad_records": 0, "too_long": 1}}
  assert rep["rounds"][0]["num_questions"] == 4 and rep["base"]["num_questions"] == 3
  assert "skipped 1 question(s) whose prompt + decode steps exceed" in p.stderr
  assert "train.jsonl:3: prompt is 542 tokens" in p.stderr
  ids = [json.loads(l)["id"] for l in (workdir / "round_1" / "votes.jsonl").read_text().splitlines()]
  assert ids == ["train-1", "train-2", "train-5", "train-6"]
  assert rep["rounds"][0]["train_truncated"] == 0


@pytest.mark.slow
def test_smoke_spurious_arm_guard_and_final_model(smoke):
  """The spurious arm trains on LMSI's own samples (a random non-majority answer's paths, as
  many as LMSI kept); the collapse guard's signals are recorded for stage 0 and every round."""
  workdir, rep = smoke
  for key in ("spurious", "final", "gains", "collapse_guard"):
    assert rep[key] is not None, key
  final = rep["rounds"][rep["final"]["round"] - 1]
  assert rep["final"]["greedy_acc"] == final["greedy_acc"]
  for arm in ("base", "control", "spurious"):
    assert rep["gains"][f"over_{arm}"] == pytest.approx(final["greedy_acc"] - rep[arm]["greedy_acc"])
  guard = rep["collapse_guard"]
  assert [e["round"] for e in guard["rounds"]] == list(range(len(rep["rounds"]) + 1))
  assert guard["rounds"][0]["agreement"] is None and guard["rounds"][1]["agreement"] is not None
  assert guard["probe_n"] == 16
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs", "demo.py"), "smoke")
  full_pool = problems.load_problem(cfg).pool
  probe_ids = {s["id"] for name in os.listdir(os.path.join(workdir, "base", "probe_samples"))
               for s in jsonl.read_jsonl(os.path.join(workdir, "base", "probe_samples", name))}
  assert probe_ids == {q["id"] for q in full_pool[-16:]}
  voted_ids = {v["id"] for v in jsonl.read_jsonl(os.path.join(workdir, "round_1", "votes.jsonl"))}
  assert not probe_ids & voted_ids                       # the probe is held out of the pool
  for r in range(1, rep["final"]["round"] + 1):
    votes = {v["id"]: v for v in jsonl.read_jsonl(os.path.join(workdir, f"round_{r}", "votes.jsonl"))}
    spur = jsonl.read_jsonl(os.path.join(workdir, "spurious", f"round_{r}", "labels.jsonl"))
    lmsi = jsonl.read_jsonl(os.path.join(workdir, f"round_{r}", "pseudo_labels.jsonl"))
    assert len(spur) == len(lmsi)
    for x in spur:
      v = votes[x["id"]]
      assert x["answer"] != v["answer"] or v["distinct_answers"] == 1


@pytest.mark.slow
def test_gold_never_changes_training_data(smoke):
  """Re-voting the run's own samples with every pool answer replaced gives the same
  pseudo-labels, spurious labels and guard signals as the run wrote."""
  from lmsi_jax import guard as guard_lib
  from lmsi_jax import pseudo_labels as pl
  from lmsi_jax import seeds
  workdir, rep = smoke
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs", "demo.py"), "smoke")
  s = pl.VoteSettings.from_config(cfg)     # the demo's voting, its minimum vote share included
  samples = pl.read_samples(os.path.join(workdir, "round_1", "samples"))
  wrong_gold = [{"id": x["id"], "question": x["question"], "answer": "-1"} for x in samples]
  labels, _ = pl.vote_pool(samples, wrong_gold, s, exemplars=None, formats=cfg.formats,
                           round_index=1, source_step=cfg.base_train.num_steps)
  assert labels == jsonl.read_jsonl(os.path.join(workdir, "round_1", "pseudo_labels.jsonl"))
  spur = pl.spurious_pool(samples, s, seed=seeds.stream(cfg.seed, "spurious"), exemplars=None,
                          formats=cfg.formats, round_index=1, source_step=0)
  assert spur == jsonl.read_jsonl(os.path.join(workdir, "spurious", "round_1", "labels.jsonl"))
  voted = [pl.vote_record(x, s) for x in pl.read_samples(os.path.join(workdir, "base", "probe_samples"))]
  sig = guard_lib.probe_signals([a for *_, a in voted], [t for t, *_ in voted], None)
  with open(os.path.join(workdir, "base", "probe.json")) as f:
    written = json.load(f)
  assert {k: written[k] for k in sig} == sig
