"""Builds the run's starting model and vocabulary from config.

`model.checkpoint` may be a Hugging Face directory or a `.gguf` file
(lmsi_jax.interop), or the Orbax directory of an earlier lmsi_jax
training stage (e.g. DIR/round_3/train). Without one, `model.preset` is
initialised randomly over the byte vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
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
    init = {"init": cfg.model.init} if cfg.model.get("init") else {}
    mcfg = model_lib.preset(cfg.model.preset, **_overrides(cfg), **init)
    if mcfg.vocab_size < vocab.vocab_size:
      raise ValueError(f"model.preset={cfg.model.preset!r} has vocab_size {mcfg.vocab_size} < "
                       f"the byte vocabulary's {vocab.vocab_size}")
    return model_lib.LM.init(mcfg, mesh, seed=cfg.seed), vocab
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.model.checkpoint={path!r} does not exist")
  if is_lmsi_checkpoint(path):
    return _load_lmsi_checkpoint(path, mesh)
  from lmsi_jax import interop  # pylint: disable=g-import-not-at-top
  return interop.load_checkpoint(path, mesh, **_overrides(cfg))


def is_lmsi_checkpoint(path: str) -> bool:
  """A directory without config.json: an lmsi_jax training directory (or its checkpoints/)."""
  return os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json"))


def load_any(path: str, mesh, *, dtype: str | None = None, max_seq_len: int | None = None):
  """(LM, vocabulary) from a HF directory, a .gguf file or an lmsi_jax training directory.

  `dtype` sets the compute (and, for HF/GGUF, the parameter) dtype; `max_seq_len`
  overrides the context. Used by the sampling CLI.
  """
  if is_lmsi_checkpoint(path):
    return _load_lmsi_checkpoint(path, mesh, **{k: v for k, v in (
        ("dtype", dtype), ("max_seq_len", max_seq_len)) if v})
  from lmsi_jax import interop  # pylint: disable=g-import-not-at-top
  return interop.load_checkpoint(path, mesh, dtype=dtype or "float32", max_seq_len=max_seq_len)


def _lmsi_meta(path: str) -> dict:
  from lmsi_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  try:
    return ckpt_lib.read_meta(path)
  except FileNotFoundError as e:
    raise ValueError(f"{path}: not a Hugging Face directory (no config.json) and not an lmsi_jax "
                     f"training directory ({e})") from None


def lmsi_vocabulary(path: str, meta: dict | None = None, _seen: tuple[str, ...] = ()):
  """The vocabulary an lmsi_jax training directory was trained with.

  Its meta item records the run's config; the tokenizer is that run's
  `model.checkpoint`'s (followed through earlier training directories), or the
  byte vocabulary when the run started from a preset.
  """
  meta = _lmsi_meta(path) if meta is None else meta
  try:
    source = json.loads(meta.get("config") or "{}").get("model", {}).get("checkpoint") or ""
  except (TypeError, ValueError, AttributeError):
    source = ""
  if not source:
    return vocab_lib.byte_vocabulary()
  if not os.path.exists(source):
    raise ValueError(f"{path} was trained from {source}, which no longer exists: its tokenizer "
                     "is needed")
  if is_lmsi_checkpoint(source):
    if os.path.abspath(source) in _seen:
      raise ValueError(f"{path}: its model.checkpoint chain loops at {source}")
    return lmsi_vocabulary(source, None, _seen + (os.path.abspath(source),))
  from lmsi_jax.interop import load_tokenizer  # pylint: disable=g-import-not-at-top
  return load_tokenizer(source)


def _load_lmsi_checkpoint(path: str, mesh, **changes):
  """An Orbax directory written by lmsi_jax.train: its meta item carries the model config.

  `changes` (compute `dtype`, `max_seq_len`) replace fields of that config."""
  from lmsi_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  meta = _lmsi_meta(path)
  if "model_config" not in meta:
    raise ValueError(f"config.model.checkpoint={path!r}: no model_config in its meta item "
                     "(not a checkpoint written by lmsi_jax.train?)")
  if meta.get("lora"):
    raise ValueError(f"config.model.checkpoint={path!r} holds LoRA adapters only (train.lora."
                     f"rank={meta['lora'].get('rank')}), not a model: load its base model and "
                     "apply them with lmsi_jax.lora.restore (or export it merged)")
  mcfg = dataclasses.replace(model_lib.ModelConfig.from_dict(meta["model_config"]), **changes)
  vocab = lmsi_vocabulary(path, meta, (os.path.abspath(path),))
  return ckpt_lib.restore_params(path, mcfg, mesh), vocab
