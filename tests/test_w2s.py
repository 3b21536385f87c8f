"""Teacher -> student (lmsi_jax/w2s.py) and the auxiliary confidence loss (lmsi_jax/losses.py)."""
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmsi_jax import config as config_lib
from lmsi_jax import losses
from lmsi_jax import model as model_lib
from lmsi_jax import train as train_lib
from lmsi_jax.data import jsonl
from lmsi_jax import voting

import train_worker as tw  # tests/ is on sys.path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ctx(step, num_steps=100):
  return train_lib.LossContext(step=jnp.int32(step), rng=jax.random.key(0), num_steps=num_steps)


def _random_batch(seed=0, rows=4, length=12, vocab=7):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(0, 3, (rows, length, vocab)), jnp.float32)
  batch = {"targets": jnp.asarray(rng.integers(0, vocab, (rows, length)), jnp.int32),
           "loss_weights": jnp.asarray(rng.random((rows, length)) < 0.7, jnp.float32)}
  return logits, batch


def _reference(logits, batch, alpha, threshold):
  """The documented definition, token by token, in numpy."""
  x = np.asarray(logits, np.float64)
  logp = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
  p = np.exp(logp)
  y, w = np.asarray(batch["targets"]), np.asarray(batch["loss_weights"])
  total = 0.0
  for idx in np.ndindex(y.shape):
    ce_y = -logp[idx][y[idx]]
    if p[idx].max() >= threshold:
      loss = (1 - alpha) * ce_y + alpha * -logp[idx][p[idx].argmax()]
    else:
      loss = ce_y
    total += w[idx] * loss
  return total, w.sum()


def test_alpha_zero_equals_cross_entropy_values_and_gradients():
  logits, batch = _random_batch()
  conf = losses.ConfidenceLoss(alpha_max=0.0, warmup_frac=0.2, threshold=0.0)
  xent = jax.jit(lambda z: train_lib.cross_entropy_loss(z, batch))
  c_fn = jax.jit(lambda z, step: conf(z, batch, _ctx(step))[:2])
  for step in (0, 50, 99):
    (l0, w0), (l1, w1) = c_fn(logits, step), xent(logits)
    assert float(l0) == pytest.approx(float(l1), rel=1e-6) and float(w0) == float(w1)
  g_conf = jax.jit(jax.grad(lambda z: conf(z, batch, _ctx(60))[0]))(logits)
  g_xent = jax.jit(jax.grad(lambda z: xent(z)[0]))(logits)
  np.testing.assert_allclose(np.asarray(g_conf), np.asarray(g_xent), atol=1e-6)


@pytest.mark.parametrize("threshold", [0.0, 0.6])
def test_alpha_positive_follows_the_definition_and_differs(threshold):
  logits, batch = _random_batch(seed=1)
  conf = losses.ConfidenceLoss(alpha_max=0.75, warmup_frac=0.0, threshold=threshold)
  l, w, aux = conf(logits, batch, _ctx(0))
  ref, wref = _reference(logits, batch, 0.75, threshold)
  assert float(l) == pytest.approx(ref, rel=1e-5) and float(w) == wref
  xent = float(train_lib.cross_entropy_loss(logits, batch)[0])
  assert abs(float(l) - xent) > 1.0            # confident disagreements exist in this batch
  p = np.asarray(jax.nn.softmax(logits))
  conf_mask = p.max(-1) >= threshold
  wts = np.asarray(batch["loss_weights"])
  assert float(aux["conf_confident_frac"]) == pytest.approx((conf_mask * wts).sum() / wts.sum())
  disagree = conf_mask & (p.argmax(-1) != np.asarray(batch["targets"]))
  assert float(aux["conf_disagree_frac"]) == pytest.approx((disagree * wts).sum() / wts.sum())
  if threshold > 0:
    assert 0 < conf_mask[wts > 0].mean() < 1     # the threshold actually splits the tokens
  # gradient: softmax - ((1-a) onehot(y) + a onehot(argmax)) on confident tokens; the
  # hardened target itself is not differentiated
  g = np.asarray(jax.grad(lambda z: conf(z, batch, _ctx(0))[0])(logits))
  a = 0.75 * conf_mask[..., None]
  onehot = lambda i: np.eye(p.shape[-1])[i]
  want = (p - (1 - a) * onehot(np.asarray(batch["targets"])) - a * onehot(p.argmax(-1))) * wts[..., None]
  np.testing.assert_allclose(g, want, atol=1e-5)


