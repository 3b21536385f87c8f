"""Parameter layout: our NNX parameters <-> Hugging Face tensor names and shapes.

Our tensors and HF's differ by transposes, head reshapes and vocabulary
padding. Each parameter has a *kind*; `read_shard` turns an index into our
layout into a read of the matching block of the HF tensor (`[out, in]`
matrices, `[n]` vectors), so a device reads only what it holds. Our layers'
parameters are stacked ([L, ...], path 'layers.attn.q_proj'); HF has one tensor
per layer ('model.layers.3.self_attn.q_proj.weight'): stacked on import, sliced on export. A `Source`
is any object with `shape` (HF order) and `read(index)`; safetensors slices
and GGUF tensors both are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np

from lmsi_jax import model as model_lib

# Our parameter path -> (HF name, kind). `{i}` is the layer index.
_LAYER_PARAMS = {
    "attn_norm.scale": ("input_layernorm.weight", "vec"),
    "mlp_norm.scale": ("post_attention_layernorm.weight", "vec"),
    "attn.q_proj": ("self_attn.q_proj.weight", "heads_in"),
    "attn.k_proj": ("self_attn.k_proj.weight", "heads_in"),
    "attn.v_proj": ("self_attn.v_proj.weight", "heads_in"),
    "attn.o_proj": ("self_attn.o_proj.weight", "heads_out"),
    "attn.q_bias": ("self_attn.q_proj.bias", "heads_bias"),
    "attn.k_bias": ("self_attn.k_proj.bias", "heads_bias"),
    "attn.v_bias": ("self_attn.v_proj.bias", "heads_bias"),
    "mlp.gate_proj": ("mlp.gate_proj.weight", "transpose"),
    "mlp.up_proj": ("mlp.up_proj.weight", "transpose"),
    "mlp.down_proj": ("mlp.down_proj.weight", "transpose"),
    "attn.q_norm.scale": ("self_attn.q_norm.weight", "vec"),          # qk_norm (Qwen3, Gemma 3)
    "attn.k_norm.scale": ("self_attn.k_norm.weight", "vec"),
    "attn_post_norm.scale": ("post_attention_layernorm.weight", "vec"),   # post_norms (Gemma 3)
    "mlp_post_norm.scale": ("post_feedforward_layernorm.weight", "vec"),
}
# With post_norms (Gemma 2/3), HF's post_attention_layernorm is the norm *after* attention;
# the MLP's input norm is pre_feedforward_layernorm.
_POST_NORM_LAYER_PARAMS = {**_LAYER_PARAMS,
                           "mlp_norm.scale": ("pre_feedforward_layernorm.weight", "vec")}
_TOP_PARAMS = {
    "embed": ("model.embed_tokens.weight", "embed"),
    "lm_head": ("lm_head.weight", "head"),
    "final_norm.scale": ("model.norm.weight", "vec"),
}


class Source(Protocol):
  shape: tuple[int, ...]

  def read(self, index: tuple[Any, ...]) -> np.ndarray:
    """The block `tensor[index]` (slices, or an int array on axis 0) in HF order."""


def param_name(path) -> str:
  """'layers.3.attn.q_proj' for a tree_map_with_path key path (the trailing `.value` dropped)."""
  parts = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
    if name == "value" and k is path[-1]:
      continue
    parts.append(str(name))
  return ".".join(parts)


def layer_names(name: str, num_layers: int) -> list[str]:
  """Per-layer names of a stacked parameter: 'layers.attn.q_proj' -> ['layers.0.attn.q_proj', ...]."""
  rest = name.split(".", 1)[1]
  return [f"layers.{i}.{rest}" for i in range(num_layers)]


def hf_entry(name: str, cfg: model_lib.ModelConfig | None = None) -> tuple[str, str]:
  """(HF tensor name, kind) for one of our parameter names (of a model with config `cfg`);
  a layer's parameter is named per layer ('layers.3.attn.q_proj', see `layer_names`)."""
  if name in _TOP_PARAMS:
    return _TOP_PARAMS[name]
  _, i, rest = name.split(".", 2)
  hf, kind = (_POST_NORM_LAYER_PARAMS if cfg is not None and cfg.post_norms else _LAYER_PARAMS)[rest]
  return f"model.layers.{i}.{hf}", kind


def hf_shape(kind: str, shape: tuple[int, ...], real_vocab: int) -> tuple[int, ...]:
  """The HF tensor shape that a parameter of ours with `shape` comes from."""
  if kind == "vec":
    return shape
  if kind == "embed":
    return (real_vocab, shape[1])
  if kind == "head":
    return (real_vocab, shape[0])
  if kind == "transpose":
    return (shape[1], shape[0])
  if kind == "heads_in":
    return (shape[1] * shape[2], shape[0])
  if kind == "heads_out":
    return (shape[2], shape[0] * shape[1])
  if kind == "heads_bias":
    return (shape[0] * shape[1],)
  raise ValueError(f"unknown parameter kind {kind!r}")


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[int, int]]:
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"strided shard index {s} is not supported")
    out.append((start, stop))
  return out


