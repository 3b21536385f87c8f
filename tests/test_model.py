"""Model: sharded init, logical axes, mesh errors, variants."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lmsi_jax import model as model_lib
from lmsi_jax import sharding


def test_mesh_inference_and_errors():
  assert sharding.infer_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert sharding.infer_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match=r"mesh.shape=\(3, -1, 1\) does not fit 8 devices"):
    sharding.infer_mesh_shape((3, -1, 1), 8)
  with pytest.raises(ValueError, match="needs 16 devices but 8 are available"):
    sharding.infer_mesh_shape((4, 4, 1), 8)
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.infer_mesh_shape((-1, -1, 1), 8)


def test_params_created_sharded(mesh8):
  cfg = model_lib.preset("tiny")
  lm = model_lib.LM.init(cfg, mesh8, seed=0)
  st = lm.state
  gate = st["layers"]["mlp"]["gate_proj"][...]         # stacked: [layers, embed, mlp]
  assert gate.sharding.spec == P(None, "fsdp", "model")
  assert st["embed"][...].sharding.spec == P("model", "fsdp")
  assert st["layers"]["attn"]["o_proj"][...].sharding.spec == P(None, "model", None, "fsdp")
  # each device holds only its shard
  shard = gate.addressable_shards[0].data
  assert shard.shape == (cfg.num_layers, cfg.hidden_size // 2, cfg.intermediate_size // 2)
  n = sum(x.size for x in jax.tree.leaves(st))
  assert n == cfg.num_params()
  assert 80_000 < n < 150_000
  assert cfg.vocab_size % 128 == 0


def test_indivisible_axis_falls_back_to_replicated(mesh8):
  # 3 kv heads (SmolLM2-like) on a model axis of 2 -> replicated, not an error.
  cfg = model_lib.ModelConfig(vocab_size=256, hidden_size=48, num_layers=1, num_heads=6,
                              num_kv_heads=3, intermediate_size=64)
  lm = model_lib.LM.init(cfg, mesh8)
  k = lm.state["layers"]["attn"]["k_proj"][...]
  assert k.sharding.spec == P(None, "fsdp", None, None)


def test_init_deterministic_and_seed_dependent(mesh8):
  cfg = model_lib.preset("tiny")
  a = model_lib.LM.init(cfg, mesh8, seed=1).state["embed"][...]
  b = model_lib.LM.init(cfg, mesh8, seed=1).state["embed"][...]
  c = model_lib.LM.init(cfg, mesh8, seed=2).state["embed"][...]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_fan_in_init_scales_and_normal_is_unchanged(mesh8):
  """model.init: "normal" draws every weight N(0, 0.02) (the default; the same draws as
  before the option existed: same key order); "fan_in" draws projections N(0, 1/fan_in),
  the residual-writing o_proj/down_proj also / sqrt(2L), and leaves the embeddings alone."""
  cfg = model_lib.ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, intermediate_size=256, tie_embeddings=False)
  normal = model_lib.LM.init(cfg, mesh8, seed=5).state
  fan = model_lib.LM.init(dataclasses.replace(cfg, init="fan_in"), mesh8, seed=5).state
  def w(st, *path):   # layers are stacked: ("layers", i, ...) reads layer i of [L, ...]
    if path[0] == "layers":
      return np.asarray(functools.reduce(lambda t, k: t[k], path[2:], st["layers"])[...])[path[1]]
    return np.asarray(functools.reduce(lambda t, k: t[k], path, st)[...])
  std = lambda st, *path: float(np.std(w(st, *path)))
  for path in (("embed",), ("lm_head",), ("layers", 0, "attn", "q_proj"),
               ("layers", 1, "mlp", "down_proj")):
    assert std(normal, *path) == pytest.approx(0.02, rel=0.1)
  assert std(fan, "embed") == pytest.approx(0.02, rel=0.1)
  np.testing.assert_array_equal(w(fan, "embed"), w(normal, "embed"))
  assert std(fan, "lm_head") == pytest.approx(64 ** -0.5, rel=0.1)
  assert std(fan, "layers", 0, "attn", "k_proj") == pytest.approx(64 ** -0.5, rel=0.1)
  assert std(fan, "layers", 0, "mlp", "up_proj") == pytest.approx(64 ** -0.5, rel=0.1)
  assert std(fan, "layers", 1, "attn", "o_proj") == pytest.approx(64 ** -0.5 / 2, rel=0.1)
  assert std(fan, "layers", 1, "mlp", "down_proj") == pytest.approx(256 ** -0.5 / 2, rel=0.1)
  # The same standard-normal draws, rescaled: fan_in / normal is one constant per weight.
  q_fan, q_normal = w(fan, "layers", 0, "attn", "q_proj"), w(normal, "layers", 0, "attn", "q_proj")
  np.testing.assert_allclose(q_fan, q_normal * (64 ** -0.5 / 0.02), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="model.init='xavier'"):
    dataclasses.replace(cfg, init="xavier")


@pytest.mark.parametrize("tie,bias", [(True, False), (False, True)])
def test_forward_variants_and_padding_invariance(mesh8, tie, bias):
  cfg = model_lib.ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, intermediate_size=64, tie_embeddings=tie, qkv_bias=bias)
  lm = model_lib.LM.init(cfg, mesh8, seed=3)
  if bias:
    assert "q_bias" in lm.state["layers"]["attn"]
  toks = np.array([[5, 6, 7, 8, 9, 10, 11, 12]] * 8, np.int32)
  pos = np.broadcast_to(np.arange(8), (8, 8))
  logits, _ = lm(toks, pos, model_lib.causal_mask(8))
  assert logits.shape == (8, 8, 256)
  # Left padding with masked keys and shifted positions gives the same logits.
  pad = np.concatenate([np.zeros((8, 3), np.int32), toks], 1)
  valid = np.concatenate([np.zeros((8, 3), bool), np.ones((8, 8), bool)], 1)
  ppos = np.maximum(np.cumsum(valid, 1) - 1, 0)
  logits2, _ = lm(pad, ppos, model_lib.causal_mask(11, valid))
  np.testing.assert_allclose(np.asarray(logits2[:, 3:]), np.asarray(logits), atol=1e-5)


def test_segment_mask_blocks_cross_segment_attention():
  seg = jnp.array([[1, 1, 2, 2, 0]])
  m = np.asarray(model_lib.segment_mask(seg))[0]
  assert m[1, 0] and not m[2, 1] and m[3, 2] and not m[4].any() and not m[0, 1]


def test_bad_config_errors():
  with pytest.raises(ValueError, match="num_kv_heads"):
    model_lib.ModelConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=4,
                          num_kv_heads=3, intermediate_size=8)
  with pytest.raises(ValueError, match="model.dtype"):
    model_lib.ModelConfig(vocab_size=128, hidden_size=32, num_layers=1, num_heads=4,
                          num_kv_heads=2, intermediate_size=8, dtype="int8")
  with pytest.raises(ValueError, match="model.preset"):
    model_lib.preset("gpt5")
