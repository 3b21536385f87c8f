"""Export an LM to a Hugging Face directory that `transformers` loads.

Writes config.json (LlamaForCausalLM; Qwen2ForCausalLM when the model has
q/k/v biases; Qwen3ForCausalLM with q/k norms; Gemma3ForCausalLM with Gemma's
post-norms: see `family`), generation_config.json, `model.safetensors` (or shards plus
`model.safetensors.index.json`) with the vocabulary un-padded, and the
tokenizer files. Every process takes part in the gathers
(`process_allgather`); only process 0 writes. Parameters are gathered one
shard file at a time, so host memory peaks at about one shard.

Tokenizers: an HFTokenizersVocabulary writes tokenizer.json; a SentencePiece
vocabulary writes tokenizer.model (transformers' LlamaTokenizer); the byte
vocabulary writes a byte-level BPE tokenizer.json that reproduces
seqio.ByteVocabulary's ids (pad=0, eos=1, unk=2, byte b -> b+3) plus a marker
so `load_checkpoint` returns a real seqio.ByteVocabulary again. seqio's byte
vocabulary itself is not something transformers can load; this twin is.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import jax
import numpy as np
import seqio
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from lmsi_jax import model as model_lib
from lmsi_jax.interop import layout
from lmsi_jax.interop import tokenizer as tok_lib
from lmsi_jax.data import vocab as vocab_lib

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "chat_template.jinja")


def _write_json(path: str, obj: dict[str, Any]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write("\n")


def family(cfg: model_lib.ModelConfig) -> str:
  """The transformers family that expresses `cfg`: "gemma3", "qwen3", "qwen2" or "llama".

  Raises a one-line ValueError for option combinations no exported family has."""
  if cfg.post_norms:
    fam = "gemma3"
    ok = (cfg.qk_norm and cfg.norm_offset == 1.0 and cfg.embed_scale and not cfg.qkv_bias
          and cfg.mlp_activation == "gelu_tanh")
  else:
    fam = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
    ok = (not cfg.norm_offset and not cfg.embed_scale and cfg.mlp_activation == "silu"
          and not cfg.query_pre_attn_scalar and not cfg.attn_logit_softcap
          and not cfg.final_logit_softcap and not cfg.sliding_window
          and (fam == "llama" or cfg.rope_type == "default"))
  if cfg.rope_freq_factors:
    raise ValueError("cannot export RoPE frequency factors (a GGUF's rope_freqs.weight) to Hugging "
                     "Face format: export from the model's Hugging Face directory instead")
  if not ok:
    raise ValueError(f"cannot export this model configuration to Hugging Face format (no "
                     f"transformers family has this combination of options; nearest: {fam})")
  return fam


def _rope_parameters(cfg: model_lib.ModelConfig) -> dict[str, Any]:
  out: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type}
  if cfg.rope_type != "default":
    out["factor"] = cfg.rope_factor
  if cfg.rope_type == "llama3":
    out.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
               original_max_position_embeddings=cfg.rope_original_max_len)
  return out


def _int_if_whole(x: float) -> int | float:
  """transformers' strict configs want an int where the value is one (query_pre_attn_scalar)."""
  return int(x) if float(x).is_integer() else x


_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
          "gemma3": "Gemma3ForCausalLM"}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}


def hf_config(cfg: model_lib.ModelConfig, vocab_size: int, *, bos_id: int | None, eos_id: int,
              dtype: str) -> dict[str, Any]:
  """config.json contents for our ModelConfig (LlamaForCausalLM, Qwen2/Qwen3ForCausalLM or
  Gemma3ForCausalLM, see `family`)."""
  fam = family(cfg)
  out: dict[str, Any] = {
      "architectures": [_ARCHS[fam]], "model_type": _MODEL_TYPES[fam],
      "vocab_size": vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
      "rope_parameters": _rope_parameters(cfg),
      "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos_id, "eos_token_id": eos_id,
      "dtype": dtype, "torch_dtype": dtype, "use_cache": True,
  }
  if fam in ("qwen2", "qwen3"):
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    if fam == "qwen3":
      out.update(attention_bias=cfg.qkv_bias)
  elif fam == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  else:
    del out["hidden_act"], out["rope_theta"]
    types = list(cfg.layer_types or ["full_attention"] * cfg.num_layers)
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
    out.update(
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim),
        sliding_window=cfg.sliding_window or None, layer_types=types,
        attn_logit_softcapping=cfg.attn_logit_softcap or None,
        final_logit_softcapping=cfg.final_logit_softcap or None,
        use_bidirectional_attention=False, attention_bias=False,
        rope_parameters={"full_attention": _rope_parameters(cfg), "sliding_attention": local})
  return out


def _token(vocab, i: int | None) -> str | None:
  if i is None:
    return None
  if isinstance(vocab, vocab_lib.HFTokenizersVocabulary):
    return vocab.tokenizer.id_to_token(int(i))
  return vocab.tokenizer.id_to_piece(int(i))


def _bos_id(vocab) -> int | None:
  """config.json's bos_token_id: the byte vocabulary's start id 0, else the tokenizer's BOS."""
  if isinstance(vocab, seqio.ByteVocabulary):
    return 0
  bos = vocab.bos_id
  return int(bos) if bos is not None and int(bos) >= 0 else None


