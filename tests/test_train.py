"""Training: config validation, optimizer, sharded step, accumulation, resume, NaN stop."""
import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmsi_jax import checkpoint as ckpt_lib
from lmsi_jax import model as model_lib
from lmsi_jax import optim
from lmsi_jax import train as train_lib

import train_worker as tw  # tests/ is on sys.path (rootdir-relative test imports)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CFG = model_lib.ModelConfig(**tw.CFG)


def _tcfg(**kw) -> train_lib.TrainConfig:
  return train_lib.TrainConfig.from_dict({**tw.TCFG, **kw})


def test_config_lmsi_setting_and_validation():
  c = train_lib.TrainConfig.from_dict({"num_steps": 10_000, "learning_rate": 5e-5, "batch_size": 32})
  assert (c.num_steps, c.learning_rate, c.batch_size) == (10_000, 5e-5, 32)
  bad = [({"num_stepz": 3}, r"train\.num_stepz: unknown key"),
         ({"batch_size": 30, "grad_accum": 4}, r"train\.batch_size=30: must be divisible by train\.grad_accum=4"),
         ({"num_steps": 0}, r"train\.num_steps=0: must be > 0"),
         ({"grad_accum": 0}, r"train\.grad_accum=0: must be > 0"),
         ({"optimizer": "sgd"}, r"train\.optimizer='sgd'"),
         ({"learning_rate": "5e-5"}, r"train\.learning_rate='5e-5': expected float"),
         ({"warmup_steps": 1.5}, r"train\.warmup_steps=1\.5: expected int"),
         ({"b2": 1.0}, r"train\.b2=1\.0: must be in \[0, 1\)"),
         ({"remat": "some"}, r"train\.remat='some': expected one of \['none', 'full', 'dots'\]")]
  for d, msg in bad:
    with pytest.raises(ValueError, match=msg):
      train_lib.TrainConfig.from_dict(d)


def test_schedule_and_decay_mask(mesh8):
  s = optim.learning_rate_schedule(optim.TrainConfig(
      learning_rate=1.0, warmup_steps=4, num_steps=104, end_lr_ratio=0.1))
  np.testing.assert_allclose([float(s(i)) for i in (0, 3, 4, 54, 104, 200)],
                             [0.25, 1.0, 1.0, 0.55, 0.1, 0.1], atol=1e-6)
  c = optim.learning_rate_schedule(optim.TrainConfig(
      learning_rate=2.0, warmup_steps=0, schedule="constant"))
  assert float(c(0)) == float(c(999)) == 2.0
  params = model_lib.abstract_model(model_lib.ModelConfig(
      **{**tw.CFG, "tie_embeddings": False, "qkv_bias": True}), mesh8)[1]
  for decay_emb in (False, True):
    flat = optim.decay_mask(optim.TrainConfig(decay_embeddings=decay_emb))(params)
    got = dict(zip(ckpt_lib.flat_shapes(params), jax.tree.leaves(flat)))
    assert got["layers/mlp/gate_proj"] and got["layers/attn/o_proj"]     # stacked [L, ...]
    assert not got["final_norm/scale"] and not got["layers/attn_norm/scale"]
    assert not got["layers/attn/q_bias"]
    assert got["embed"] == got["lm_head"] == decay_emb


def test_opt_state_sharded_like_params(mesh8):
  lm = model_lib.LM.init(CFG, mesh8)
  step = train_lib.make_train_step(lm, _tcfg())
  opt = step.init(lm.state)
  adam = opt[1][0]
  param_sh = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, lm.state))
  assert any(tuple(s.spec) == (None, "fsdp", "model") for s in param_sh)     # stacked [L, embed, mlp]
  for moments in (adam.mu, adam.nu):
    got = [x.sharding for x in jax.tree.leaves(moments)]
    assert got == param_sh
    assert all(a.spec == b.spec for a, b in zip(got, param_sh))
  assert adam.count.sharding.spec == jax.sharding.PartitionSpec()
  # Adafactor: factored statistics (other shapes) are replicated, not mis-sharded.
  fac = train_lib.make_train_step(lm, _tcfg(optimizer="adafactor"))
  for s, leaf in zip(jax.tree.leaves(fac.opt_shardings), jax.tree.leaves(fac.abstract_opt_state)):
    assert s == leaf.sharding
    assert all(d % 2 == 0 for d, ax in zip(leaf.shape, s.spec) if ax)


