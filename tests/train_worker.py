"""Shared tiny training setup; also a subprocess entry point for the SIGKILL test.

  python tests/train_worker.py WORKDIR OUT.npz [STEP_DELAY_S]
trains `TCFG` in WORKDIR (resuming if it has a checkpoint) and writes the
final params to OUT.npz (with TRAIN_WORKER_LORA_RANK=r: LoRA adapters `LORA`, rank r). Preempted (SIGTERM/SIGINT): one line, exit 128 + signal.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

CFG = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
           intermediate_size=64, max_seq_len=64)
TCFG = dict(learning_rate=1e-2, warmup_steps=2, num_steps=20, batch_size=8, seq_len=32,
            checkpoint_every=10, log_every=5, weight_decay=0.01)


def make_batch(rng: np.random.Generator, rows: int, seq_len: int, vocab: int = 128):
  """Arithmetic sequences, two packed segments per row, ragged prompts and padding."""
  start = rng.integers(0, vocab - 3, size=(rows, 1))
  stride = rng.integers(1, 4, size=(rows, 1))
  seq = (start + stride * np.arange(seq_len + 1)) % (vocab - 3) + 3
  half = seq_len // 2
  idx = np.arange(seq_len)[None]
  pad = rng.integers(0, 6, size=(rows, 1))
  seg = np.where(idx < half, 1, 2) * (idx < seq_len - pad)
  pos = np.where(idx < half, idx, idx - half) * (seg > 0)
  plen = rng.integers(2, 7, size=(rows, 1))
  return {"tokens": (seq[:, :-1] * (seg > 0)).astype(np.int32),
          "targets": (seq[:, 1:] * (seg > 0)).astype(np.int32),
          "loss_weights": ((pos >= plen) & (seg > 0)).astype(np.float32),
          "segment_ids": seg.astype(np.int32), "positions": pos.astype(np.int32)}


class ArrayBatches:
  """Deterministic, resumable batch stream (batch i depends only on seed and i)."""

  def __init__(self, rows: int, seq_len: int, seed: int = 0, delay_s: float = 0.0,
               fail_at: int | None = None):
    self.rows, self.seq_len, self.seed, self.delay_s, self.fail_at = rows, seq_len, seed, delay_s, fail_at
    self.i = 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.fail_at is not None and self.i >= self.fail_at:
      raise RuntimeError(f"simulated crash before batch {self.i}")
    time.sleep(self.delay_s)
    b = make_batch(np.random.default_rng([self.seed, self.i]), self.rows, self.seq_len)
    self.i += 1
    return b

  def state(self):
    return {"i": self.i, "seed": self.seed}

  def restore(self, state):
    assert state["seed"] == self.seed
    self.i = int(state["i"])


def flat_params(state) -> dict[str, np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  from lmsi_jax import checkpoint  # pylint: disable=g-import-not-at-top
  names = list(checkpoint.flat_shapes(state))
  return {n: np.asarray(x) for n, x in zip(names, jax.tree.leaves(state))}


LORA = dict(alpha=8.0, targets=("q", "v", "o", "down"), dropout=0.1)


def run(workdir: str, delay_s: float = 0.0, fail_at: int | None = None, lora_rank: int = 0,
        **overrides):
  from lmsi_jax import model, sharding, train  # pylint: disable=g-import-not-at-top
  tcfg = train.TrainConfig.from_dict({**TCFG, **overrides})
  lm = model.LM.init(model.ModelConfig(**CFG), sharding.make_mesh((2, 2, 2)), seed=0)
  if lora_rank:
    from lmsi_jax import lora  # pylint: disable=g-import-not-at-top
    lm = lora.apply(lm, lora.LoraConfig(rank=lora_rank, **LORA))
  batches = ArrayBatches(tcfg.batch_size, tcfg.seq_len, seed=1, delay_s=delay_s, fail_at=fail_at)
  return train.train(lm, batches, tcfg, workdir)


if __name__ == "__main__":
  sys.modules.setdefault("torch", None)  # tensorboardX imports torch if it can (~5 s); not needed
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", 8)
  from lmsi_jax import preemption  # pylint: disable=g-import-not-at-top
  try:
    out = run(sys.argv[1], delay_s=float(sys.argv[3]) if len(sys.argv) > 3 else 0.0,
              lora_rank=int(os.environ.get("TRAIN_WORKER_LORA_RANK", "0")))
  except preemption.Preempted as e:
    print(f"lmsi_jax: {e}", file=sys.stderr)
    sys.exit(128 + e.signum)
  np.savez(sys.argv[2] + ".tmp.npz", **flat_params(out.state))
  os.replace(sys.argv[2] + ".tmp.npz", sys.argv[2])