def save_tokenizer(source, out_dir: str, *, write: bool = True) -> seqio.Vocabulary:
  """Writes the tokenizer files for a vocabulary or a tokenizer path. Returns the vocabulary."""
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    vocab = tok_lib.load_tokenizer(path)
    if os.path.isdir(path):
      if write:
        for name in _TOKENIZER_FILES:
          if os.path.exists(os.path.join(path, name)):
            shutil.copyfile(os.path.join(path, name), os.path.join(out_dir, name))
      return vocab
    source = vocab
  vocab = source
  if not write:
    return vocab
  base = {"model_max_length": 1_000_000_000_000}
  if isinstance(vocab, seqio.ByteVocabulary):
    # The byte vocabulary's sequences start with id 0 (`vocab.prompt_prefix`): the
    # exported tokenizer adds it, so transformers tokenizes prompts as the sampler does.
    tok = tok_lib.byte_tokenizer()
    tok_lib.set_bos_post_processor(tok, 0)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        **base, "tokenizer_class": "PreTrainedTokenizerFast", tok_lib.BYTE_MARKER: "byte",
        "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
  elif isinstance(vocab, vocab_lib.HFTokenizersVocabulary):
    vocab.tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        **base, "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token(vocab, vocab.bos_id), "eos_token": _token(vocab, vocab.eos_id),
        "unk_token": _token(vocab, vocab.unk_id)})
  elif isinstance(vocab, seqio.SentencePieceVocabulary):
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
      f.write(vocab.sp_model)
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        **base, "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": bool(vocab_lib.prompt_prefix(vocab)),
        "bos_token": _token(vocab, vocab.tokenizer.bos_id() if vocab.tokenizer.bos_id() >= 0 else None),
        "eos_token": _token(vocab, vocab.eos_id), "unk_token": _token(vocab, vocab.unk_id)})
  else:
    raise ValueError(f"cannot export a tokenizer for {type(vocab).__name__}")
  return vocab


def _plan_shards(lm: model_lib.LM, dtype, max_shard_size: int) -> list[list[tuple[str, Any, Any]]]:
  """Groups (name, leaf, layer index or None) into shard files of at most `max_shard_size`
  bytes (one tensor may exceed); a stacked layer parameter gives one tensor per layer."""
  shards: list[list[tuple[str, Any, Any]]] = [[]]
  size = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(lm.state):
    name = layout.param_name(path)
    parts = ([(name, None)] if not name.startswith("layers.") else
             [(n, i) for i, n in enumerate(layout.layer_names(name, lm.cfg.num_layers))])
    for n, i in parts:
      nbytes = math.prod(leaf.shape[0 if i is None else 1:]) * np.dtype(dtype).itemsize
      if shards[-1] and size + nbytes > max_shard_size:
        shards.append([])
        size = 0
      shards[-1].append((n, leaf, i))
      size += nbytes
  return shards


def export_hf(lm: model_lib.LM, vocab_or_tokenizer_source, out_dir: str, *,
              vocab_size: int | None = None, dtype: str | None = None,
              max_shard_size: int = 4 << 30) -> str:
  """Writes `lm` as a transformers checkpoint directory. Returns `out_dir`.

  Args:
    lm: the model.
    vocab_or_tokenizer_source: a seqio.Vocabulary (HFTokenizersVocabulary, SentencePiece,
      ByteVocabulary) or a path accepted by `load_tokenizer` (a directory's tokenizer files
      are copied verbatim).
    out_dir: created if needed.
    vocab_size: embedding rows to keep (default: the tokenizer's size).
    dtype: "float32" | "bfloat16" | "float16" for the stored weights (default: param dtype).
    max_shard_size: bytes per safetensors file; more than one file adds an index.
  """
  write = jax.process_index() == 0
  if write:
    os.makedirs(out_dir, exist_ok=True)
  vocab = save_tokenizer(vocab_or_tokenizer_source, out_dir, write=write)
  real_vocab = int(vocab_size or vocab.vocab_size)
  if real_vocab > lm.cfg.vocab_size:
    raise ValueError(f"vocab_size {real_vocab} exceeds the model's {lm.cfg.vocab_size} embedding rows")
  dtype = dtype or lm.cfg.param_dtype
  np_dtype = np.dtype(model_lib.DTYPES[dtype])
  bos = _bos_id(vocab)
  if write:
    _write_json(os.path.join(out_dir, "config.json"),
                hf_config(lm.cfg, real_vocab, bos_id=bos, eos_id=vocab.eos_id, dtype=dtype))
    _write_json(os.path.join(out_dir, "generation_config.json"),
                {"bos_token_id": bos, "eos_token_id": vocab.eos_id})
  shards = _plan_shards(lm, np_dtype, max_shard_size)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map, total = {}, 0
  for file, shard in zip(names, shards):
    tensors = {}
    gathered = (None, None)
    for name, leaf, layer in shard:
      hf_name, kind = layout.hf_entry(name, lm.cfg)
      if gathered[0] is not leaf:              # a stacked leaf is gathered once per file
        gathered = (leaf, np.asarray(multihost_utils.process_allgather(leaf, tiled=True)))
      host = gathered[1] if layer is None else gathered[1][layer]
      tensors[hf_name] = np.ascontiguousarray(layout.to_hf(kind, host, real_vocab).astype(np_dtype))
      weight_map[hf_name] = file
      total += tensors[hf_name].nbytes
    if write:
      save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
    del tensors
  if write and len(shards) > 1:
    _write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
  multihost_utils.sync_global_devices("lmsi_jax.export_hf")
  return out_dir