def test_alpha_warmup_ramp():
  conf = losses.ConfidenceLoss(alpha_max=0.5, warmup_frac=0.2, threshold=0.0)
  got = [float(conf.alpha(s, 100)) for s in (0, 5, 10, 19, 20, 50, 99)]
  np.testing.assert_allclose(got, [0.0, 0.125, 0.25, 0.475, 0.5, 0.5, 0.5], atol=1e-7)
  assert float(losses.ConfidenceLoss(0.3, 0.0, 0.0).alpha(0, 100)) == pytest.approx(0.3)
  logits, batch = _random_batch()
  assert float(conf(logits, batch, _ctx(10))[2]["conf_alpha"]) == pytest.approx(0.25)
  with pytest.raises(ValueError, match=r"w2s\.conf_threshold=1\.5"):
    losses.ConfidenceLoss(0.5, 0.2, 1.5)


def test_train_step_alpha_zero_equals_xent_alpha_positive_differs(mesh8):
  """Through the sharded train step: same params with alpha 0, different with alpha > 0,
  and the logged alpha follows the ramp (warmup 0.2 x 20 steps = 4 steps)."""
  cfg = model_lib.ModelConfig(**tw.CFG)
  tcfg = train_lib.TrainConfig.from_dict(tw.TCFG)
  out = {}
  for name, fn in (("xent", None), ("a0", losses.ConfidenceLoss(0.0, 0.2, 0.0)),
                   ("a5", losses.ConfidenceLoss(0.5, 0.2, 0.0))):
    lm = model_lib.LM.init(cfg, mesh8, seed=0)
    step = train_lib.make_train_step(lm, tcfg, fn)
    params, opt, alphas = lm.state, step.init(lm.state), []
    for i in range(4):
      params, opt, m = step(params, opt, tw.make_batch(np.random.default_rng(i), 8, 32), i)
      alphas.append(float(m.get("conf_alpha", np.nan)))
    out[name] = (tw.flat_params(params), alphas)
  for k, v in out["xent"][0].items():
    np.testing.assert_allclose(out["a0"][0][k], v, atol=1e-6, err_msg=k)
  assert max(np.abs(out["a5"][0][k] - v).max() for k, v in out["xent"][0].items()) > 1e-4
  np.testing.assert_allclose(out["a5"][1], [0.0, 0.125, 0.25, 0.375], atol=1e-7)


@pytest.mark.parametrize("key,value,msg", [
    ("labels", "sampled", "config.w2s.labels='sampled': expected 'vote' or 'greedy'"),
    ("losses", ("xent", "xent"), "config.w2s.losses=('xent', 'xent'): a non-empty tuple"),
    ("losses", ("hinge",), "config.w2s.losses=('hinge',)"),
    ("student_preset", "huge", "config.w2s.student_preset='huge': expected one of"),
    ("conf_alpha_max", 1.5, "config.w2s.conf_alpha_max=1.5: must be in [0, 1]"),
    ("replay_weight", 1.0, "config.w2s.replay_weight=1.0: must be in [0, 1)"),
    ("pretrain_steps", -1, "config.w2s.pretrain_steps=-1"),
])
def test_w2s_config_errors_name_the_key(key, value, msg):
  c = config_lib.base_config()
  c.mode = "w2s"
  c.w2s[key] = value
  with pytest.raises(ValueError) as e:
    config_lib.validate(c)
  assert msg in str(e.value) and "\n" not in str(e.value)


