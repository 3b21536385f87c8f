"""Builds the run's starting model and vocabulary from config.

`model.checkpoint` may be a Hugging Face directory or a `.gguf` file
(lmsi_jax.checkpoints), or the Orbax directory of an earlier lmsi_jax
training stage (e.g. DIR/round_3/train). Without one, `model.preset` is
initialised randomly over the byte vocabulary.
"""

from __future__ import annotations

import os

from lmsi_jax import model as model_lib
from lmsi_jax.data import vocab as vocab_lib


def _overrides(cfg) -> dict:
  out = dict(param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype)
  if cfg.model.max_seq_len:
    out["max_seq_len"] = cfg.model.max_seq_len
  return out


def build_model(cfg, mesh):
  """Returns (LM, seqio vocabulary)."""
  path = cfg.model.checkpoint
  if not path:
    vocab = vocab_lib.byte_vocabulary()
    mcfg = model_lib.preset(cfg.model.preset, **_overrides(cfg))
    if mcfg.vocab_size < vocab.vocab_size:
      raise ValueError(f"model.preset={cfg.model.preset!r} has vocab_size {mcfg.vocab_size} < "
                       f"the byte vocabulary's {vocab.vocab_size}")
    return model_lib.LM.init(mcfg, mesh, seed=cfg.seed), vocab
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.model.checkpoint={path!r} does not exist")
  if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
    return _load_lmsi_checkpoint(path, mesh)
  from lmsi_jax import checkpoints  # pylint: disable=g-import-not-at-top
  return checkpoints.load_checkpoint(path, mesh, **_overrides(cfg))


def _load_lmsi_checkpoint(path: str, mesh):
  """An Orbax directory written by lmsi_jax.train: its meta item carries the model config."""
  from lmsi_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  meta = ckpt_lib.read_meta(path)
  if "model_config" not in meta:
    raise ValueError(f"config.model.checkpoint={path!r}: no model_config in its meta item "
                     "(not a checkpoint written by lmsi_jax.train?)")
  mcfg = model_lib.ModelConfig.from_dict(meta["model_config"])
  return ckpt_lib.restore_params(path, mcfg, mesh), vocab_lib.byte_vocabulary()
