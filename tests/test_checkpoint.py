"""Checkpoints: round trip, restore onto other meshes / device counts, shape errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lmsi_jax import checkpoint as ckpt_lib
from lmsi_jax import model as model_lib
from lmsi_jax import sharding
from lmsi_jax import train as train_lib

import train_worker as tw

CFG = model_lib.ModelConfig(**tw.CFG)
TCFG = train_lib.TrainConfig.from_dict(tw.TCFG)


@pytest.fixture(scope="module")
def saved(mesh8, tmp_path_factory):
  """A (2,2,2)-mesh checkpoint at step 3 with params, opt state, data and meta."""
  d = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
  lm = model_lib.LM.init(CFG, mesh8, seed=7)
  opt = train_lib.make_train_step(lm, TCFG).init(lm.state)
  opt = jax.tree.map(lambda x: x + 1, opt)                 # non-trivial values
  with ckpt_lib.Checkpointer(d, max_to_keep=2) as ck:
    assert ck.latest_step() is None
    assert ck.save(3, lm.state, opt, {"epoch": 1, "row": 5}, {"round": 2})
    ck.wait()
    assert not ck.save(3, lm.state, opt, {}, {})           # re-saving a step is refused
  return d, tw.flat_params(lm.state), tw.flat_params(opt)


def _restore_on(mesh, d):
  """Restores the `saved` checkpoint onto `mesh` (abstract LM: nothing allocated first)."""
  graphdef, abstract, _ = model_lib.abstract_model(CFG, mesh)
  step = train_lib.make_train_step(model_lib.LM(CFG, graphdef, abstract, mesh), TCFG)
  with ckpt_lib.Checkpointer(d) as ck:
    return ck.restore(ck.latest_step(), step.abstract_params, step.abstract_opt_state), step


def test_round_trip_same_mesh(mesh8, saved):
  d, params, opt = saved
  r, step = _restore_on(mesh8, d)
  assert r["data"] == {"epoch": 1, "row": 5} and r["meta"] == {"round": 2}
  assert jax.tree.structure(r["params"]) == jax.tree.structure(step.abstract_params)
  assert isinstance(r["params"]["layers"]["mlp"]["gate_proj"][...], jax.Array)
  for got, want in ((tw.flat_params(r["params"]), params), (tw.flat_params(r["opt_state"]), opt)):
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  gate = r["params"]["layers"]["mlp"]["gate_proj"][...]
  assert gate.sharding.spec == P(None, "fsdp", "model")
  mu = r["opt_state"][1][0].mu["layers"]["mlp"]["gate_proj"][...]
  assert mu.sharding == gate.sharding


@pytest.mark.parametrize("shape,ndev", [((4, 2, 1), 8), ((2, 1, 2), 4)])
def test_restore_onto_other_mesh(saved, shape, ndev):
  d, params, opt = saved
  mesh = sharding.make_mesh(shape, devices=jax.devices()[:ndev])
  r, step = _restore_on(mesh, d)
  for got, want in ((tw.flat_params(r["params"]), params), (tw.flat_params(r["opt_state"]), opt)):
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  for x, s in zip(jax.tree.leaves(r["params"]), jax.tree.leaves(step.param_shardings)):
    assert x.sharding == s and len(x.sharding.device_set) == ndev
  gate = r["params"]["layers"]["mlp"]["gate_proj"][...]
  assert gate.sharding.spec == (P(None, "fsdp", None) if shape == (4, 2, 1) else
                                P(None, None, "model"))


def test_restore_params_from_workdir_or_dir(saved):
  d, params, _ = saved
  mesh = sharding.make_mesh((1, 2, 2), devices=jax.devices()[:4])
  for where in (d, d.rsplit("/", 1)[0]):                # checkpoint dir or its workdir
    lm = ckpt_lib.restore_params(where, CFG, mesh)
    assert lm.mesh is mesh and lm.cfg == CFG
    assert ckpt_lib.read_meta(where) == {"round": 2}
    got = tw.flat_params(lm.state)
    for k in params:
      np.testing.assert_array_equal(got[k], params[k], err_msg=k)
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 9"):
    ckpt_lib.restore_params(d, CFG, mesh, step=9)


def test_shape_mismatch_names_parameter(mesh8, saved, tmp_path):
  d, _, _ = saved
  bigger = model_lib.ModelConfig(**{**tw.CFG, "intermediate_size": 96})
  with pytest.raises(ValueError, match=r"parameter 'layers/mlp/down_proj' has shape \(2, 64, 32\) "
                                       r"in the checkpoint but \(2, 96, 32\) in the model"):
    ckpt_lib.restore_params(d, bigger, mesh8)
  deeper = model_lib.ModelConfig(**{**tw.CFG, "num_layers": 3})
  with pytest.raises(ValueError, match=r"parameter 'layers/attn/k_proj' has shape \(2, 32, 2, 8\) in "
                                       r"the checkpoint but \(3, 32, 2, 8\) in the model"):
    ckpt_lib.restore_params(d, deeper, mesh8)
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    ckpt_lib.restore_params(str(tmp_path), CFG, mesh8)


OLD_LAYOUT = os.path.join(os.path.dirname(__file__), "fixtures", "old_layout")


def test_per_layer_checkpoint_loads_into_stacked_layers(mesh8):
  """A checkpoint written before the layers were stacked (params 'layers/0/attn/q_proj', ...;
  tests/fixtures/old_layout, made once by that code with tw.CFG, seed 7, plus its logits) is
  stacked on restore and gives the same logits, on another mesh than it was written on."""
  with ckpt_lib._open(OLD_LAYOUT) as ckpt:  # pylint: disable=protected-access
    md = ckpt._mngr.item_metadata(3)  # pylint: disable=protected-access
  assert "layers/0/attn/q_proj" in ckpt_lib.flat_shapes(md["params"])
  lm = ckpt_lib.restore_params(OLD_LAYOUT, CFG, mesh8)
  assert lm.state["layers"]["attn"]["q_proj"][...].shape == (2, 32, 4, 8)
  tokens = jnp.asarray(np.arange(16).reshape(2, 8) * 7 % 128, jnp.int32)
  logits, _ = lm(tokens, jnp.broadcast_to(jnp.arange(8), (2, 8)), model_lib.causal_mask(8))
  np.testing.assert_allclose(np.asarray(logits), np.load(os.path.join(OLD_LAYOUT, "logits.npy")),
                             atol=1e-6, rtol=1e-6)
  deeper = model_lib.ModelConfig(**{**tw.CFG, "num_layers": 3})
  with pytest.raises(ValueError, match=r"parameter 'layers/attn/k_proj' .* is not in the model|"
                                       r"the checkpoint has layers \[0, 1\], the model 3"):
    ckpt_lib.restore_params(OLD_LAYOUT, deeper, mesh8)
