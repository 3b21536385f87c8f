"""The embedded demo's train step by row shape: where its five minutes go (issue 14).

The demo (configs/demo.py) trains 7,800 optimizer steps of 16 packed rows x 96 tokens (stage 0
3,000, then 16 fine-tunes of 300: four rounds and three arms of four). This times that step
against peers with the same model and optimizer but other row shapes, in interleaved rounds
(one step of each shape per round, after a compile and a warm-up), so the ratios hold while
the machine's speed drifts. Random tokens, all positions are targets, one segment per row.
It reports each shape's median step time, its ratio to the demo's shape and the seconds its
7,800 steps would take. The last stdout line is JSON.

A shape may name a `train.remat` policy after a colon ("16x96:dots"); without one it is the
demo config's own (`configs/demo.py`). So the remat policies compare as peers too.

  python benchmarks/demo_step.py                        # 16x96 vs 16x64, 16x48, 32x48, 8x96
  python benchmarks/demo_step.py --shapes 16x96,16x64 --rounds 20
  python benchmarks/demo_step.py --shapes 16x96:none,16x96:full,16x96:dots
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import cpu_model  # noqa: E402
from lmsi_jax import config as config_lib  # noqa: E402
from lmsi_jax import sharding  # noqa: E402
from lmsi_jax import train as train_lib  # noqa: E402
from lmsi_jax.loading import build_model  # noqa: E402

DEMO_STEPS = 3000 + 16 * 300
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(rows: int, cols: int, vocab: int, rng) -> dict[str, np.ndarray]:
  return {"tokens": rng.integers(1, vocab, (rows, cols)).astype(np.int32),
          "targets": rng.integers(1, vocab, (rows, cols)).astype(np.int32),
          "loss_weights": np.ones((rows, cols), np.float32),
          "segment_ids": np.ones((rows, cols), np.int32),
          "positions": np.tile(np.arange(cols, dtype=np.int32), (rows, 1))}


def _shape(spec: str, default_remat: str) -> tuple[int, int, str]:
  """"16x96" or "16x96:dots" -> (16, 96, remat)."""
  dims, _, remat = spec.partition(":")
  rows, cols = (int(v) for v in dims.split("x"))
  return rows, cols, remat or default_remat


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default="16x96,16x64,16x48,32x48,8x96",
                  help="rows x tokens; the first is the reference (the demo's)")
  ap.add_argument("--rounds", type=int, default=10)
  ap.add_argument("--steps", type=int, default=5, help="timed steps per shape per round")
  args = ap.parse_args()
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs", "demo.py"))
  shapes = [_shape(s, cfg.train.remat) for s in args.shapes.split(",")]
  mesh = sharding.make_mesh((1, 1, 1))
  lm, _ = build_model(cfg, mesh)
  runs = {}
  for rows, cols, remat in shapes:
    tcfg = dataclasses.replace(train_lib.TrainConfig(), learning_rate=1e-3, batch_size=rows,
                               seq_len=cols, weight_decay=0.01, b2=0.98, num_steps=DEMO_STEPS,
                               remat=remat)
    copy = dataclasses.replace(lm, state=jax.tree.map(lambda x: x.copy(), lm.state))
    step = train_lib.make_train_step(copy, tcfg)
    batch = step.put_batch(_batch(rows, cols, lm.cfg.vocab_size,   # one batch per shape
                                   np.random.default_rng([rows, cols])))
    params, opt = copy.state, step.init(copy.state)
    for i in range(3):    # compile + warm-up
      params, opt, m = step(params, opt, batch, i)
    jax.block_until_ready(m)
    runs[(rows, cols, remat)] = [step, batch, params, opt, []]
  for _ in range(args.rounds):
    for run in runs.values():
      step, batch, params, opt, times = run
      t = time.perf_counter()
      for i in range(args.steps):
        params, opt, m = step(params, opt, batch, i)
      jax.block_until_ready(m)
      times.append((time.perf_counter() - t) / args.steps)
      run[2], run[3] = params, opt
  ref = statistics.median(runs[shapes[0]][4])
  print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), jax {jax.__version__}, demo model "
        f"{lm.cfg.hidden_size} wide x {lm.cfg.num_layers} layers, vocab {lm.cfg.vocab_size}")
  print("| rows x tokens, remat | step (median) | min-max | ratio to the first | tokens/s | "
        f"{DEMO_STEPS:,} steps |")
  print("|---|---|---|---|---|---|")
  out = {"cpu": cpu_model(), "shapes": {}}
  for (rows, cols, remat), run in runs.items():
    med = statistics.median(run[4])
    print(f"| {rows} x {cols}, {remat} | {med * 1e3:.1f} ms | {min(run[4]) * 1e3:.1f}-"
          f"{max(run[4]) * 1e3:.1f} | {med / ref:.2f} | {rows * cols / med:,.0f} | "
          f"{DEMO_STEPS * med:.0f} s |")
    out["shapes"][f"{rows}x{cols}:{remat}"] = {"median_s": med, "ratio": med / ref}
  # Peers of one shape ran the same steps on the same batch from the same weights: a remat
  # policy that changed any bit of training shows here.
  firsts = {}
  for (rows, cols, remat), run in runs.items():
    if (rows, cols) in firsts:
      ref_remat, ref_params = firsts[rows, cols]
      same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                 zip(jax.tree.leaves(ref_params), jax.tree.leaves(run[2])))
      print(f"{rows} x {cols}: weights after {3 + args.rounds * args.steps} steps with remat "
            f"{remat} {'bit-identical to' if same else 'DIFFER from'} remat {ref_remat}")
      out["shapes"][f"{rows}x{cols}:{remat}"]["bit_identical_to_first"] = same
    else:
      firsts[rows, cols] = (remat, run[2])
  print(json.dumps(out))


if __name__ == "__main__":
  main()
