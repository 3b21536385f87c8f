"""Sampler throughput: lmsi_jax `decode_batch` vs HF transformers `generate` (issue 2).

SmolLM2-135M shape, random weights, f32, batch 32, 64-token prompt, 128 new
tokens forced (no EOS), T=0.7, top-k 40, on CPU. Both sides get one warm-up
call, then the best of `--repeats` timed calls; prefill is included in both.
tokens/s = batch * new_tokens / wall time. The last stdout line is JSON.

  python benchmarks/sampler.py                       # full spec
  python benchmarks/sampler.py --batch 4 --new_tokens 16 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# One CPU device in a plain process; let XLA use every core for one computation.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py, next to this script)


def _best(fn, repeats: int) -> tuple[float, list[float]]:
  fn()                                            # warm-up (compile / allocator)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times), times


def bench_ours(args, prompts: np.ndarray) -> dict:
  import jax
  from lmsi_jax import model as model_lib
  from lmsi_jax import sampler, sharding

  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  cfg = model_lib.preset("smollm2_135m", max_seq_len=max(8192, args.prompt_len + args.new_tokens))
  lm = model_lib.LM.init(cfg, mesh, seed=0)
  b = prompts.shape[0]
  keys = sampler.row_keys(0, np.arange(b), np.zeros(b, int))
  rows = [list(map(int, p)) for p in prompts]

  def run(n: int):
    p = sampler.SamplingParams(args.temperature, args.top_k, 1.0, n)
    out = sampler.decode_batch(lm, rows, keys, params=p, eos_id=-1)
    assert int(out["steps"]) == n and (out["lengths"] == n).all(), out["lengths"]
    return out

  best, times = _best(lambda: run(args.new_tokens), args.repeats)
  res = {"ours_s": best, "ours_times_s": times}
  if args.breakdown:                              # prefill + first token vs. per decode step
    pre, _ = _best(lambda: run(1), args.repeats)
    res["ours_prefill_s"] = pre
    res["ours_step_ms"] = 1e3 * (best - pre) / max(args.new_tokens - 1, 1)
  return res


def bench_hf(args, prompts: np.ndarray) -> dict:
  import torch
  import transformers

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=1e5,
      rms_norm_eps=1e-5, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
      pad_token_id=0)
  model = transformers.LlamaForCausalLM(cfg).eval().to(torch.float32)
  ids = torch.as_tensor(prompts, dtype=torch.long)
  n = args.new_tokens

  def run():
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                           temperature=args.temperature, top_k=args.top_k, top_p=1.0,
                           min_new_tokens=n, max_new_tokens=n, pad_token_id=0)
    assert out.shape == (ids.shape[0], ids.shape[1] + n), out.shape
    return out

  best, times = _best(run, args.repeats)
  return {"hf_s": best, "hf_times_s": times, "torch_threads": torch.get_num_threads(),
          "transformers": transformers.__version__, "torch": torch.__version__}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--prompt_len", type=int, default=64)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--temperature", type=float, default=0.7)
  ap.add_argument("--top_k", type=int, default=40)
  ap.add_argument("--repeats", type=int, default=2, help="timed runs per side (best is kept)")
  ap.add_argument("--no_hf", action="store_true", help="skip the transformers baseline")
  ap.add_argument("--breakdown", action="store_true", help="also time prefill (+1 token) alone")
  args = ap.parse_args()

  import jax
  prompts = np.random.default_rng(0).integers(3, 49152, (args.batch, args.prompt_len))
  tokens = args.batch * args.new_tokens
  res = {"batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
         "temperature": args.temperature, "top_k": args.top_k,
         "nproc": os.cpu_count(), "cpu": common.cpu_model(), "jax": jax.__version__}
  res.update(bench_ours(args, prompts))
  res["ours_tokens_per_s"] = tokens / res["ours_s"]
  print(f"ours: {res['ours_tokens_per_s']:.1f} tok/s ({res['ours_s']:.2f} s)", flush=True)
  if not args.no_hf:
    res.update(bench_hf(args, prompts))
    res["hf_tokens_per_s"] = tokens / res["hf_s"]
    res["ratio"] = res["ours_tokens_per_s"] / res["hf_tokens_per_s"]
    print(f"hf:   {res['hf_tokens_per_s']:.1f} tok/s ({res['hf_s']:.2f} s)", flush=True)
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))


if __name__ == "__main__":
  main()
