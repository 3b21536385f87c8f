"""The run store (lmsi_jax/store.py): fingerprints, verified reuse, restart, lock, one-line errors."""
import hashlib
import os
import subprocess
import sys
import time

import ml_collections
import pytest

from lmsi_jax import config as config_lib
from lmsi_jax import store as store_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**train):
  c = ml_collections.ConfigDict(dict(
      seed=0, mode="lmsi", mesh=dict(shape=(-1, 1, 1)),
      train=dict(learning_rate=3e-4, num_steps=12, log_every=5, checkpoint_every=6),
      eval=dict(num_samples=4, temperature=0.8)))
  c.train.update(train)
  return c


def _fresh(tmp_path, name="run"):
  """A Store of its own (not the per-process cache: each test simulates a new process)."""
  root = str(tmp_path / name)
  store_lib._STORES.pop(os.path.abspath(root), None)  # pylint: disable=protected-access
  return store_lib.open_store(root), root


def _digest(root):
  """Every file under root (but the lock) -> sha256: what a refusal must leave untouched."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      if f != store_lib.LOCK:
        with open(p, "rb") as fh:
          out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _run_stage(s, root, name, cfg, keys, lines, inputs=()):
  st = s.stage(name, cfg, keys, inputs=inputs)
  if st.done:
    return st
  st.begin(os.path.join(root, name))
  path = os.path.join(root, name, "out.jsonl")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join(f'{{"i": {i}}}\n' for i in range(lines)))
  st.finish(path, wall_s=1.5)
  return st


def _two_stages(s, root, cfg):
  a = _run_stage(s, root, "base/train", cfg, ("seed", "train"), 3)
  b = _run_stage(s, root, "round_1/eval", cfg, ("seed", "eval"), 2, inputs=["base/train"])
  return a, b


def test_done_stage_is_reused_and_timed(tmp_path):
  s, root = _fresh(tmp_path)
  cfg = _cfg()
  a, b = _two_stages(s, root, cfg)
  assert a.done and b.done                              # finished now
  s2, _ = _fresh(tmp_path)                              # a resumed run: a new process
  st = s2.stage("base/train", cfg, ("seed", "train"))
  assert st.done and st.fingerprint == a.fingerprint
  assert s2.wall_s() == 3.0 and s2.wall_s(["base/train"]) == 1.5
  e = s2.entries()["round_1/eval"]
  assert e["inputs"] == {"base/train": a.fingerprint}
  assert e["outputs"]["round_1/eval/out.jsonl"]["lines"] == 2
  # logging and checkpoint cadence do not shape results: not part of any fingerprint
  assert s2.stage("base/train", _cfg(log_every=1, checkpoint_every=2), ("seed", "train")).done


def test_changed_config_fails_naming_stage_and_key_then_restart(tmp_path):
  s, root = _fresh(tmp_path)
  _two_stages(s, root, _cfg())
  before = _digest(root)
  new = _cfg(learning_rate=1e-3)
  s2, _ = _fresh(tmp_path)
  with pytest.raises(store_lib.StoreError) as e:
    s2.check(new)                                      # what a run does first
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("stage base/train in ") and "train.learning_rate 0.0003 -> 0.001" in msg
  assert "--restart_from=base/train" in msg
  with pytest.raises(store_lib.StoreError, match="train.learning_rate 0.0003 -> 0.001"):
    s2.stage("base/train", new, ("seed", "train"))     # and at the stage itself
  assert _digest(root) == before                       # nothing written was lost
  # the restart mechanism: that stage and the ones recorded after it go, with their files
  with pytest.raises(store_lib.StoreError, match="no such stage in .*recorded: base/train, "
                                                 "round_1/eval"):
    s2.restart_from("round_2/train")
  assert s2.restart_from("base/train") == ["base/train", "round_1/eval"]
  assert not os.path.exists(os.path.join(root, "base", "train"))
  s2.check(new)
  a, b = _two_stages(s2, root, new)
  assert s2.stage("round_1/eval", new, ("seed", "eval"), inputs=["base/train"]).done
  # only the restarted stages changed
  s3, _ = _fresh(tmp_path)
  s3.restart_from("round_1/eval")
  assert list(s3.entries()) == ["base/train"]


def test_changed_input_fails(tmp_path):
  s, root = _fresh(tmp_path)
  _two_stages(s, root, _cfg())
  _run_stage(s, root, "other/train", _cfg(), ("seed", "train"), 1)
  with pytest.raises(store_lib.StoreError, match=r"stage round_1/eval in .* was made from other "
                                                 r"inputs: base/train .* -> \(absent\), "
                                                 r"other/train \(absent\) -> "):
    s.stage("round_1/eval", _cfg(), ("seed", "eval"), inputs=["other/train"])


@pytest.mark.parametrize("damage", ["truncate", "edit", "delete"])
def test_changed_stage_output_fails_naming_the_file(tmp_path, damage):
  s, root = _fresh(tmp_path)
  _two_stages(s, root, _cfg())
  path = os.path.join(root, "base", "train", "out.jsonl")
  with open(path) as f:
    lines = f.readlines()
  if damage == "truncate":
    with open(path, "w") as f:
      f.writelines(lines[:-1])
  elif damage == "edit":
    with open(path, "w") as f:
      f.writelines([lines[0].replace("0", "7")] + lines[1:])
  else:
    os.remove(path)
  before = _digest(root)
  s2, _ = _fresh(tmp_path)
  with pytest.raises(store_lib.StoreError) as e:
    s2.stage("base/train", _cfg(), ("seed", "train"))
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(path)
  want = {"truncate": "has 2 lines", "edit": "has 3 lines", "delete": "is missing"}[damage]
  assert want in msg and "stage base/train recorded" in msg and "--restart_from=base/train" in msg
  assert _digest(root) == before


def test_started_stage_with_changed_config_is_refused(tmp_path):
  """A killed stage's partial outputs (shards, checkpoints) are never resumed under another
  config: the started entry records the fingerprint too."""
  s, root = _fresh(tmp_path)
  s.stage("round_1/samples", _cfg(), ("seed", "train")).begin(os.path.join(root, "round_1"))
  s2, _ = _fresh(tmp_path)
  assert not s2.stage("round_1/samples", _cfg(), ("seed", "train")).done    # resumable
  with pytest.raises(store_lib.StoreError, match="stage round_1/samples .* train.num_steps 12 -> 13"):
    s2.check(_cfg(num_steps=13))


def test_open_store_records_the_config(tmp_path):
  root = str(tmp_path / "cfgrun")
  store_lib.open_store(root, _cfg())
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(root, "config.json")) as f:
    assert json.load(f)["train"]["learning_rate"] == 3e-4


def test_second_run_on_a_workdir_fails_naming_the_holder(tmp_path):
  root = str(tmp_path / "locked")
  code = ("import sys, time; from lmsi_jax import store; store.lock(sys.argv[1]); "
          "print('locked', flush=True); time.sleep(60)")
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  p = subprocess.Popen([sys.executable, "-c", code, root], env=env, stdout=subprocess.PIPE,
                       text=True)
  try:
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(store_lib.StoreError) as e:
      store_lib.lock(root)
    msg = str(e.value)
    assert "\n" not in msg and f"in use by another run (pid {p.pid} holds {root}/.lock)" in msg
  finally:
    p.kill()
    p.wait()
  t0 = time.time()
  store_lib.lock(root)                   # released with its process
  assert time.time() - t0 < 5


@pytest.mark.parametrize("key,value,msg", [
    ("eval.temperature", -0.1, "must be >= 0"),
    ("eval.base_temperature", -1.0, "must be >= 0"),
    ("eval.top_p", 0.0, r"must be in \(0, 1\]"),
    ("eval.top_p", 1.5, r"must be in \(0, 1\]"),
    ("eval.top_k", -1, "must be >= 0"),
    ("eval.max_decode_steps", 0, "must be >= 1"),
    ("sampling.top_k", -1, "must be >= 0"),
    ("sampling.batch_size", 0, "must be >= 1"),
    ("train.checkpoint_every", 0, "must be >= 1"),
    ("train.batch_size", 0, "must be >= 1"),
    ("base_train.batch_size", 0, "must be >= 1"),
    ("base_train.num_steps", 0, "must be >= 1 when enabled"),
    ("train.num_steps", 0, "must be > 0"),
    ("base_train.learning_rate", -1.0, "must be finite and >= 0"),
])
def test_late_keys_are_validated_up_front_by_their_own_name(demo_config, key, value, msg):
  c = demo_config("smoke", {key: value})
  with pytest.raises(ValueError, match=rf"^config\.{key.replace('.', chr(92) + '.')}="
                                       rf"{value!r}: {msg}") as e:
    config_lib.validate(c)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("split", ["eval", "pool"])
def test_empty_eval_set_or_pool_is_one_line_before_any_work(tmp_path, demo_config, split):
  from lmsi_jax import rounds  # pylint: disable=g-import-not-at-top
  cfg = demo_config("smoke", {f"synthetic.{split}_n": 0})
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError) as e:
    rounds.Pipeline(cfg, workdir)
  what = {"eval": "the eval set is empty: no questions from config.synthetic.eval_n; "
                  "nothing to evaluate",
          "pool": "the pool is empty: no questions from config.synthetic.pool_n; nothing to "
                  "sample (config.rounds.num_rounds=2)"}[split]
  assert str(e.value) == what
  assert sorted(os.listdir(workdir)) == [".lock", "config.json"]    # no stage ran