def _rows(src: Source, r0: int, r1: int, cols: slice | None = None) -> np.ndarray:
  """Rows [r0, r1) of `src`, zero-filled past its end (vocabulary padding)."""
  hi = min(r1, src.shape[0])
  if cols is None:
    block = src.read((slice(r0, hi),)) if hi > r0 else None
    width: tuple[int, ...] = ()
  else:
    block = src.read((slice(r0, hi), cols)) if hi > r0 else None
    width = (len(range(*cols.indices(src.shape[1]))),)
  if hi >= r1:
    return block
  out = np.zeros((r1 - r0,) + width, np.float32 if block is None else block.dtype)
  if block is not None:
    out[: hi - r0] = block
  return out


def read_shard(kind: str, src: Source, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
  """The block `param[index]` of our parameter (of `shape`) read from HF tensor `src`."""
  b = _bounds(index, shape)
  if kind == "vec":
    return src.read((slice(*b[0]),))
  if kind == "embed":
    return _rows(src, *b[0], slice(*b[1]))
  if kind == "head":
    return _rows(src, *b[1], slice(*b[0])).T
  if kind == "transpose":
    return src.read((slice(*b[1]), slice(*b[0]))).T
  if kind == "heads_in":                                      # [D,H,Dh] <- [H*Dh, D]
    (d0, d1), (h0, h1), (j0, j1) = b
    dh = shape[2]
    x = src.read((slice(h0 * dh, h1 * dh), slice(d0, d1)))
    return x.reshape(h1 - h0, dh, d1 - d0).transpose(2, 0, 1)[:, :, j0:j1]
  if kind == "heads_out":                                     # [H,Dh,D] <- [D, H*Dh]
    (h0, h1), (j0, j1), (d0, d1) = b
    dh = shape[1]
    x = src.read((slice(d0, d1), slice(h0 * dh, h1 * dh)))
    return x.reshape(d1 - d0, h1 - h0, dh).transpose(1, 2, 0)[:, j0:j1, :]
  if kind == "heads_bias":                                    # [H,Dh] <- [H*Dh]
    (h0, h1), (j0, j1) = b
    dh = shape[1]
    return src.read((slice(h0 * dh, h1 * dh),)).reshape(h1 - h0, dh)[:, j0:j1]
  raise ValueError(f"unknown parameter kind {kind!r}")


def to_hf(kind: str, x: np.ndarray, real_vocab: int) -> np.ndarray:
  """Inverse of `read_shard` on a whole (host) parameter: our layout -> HF layout."""
  if kind == "vec":
    return x
  if kind == "embed":
    return x[:real_vocab]
  if kind == "head":
    return x[:, :real_vocab].T
  if kind == "transpose":
    return x.T
  if kind == "heads_in":
    return x.reshape(x.shape[0], -1).T
  if kind == "heads_out":
    return x.reshape(-1, x.shape[2]).T
  if kind == "heads_bias":
    return x.reshape(-1)
  raise ValueError(f"unknown parameter kind {kind!r}")


def build_state(cfg: model_lib.ModelConfig, mesh, real_vocab: int,
                get_source: Callable[[str, str, tuple[int, ...]], Source]):
  """Creates every parameter directly on its shards. Returns (graphdef, state).

  `get_source(our_name, hf_name, expected_hf_shape)` returns the Source (and
  raises the user-facing ValueError when it is missing or mis-shaped).
  """
  graphdef, abs_state, _ = model_lib.abstract_model(cfg, mesh)

  def load(path, leaf: jax.ShapeDtypeStruct):
    name = param_name(path)
    if name in _TOP_PARAMS:
      hf_name, kind = hf_entry(name, cfg)
      src = get_source(name, hf_name, hf_shape(kind, leaf.shape, real_vocab))
      read = lambda index: read_shard(kind, src, leaf.shape, index)  # noqa: E731
    else:                                      # stacked layers: one HF tensor per layer
      srcs = []
      for i, layer_name in enumerate(layer_names(name, cfg.num_layers)):
        hf_name, kind = hf_entry(layer_name, cfg)
        srcs.append(get_source(layer_name, hf_name, hf_shape(kind, leaf.shape[1:], real_vocab)))
      read = lambda index: np.stack([read_shard(kind, srcs[i], leaf.shape[1:], index[1:])  # noqa: E731
                                     for i in range(*index[0].indices(leaf.shape[0]))])
    blocks: dict[tuple, np.ndarray] = {}

    def cb(index):
      key = tuple((s.start, s.stop) for s in index)
      if key not in blocks:                    # replicated shards: read once
        blocks[key] = np.ascontiguousarray(read(index).astype(leaf.dtype))
      return blocks[key]

    return jax.make_array_from_callback(leaf.shape, leaf.sharding, cb)

  return graphdef, jax.tree_util.tree_map_with_path(load, abs_state)



def finish(cfg: model_lib.ModelConfig, mesh, graphdef, state, vocab, where: str):
  """The loaded LM and its vocabulary, checking the tokenizer fits the embedding."""
  if vocab.vocab_size > cfg.vocab_size:
    raise ValueError(f"{where}: tokenizer has {vocab.vocab_size} tokens but the model only "
                     f"{cfg.vocab_size} (padded) embedding rows")
  return model_lib.LM(cfg, graphdef, state, mesh), vocab