def test_grad_accumulation_equals_big_batch(mesh8):
  batch = tw.make_batch(np.random.default_rng(0), 8, 32)
  assert len(set(batch["loss_weights"].sum(1))) > 2      # ragged target counts per row
  out = {}
  for k in (1, 2):
    lm = model_lib.LM.init(CFG, mesh8, seed=3)
    step = train_lib.make_train_step(lm, _tcfg(grad_accum=k))
    params, opt, m = step(lm.state, step.init(lm.state), batch, 0)
    mu = [np.asarray(x) for x in jax.tree.leaves(opt[1][0].mu)]   # (1 - b1) * clipped grad
    out[k] = (float(m["loss"]), float(m["grad_norm"]), mu, jax.tree.leaves(params))
  (l1, g1, mu1, p1), (l2, g2, mu2, p2) = out[1], out[2]
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  np.testing.assert_allclose(g1, g2, rtol=1e-5)
  for a, b in zip(mu1, mu2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)
  for a, b in zip(p1, p2):  # Adam's 1st step ~ lr * sign(g): tiny grads amplify rounding
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-5)


def test_remat_same_loss_and_grads_less_memory(mesh8):
  """Per-block remat changes what the backward pass keeps, never the numbers."""
  batch = tw.make_batch(np.random.default_rng(0), 8, 32)
  out = {}
  for remat in ("none", "full", "dots"):
    lm = model_lib.LM.init(CFG, mesh8, seed=3)
    step = train_lib.make_train_step(lm, _tcfg(remat=remat))
    params, opt, m = step(lm.state, step.init(lm.state), batch, 0)
    mu = [np.asarray(x) for x in jax.tree.leaves(opt[1][0].mu)]   # (1 - b1) * clipped grad
    out[remat] = (float(m["loss"]), float(m["grad_norm"]), mu)
  loss, gnorm, mu = out["none"]
  for remat in ("full", "dots"):
    l, g, mu_r = out[remat]
    np.testing.assert_allclose(l, loss, rtol=1e-6)
    np.testing.assert_allclose(g, gnorm, rtol=1e-5)
    for a, b in zip(mu_r, mu):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)

  # XLA's buffer assignment of the step (per device): the layers' [T,T] attention residuals
  # are no longer kept for the backward pass.
  cfg = dataclasses.replace(CFG, num_layers=4, max_seq_len=512)
  batch = tw.make_batch(np.random.default_rng(0), 8, 512)
  temp = {}
  for remat in ("none", "full", "dots"):
    lm = model_lib.LM.init(cfg, mesh8, seed=3)
    step = train_lib.make_train_step(lm, _tcfg(remat=remat, seq_len=512))
    with jax.set_mesh(mesh8):
      temp[remat] = step._step.lower(lm.state, step.init(lm.state), step.put_batch(batch),
                                     jnp.int32(0)).compile().memory_analysis().temp_size_in_bytes
  assert temp["full"] < 0.5 * temp["none"] and temp["dots"] < 0.5 * temp["none"], temp


def test_bf16_compute_f32_master_weights(mesh8):
  f32 = model_lib.LM.init(CFG, mesh8)
  bf16_cfg = model_lib.ModelConfig(**tw.CFG, dtype="bfloat16")   # f32 params, bf16 compute
  lm = model_lib.LM(bf16_cfg, model_lib.abstract_model(bf16_cfg, mesh8)[0], f32.state, mesh8)
  step = train_lib.make_train_step(lm, _tcfg())
  batch = tw.make_batch(np.random.default_rng(0), 8, 32)
  params, opt, m = step(lm.state, step.init(lm.state), batch, 0)
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
  assert 3.0 < float(m["loss"]) < 6.0                    # ~ln(128) at init
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(opt[1][0].mu)} == {jnp.dtype("float32")}


