"""Tokenizers from checkpoints, as seqio.Vocabulary objects.

- HF directories: `tokenizer.json` -> `HFTokenizersVocabulary`; SentencePiece
  `tokenizer.model` -> `vocab.SentencePieceVocabulary`; a directory that
  `export_hf` wrote for the built-in byte vocabulary -> `seqio.ByteVocabulary`.
  BOS/EOS ids come from generation_config.json, then config.json, then
  tokenizer_config.json (the first id when a list is given). Whether a BOS
  starts every text is tokenizer.json's post-processor's decision (transformers
  5 ignores tokenizer_config.json's add_bos_token when tokenizer.json exists).
- GGUF metadata: the tokenizer is rebuilt with `tokenizers` (no transformers or
  torch): "gpt2" byte-level BPE (tokens, merges, token types, the pre-tokenizer
  named by `tokenizer.ggml.pre`) and "llama" SentencePiece-BPE (tokens and
  scores, merges derived from scores, byte fallback); a BOS post-processor when
  the file says add_bos_token (default: "llama" files only), as transformers.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import seqio
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from lmsi_jax.data import vocab as vocab_lib

BYTE_MARKER = "lmsi_vocabulary"      # tokenizer_config.json key written for ByteVocabulary
_CONTROL, _USER_DEFINED = 3, 4       # llama.cpp token types

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_DIGIT_SPLIT = ("smollm", "starcoder", "refact")    # GPT-2 regex after single-digit split


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table used by byte-level BPE."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
  cs = list(bs)
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _first(v):
  return v[0] if isinstance(v, (list, tuple)) and v else v


def _token_str(v) -> str | None:
  return v.get("content") if isinstance(v, dict) else v


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def special_ids(directory: str, config: dict[str, Any] | None = None) -> dict[str, int | str | None]:
  """{"bos": id-or-token, "eos": ..., "unk": ...} from a checkpoint directory's JSON files."""
  gen = _read_json(os.path.join(directory, "generation_config.json"))
  config = config if config is not None else _read_json(os.path.join(directory, "config.json"))
  tok_cfg = _read_json(os.path.join(directory, "tokenizer_config.json"))
  out: dict[str, int | str | None] = {}
  for key in ("bos", "eos", "unk"):
    value = None
    for src in (gen, config):
      value = _first(src.get(f"{key}_token_id"))
      if value is not None:
        break
    if value is None:
      value = _token_str(tok_cfg.get(f"{key}_token"))
    out[key] = value
  return out


def byte_tokenizer() -> tokenizers.Tokenizer:
  """A `tokenizers` twin of seqio.ByteVocabulary: pad=0, eos=1, unk=2, byte b -> b+3.

  Identical ids on any text that does not literally contain "<pad>", "</s>"
  or "<unk>" (those match as special tokens here).
  """
  specials = ["<pad>", "</s>", "<unk>"]
  vocab = {s: i for i, s in enumerate(specials)}
  vocab.update({ch: b + 3 for b, ch in bytes_to_unicode().items()})
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
  return tok


def load_hf_tokenizer(directory: str, config: dict[str, Any] | None = None) -> seqio.Vocabulary:
  """The vocabulary of a checkpoint directory (see module docstring)."""
  tok_cfg = _read_json(os.path.join(directory, "tokenizer_config.json"))
  if tok_cfg.get(BYTE_MARKER) == "byte":
    return vocab_lib.byte_vocabulary()
  ids = special_ids(directory, config)
  tj = os.path.join(directory, "tokenizer.json")
  if os.path.exists(tj):
    tok = tokenizers.Tokenizer.from_file(tj)
    eos = ids["eos"] if ids["eos"] is not None else "</s>"
    return vocab_lib.HFTokenizersVocabulary(tok, eos=eos, bos=ids["bos"], unk=ids["unk"])
  sp = os.path.join(directory, "tokenizer.model")
  if os.path.exists(sp):
    tok_cfg = _read_json(os.path.join(directory, "tokenizer_config.json"))
    return vocab_lib.SentencePieceVocabulary(sp, add_bos=tok_cfg.get("add_bos_token") is True)
  raise ValueError(f"no tokenizer in {directory} (expected tokenizer.json or tokenizer.model)")


