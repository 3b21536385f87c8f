"""Shared-prefix decoding and refilled rows (issue 16, items 1-2).

Shared (few-shot block prefilled once, each question once for its m rows) equals
nothing shared (every row its whole prompt, the same engine), greedy and with
fixed per-row keys; a sample is the same whatever the batch size and arrival
order; refills never recompile.
"""
import numpy as np
import pytest

from lmsi_jax import batching
from lmsi_jax import engine
from lmsi_jax import model as model_lib
from lmsi_jax import sampler
from lmsi_jax import testing

CFG = model_lib.ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                            num_kv_heads=2, intermediate_size=64, max_seq_len=128)
FEWSHOT = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
QUESTIONS = [[3, 17, 9], [5, 6, 7, 8, 9, 10, 11], [42], [1, 2, 3, 4, 5], [9, 9]]
PROMPTS = [FEWSHOT + q for q in QUESTIONS]
M = 3


def _keys(n, m, seed=0):
  return sampler.row_keys(seed, np.repeat(np.arange(n), m), np.tile(np.arange(m), n)).reshape(n, m, -1)


def _run(lm, prompts, keys, params, **kw):
  kw.setdefault("eos_id", -1)
  out = batching.sample_prompts(lm, prompts, keys, params=params, **kw)
  return ([[r.tokens.tolist() for r in rows] for rows in out],
          [[r.logprobs for r in rows] for rows in out])


@pytest.fixture(scope="module")
def tiny(mesh8):
  return model_lib.LM.init(CFG, mesh8, seed=0)


def test_common_prefix_leaves_each_prompt_a_token():
  assert batching.common_prefix(PROMPTS) == len(FEWSHOT)
  assert batching.common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
  assert batching.common_prefix([[1, 2], [3, 4]]) == 0


@pytest.mark.parametrize("params", [
    sampler.SamplingParams(temperature=0.0, max_decode_steps=12),
    sampler.SamplingParams(temperature=1.0, top_k=20, max_decode_steps=12)],
    ids=["greedy", "sampled"])
def test_shared_equals_plain_tiny(tiny, params):
  keys = _keys(len(PROMPTS), M)
  st = batching.Stats()
  shared, lp_s = _run(tiny, PROMPTS, keys, params, batch_size=8, stats=st)
  plain, lp_p = _run(tiny, PROMPTS, keys, params, batch_size=8, share=False)
  assert shared == plain
  for a, b in zip(lp_s, lp_p):
    np.testing.assert_allclose(np.concatenate(a), np.concatenate(b), atol=1e-5)
  # The few-shot block was prefilled once; each question once for its M rows.
  assert st.prefix_tokens == len(FEWSHOT)
  assert st.question_tokens == sum(len(q) for q in QUESTIONS)
  if params.temperature == 0:
    assert all(r == rows[0] for rows in shared for r in rows)   # greedy: same path per sample
  else:
    assert any(len({tuple(r) for r in rows}) > 1 for rows in shared)


def _greedy_by_recompute(lm, prompt, steps: int, length: int) -> list[int]:
  """`steps` greedy tokens after `prompt`, each the argmax of an uncached full forward."""
  seq = list(prompt)
  for _ in range(steps):
    toks = np.zeros((1, length), np.int32)
    toks[0, :len(seq)] = seq
    logits, _ = lm(toks, np.arange(length)[None], model_lib.causal_mask(length))
    seq.append(int(np.argmax(np.asarray(logits[0, len(seq) - 1]))))
  return seq[len(prompt):]


def test_greedy_shared_equals_full_recompute(tiny):
  """Greedy continuation == argmax of an uncached full forward, token by token."""
  st = batching.Stats()
  out, _ = _run(tiny, PROMPTS, _keys(len(PROMPTS), 1), batch_size=32, stats=st,
                params=sampler.SamplingParams(temperature=0.0, max_decode_steps=8))
  assert st.slots == 8           # 5 rows: the power of two above, not all 32 slots
  for p, rows in zip(PROMPTS, out):
    assert rows[0] == _greedy_by_recompute(tiny, p, 8, length=32)


def test_refill_same_samples_whatever_batch_and_order(tiny):
  """Rows stop at EOS at different steps and slots are refilled; every (prompt, key)
  gives the same tokens for batch sizes 8 and 16 and for reversed prompt order."""
  params = sampler.SamplingParams(temperature=1.5, max_decode_steps=16)
  keys = _keys(len(PROMPTS), M, seed=3)
  st = batching.Stats()
  ref, _ = _run(tiny, PROMPTS, keys, params, eos_id=5, batch_size=8, stats=st)
  lengths = [len(r) for rows in ref for r in rows]
  assert min(lengths) < 16 and st.chunks > 1      # rows stopped early and slots were refilled
  assert any(r[-1] == 5 for rows in ref for r in rows)
  big, _ = _run(tiny, PROMPTS, keys, params, eos_id=5, batch_size=16)
  assert big == ref
  rev, _ = _run(tiny, PROMPTS[::-1], keys[::-1], params, eos_id=5, batch_size=8)
  assert rev[::-1] == ref


