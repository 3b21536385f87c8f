"""LoRA (lmsi_jax/lora.py): config validation, frozen base, adapter-only optimizer state,
merge == adapters, adapter checkpoints and resume, PEFT export round trip."""
import dataclasses
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
from lmsi_jax import config as config_lib
from lmsi_jax import lora
from lmsi_jax import model as model_lib
from lmsi_jax import sharding
from lmsi_jax import train as train_lib

import train_worker as tw  # tests/ is on sys.path

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CFG = model_lib.ModelConfig(**tw.CFG)
LCFG = lora.LoraConfig(rank=4, **tw.LORA)


def _tcfg(**kw) -> train_lib.TrainConfig:
  return train_lib.TrainConfig.from_dict({**tw.TCFG, "learning_rate": 0.1, **kw})


def _logits(lm, tokens):
  b, t = tokens.shape
  return np.asarray(lm(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(t), (b, t)),
                       model_lib.causal_mask(t))[0])


def test_config_validation_names_the_key():
  assert not lora.LoraConfig().enabled
  assert lora.LoraConfig.from_config({"rank": 8, "targets": ["q", "v"]}).targets == ("q", "v")
  bad = [({"rank": -1}, r"^train\.lora\.rank=-1: expected an int >= 0"),
         ({"rank": 2.0}, r"^train\.lora\.rank=2\.0: expected an int"),
         ({"alpha": 0.0}, r"^train\.lora\.alpha=0\.0: expected a finite number > 0"),
         ({"dropout": 1.0}, r"^train\.lora\.dropout=1\.0: expected a number in \[0, 1\)"),
         ({"targets": ()}, r"^train\.lora\.targets=\(\): expected a non-empty tuple"),
         ({"targets": ("q", "(")}, r"^train\.lora\.targets=\('q', '\('\): '\(' is neither"),
         ({"rnak": 4}, r"^train\.lora\.rnak: unknown key")]
  for d, msg in bad:
    with pytest.raises(ValueError, match=msg):
      lora.LoraConfig.from_config(d)
  c = config_lib.base_config()
  config_lib.validate(c)                                  # default: off, valid
  c.train.lora.dropout = 1.5
  with pytest.raises(ValueError, match=r"^config\.train\.lora\.dropout=1\.5: expected") as e:
    config_lib.validate(c)
  assert "\n" not in str(e.value)