def load_tokenizer(path: str) -> seqio.Vocabulary:
  """A vocabulary from a checkpoint directory, a tokenizer.json, a SentencePiece .model or a .gguf."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return load_hf_tokenizer(path)
  if path.endswith(".gguf"):
    from lmsi_jax.interop import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
    return gguf_lib.load_vocab(path)
  if path.endswith(".model"):
    return vocab_lib.SentencePieceVocabulary(path)
  if path.endswith(".json"):
    ids = special_ids(os.path.dirname(path) or ".")
    tok = tokenizers.Tokenizer.from_file(path)
    return vocab_lib.HFTokenizersVocabulary(
        tok, eos=ids["eos"] if ids["eos"] is not None else "</s>", bos=ids["bos"], unk=ids["unk"])
  raise ValueError(f"{path}: not a tokenizer (expected a directory, tokenizer.json, .model or .gguf)")


# ----------------------------------------------------------------------------- GGUF


def _gpt2_pre_tokenizer(pre: str | None):
  if pre in _SPLITS:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _DIGIT_SPLIT:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  return byte_level


def _gpt2_tokenizer(meta: dict[str, Any], where: str) -> tokenizers.Tokenizer:
  spelling = bytes_to_unicode()
  alphabet = set(spelling.values())
  tokens = meta["tokenizer.ggml.tokens"]
  vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
           for i, t in enumerate(tokens)}
  if "tokenizer.ggml.merges" not in meta:
    raise ValueError(f"{where}: GGUF gpt2 tokenizer without tokenizer.ggml.merges")
  merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                        byte_fallback=False))
  tok.pre_tokenizer = _gpt2_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  _add_typed_tokens(tok, tokens, meta, alphabet)
  return tok


def _sp_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
  """Merges implied by a SentencePiece-BPE vocabulary: best-scoring merged piece first."""
  merges = []
  for piece, idx in vocab.items():
    local = [(piece[:k], piece[k:]) for k in range(1, len(piece))
             if piece[:k] in vocab and piece[k:] in vocab]
    local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.extend((a, b, scores[idx]) for a, b in local)
  merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
  return [(a, b) for a, b, _ in merges]


def _llama_tokenizer(meta: dict[str, Any], where: str) -> tokenizers.Tokenizer:
  tokens = meta["tokenizer.ggml.tokens"]
  scores = meta.get("tokenizer.ggml.scores")
  if scores is None:
    raise ValueError(f"{where}: GGUF llama tokenizer without tokenizer.ggml.scores")
  vocab = {t: i for i, t in enumerate(tokens)}
  unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=_sp_merges(vocab, list(scores)),
                                        unk_token=tokens[unk_id], fuse_unk=True,
                                        byte_fallback=True))
  prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
  tok.normalizer = normalizers.Sequence(
      ([normalizers.Prepend("\u2581")] if prefix else []) + [normalizers.Replace(" ", "\u2581")])
  tok.decoder = decoders.Sequence(
      [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
      + ([decoders.Strip(" ", 1, 0)] if prefix else []))
  _add_typed_tokens(tok, tokens, meta, None)
  return tok


def _add_typed_tokens(tok: tokenizers.Tokenizer, tokens: list[str], meta: dict[str, Any],
                      alphabet: set[str] | None) -> None:
  """Control tokens become special added tokens, user-defined ones plain added tokens."""
  types = meta.get("tokenizer.ggml.token_type") or []
  special = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
             if ty == _CONTROL and (alphabet is None or set(t) <= alphabet)]
  user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
          if ty == _USER_DEFINED]
  if special:
    tok.add_special_tokens(special)
  if user:
    tok.add_tokens(user)


def gguf_tokenizer(meta: dict[str, Any], where: str) -> tokenizers.Tokenizer:
  """Rebuilds the tokenizer described by GGUF metadata (`{key: value}`)."""
  kind = meta.get("tokenizer.ggml.model")
  if "tokenizer.ggml.tokens" not in meta:
    raise ValueError(f"{where}: GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
  if kind == "gpt2":
    return _gpt2_tokenizer(meta, where)
  if kind == "llama":
    return _llama_tokenizer(meta, where)
  raise ValueError(f"unsupported GGUF tokenizer model {kind!r} in {where} "
                   "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)")


def gguf_vocabulary(meta: dict[str, Any], where: str) -> vocab_lib.HFTokenizersVocabulary:
  """HFTokenizersVocabulary with BOS/EOS/UNK ids from the GGUF metadata."""
  tok = gguf_tokenizer(meta, where)
  eos = meta.get("tokenizer.ggml.eos_token_id")
  if eos is None:
    raise ValueError(f"{where}: GGUF metadata has no tokenizer.ggml.eos_token_id")
  # Whether a BOS starts every text is decided as transformers' GGUF loader does:
  # tokenizer.ggml.add_bos_token, else True for "llama" (SentencePiece) files and
  # False otherwise. SmolLM2 says False: its prompts start with the text itself.
  bos = meta.get("tokenizer.ggml.bos_token_id")
  add_bos = meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")
  if add_bos:
    if bos is None:
      raise ValueError(f"{where}: GGUF metadata sets add_bos_token but has no bos_token_id")
    set_bos_post_processor(tok, int(bos))
  return vocab_lib.HFTokenizersVocabulary(
      tok, eos=int(eos), bos=bos, unk=meta.get("tokenizer.ggml.unknown_token_id"))


def set_bos_post_processor(tok: tokenizers.Tokenizer, bos_id: int) -> None:
  """Makes `tok` put `bos_id` before every text (transformers' `update_post_processor`)."""
  bos = tok.id_to_token(bos_id)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
