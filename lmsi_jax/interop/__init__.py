"""Pretrained checkpoints: Hugging Face directories and GGUF files in, HF directories out.

  lm, vocab = load_checkpoint("/ckpt/SmolLM2-135M-Instruct", mesh)      # or "/ckpt/model.gguf"
  export_hf(lm, vocab, "/out/dir")

Parameters are created directly on their shards (each device reads only its
block of each tensor). The model's vocabulary is padded to a multiple of 128
with zero rows; pass `vocab_limit=vocab.vocab_size` to the sampler (as
`sampler.generate` does) so padded ids are never sampled.
"""

from __future__ import annotations

import os

import seqio
from jax.sharding import Mesh

from lmsi_jax import model as model_lib
from lmsi_jax.interop.export import export_hf, save_tokenizer
from lmsi_jax.interop.tokenizer import load_tokenizer

__all__ = ["load_checkpoint", "export_hf", "save_tokenizer", "load_tokenizer"]


def load_checkpoint(path: str | os.PathLike[str], mesh: Mesh, *, dtype: str = "float32",
                    param_dtype: str | None = None, max_seq_len: int | None = None,
                    ) -> tuple[model_lib.LM, seqio.Vocabulary]:
  """Loads a HF checkpoint directory or a `.gguf` file onto `mesh`. Returns (LM, vocabulary).

  Args:
    path: directory with config.json + model.safetensors[.index.json], or a .gguf file.
    mesh: the device mesh (see `sharding.make_mesh`).
    dtype: compute dtype ("float32" | "bfloat16" | "float16").
    param_dtype: stored parameter dtype (default: `dtype`).
    max_seq_len: model context override (default: the checkpoint's max_position_embeddings
      / context_length, capped at a sliding window).
  Raises:
    ValueError: one line naming the unsupported architecture / tensor type, the missing or
      mis-shaped tensor, or the unreadable file.
  """
  path = os.fspath(path)
  kw = dict(param_dtype=param_dtype or dtype, dtype=dtype, max_seq_len=max_seq_len)
  if os.path.isdir(path):
    from lmsi_jax.interop import hf  # pylint: disable=g-import-not-at-top
    return hf.load(path, mesh, **kw)
  if path.endswith(".gguf"):
    from lmsi_jax.interop import gguf  # pylint: disable=g-import-not-at-top
    return gguf.load(path, mesh, **kw)
  if not os.path.exists(path):
    raise ValueError(f"checkpoint {path} does not exist")
  raise ValueError(f"checkpoint {path}: expected a Hugging Face directory or a .gguf file")
