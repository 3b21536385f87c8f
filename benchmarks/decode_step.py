"""Milliseconds per decode step at LMSI's sampling shape (random SmolLM2-135M weights).

The shape of `benchmarks/lmsi_sampling.py` without the checkpoint or the
tokenizer: a shared 730-token few-shot block, `--batch // 16` questions of 50
tokens, m = 16 rows each, `--steps` row-KV slots (the decode budget), T=0.7,
top-k 40, no EOS so every row runs. It times `--chunks` chunks of `--chunk`
decode steps after the first (compiling) one and prints the fastest chunk's
milliseconds per step. For comparing two commits: run it in a checkout of each,
in turn (it imports lmsi_jax from the checkout it sits in); the last line is JSON.

  python benchmarks/decode_step.py                      # batch 32, 256 slots
  python benchmarks/decode_step.py --batch 64 --steps 32
  python benchmarks/decode_step.py --preset tiny --batch 1024 --steps 64 --prefix 3 \
      --question_len 40 --samples 32 --chunk 8 --chunks 4     # the demo's pool sampling
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py)


class _Enough(Exception):
  pass


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32, help="row slots")
  ap.add_argument("--steps", type=int, default=256, help="decode budget = row KV slots")
  ap.add_argument("--prefix", type=int, default=730, help="shared prefix tokens")
  ap.add_argument("--chunk", type=int, default=16, help="decode steps per timed chunk")
  ap.add_argument("--chunks", type=int, default=6, help="timed chunks after the first")
  ap.add_argument("--preset", default="smollm2_135m", help="lmsi_jax.model_config preset")
  ap.add_argument("--question_len", type=int, default=50, help="tokens per question")
  ap.add_argument("--samples", type=int, default=16, help="rows per question (m)")
  args = ap.parse_args()

  import jax
  from lmsi_jax import batching, engine, sampler, sharding
  from lmsi_jax import model as model_lib
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  cfg = model_lib.preset(args.preset, max_seq_len=2048)
  lm = model_lib.LM.init(cfg, mesh, seed=0)
  rng = np.random.default_rng(0)
  top = min(40000, cfg.vocab_size)
  prefix = list(rng.integers(10, top, args.prefix))
  m = args.samples
  n_q = max(1, args.batch // m)
  prompts = [prefix + list(rng.integers(10, top, args.question_len)) for _ in range(n_q)]
  keys = np.stack([sampler.row_keys(0, np.full(m, i), np.arange(m)) for i in range(n_q)])
  params = sampler.SamplingParams(0.7, 40, 1.0, args.steps)

  times: list[float] = []
  program = engine.chunk_program

  def timed(platform):
    f = program(platform)

    def run(*a, **k):
      t0 = time.perf_counter()
      out = jax.block_until_ready(f(*a, **k))
      times.append(time.perf_counter() - t0)
      if len(times) > args.chunks:
        raise _Enough
      return out
    return run

  engine.chunk_program = timed
  try:
    batching.sample_prompts(lm, prompts, keys, params=params, eos_id=-1,
                            batch_size=args.batch, chunk=args.chunk)
  except _Enough:
    pass
  finally:
    engine.chunk_program = program
  if len(times) <= args.chunks:
    sys.exit(f"only {len(times)} chunks ran: lower --chunks or --chunk, or raise --steps")
  ms = 1e3 * min(times[1:]) / args.chunk
  print(f"{args.preset}, batch {args.batch}, {args.steps} row slots, prefix {args.prefix}: "
        f"{ms:.1f} ms/step "
        f"(chunks: {', '.join(f'{t:.2f}' for t in times[1:])} s)")
  print(json.dumps({"ms_per_step": round(ms, 2), "preset": args.preset, "batch": args.batch,
                    "steps": args.steps, "samples": m, "question_len": args.question_len,
                    "prefix": args.prefix, "chunk": args.chunk,
                    "chunk_s": [round(t, 3) for t in times[1:]], "cpu": common.cpu_model(),
                    "nproc": os.cpu_count(), "jax": jax.__version__}))


if __name__ == "__main__":
  main()