def test_nan_loss_stops_and_keeps_last_good_checkpoint(mesh8, tmp_path):
  def nan_after_3(logits, batch, ctx):
    l, w = train_lib.cross_entropy_loss(logits, batch)
    return jnp.where(ctx.step >= 3, jnp.nan, l), w
  lm = model_lib.LM.init(CFG, mesh8)
  with pytest.raises(FloatingPointError,
                     match=r"non-finite loss at step 3 .*last good checkpoint: step 2"):
    train_lib.train(lm, tw.ArrayBatches(8, 32), _tcfg(checkpoint_every=2), str(tmp_path),
                    loss_fn=nan_after_3)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
  assert ck.all_steps() == [2]
  params = ck.restore(2, train_lib.make_train_step(model_lib.LM.init(CFG, mesh8), _tcfg()).abstract_params)["params"]
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted run of tw.TCFG: (workdir, trained LM, flat final params)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  out = tw.run(workdir)
  return workdir, out, tw.flat_params(out.state)


def test_loss_falls_logs_and_skips_when_done(mesh8, straight):
  workdir, out, _ = straight
  evals = lambda: tw.ArrayBatches(8, 32, seed=99)
  before = train_lib.evaluate_loss(model_lib.LM.init(CFG, mesh8), evals(), 2)
  after = train_lib.evaluate_loss(out, evals(), 2)
  assert before > 4.0 and after < 0.7 * before, (before, after)
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [10, 20]
  meta = ckpt_lib.read_meta(workdir)
  assert meta["step"] == 20 and model_lib.ModelConfig.from_dict(meta["model_config"]) == CFG
  assert meta["train_config"] == dataclasses.asdict(_tcfg())
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))
  # Done already: restored, not retrained (an empty iterator would fail otherwise).
  again = train_lib.train(model_lib.LM.init(CFG, mesh8, seed=5), iter(()), _tcfg(), workdir)
  for a, b in zip(jax.tree.leaves(out.state), jax.tree.leaves(again.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _assert_same(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_crash_and_resume_matches_uninterrupted(straight, tmp_path):
  straight_params = straight[2]
  with pytest.raises(RuntimeError, match="simulated crash before batch 10"):
    tw.run(str(tmp_path), fail_at=10)
  assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [10]
  resumed = tw.run(str(tmp_path))          # new LM init, fresh iterator, same workdir
  _assert_same(tw.flat_params(resumed.state), straight_params)
  assert not np.allclose(straight_params["embed"],
                         tw.flat_params(model_lib.LM.init(CFG, resumed.mesh).state)["embed"])


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches(straight, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),  # the re-run skips compiling
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cmd = [sys.executable, os.path.join(REPO, "tests", "train_worker.py"), str(tmp_path / "w"),
         str(tmp_path / "out.npz"), "0.3"]
  first = tmp_path / "w" / "checkpoints" / "10" / "commit_success.txt"
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.time() + 120
    while not first.exists():
      assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
      assert time.time() < deadline, "worker wrote no checkpoint"
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (tmp_path / "out.npz").exists()
  done = subprocess.run(cmd[:-1], env=env, capture_output=True, timeout=180)
  assert done.returncode == 0, done.stderr.decode()[-3000:]
  with np.load(tmp_path / "out.npz") as f:
    _assert_same(dict(f), straight[2])


def _damage_step(workdir, step):
  """Overwrites every array file of a checkpoint step's params with garbage (a bad disk,
  a half-copied directory): Orbax still lists the step, restoring it fails."""
  d = os.path.join(workdir, "checkpoints", str(step), "params")
  n = 0
  for root, _, files in os.walk(d):
    for f in files:
      if not f.startswith("_"):          # keep Orbax's metadata: the step stays listed
        with open(os.path.join(root, f), "r+b") as fh:
          size = os.path.getsize(fh.name)
          fh.write(b"\x00garbage" * (size // 8 + 1))
        n += 1
  assert n, os.listdir(d)


def test_corrupt_newest_checkpoint_falls_back_to_the_older_one(straight, tmp_path, caplog):
  import logging  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "w")
  shutil.copytree(straight[0], workdir)
  _damage_step(workdir, 20)
  with caplog.at_level(logging.WARNING):
    resumed = tw.run(workdir)                 # the newest step is damaged: resume from 10
  warn = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
  assert len(warn) == 1 and "\n" not in warn[0], warn
  assert "checkpoint step 20 in " in warn[0] and "falling back to step 10" in warn[0]
  _assert_same(tw.flat_params(resumed.state), straight[2])
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [10, 20]
  kept = os.listdir(os.path.join(workdir, "checkpoints.corrupt"))   # moved aside, not deleted
  assert len(kept) == 1 and kept[0].startswith("20.")


@pytest.mark.slow
def test_sigterm_mid_run_saves_the_step_then_resume_matches(straight, tmp_path):
  """SIGTERM (how TPU VMs and SLURM preempt) between checkpoints: the current step is saved,
  one line, exit 143; the re-run resumes there and ends with the uninterrupted params."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cmd = [sys.executable, os.path.join(REPO, "tests", "train_worker.py"), str(tmp_path / "w"),
         str(tmp_path / "out.npz"), "0.3"]
  first = tmp_path / "w" / "checkpoints" / "10" / "commit_success.txt"
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300   # a loaded 2-core machine compiles slowly
    while not first.exists():
      assert proc.poll() is None, proc.stderr.read()[-3000:]
      assert time.time() < deadline, "worker wrote no checkpoint"
      time.sleep(0.05)
    time.sleep(1.0)                             # a few steps past the periodic checkpoint
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  lines = [l for l in err.splitlines() if l.startswith("lmsi_jax:")]
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  steps = ckpt_lib.Checkpointer(str(tmp_path / "w" / "checkpoints")).all_steps()
  saved = max(steps)
  assert 10 < saved < 20, steps
  assert lines[0] == (f"lmsi_jax: preempted by SIGTERM: train saved a checkpoint at step {saved} "
                      f"of 20 in {tmp_path / 'w' / 'checkpoints'}; rerun the same command to "
                      "resume")
  assert not (tmp_path / "out.npz").exists()
  done = subprocess.run(cmd[:-1], env=env, capture_output=True, timeout=180)
  assert done.returncode == 0, done.stderr.decode()[-3000:]
  with np.load(tmp_path / "out.npz") as f:
    _assert_same(dict(f), straight[2])


def test_summary_writer_logs_scalars_without_importing_torch(tmp_path):
  """tensorboardX is imported with torch blocked (its import cost 2.8-3.1 s a process), the
  events read back, and `import torch` still works afterwards where torch is installed."""
  script = f"""
import importlib.util, sys
from lmsi_jax import train
w = train.summary_writer({str(tmp_path)!r})
w.add_scalar("stage/loss", 1.25, 7)
w.close()
print("torch_imported", "torch" in sys.modules)
if importlib.util.find_spec("torch") is not None:
  import torch
  print("torch_ok", torch.ones(2).sum().item() == 2.0)
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
  assert "torch_imported False" in out, out
  if importlib.util.find_spec("torch") is not None:
    assert "torch_ok True" in out, out
  import tensorflow as tf
  (events,) = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path)]
  values = [(e.step, v.tag, v.simple_value) for e in tf.compat.v1.train.summary_iterator(events)
            for v in e.summary.value]
  assert values == [(7, "stage/loss", 1.25)]
