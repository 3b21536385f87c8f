"""GGUF checkpoints (llama.cpp): architectures "llama", "qwen2" and "qwen3".

Refused in one line: Gemma GGUFs (they do not carry query_pre_attn_scalar,
the sliding/global layer pattern or the sliding layers' RoPE base, which
llama.cpp hard-codes per model size: load the HF directory). RoPE: `linear`
scaling (rope.scaling.type/factor), and a `rope_freqs.weight` tensor (how
llama.cpp stores Llama 3.1+ `llama3` scaling: per-frequency divisors) becomes
`ModelConfig.rope_freq_factors` (such a model cannot be exported to HF).

Tensors of type F32, F16, BF16, Q8_0, Q4_0 and Q4_1 are dequantised with
`gguf.quants.dequantize` into the requested param dtype. A GGUF matrix is
stored row-major as `[out, in]` (HF order) with each row a run of quant
blocks, so a shard's callback dequantises only the rows it needs, then slices
columns. llama.cpp permutes the rows of Q/K for "llama" (interleaved RoPE);
the permutation is undone on read (Qwen2 is stored unpermuted).
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np
from jax.sharding import Mesh

from lmsi_jax import model as model_lib
from lmsi_jax.interop import layout
from lmsi_jax.interop import tokenizer as tok_lib
from lmsi_jax.data import vocab as vocab_lib

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)
ARCHITECTURES = ("llama", "qwen2", "qwen3")
_REFUSED = {
    arch: ("a Gemma GGUF does not carry query_pre_attn_scalar, the sliding/global layer "
           "pattern or the sliding layers' RoPE base (llama.cpp hard-codes them); load the "
           "Hugging Face directory instead")
    for arch in ("gemma", "gemma2", "gemma3")}

_TOP = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
        "model.norm.weight": "output_norm.weight"}
_LAYER = {"input_layernorm.weight": "attn_norm.weight",
          "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
          "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
          "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
          "self_attn.q_norm.weight": "attn_q_norm.weight",
          "self_attn.k_norm.weight": "attn_k_norm.weight"}


def gguf_name(hf_name: str) -> str:
  """llama.cpp name of a HF tensor: 'model.layers.3.mlp.up_proj.weight' -> 'blk.3.ffn_up.weight'."""
  if hf_name in _TOP:
    return _TOP[hf_name]
  _, _, i, rest = hf_name.split(".", 3)
  return f"blk.{i}.{_LAYER[rest]}"


def open_reader(path: str) -> gguf.GGUFReader:
  try:
    return gguf.GGUFReader(path)
  except FileNotFoundError:
    raise ValueError(f"{path}: no such GGUF file") from None
  except (ValueError, IndexError, OSError) as e:
    raise ValueError(f"{path}: unreadable or truncated GGUF file ({e})") from None


def metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
  """All key/value fields as Python values."""
  return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


class _TensorSource:
  """One GGUF tensor in HF order; `read` dequantises only the selected rows."""

  def __init__(self, tensor, where: str):
    if tensor.tensor_type not in SUPPORTED_TYPES:
      raise ValueError(f"unsupported GGUF tensor type {tensor.tensor_type.name} for {tensor.name} "
                       f"in {where} (supported: {', '.join(t.name for t in SUPPORTED_TYPES)})")
    self.qtype = tensor.tensor_type
    self.shape = tuple(int(n) for n in reversed(tensor.shape))
    self._data = tensor.data

  def read(self, index) -> np.ndarray:
    if len(self.shape) == 1:
      return gguf.quants.dequantize(np.asarray(self._data), self.qtype).reshape(-1)[index[0]]
    x = gguf.quants.dequantize(np.asarray(self._data[index[0]]), self.qtype)
    return x[:, index[1]] if len(index) > 1 else x


class _UnpermutedRows:
  """Undoes llama.cpp's Q/K row permutation: HF row (head h, j = p*Dh/2 + i) is row h*Dh + 2i + p."""

  def __init__(self, src: layout.Source, head_dim: int):
    self.shape = src.shape
    self._src = src
    r = np.arange(src.shape[0])
    h, j = np.divmod(r, head_dim)
    p, i = np.divmod(j, head_dim // 2)
    self._perm = h * head_dim + 2 * i + p

  def read(self, index) -> np.ndarray:
    return self._src.read((self._perm[index[0]],) + tuple(index[1:]))


def model_config(meta: dict[str, Any], tensors: dict[str, Any], where: str, *,
                 param_dtype: str = "float32", dtype: str = "float32",
                 max_seq_len: int | None = None) -> tuple[model_lib.ModelConfig, int]:
  """(ModelConfig, real vocabulary size) from GGUF metadata and tensor table."""
  arch = meta.get("general.architecture")
  if arch in _REFUSED:
    raise ValueError(f"unsupported architecture {arch} in {where}: {_REFUSED[arch]}")
  if arch not in ARCHITECTURES:
    raise ValueError(f"unsupported architecture {arch} in {where} (supported: {list(ARCHITECTURES)})")

  def get(key, default=None):
    value = meta.get(f"{arch}.{key}", default)
    if value is None:
      raise ValueError(f"{where}: missing GGUF metadata {arch}.{key}")
    return value

  scaling = meta.get(f"{arch}.rope.scaling.type", "none")
  if scaling not in ("none", None, "linear"):
    raise ValueError(f"unsupported RoPE scaling {scaling!r} in {where} (supported: none, linear)")
  rope: dict[str, Any] = {}
  if scaling == "linear":
    rope = dict(rope_type="linear", rope_factor=float(get("rope.scaling.factor")))
  if "rope_freqs.weight" in tensors:       # Llama 3.1+ `llama3` scaling, as per-frequency factors
    factors = _TensorSource(tensors["rope_freqs.weight"], where)
    rope["rope_freq_factors"] = tuple(float(f) for f in factors.read((slice(None),)))
  if "token_embd.weight" not in tensors:
    raise ValueError(f"token_embd.weight: missing in {where}")
  real_vocab = int(tensors["token_embd.weight"].shape[1])
  hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
  cfg = model_lib.ModelConfig(
      vocab_size=vocab_lib.padded_vocab_size(real_vocab), hidden_size=hidden,
      num_layers=int(get("block_count")), num_heads=heads,
      num_kv_heads=int(get("attention.head_count_kv", heads)),
      intermediate_size=int(get("feed_forward_length")),
      head_dim=int(get("attention.key_length", hidden // heads)),
      rope_theta=float(get("rope.freq_base", 10_000.0)),
      norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
      tie_embeddings="output.weight" not in tensors,
      qkv_bias=arch == "qwen2" or (arch == "qwen3" and "blk.0.attn_q.bias" in tensors),
      qk_norm=arch == "qwen3", **rope,
      max_seq_len=int(max_seq_len or get("context_length", 2048)),
      param_dtype=param_dtype, dtype=dtype)
  return cfg, real_vocab


def load_vocab(path: str, reader: gguf.GGUFReader | None = None) -> vocab_lib.HFTokenizersVocabulary:
  """The tokenizer stored in a GGUF file's metadata."""
  reader = reader or open_reader(path)
  return tok_lib.gguf_vocabulary(metadata(reader), path)


def load(path: str, mesh: Mesh, *, param_dtype: str = "float32", dtype: str = "float32",
         max_seq_len: int | None = None) -> tuple[model_lib.LM, vocab_lib.HFTokenizersVocabulary]:
  """Loads a GGUF file. Returns (LM, vocabulary)."""
  reader = open_reader(path)
  meta = metadata(reader)
  tensors = {t.name: t for t in reader.tensors}
  cfg, real_vocab = model_config(meta, tensors, path, param_dtype=param_dtype, dtype=dtype,
                                 max_seq_len=max_seq_len)
  permute = meta["general.architecture"] == "llama"

  def get_source(name, hf_name, expected):
    gname = gguf_name(hf_name)
    if gname not in tensors:
      raise ValueError(f"{gname}: missing in {path}")
    src: layout.Source = _TensorSource(tensors[gname], path)
    if src.shape != tuple(expected):
      raise ValueError(f"{gname}: shape {src.shape} in {path} does not match {tuple(expected)} "
                       "expected from the GGUF metadata")
    if permute and name.endswith(("attn.q_proj", "attn.k_proj")):
      src = _UnpermutedRows(src, cfg.head_dim)
    return src

  graphdef, state = layout.build_state(cfg, mesh, real_vocab, get_source)
  return layout.finish(cfg, mesh, graphdef, state, tok_lib.gguf_vocabulary(meta, path), path)
