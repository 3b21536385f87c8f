"""Vocabularies: SeqIO's ByteVocabulary and a Hugging Face `tokenizers` wrapper.

Importing this module hides GPUs from TensorFlow so that tf.data never claims
accelerator memory that JAX needs.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import seqio
import tensorflow as tf
import tokenizers

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices; nothing to do.
  pass


def byte_vocabulary() -> seqio.ByteVocabulary:
  """UTF-8 bytes: pad=0, eos=1, unk=2, byte b -> b + 3; size 259."""
  return seqio.ByteVocabulary()


def padded_vocab_size(n: int, multiple: int = 128) -> int:
  """Embedding rows for a vocabulary of `n` ids, rounded up for sharding (259 -> 384)."""
  if n <= 0 or multiple <= 0:
    raise ValueError(f"n and multiple must be positive, got {n}, {multiple}")
  return -(-n // multiple) * multiple


def _resolve_id(tok: tokenizers.Tokenizer, what: str, token: str | int | None) -> int | None:
  if token is None:
    return None
  size = tok.get_vocab_size(with_added_tokens=True)
  if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
    if not 0 <= int(token) < size:
      raise ValueError(f"{what} id {token} outside the vocabulary [0, {size})")
    return int(token)
  token_id = tok.token_to_id(token)
  if token_id is None:
    raise ValueError(f"{what} token {token!r} is not in the tokenizer")
  return token_id


def leading_special_ids(tok: tokenizers.Tokenizer) -> tuple[int, ...]:
  """The special tokens `tok`'s post-processor adds before a text (its BOS, if any)."""
  enc = tok.encode("a", add_special_tokens=True)
  n = 0
  while n < len(enc.ids) and enc.special_tokens_mask[n]:
    n += 1
  return tuple(int(i) for i in enc.ids[:n])


class HFTokenizersVocabulary(seqio.Vocabulary):
  """A SeqIO vocabulary over a Hugging Face `tokenizers.Tokenizer`.

  SeqIO assumes PAD_ID == 0. Here id 0 may be a real token (e.g. "!" in
  GPT-2/Qwen vocabularies): that is fine for training because pipelines pad
  with 0 and every mask comes from segment ids, never from `token != 0`.
  Decoding stops at the first EOS (dropped) and strips a trailing run of
  pads (id 0); special tokens (BOS, ...) are skipped.

  `encode` never adds special tokens. Whether a BOS starts every sequence
  (`prefix_ids`, used for prompts and training segments) is the tokenizer's
  own post-processor's decision, as in transformers: a `TemplateProcessing`
  with a leading BOS adds one; none, or a `ByteLevel` one, adds nothing. `bos`
  only names the BOS token (exported configs); it adds nothing by itself.

  Tokenization in tf.data goes through `tf.numpy_function` (holds the GIL; fine
  at pseudo-label scale).
  """

  def __init__(
      self,
      tokenizer: str | os.PathLike[str] | tokenizers.Tokenizer,
      *,
      eos: str | int = "</s>",
      bos: str | int | None = None,
      unk: str | int | None = None,
      extra_ids: int = 0,
  ):
    """Args: a tokenizer.json path or an in-memory Tokenizer; special tokens by string or id."""
    if isinstance(tokenizer, tokenizers.Tokenizer):
      self._tok = tokenizer
    else:
      self._tok = tokenizers.Tokenizer.from_file(os.fspath(tokenizer))
    self._eos = _resolve_id(self._tok, "EOS", eos)
    self._bos = _resolve_id(self._tok, "BOS", bos)
    self._unk = _resolve_id(self._tok, "UNK", unk)
    self._prefix = leading_special_ids(self._tok)
    digest = hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()
    self._fingerprint = (digest, self._eos, self._bos, self._unk, extra_ids)
    super().__init__(extra_ids=extra_ids)

  @property
  def tokenizer(self) -> tokenizers.Tokenizer:
    return self._tok

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def bos_id(self) -> int | None:
    return self._bos

  @property
  def unk_id(self) -> int | None:
    return self._unk

  @property
  def prefix_ids(self) -> tuple[int, ...]:
    """Ids the tokenizer's post-processor puts before a text (e.g. `(bos,)`), else `()`."""
    return self._prefix

  @property
  def _base_vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def _encode(self, s: str) -> list[int]:
    return self._tok.encode(s, add_special_tokens=False).ids

  def _decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if self._eos in ids:
      ids = ids[: ids.index(self._eos)]
    while ids and ids[-1] == 0:
      ids.pop()
    size = self._base_vocab_size
    ids = [i for i in ids if 0 <= i < size]
    return self._tok.decode(ids, skip_special_tokens=True)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """Encodes a scalar string tensor to int32 ids [n]."""
    def enc(x):
      x = np.asarray(x).item()  # bytes inside tf.data, ndarray eagerly
      return np.asarray(self._encode(x.decode("utf-8")), np.int32)
    ids = tf.numpy_function(enc, [s], tf.int32, stateful=False)
    return tf.ensure_shape(ids, [None])

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """Decodes ids [..., n] to strings [...]."""
    def dec(x):
      x = np.asarray(x)
      if x.shape[-1] == 0:
        return np.full(x.shape[:-1], b"", dtype=object)
      flat = x.reshape(-1, x.shape[-1])
      out = np.asarray([self._decode(r.tolist()).encode("utf-8") for r in flat], dtype=object)
      return out.reshape(x.shape[:-1])
    out = tf.numpy_function(dec, [ids], tf.string, stateful=False)
    return tf.ensure_shape(out, ids.shape[:-1])

  def __eq__(self, other: object) -> bool:
    return isinstance(other, HFTokenizersVocabulary) and self._fingerprint == other._fingerprint

  def __hash__(self) -> int:
    return hash(self._fingerprint)

  def __repr__(self) -> str:
    return (f"HFTokenizersVocabulary(size={self.vocab_size}, eos={self._eos}, "
            f"bos={self._bos}, unk={self._unk}, prefix={list(self._prefix)})")


class SentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """seqio's SentencePiece vocabulary plus whether a BOS starts every text.

  transformers 5 adds the BOS to a `tokenizer.model`-only checkpoint only when
  tokenizer_config.json says `add_bos_token: true` (default false). The flag is
  part of the state seqio compares and pickles.
  """

  def __init__(self, sentencepiece_model_file: str, *, add_bos: bool = False, **kwargs):
    super().__init__(sentencepiece_model_file, **kwargs)
    self._add_bos = bool(add_bos)

  @property
  def prefix_ids(self) -> tuple[int, ...]:
    bos = self.tokenizer.bos_id()
    return (int(bos),) if self._add_bos and bos >= 0 else ()


def prompt_prefix(vocab: seqio.Vocabulary) -> tuple[int, ...]:
  """The ids the checkpoint's tokenizer puts before every text: `(bos,)` or `()`.

  - ByteVocabulary: `(0,)`, SeqIO's decoder-start id (the embedded demo's trained format).
  - HFTokenizersVocabulary: the leading special tokens its post-processor adds
    (`prefix_ids`), as `transformers.AutoTokenizer` on the same tokenizer.json or
    GGUF does: `(bos,)` for a tokenizer that adds a BOS (Llama 2/3, SentencePiece
    GGUFs), `()` for one that adds none (SmolLM2, Qwen2, GPT-2).
  - SentencePieceVocabulary (ours): `(bos,)` when its tokenizer_config.json says
    `add_bos_token: true`, else `()`; a plain seqio one: `()` (transformers' default).
  """
  if isinstance(vocab, seqio.ByteVocabulary):
    return (0,)
  return tuple(getattr(vocab, "prefix_ids", ()))


def encode_prompt(vocab: seqio.Vocabulary, text: str) -> list[int]:
  """`prompt_prefix(vocab) + vocab.encode(text)`: what the sampler feeds the model.

  Equal to the checkpoint's own tokenizer's ids for `text` (no start token the
  tokenizer does not add itself), and to the start of every training segment
  built from an example whose inputs are `text` (`features.pack_examples`).
  """
  return list(prompt_prefix(vocab)) + [int(i) for i in vocab.encode(text)]
