"""Hugging Face checkpoint directories: config.json + (sharded) safetensors.

Supports LlamaForCausalLM (Llama 2, Llama 3.x with `llama3` RoPE scaling,
SmolLM2), MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM and
Gemma3ForCausalLM (Gemma 3 text: interleaved sliding-window layers). Every tensor is read straight into its sharded array: a
device's callback reads only its block of the safetensors tensor via
`safe_open(...).get_slice(name)[rows, cols]` (no tensor is read whole).

Mistral / Qwen2 / Qwen3 with `use_sliding_window` load with `max_seq_len`
capped at the window, where full attention is exactly equivalent (Gemma 3's
sliding layers are run as sliding layers). RoPE scaling: `llama3` and
`linear`; any other type is refused in one line.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open

from lmsi_jax import model as model_lib
from lmsi_jax.interop import layout
from lmsi_jax.interop import tokenizer as tok_lib
from lmsi_jax.data import vocab as vocab_lib

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "Gemma3ForCausalLM": "gemma3"}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "gemma3_text": "Gemma3ForCausalLM"}
# What transformers 5 assumes when config.json omits the key.
_DEFAULT_TIE = {"gemma3": True}
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_REFUSED_ARCHITECTURES = {
    "Gemma3ForConditionalGeneration": "the multimodal Gemma 3 checkpoint (only the text model "
                                      "Gemma3ForCausalLM is supported)",
    "Gemma2ForCausalLM": "Gemma 2 (only Gemma 3 text is supported)",
}
ROPE_TYPES = ("default", "llama3", "linear")


def read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from None


def _rope_options(rope: dict[str, Any], theta: float, where: str) -> dict[str, Any]:
  """ModelConfig RoPE fields for one rope_parameters / rope_scaling dict."""
  rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"unsupported RoPE scaling {rope_type!r} in {where} "
                     f"(supported: {', '.join(ROPE_TYPES)})")
  out: dict[str, Any] = dict(rope_theta=float(rope.get("rope_theta", theta)), rope_type=rope_type)
  if rope_type != "default":
    out["rope_factor"] = float(rope["factor"])
  if rope_type == "llama3":
    try:
      out.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                 rope_high_freq_factor=float(rope["high_freq_factor"]),
                 rope_original_max_len=int(rope["original_max_position_embeddings"]))
    except KeyError as e:
      raise ValueError(f"{where}: llama3 RoPE scaling without {e.args[0]}") from None
  return out


def _rope_config(hf: dict[str, Any], family: str, where: str) -> dict[str, Any]:
  """RoPE fields: transformers 5 `rope_parameters` or the older rope_theta + rope_scaling."""
  params = hf.get("rope_parameters")
  if family == "gemma3":
    if params and "full_attention" in params:
      full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    else:
      full, local = {**(hf.get("rope_scaling") or {})}, {}
    out = _rope_options(full, hf.get("rope_theta", 1_000_000.0), where)
    local_opts = _rope_options(local, hf.get("rope_local_base_freq", 10_000.0), where)
    if local_opts["rope_type"] != "default":
      raise ValueError(f"unsupported RoPE scaling {local_opts['rope_type']!r} on the sliding "
                       f"layers in {where} (only the default rotary embedding there)")
    out["rope_local_theta"] = local_opts["rope_theta"]
    return out
  rope = params or hf.get("rope_scaling") or {}
  return _rope_options(rope, hf.get("rope_theta", 10_000.0), where)


def _refuse_if(cond: bool, what: str, arch: str, where: str) -> None:
  if cond:
    raise ValueError(f"unsupported {what} for {arch} in {where}")


def model_config(hf: dict[str, Any], where: str, *, param_dtype: str = "float32",
                 dtype: str = "float32", max_seq_len: int | None = None) -> model_lib.ModelConfig:
  """Maps a transformers config.json (dict) to our ModelConfig (vocab padded to 128)."""
  archs = hf.get("architectures") or [_MODEL_TYPES.get(hf.get("model_type"), hf.get("model_type"))]
  arch = archs[0]
  if arch in _REFUSED_ARCHITECTURES:
    raise ValueError(f"unsupported architecture {arch} in {where}: {_REFUSED_ARCHITECTURES[arch]}")
  if arch not in ARCHITECTURES:
    raise ValueError(f"unsupported architecture {arch} in {where} (supported: {sorted(ARCHITECTURES)})")
  family = ARCHITECTURES[arch]
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
  if act not in _ACTIVATIONS or (family != "gemma3" and act != "silu"):
    raise ValueError(f"unsupported hidden_act {act!r} in {where} "
                     f"(only {'gelu_pytorch_tanh or silu' if family == 'gemma3' else 'silu'})")
  _refuse_if(family not in ("qwen2", "qwen3") and bool(hf.get("attention_bias")),
             "attention_bias=true", arch, where)
  _refuse_if(bool(hf.get("mlp_bias")), "mlp_bias=true", arch, where)
  try:
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    layers = int(hf["num_hidden_layers"])
    cfg = dict(
        vocab_size=vocab_lib.padded_vocab_size(int(hf["vocab_size"])),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        intermediate_size=int(hf["intermediate_size"]),
        head_dim=int(hf.get("head_dim") or hidden // heads),
    )
  except KeyError as e:
    raise ValueError(f"{where}: missing config field {e.args[0]}") from None
  seq = int(hf.get("max_position_embeddings", 2048))
  window = hf.get("sliding_window")
  extra: dict[str, Any] = {}
  if family == "gemma3":
    _refuse_if(bool(hf.get("use_bidirectional_attention")), "use_bidirectional_attention=true",
               arch, where)
    types = hf.get("layer_types")
    if types is None:                  # older configs: every sliding_window_pattern-th layer is global
      pattern = int(hf.get("sliding_window_pattern", 6))
      types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    extra = dict(qk_norm=True, norm_offset=1.0, post_norms=True, embed_scale=True,
                 mlp_activation=_ACTIVATIONS[act],
                 query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
                 # transformers' Gemma3Attention never passes attn_logit_softcapping to its
                 # attention functions (Gemma 3 checkpoints set it to null): neither do we.
                 attn_logit_softcap=0.0,
                 final_logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
                 layer_types=tuple(types),
                 sliding_window=int(window or 0) if "sliding_attention" in types else 0)
  elif window and (family == "mistral" or hf.get("use_sliding_window")):
    # Sliding-window Mistral/Qwen: full attention is exact up to the window.
    seq = min(seq, int(window))
  if family == "qwen3":
    extra["qk_norm"] = True
  return model_lib.ModelConfig(
      **cfg, **_rope_config(hf, family, where), **extra,
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", _DEFAULT_TIE.get(family, False))),
      qkv_bias=family == "qwen2" or (family == "qwen3" and bool(hf.get("attention_bias"))),
      max_seq_len=int(max_seq_len or seq), param_dtype=param_dtype, dtype=dtype)


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
