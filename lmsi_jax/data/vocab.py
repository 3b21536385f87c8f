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


class HFTokenizersVocabulary(seqio.Vocabulary):
  """A SeqIO vocabulary over a Hugging Face `tokenizers.Tokenizer`.

  SeqIO assumes PAD_ID == 0. Here id 0 may be a real token (e.g. "!" in
  GPT-2/Qwen vocabularies): that is fine for training because pipelines pad
  with 0 and every mask comes from segment ids, never from `token != 0`.
  Decoding stops at the first EOS (dropped) and strips a trailing run of
  pads (id 0); special tokens (BOS, ...) are skipped.

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
            f"bos={self._bos}, unk={self._unk})")


def start_id(vocab: seqio.Vocabulary) -> int:
  """The id that starts every model sequence (prompts and packed segments).

  ByteVocabulary: 0 (SeqIO's decoder-BOS convention); otherwise the
  vocabulary's BOS id when it has one (>= 0), else 0.
  """
  if isinstance(vocab, seqio.ByteVocabulary):
    return 0
  try:
    bos = vocab.bos_id
  except NotImplementedError:
    return 0
  return int(bos) if bos is not None and int(bos) >= 0 else 0


def encode_prompt(vocab: seqio.Vocabulary, text: str) -> list[int]:
  """`[start_id] + vocab.encode(text)`: what the sampler feeds the model."""
  return [start_id(vocab)] + [int(i) for i in vocab.encode(text)]