def test_tail_on_fewer_slots_same_samples(tiny):
  """The tail (nothing pending, half the slots or fewer running) moves to half the slots,
  and again; every row's tokens and log-probs are those of a run that never shrinks."""
  params = sampler.SamplingParams(temperature=1.5, max_decode_steps=40)
  prompts = PROMPTS * 2
  keys = _keys(len(prompts), M, seed=5)
  st = batching.Stats()    # eos 65: rows of these keys stop after 4 to 40 tokens
  out, lp = _run(tiny, prompts, keys, params, eos_id=65, batch_size=16, min_slots=4, chunk=8,
                 stats=st)
  assert st.shrinks >= 1 and len({len(r) for rows in out for r in rows}) > 5
  ref, lp_ref = _run(tiny, prompts, keys, params, eos_id=65, batch_size=16, min_slots=64,
                     chunk=8)
  assert out == ref
  for a, b in zip(lp, lp_ref):
    np.testing.assert_allclose(np.concatenate(a), np.concatenate(b), atol=1e-6)


def test_refills_do_not_recompile(tiny):
  params = sampler.SamplingParams(temperature=1.0, max_decode_steps=16)
  kw = dict(eos_id=7, batch_size=8)
  _run(tiny, PROMPTS, _keys(len(PROMPTS), M), params, **kw)     # compiles this bucket
  before = engine.jit_cache_sizes()
  st = batching.Stats()
  # More questions and samples, other keys: many more refills, the same bucket shapes.
  more = PROMPTS * 3
  _run(tiny, more, _keys(len(more), M, seed=9), params, stats=st, **kw)
  assert st.chunks >= 4
  assert engine.jit_cache_sizes() == before


def test_smollm2_shaped_shared_equals_plain(mesh8):
  """SmolLM2-135M's widths, heads (9 q / 3 kv, head_dim 64) and vocab, random weights,
  2 layers, on the 2x2x2 mesh."""
  cfg = model_lib.preset("smollm2_135m", num_layers=2, max_seq_len=256)
  lm = model_lib.LM.init(cfg, mesh8, seed=1)
  rng = np.random.default_rng(0)
  few = rng.integers(100, 49000, 40).tolist()
  prompts = [few + rng.integers(100, 49000, n).tolist() for n in (5, 9, 3)]
  keys = _keys(3, 2, seed=4)
  for params in (sampler.SamplingParams(temperature=0.0, max_decode_steps=8),
                 sampler.SamplingParams(temperature=0.7, top_k=40, max_decode_steps=8)):
    shared, lp_s = _run(lm, prompts, keys, params, batch_size=8)
    plain, lp_p = _run(lm, prompts, keys, params, batch_size=8, share=False)
    assert shared == plain
    for a, b in zip(lp_s, lp_p):
      np.testing.assert_allclose(np.concatenate(a), np.concatenate(b), atol=1e-4)


def test_every_model_option_shared_greedy_equals_full_forward(mesh8):
  """Sliding-window layers past the window (over prefix, question and row segments),
  softcaps, qk-norm, post-norms, llama3 RoPE: greedy shared decoding == full forward."""
  lm = testing.all_options_lm(mesh8)
  prompts = [[5, 9, 2, 7, 1] + q for q in ([3, 4], [8], [6, 6, 6])]
  out, _ = _run(lm, prompts, _keys(3, 1), batch_size=8,
                params=sampler.SamplingParams(temperature=0.0, max_decode_steps=6))
  for p, rows in zip(prompts, out):
    assert rows[0] == _greedy_by_recompute(lm, p, 6, length=16)


def test_workload_benchmark_imports_without_tensorflow(shared_dir):
  """benchmarks/lmsi_sampling.py imports, and builds its 8-shot CoT prompts and parses answers,
  on a machine without TensorFlow, SeqIO, TFDS or ml_collections."""
  import os        # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys       # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ("import sys\n"
          "for m in ('tensorflow', 'seqio', 'tensorflow_datasets', 'ml_collections'):\n"
          "  sys.modules[m] = None\n"
          "sys.path.insert(0, 'benchmarks')\n"
          "import lmsi_sampling as b\n"
          f"p = b.prompts(b.questions({os.path.join(shared_dir, 'data', 'gsm8k')!r}, 2))\n"
          "assert len(p) == 2 and p[0].endswith('\\nA:') and p[0].count('Q: ') == 9, p[0][-200:]\n"
          "assert b.parses('9 * 2 = 18. The answer is 18.\\nQ: next') and not b.parses('18')\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo,
                       env={**os.environ, "PYTHONPATH": repo})
  assert out.returncode == 0, out.stderr