def test_distillation_is_the_same_code_with_sizes_swapped():
  from lmsi_jax import w2s
  c = config_lib.base_config()
  c.mode, c.model.preset = "w2s", "small"
  c.w2s.update(student_preset="tiny", labels="greedy", pretrain_steps=3)
  config_lib.validate(c)
  t, s = w2s.teacher_config(c), w2s.student_config(c)
  assert model_lib.preset(t.model.preset).num_params() > model_lib.preset(s.model.preset).num_params()
  assert (t.sampling.num_samples, t.sampling.temperature) == (1, 0.0)      # greedy labels
  assert (s.model.preset, s.base_train.enabled, s.base_train.num_steps) == ("tiny", True, 3)
  assert c.sampling.num_samples == 32 and c.model.preset == "small"         # cfg untouched
  assert w2s.student_config(config_lib.base_config()).base_train.enabled is False


def _main(workdir, timeout=900):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
  t0 = time.time()
  p = subprocess.run([sys.executable, "-m", "lmsi_jax.main", "--config=configs/demo.py:w2s_smoke",
                      f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=timeout)
  assert p.returncode == 0, p.stderr[-4000:]
  with open(os.path.join(workdir, "report.json")) as f:
    return json.load(f), p, time.time() - t0


@pytest.mark.slow
def test_w2s_smoke_end_to_end_and_rerun_skips(tmp_path):
  workdir = str(tmp_path / "w2s")
  rep, p, _ = _main(workdir)
  w = rep["w2s"]
  assert rep["mode"] == "w2s" and w["direction"] == "weak_to_strong"
  for k in ("weak_acc", "w2s_acc", "ceiling_acc", "student_base_acc", "weak_sc_acc",
            "w2s_sc_acc", "ceiling_sc_acc"):
    assert 0.0 <= w[k] <= 1.0, k
  assert "pgr" in w and (w["pgr"] is None or isinstance(w["pgr"], float))
  assert set(w["by_loss"]) == {"xent", "confidence"} and w["loss"] == "xent"
  assert w["w2s_acc"] == w["by_loss"]["xent"]["greedy_acc"]
  assert (w["teacher"]["model"], w["student"]["model"]) == ("tiny", "small")
  assert "Teacher → student report" in p.stdout and rep["wall_s"] > 0
  # the student trained on exactly the teacher's majority-vote paths for the pool
  t = os.path.join(workdir, "w2s", "teacher", "round_1")
  votes = {v["id"]: v for v in jsonl.read_jsonl(os.path.join(t, "votes.jsonl"))}
  labels = jsonl.read_jsonl(os.path.join(t, "pseudo_labels.jsonl"))
  assert labels and len(votes) == w["num_pool_questions"] == 64     # no probe held out in w2s
  assert len({(l["id"], l["path_index"]) for l in labels}) == w["teacher_label_paths"]
  for l in labels:
    assert l["answer"] == votes[l["id"]]["answer"]
    if l["format"] == "zero_shot_cot":
      assert voting.extract_answer(l["targets"]) == l["answer"]
  s = os.path.join(workdir, "w2s", "student")
  gold = jsonl.read_jsonl(os.path.join(s, "data", "gold.jsonl"))
  assert {g["id"] for g in gold} == set(votes)
  assert all(r["id"].startswith("seed_easy") for r in jsonl.read_jsonl(os.path.join(s, "data", "pretrain.jsonl")))
  for arm in ("pretrain", "ceiling", "w2s_xent", "w2s_confidence"):
    assert os.path.exists(os.path.join(s, arm, "eval.json")), arm
  assert os.path.getsize(os.path.join(workdir, "w2s.png")) > 0
  # a re-run trains and samples nothing and reproduces the report
  before = os.path.getmtime(os.path.join(s, "ceiling", "eval.json"))
  rep2, p2, _ = _main(workdir)
  assert rep2["w2s"] == w
  assert os.path.getmtime(os.path.join(s, "ceiling", "eval.json")) == before
  assert "skipping training" in p2.stderr and "sample round" not in p2.stderr
