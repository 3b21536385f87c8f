"""LMSI on GSM8K with a Gemma 3 text (e.g. gemma-3-1b-it, Gemma3ForCausalLM; sliding-window + global layers).

  python -m lmsi_jax.main --config=configs/gemma3.py:/ckpt/gemma-3-1b-it --workdir=DIR \
      --config.data.dir=/path/to/gsm8k
  # or: --config=configs/gemma3.py --config.model.checkpoint=/ckpt/gemma-3-1b-it

The checkpoint (a Hugging Face directory: config.json + safetensors + tokenizer; see the
README's "Bringing a checkpoint" table for what GGUF files of this family load) comes
from the command line; without one the run stops with one line. The paper's settings
come from configs/gsm8k.py (this file is its `checkpoint:PATH` variant): the context is
capped at 2048 tokens and training rematerialises each layer, as configs/smollm2.py does. Add
`--config.model.dtype=bfloat16` to halve memory on an accelerator.
"""

import os

from lmsi_jax import config as config_lib

GSM8K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gsm8k.py")


def get_config(arg: str | None = None):
  return config_lib.load_config_file(GSM8K, "checkpoint:" + (arg or ""))
