"""Training-step memory with and without per-block remat (issue 6).

SmolLM2-135M shape, random init, f32, AdamW, one CPU device, a packed batch
of `--batch` x `--seq_len` tokens (two segments per row, as the pipeline's
packed rows have). Prints XLA's buffer assignment of the compiled step
(`temp` = activations and other scratch; arguments/outputs are the params and
optimizer state) and, unless `--compile_only`, runs `--steps` steps. Run it
under `/usr/bin/time -v` for the process's peak RSS. The last stdout line is
JSON.

  python benchmarks/remat_memory.py --remat full --batch 8 --seq_len 1280 --compile_only
  /usr/bin/time -v python benchmarks/remat_memory.py --remat none --batch 2 --seq_len 1280
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py, next to this script)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq_len", type=int, default=1280)
  ap.add_argument("--steps", type=int, default=1)
  ap.add_argument("--compile_only", action="store_true")
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  from lmsi_jax import model as model_lib
  from lmsi_jax import sharding
  from lmsi_jax import train as train_lib

  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  cfg = model_lib.preset("smollm2_135m")
  lm = model_lib.LM.init(cfg, mesh, seed=0)
  b, t = args.batch, args.seq_len
  tcfg = train_lib.TrainConfig(learning_rate=1e-4, warmup_steps=0, schedule="constant",
                               num_steps=10 ** 6, batch_size=b, seq_len=t, remat=args.remat)
  step = train_lib.make_train_step(lm, tcfg)
  rng = np.random.default_rng(0)
  half = np.arange(t) < t // 2
  batch = {"tokens": rng.integers(1, 49152, (b, t), dtype=np.int32),
           "targets": rng.integers(1, 49152, (b, t), dtype=np.int32),
           "loss_weights": np.ones((b, t), np.float32),
           "segment_ids": np.broadcast_to(np.where(half, 1, 2), (b, t)).astype(np.int32),
           "positions": np.broadcast_to(np.where(half, np.arange(t), np.arange(t) - t // 2),
                                        (b, t)).astype(np.int32)}
  opt = step.init(lm.state)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step._step.lower(lm.state, opt, step.put_batch(batch), jnp.int32(0)).compile()  # pylint: disable=protected-access
  ma = compiled.memory_analysis()
  out = {"remat": args.remat, "batch": b, "seq_len": t, "compile_s": round(time.perf_counter() - t0, 1),
         "xla_temp_gib": round(ma.temp_size_in_bytes / 2 ** 30, 3),
         "xla_args_gib": round(ma.argument_size_in_bytes / 2 ** 30, 3), "cpu": common.cpu_model()}
  if not args.compile_only:
    params, times = lm.state, []
    for i in range(args.steps):
      t0 = time.perf_counter()
      params, opt, m = step(params, opt, batch, i)   # compiles again: jit's own cache
      out["loss"] = float(m["loss"])
      times.append(time.perf_counter() - t0)
    out["step_s"] = [round(x, 1) for x in times]
  print(json.dumps(out))


if __name__ == "__main__":
  main()
