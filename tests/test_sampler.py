"""Sampler: cached decode vs recompute, sharding invariance, sampling distribution, stops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmsi_jax import model as model_lib
from lmsi_jax import sampler
from lmsi_jax import sharding

CFG = model_lib.ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                            num_kv_heads=2, intermediate_size=64, max_seq_len=128)
PROMPTS = [[3, 17, 9], [5, 6, 7, 8, 9, 10, 11], [42], [1, 2, 3, 4, 5], [9, 9], [100, 3, 4, 5, 6, 7],
           [60, 61, 62, 63], [7]]


def _lm(mesh, seed=0, cfg=CFG):
  return model_lib.LM.init(cfg, mesh, seed=seed)


def _keys(n, seed=0):
  return sampler.row_keys(seed, np.arange(n), np.zeros(n))


def _greedy(lm, prompts, steps, **kw):
  p = sampler.SamplingParams(temperature=0.0, max_decode_steps=steps)
  return sampler.decode_batch(lm, prompts, _keys(len(prompts)), params=p, eos_id=-1, **kw)


L = 32   # fixed (right-padded) length: one compile for every reference forward


def _full_logits(lm, seq):
  """Uncached forward over one sequence; right padding cannot affect causal logits."""
  toks = np.zeros((1, L), np.int32)
  toks[0, :len(seq)] = seq
  logits, _ = lm(toks, np.arange(L)[None], model_lib.causal_mask(L))
  return np.asarray(logits[0, :len(seq)])


def _recompute_greedy(lm, prompt, steps):
  seq = list(prompt)
  for _ in range(steps):
    seq.append(int(np.argmax(_full_logits(lm, seq)[-1])))
  return seq[len(prompt):]


def test_cached_decode_equals_recompute_on_ragged_prompts(mesh8):
  lm = _lm(mesh8)
  out = _greedy(lm, PROMPTS, 12)
  for r, p in enumerate(PROMPTS):
    assert out["tokens"][r].tolist() == _recompute_greedy(lm, p, 12), r
  assert (out["lengths"] == 12).all() and (out["stop_reason"] == sampler.STOP_LENGTH).all()


def test_sharded_2x4_equals_single_device():
  lm8 = _lm(sharding.make_mesh((2, 1, 4)))
  lm1 = _lm(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  a, b = _greedy(lm8, PROMPTS, 10), _greedy(lm1, PROMPTS, 10)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-4)
  # and sampling (per-row keys) is mesh-independent too
  p = sampler.SamplingParams(temperature=1.0, top_k=20, max_decode_steps=10)
  s8 = sampler.decode_batch(lm8, PROMPTS, _keys(8, 5), params=p, eos_id=-1)
  s1 = sampler.decode_batch(lm1, PROMPTS, _keys(8, 5), params=p, eos_id=-1)
  np.testing.assert_array_equal(s8["tokens"], s1["tokens"])


def test_low_temperature_and_top_k1_equal_greedy(mesh8):
  lm = _lm(mesh8)
  g = _greedy(lm, PROMPTS, 10)["tokens"]
  for p in (sampler.SamplingParams(temperature=1e-6, max_decode_steps=10),
            sampler.SamplingParams(temperature=1.5, top_k=1, max_decode_steps=10),
            sampler.SamplingParams(temperature=1.0, top_p=1e-6, max_decode_steps=10)):
    out = sampler.decode_batch(lm, PROMPTS, _keys(8, 7), params=p, eos_id=-1)
    np.testing.assert_array_equal(out["tokens"], g)


def _frequencies(logits, params, n=40_000, seed=0):
  keys = jax.random.split(jax.random.key(seed), n)
  toks = jax.jit(sampler.sample_tokens, static_argnums=2)(
      jnp.broadcast_to(logits, (n, logits.shape[0])), keys, params)
  return np.bincount(np.asarray(toks), minlength=logits.shape[0]) / n


LOGITS = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], jnp.float32)


@pytest.mark.parametrize("t", [0.5, 1.0, 1.7])
def test_sampled_frequencies_match_softmax(t):
  f = _frequencies(LOGITS, sampler.SamplingParams(temperature=t))
  p = np.asarray(jax.nn.softmax(LOGITS / t))
  # 40k draws: standard error <= 0.0025; allow 5 sigma.
  np.testing.assert_allclose(f, p, atol=0.0125)


def test_top_k_and_top_p_truncation_respected():
  f = _frequencies(LOGITS, sampler.SamplingParams(temperature=1.0, top_k=3))
  p = np.asarray(jax.nn.softmax(LOGITS[:3]))
  np.testing.assert_allclose(f[:3], p, atol=0.0125)
  assert f[3:].sum() == 0
  # top-p 0.8: softmax = [.55,.20,.12,.07,...]; cumulative-before < 0.8 keeps 3 tokens.
  full = np.asarray(jax.nn.softmax(LOGITS))
  f = _frequencies(LOGITS, sampler.SamplingParams(temperature=1.0, top_p=0.8))
  np.testing.assert_allclose(f[:3], full[:3] / full[:3].sum(), atol=0.0125)
  assert f[3:].sum() == 0
  f = _frequencies(LOGITS, sampler.SamplingParams(temperature=1.0, top_k=4, top_p=0.8))
  assert f[3:].sum() == 0


def test_eos_stop_sequence_and_max_steps(mesh8):
  lm = _lm(mesh8)
  ref = _greedy(lm, PROMPTS, 16)["tokens"]
  eos = int(ref[0, 5])
  first = [int(np.argmax(row == eos)) if (row == eos).any() else None for row in ref]
  out = sampler.decode_batch(lm, PROMPTS, _keys(8), eos_id=eos, pad_id=0,
                             params=sampler.SamplingParams(temperature=0.0, max_decode_steps=16))
  for r in range(8):
    if first[r] is None:
      assert out["lengths"][r] == 16 and out["stop_reason"][r] == sampler.STOP_LENGTH
      np.testing.assert_array_equal(out["tokens"][r], ref[r])
    else:
      n = first[r] + 1
      assert out["lengths"][r] == n and out["stop_reason"][r] == sampler.STOP_EOS
      np.testing.assert_array_equal(out["tokens"][r, :n], ref[r, :n])
      assert (out["tokens"][r, n:] == 0).all() and (out["logprobs"][r, n:] == 0).all()
  # A two-token stop sequence taken from row 1's greedy output.
  stop = (int(ref[1, 3]), int(ref[1, 4]))
  out = sampler.decode_batch(lm, PROMPTS, _keys(8), eos_id=-1, stop_sequences=(stop,),
                             params=sampler.SamplingParams(temperature=0.0, max_decode_steps=16))
  hit = [i for i in range(1, 16) if (int(ref[1, i - 1]), int(ref[1, i])) == stop][0]
  assert out["stop_reason"][1] == sampler.STOP_SEQUENCE and out["lengths"][1] == hit + 1
  # Every row stopped early -> the loop exits early.
  g = _greedy(lm, [[3, 4]], 1)["tokens"][0, 0]
  out = sampler.decode_batch(lm, [[3, 4]] * 8, _keys(8), eos_id=int(g),
                             params=sampler.SamplingParams(temperature=0.0, max_decode_steps=16))
  assert int(out["steps"]) == 1 and (out["lengths"] == 1).all()


def test_logprobs_equal_model_log_softmax(mesh8):
  lm = _lm(mesh8)
  p = sampler.SamplingParams(temperature=1.0, top_k=10, max_decode_steps=8)
  out = sampler.decode_batch(lm, PROMPTS, _keys(8, 3), params=p, eos_id=-1)
  for r, prompt in enumerate(PROMPTS):
    seq = list(prompt) + out["tokens"][r].tolist()
    ls = np.asarray(jax.nn.log_softmax(_full_logits(lm, seq), -1))
    want = [ls[len(prompt) - 1 + i, seq[len(prompt) + i]] for i in range(8)]
    np.testing.assert_allclose(out["logprobs"][r], want, atol=1e-4)


def test_padded_vocab_never_sampled(mesh8):
  lm = _lm(mesh8)
  p = sampler.SamplingParams(temperature=3.0, max_decode_steps=20)
  out = sampler.decode_batch(lm, PROMPTS, _keys(8, 1), params=p, eos_id=-1, vocab_limit=50)
  assert out["tokens"].max() < 50


def test_bucketing_bounds_compiles(mesh8):
  lm = _lm(mesh8)
  p = sampler.SamplingParams(temperature=0.0, max_decode_steps=4)
  before = sampler.compile_count()
  for n in (3, 5, 9, 12, 16):
    sampler.decode_batch(lm, [[7] * n] * 3, _keys(3), params=p, eos_id=-1, batch_size=8)
  assert sampler.compile_count() - before == 1   # all lengths fall in the 16 bucket
  assert sampler.bucket_length(17) == 32


@pytest.mark.parametrize("kw,msg", [
    (dict(temperature=-0.1), "temperature must be >= 0, got -0.1"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(top_k=-1), "top_k must be an int >= 0, got -1"),
    (dict(max_decode_steps=0), "max_decode_steps must be an int >= 1, got 0"),
])
def test_invalid_arguments(kw, msg):
  with pytest.raises(ValueError, match=msg):
    sampler.SamplingParams(**kw)


def test_prompt_longer_than_context(mesh8):
  lm = _lm(mesh8)
  with pytest.raises(ValueError, match="exceeds the model context model.max_seq_len=128"):
    sampler.decode_batch(lm, [[1] * 100], _keys(1), eos_id=-1,
                         params=sampler.SamplingParams(max_decode_steps=64))
