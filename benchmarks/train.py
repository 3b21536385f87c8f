"""Training-step throughput: lmsi_jax train step vs PyTorch + HF transformers (issue 4).

SmolLM2-135M shape, random init, f32, AdamW (+ global-norm clipping 1.0),
full-row next-token loss, on CPU, one process, one device. Both sides are
compiled/warmed up first (`--warmup` untimed steps). Then `--rounds` rounds
each time, back to back: the f32 matmul peak (best of 3 `jnp.dot` 2048^3 and
`torch.mm` 2048^3), one step of ours, one torch step, so all three see the
same machine load (the benchmark host may be shared). tokens/s = batch *
seq_len / median step time. Model FLOPs per token = 6 * params + 12 * layers
* hidden * seq_len (PaLM appendix B); MFU = model FLOP/s / `jnp.dot` peak of
the same round (median over rounds); `mfu_vs_torch_peak` uses torch.mm's.
The last stdout line is JSON.

  python benchmarks/train.py                              # batch 4 x seq 256
  python benchmarks/train.py --batch 2 --seq_len 64 --rounds 2   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py, next to this script)


def _time(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def make_peak(n: int = 2048):
  """() -> (jnp.dot FLOP/s, torch.mm FLOP/s), best of 3 each."""
  import jax
  import jax.numpy as jnp
  import torch
  a, ta = jnp.ones((n, n), jnp.float32), torch.ones(n, n)
  dot = jax.jit(jnp.dot)
  run_jax, run_torch = lambda: dot(a, a).block_until_ready(), lambda: torch.mm(ta, ta)
  run_jax(), run_torch()
  flops = 2 * n ** 3
  return lambda: (flops / min(_time(run_jax) for _ in range(3)),
                  flops / min(_time(run_torch) for _ in range(3)))


def make_ours(tokens: np.ndarray):
  """() -> loss: one lmsi_jax train step (blocks until done)."""
  import jax
  from lmsi_jax import model as model_lib
  from lmsi_jax import sharding
  from lmsi_jax import train as train_lib

  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  cfg = model_lib.preset("smollm2_135m")
  lm = model_lib.LM.init(cfg, mesh, seed=0)
  b, t = tokens.shape[0], tokens.shape[1] - 1
  tcfg = train_lib.TrainConfig(learning_rate=1e-4, warmup_steps=0, schedule="constant",
                               num_steps=10 ** 6, batch_size=b, seq_len=t, clip_norm=1.0)
  step = train_lib.make_train_step(lm, tcfg)
  batch = step.put_batch({
      "tokens": tokens[:, :-1], "targets": tokens[:, 1:],
      "loss_weights": np.ones((b, t), np.float32), "segment_ids": np.ones((b, t), np.int32),
      "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()})
  state = {"p": lm.state, "o": step.init(lm.state), "i": 0}

  def one() -> float:
    state["p"], state["o"], m = step(state["p"], state["o"], batch, state["i"])
    state["i"] += 1
    return float(m["loss"])
  return one, cfg


def make_torch(tokens: np.ndarray):
  """() -> loss: one HF LlamaForCausalLM + torch.optim.AdamW step."""
  import torch
  import transformers
  torch.manual_seed(0)
  hf = transformers.LlamaConfig(
      vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=1e5,
      max_position_embeddings=8192, rms_norm_eps=1e-5)
  model = transformers.LlamaForCausalLM(hf).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  x = torch.from_numpy(tokens[:, :-1].astype(np.int64))
  y = torch.from_numpy(tokens[:, 1:].astype(np.int64))

  def one() -> float:
    logits = model(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()
  return one, sum(p.numel() for p in model.parameters())


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq_len", type=int, default=256)
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
  ap.add_argument("--rounds", type=int, default=4)
  args = ap.parse_args()

  import jax
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 49152, size=(args.batch, args.seq_len + 1)).astype(np.int32)
  ntok = args.batch * args.seq_len

  peak = make_peak()
  ours, cfg = make_ours(tokens)
  compile_s = _time(ours)                              # compile + first step
  theirs, torch_params = make_torch(tokens)
  for _ in range(args.warmup):
    ours(), theirs()
  rounds = []
  for _ in range(args.rounds):
    pj, pt = peak()
    rounds.append({"peak_jax": pj, "peak_torch": pt, "ours": _time(ours), "torch": _time(theirs)})
  load = os.getloadavg()

  params = cfg.num_params()
  flops_tok = 6 * params + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * args.seq_len
  med = lambda k: statistics.median(r[k] for r in rounds)
  ours_tps, torch_tps = ntok / med("ours"), ntok / med("torch")
  mfu = statistics.median(flops_tok * ntok / r["ours"] / r["peak_jax"] for r in rounds)
  mfu_t = statistics.median(flops_tok * ntok / r["ours"] / r["peak_torch"] for r in rounds)
  torch_mfu = statistics.median(flops_tok * ntok / r["torch"] / r["peak_jax"] for r in rounds)
  print(f"machine: {os.cpu_count()} cores, {common.cpu_model()}; load avg {load[0]:.1f}; jax "
        f"{jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  print(f"shape: batch {args.batch} x seq {args.seq_len} = {ntok} tokens/step, {params / 1e6:.1f}M "
        f"params (torch {torch_params / 1e6:.1f}M), {flops_tok * ntok / 1e12:.3f} TFLOP/step; "
        f"ours compile + 1st step {compile_s:.1f} s")
  for i, r in enumerate(rounds):
    print(f"round {i}: peak jnp.dot {r['peak_jax'] / 1e9:.1f} / torch.mm {r['peak_torch'] / 1e9:.1f} "
          f"GFLOP/s; ours {r['ours']:.2f} s ({flops_tok * ntok / r['ours'] / 1e9:.1f} GFLOP/s); "
          f"torch {r['torch']:.2f} s ({flops_tok * ntok / r['torch'] / 1e9:.1f} GFLOP/s)")
  print(json.dumps({
      "ours_tokens_per_s": round(ours_tps, 1), "torch_tokens_per_s": round(torch_tps, 1),
      "ratio": round(ours_tps / torch_tps, 3), "mfu": round(mfu, 3),
      "mfu_vs_torch_peak": round(mfu_t, 3), "torch_mfu": round(torch_mfu, 3),
      "peak_gflops_jax": round(med("peak_jax") / 1e9, 1),
      "peak_gflops_torch": round(med("peak_torch") / 1e9, 1),
      "batch": args.batch, "seq_len": args.seq_len}))


if __name__ == "__main__":
  main()