def test_targets_select_weights(mesh8):
  lm = model_lib.LM.init(CFG, mesh8)
  paths = lora.apply(lm, LCFG).adapter_paths()
  assert paths == [f"layers.{i}.{w}" for i in range(2)
                   for w in ("attn.o_proj", "attn.q_proj", "attn.v_proj", "mlp.down_proj")]
  one = lora.LoraConfig(rank=2, targets=(r"layers/1/mlp/(gate|up)_proj", "k_proj"))
  assert lora.apply(lm, one).adapter_paths() == [
      "layers.0.attn.k_proj", "layers.1.attn.k_proj", "layers.1.mlp.gate_proj",
      "layers.1.mlp.up_proj"]
  with pytest.raises(ValueError, match=r"config\.train\.lora\.targets=\('embed',\): matches no"):
    lora.apply(lm, lora.LoraConfig(rank=2, targets=("embed",)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """16 LoRA steps (with dropout) of the tiny model on the (2,2,2) mesh: (base LM copy, out)."""
  mesh = sharding.make_mesh((2, 2, 2))
  lm = model_lib.LM.init(CFG, mesh, seed=0)
  # A wider embedding than the 0.02 init: with the final norm frozen, the logits' scale is
  # the embedding's, so adapters on a 0.02 one could barely move the loss.
  lm.state["embed"][...] = lm.state["embed"][...] * 25.0
  base = jax.tree.map(lambda x: np.asarray(x).copy(), lm.state)
  llm = lora.apply(lm, LCFG, seed=0)
  workdir = str(tmp_path_factory.mktemp("lora_train"))
  out = train_lib.train(llm, tw.ArrayBatches(8, 32, seed=1), _tcfg(num_steps=16, checkpoint_every=8),
                        workdir)
  return lm, base, llm, out, workdir


def test_only_adapters_train_and_hold_optimizer_state(trained):
  _, base, _, out, _ = trained
  assert isinstance(out, lora.LoraLM)
  # The base weights are bit-identical after training (never donated, never updated).
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(out.frozen)):
    np.testing.assert_array_equal(a, np.asarray(b))
  # Every adapter B moved off zero; adapters keep their shardings (A like W's input dims).
  flat = tw.flat_params(out.state)
  assert all(np.abs(v).max() > 0 for k, v in flat.items() if k.endswith("_lora_b"))
  q_a = out.state["layers"]["attn"]["q_proj_lora_a"][...]                # stacked: [L, in, r]
  assert q_a.shape == (2, 32, 4)
  assert q_a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  # Optimizer state: moments only for the adapters (shapes of LoRA params, nothing else).
  step = train_lib.make_train_step(out, _tcfg())
  opt = step.init(out.state)
  lora_shapes = {tuple(x.shape) for x in jax.tree.leaves(out.state)}
  big = [x.shape for x in jax.tree.leaves(opt) if x.ndim and tuple(x.shape) not in lora_shapes]
  assert not big, big
  n_opt = sum(x.size for x in jax.tree.leaves(opt))
  n_lora = sum(x.size for x in jax.tree.leaves(out.state))
  n_base = sum(x.size for x in jax.tree.leaves(out.frozen))
  assert n_opt <= 2 * n_lora + 8 and n_lora < n_base / 4, (n_opt, n_lora, n_base)


def test_loss_falls(trained):
  lm, _, _, out, _ = trained
  evals = lambda: tw.ArrayBatches(8, 32, seed=99)
  before = train_lib.evaluate_loss(lm, evals(), 2)
  after = train_lib.evaluate_loss(lora.merge(out), evals(), 2)
  assert after < before - 0.3, (before, after)


def test_merged_logits_equal_adapter_logits(trained):
  _, _, _, out, _ = trained
  tokens = tw.make_batch(np.random.default_rng(5), 8, 16)["tokens"]
  merged = lora.merge(out)
  assert isinstance(merged, model_lib.LM) and merged.graphdef == out.base_graphdef
  assert "q_proj_lora_a" not in merged.state["layers"]["attn"]     # a plain model
  np.testing.assert_allclose(_logits(merged, tokens), _logits(out, tokens), atol=2e-5, rtol=1e-5)
  # ... and same shardings as the base (samplers get what they always got).
  for a, b in zip(jax.tree.leaves(merged.state), jax.tree.leaves(out.frozen)):
    assert a.sharding == b.sharding
  # Fresh adapters (B = 0) are the base model exactly.
  fresh = lora.apply(model_lib.LM(CFG, out.base_graphdef, out.frozen, out.mesh), LCFG)
  np.testing.assert_allclose(_logits(fresh, tokens),
                             _logits(model_lib.LM(CFG, out.base_graphdef, out.frozen, out.mesh),
                                     tokens), atol=2e-5, rtol=1e-5)   # jit vs eager rounding


def test_checkpoint_holds_the_adapter_only(trained):
  lm, _, _, out, workdir = trained
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as ck:
    assert ck.all_steps() == [8, 16]
    md = ck.metadata(16)
  shapes = ckpt_lib.flat_shapes(md["params"])
  assert shapes and all(k.endswith(("_lora_a", "_lora_b")) for k in shapes), shapes
  assert ckpt_lib.flat_shapes(md["params"]) == ckpt_lib.flat_shapes(out.state)
  meta = ckpt_lib.read_meta(workdir)
  assert meta["lora"] == {**dataclasses.asdict(LCFG), "targets": list(LCFG.targets)}
  restored = lora.restore(workdir, lm, LCFG)
  for a, b in zip(jax.tree.leaves(out.state), jax.tree.leaves(restored.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == b.sharding
  # Not loadable as a model on its own: one line saying what it is.
  from lmsi_jax import loading  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"holds LoRA adapters only \(train\.lora\.rank=4\)"):
    loading.load_any(workdir, lm.mesh)
  # A different rank is a named shape mismatch, not a silent restart.
  with pytest.raises(ckpt_lib.ShapeMismatch, match=r"_proj_lora_a' has shape \(2, 4, 8, 4\)"):
    lora.restore(workdir, lm, dataclasses.replace(LCFG, rank=2))


def _run_lora(workdir, **kw):
  return tw.run(workdir, lora_rank=LCFG.rank, **kw)


def test_crash_and_resume_from_adapter_checkpoint(tmp_path):
  straight = tw.flat_params(_run_lora(str(tmp_path / "straight")).state)
  with pytest.raises(RuntimeError, match="simulated crash before batch 10"):
    _run_lora(str(tmp_path / "w"), fail_at=10)
  assert ckpt_lib.Checkpointer(str(tmp_path / "w" / "checkpoints")).all_steps() == [10]
  resumed = _run_lora(str(tmp_path / "w"))
  flat = tw.flat_params(resumed.state)
  assert flat.keys() == straight.keys()
  for k in flat:
    np.testing.assert_allclose(flat[k], straight[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_from_adapter(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             TRAIN_WORKER_LORA_RANK=str(LCFG.rank),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cmd = [sys.executable, os.path.join(REPO, "tests", "train_worker.py"), str(tmp_path / "w"),
         str(tmp_path / "out.npz"), "0.3"]
  first = tmp_path / "w" / "checkpoints" / "10" / "commit_success.txt"
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.time() + 180
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
  done = subprocess.run(cmd[:-1], env=env, capture_output=True, timeout=240)
  assert done.returncode == 0, done.stderr.decode()[-3000:]
  straight = tw.flat_params(_run_lora(str(tmp_path / "straight")).state)
  with np.load(tmp_path / "out.npz") as f:
    got = dict(f)
  assert got.keys() == straight.keys() and all(k.endswith(("_lora_a", "_lora_b")) for k in got)
  # The worker runs with XLA's default CPU threading, the reference in this process with the
  # caller's flags: float sums differ in the last bits (seen: 7e-6 relative after 20 steps).
  for k in got:
    np.testing.assert_allclose(got[k], straight[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_peft_round_trip_equal_logits(mesh8, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  from lmsi_jax.interop import load_checkpoint, save_tokenizer  # pylint: disable=g-import-not-at-top
  from lmsi_jax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  hf_cfg = transformers.LlamaConfig(
      vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
      rms_norm_eps=1e-5, tie_word_embeddings=False,
      rope_parameters={"rope_theta": 50_000.0, "rope_type": "default"})
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.normal_(0.0, 0.1) if p.ndim > 1 else p.fill_(1.0)
  base_dir = str(tmp_path / "base")
  hf.save_pretrained(base_dir)
  save_tokenizer(vocab_lib.byte_vocabulary(), base_dir)

  lm, _ = load_checkpoint(base_dir, mesh8)
  lcfg = lora.LoraConfig(rank=4, alpha=12.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
  llm = lora.apply(lm, lcfg, seed=3)
  keys = iter(jax.random.split(jax.random.key(7), 64))
  llm.state = jax.tree.map(lambda x: jax.device_put(
      0.1 * jax.random.normal(next(keys), x.shape, x.dtype), x.sharding), llm.state)
  adapter_dir = lora.export_peft(llm, str(tmp_path / "adapter"), base_model_name_or_path=base_dir)
  assert sorted(os.listdir(adapter_dir)) == ["adapter_config.json", "adapter_model.safetensors"]

  tokens = np.array([[0, 5, 17, 299, 42, 7, 3, 250], [0, 104, 105, 33, 258, 1, 9, 11]], np.int32)
  peft_model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
  with torch.no_grad():
    want = peft_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  ours = _logits(llm, tokens)[..., :300]
  np.testing.assert_allclose(ours, want, atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(_logits(lora.merge(llm), tokens)[..., :300], want, atol=2e-4, rtol=2e-4)
  # The adapter really changes the function (the test would pass vacuously otherwise).
  with torch.no_grad(), peft_model.disable_adapter():
    base_logits = peft_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  assert np.abs(base_logits - want).max() > 1e-2
