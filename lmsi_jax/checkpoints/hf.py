"""Hugging Face checkpoint directories: config.json + (sharded) safetensors.

Supports LlamaForCausalLM (Llama 2/3, SmolLM2), MistralForCausalLM and
Qwen2ForCausalLM. Every tensor is read straight into its sharded array: a
device's callback reads only its block of the safetensors tensor via
`safe_open(...).get_slice(name)[rows, cols]` (no tensor is read whole).

Sliding-window attention (Mistral, Qwen2 with `use_sliding_window`) is not
implemented by the model; such checkpoints load with `max_seq_len` capped at
the window, where full attention is exactly equivalent.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open

from lmsi_jax import model as model_lib
from lmsi_jax.checkpoints import layout
from lmsi_jax.checkpoints import tokenizer as tok_lib
from lmsi_jax.data import vocab as vocab_lib

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}
_MODEL_TYPES = {v: k for k, v in ARCHITECTURES.items()}
# What transformers 5 assumes when config.json omits the key (all three model classes).
_DEFAULT_TIE = False


def read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from None


def _rope_theta(hf: dict[str, Any], where: str) -> float:
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in (None, "default"):
    raise ValueError(f"unsupported RoPE scaling {rope_type!r} in {where} "
                     "(only the default rotary embedding is implemented)")
  theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
  return float(theta)


def model_config(hf: dict[str, Any], where: str, *, param_dtype: str = "float32",
                 dtype: str = "float32", max_seq_len: int | None = None) -> model_lib.ModelConfig:
  """Maps a transformers config.json (dict) to our ModelConfig (vocab padded to 128)."""
  archs = hf.get("architectures") or [_MODEL_TYPES.get(hf.get("model_type"), hf.get("model_type"))]
  arch = archs[0]
  if arch not in ARCHITECTURES:
    raise ValueError(f"unsupported architecture {arch} in {where} (supported: {sorted(ARCHITECTURES)})")
  family = ARCHITECTURES[arch]
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} in {where} (only silu)")
  if family != "qwen2" and (hf.get("attention_bias") or hf.get("mlp_bias")):
    raise ValueError(f"unsupported attention_bias/mlp_bias=true for {arch} in {where}")
  try:
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    cfg = dict(
        vocab_size=vocab_lib.padded_vocab_size(int(hf["vocab_size"])),
        hidden_size=hidden,
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        intermediate_size=int(hf["intermediate_size"]),
        head_dim=int(hf.get("head_dim") or hidden // heads),
    )
  except KeyError as e:
    raise ValueError(f"{where}: missing config field {e.args[0]}") from None
  seq = int(hf.get("max_position_embeddings", 2048))
  window = hf.get("sliding_window")
  if window and (family == "mistral" or hf.get("use_sliding_window")):
    seq = min(seq, int(window))
  return model_lib.ModelConfig(
      **cfg, rope_theta=_rope_theta(hf, where), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", _DEFAULT_TIE)),
      qkv_bias=family == "qwen2", max_seq_len=int(max_seq_len or seq),
      param_dtype=param_dtype, dtype=dtype)


class _SliceSource:
  """One safetensors tensor; `read` slices without loading the rest."""

  def __init__(self, handle, name: str, file: str):
    self._slice = handle.get_slice(name)
    self.shape = tuple(self._slice.get_shape())
    self._file = file

  def read(self, index):
    try:
      return np.asarray(self._slice[index])
    except SafetensorError as e:
      raise ValueError(f"{self._file}: cannot read tensor data ({e})") from None


class SafetensorsFiles:
  """The tensors of `model.safetensors` or a sharded `model.safetensors.index.json`."""

  def __init__(self, directory: str):
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index):
      weight_map = read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no weight_map")
      self._where = {k: os.path.join(directory, v) for k, v in weight_map.items()}
    elif os.path.exists(single):
      self._where = None
      self._single = single
    else:
      raise ValueError(f"no model.safetensors or model.safetensors.index.json in {directory}")
    self._handles: dict[str, Any] = {}
    self._dir = directory

  def _open(self, file: str):
    if file not in self._handles:
      if not os.path.exists(file):
        raise ValueError(f"{file}: missing (listed in the safetensors index)")
      try:   # safetensors checks that the header's offsets cover the file exactly
        self._handles[file] = safe_open(file, framework="numpy")
      except SafetensorError as e:
        raise ValueError(f"{file}: unreadable or truncated safetensors file ({e})") from None
    return self._handles[file]

  def keys(self) -> set[str]:
    if self._where is not None:
      return set(self._where)
    return set(self._open(self._single).keys())

  def source(self, name: str, expected: tuple[int, ...]) -> layout.Source:
    file = self._single if self._where is None else self._where.get(name)
    if file is None or name not in self._open(file).keys():
      raise ValueError(f"{name}: missing in {self._dir}")
    src = _SliceSource(self._open(file), name, file)
    if src.shape != tuple(expected):
      raise ValueError(f"{name}: shape {src.shape} in {file} does not match {tuple(expected)} "
                       "expected from config.json")
    return src


def load(directory: str, mesh: Mesh, *, param_dtype: str = "float32", dtype: str = "float32",
         max_seq_len: int | None = None) -> tuple[model_lib.LM, Any]:
  """Loads a transformers checkpoint directory. Returns (LM, vocabulary)."""
  config_path = os.path.join(directory, "config.json")
  if not os.path.exists(config_path):
    raise ValueError(f"{directory}: no config.json (not a Hugging Face checkpoint directory)")
  hf = read_json(config_path)
  cfg = model_config(hf, config_path, param_dtype=param_dtype, dtype=dtype,
                     max_seq_len=max_seq_len)
  files = SafetensorsFiles(directory)
  real_vocab = int(hf["vocab_size"])

  def get_source(name, hf_name, expected):
    del name
    return files.source(hf_name, expected)

  graphdef, state = layout.build_state(cfg, mesh, real_vocab, get_source)
  return layout.finish(cfg, mesh, graphdef, state, tok_lib.load_hf_tokenizer(directory, hf),
                       directory)
