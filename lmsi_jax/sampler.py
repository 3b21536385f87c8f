"""Batched sampling: the text API over the shared-prefix, refilled-row engine.

`generate` tokenizes prompts and decodes `num_samples` continuations of each
with `batching.sample_prompts`: the prompts' common few-shot block is
prefilled once, each prompt's own tokens once for all its samples, and row
slots are refilled as rows finish (`engine` holds the jitted programs). Each
row has its own PRNG key, so a sample depends only on (seed, prompt index,
sample index), not on the batch it landed in, the order rows ran in, or the
mesh. `decode_batch` is the token-level entry (one key per prompt).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmsi_jax import batching
from lmsi_jax import model as model_lib
from lmsi_jax.batching import bucket_length, compile_count  # noqa: F401  (re-exported)
from lmsi_jax.sampling_core import (NEG_INF, STOP_EOS, STOP_LENGTH, STOP_REASONS,  # noqa: F401
                                    STOP_SEQUENCE, SamplingParams, argmax_last, sample_tokens)


def row_keys(seed: int, prompt_index: np.ndarray, sample_index: np.ndarray) -> np.ndarray:
  """Raw uint32 key data, one key per (prompt, sample): independent of batching and mesh."""
  base = jax.random.key(seed)
  f = jax.jit(jax.vmap(lambda i, j: jax.random.key_data(
      jax.random.fold_in(jax.random.fold_in(base, i), j))))
  return np.asarray(f(jnp.asarray(prompt_index, jnp.uint32), jnp.asarray(sample_index, jnp.uint32)))


def decode_batch(lm: model_lib.LM, prompts: Sequence[Sequence[int]], keys: np.ndarray, *,
                 params: SamplingParams, eos_id: int, pad_id: int = 0, vocab_limit: int | None = None,
                 stop_sequences: tuple[tuple[int, ...], ...] = (), batch_size: int | None = None,
                 share: bool = True) -> dict[str, np.ndarray]:
  """Decodes token-id prompts, one row each with its key. Returns host numpy arrays:
  tokens/logprobs [rows, max_decode_steps] (pad/0 after a row's stop), lengths,
  stop_reason, steps (the longest row)."""
  keys = np.asarray(keys)
  out = batching.sample_prompts(lm, prompts, keys[:, None], params=params, eos_id=eos_id,
                                pad_id=pad_id, vocab_limit=vocab_limit,
                                stop_sequences=stop_sequences,
                                batch_size=batch_size or len(prompts), share=share)
  return _stack([r[0] for r in out], params.max_decode_steps, pad_id)


def generate_ids(lm: model_lib.LM, vocab, prompts: Sequence[Sequence[int]], keys: np.ndarray, *,
                 params: SamplingParams, stop_strings: Sequence[str] = (),
                 batch_size: int | None = None) -> list[Sample]:
  """One sample per token-id prompt, prompt i with raw key data `keys[i]` (lm-eval's
  `generate_until`): stop strings end the text as in `generate`."""
  out = batching.sample_prompts(lm, prompts, np.asarray(keys)[:, None], params=params,
                                eos_id=vocab.eos_id, pad_id=0, vocab_limit=vocab.vocab_size,
                                stop_sequences=stop_token_sequences(vocab, stop_strings),
                                batch_size=batch_size or len(prompts))
  return [to_sample(vocab, r[0], stop_strings) for r in out]


def _stack(rows: Sequence[batching.Row], n: int, pad_id: int) -> dict[str, np.ndarray]:
  tokens = np.full((len(rows), n), pad_id, np.int32)
  logprobs = np.zeros((len(rows), n), np.float32)
  for r, row in enumerate(rows):
    tokens[r, :len(row.tokens)] = row.tokens
    logprobs[r, :len(row.logprobs)] = row.logprobs
  lengths = np.array([len(r.tokens) for r in rows], np.int32)
  return {"tokens": tokens, "logprobs": logprobs, "lengths": lengths,
          "stop_reason": np.array([r.reason for r in rows], np.int32),
          "steps": np.array(lengths.max(), np.int32)}


@dataclasses.dataclass(frozen=True)
class Sample:
  """One sampled continuation."""
  text: str
  tokens: tuple[int, ...]
  logprobs: tuple[float, ...]
  stop_reason: str          # "eos" | "stop" | "length"

  @property
  def sum_logprob(self) -> float:
    return float(sum(self.logprobs))

  @property
  def mean_logprob(self) -> float:
    return self.sum_logprob / max(len(self.logprobs), 1)


def stop_token_sequences(vocab, stop_strings: Sequence[str]) -> tuple[tuple[int, ...], ...]:
  """Token sequences checked inside the decode loop (the text is truncated on the host too)."""
  return tuple(tuple(int(t) for t in vocab.encode(s)) for s in stop_strings if s)


def generate(lm: model_lib.LM, vocab, prompts: Sequence[str], *, num_samples: int = 1,
             temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0,
             max_decode_steps: int = 256, stop_strings: Sequence[str] = ("\nQ:",), seed: int = 0,
             batch_size: int = 32, prompt_offset: int = 0,
             progress: Callable[[int], None] | None = None) -> list[list[Sample]]:
  """Samples `num_samples` continuations for each prompt. Returns [prompt][sample].

  Sample j of prompt i uses the key fold_in(fold_in(key(seed), prompt_offset + i), j),
  so results do not depend on batch size, prompt order or mesh shape.

  Prompts are tokenized as the checkpoint's tokenizer does (`vocab.encode_prompt`:
  a BOS only where the tokenizer adds one); positions count from 0 at each
  prompt's first token, so no start token is needed.
  """
  from lmsi_jax.data import vocab as vocab_lib   # pylint: disable=g-import-not-at-top
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
  params = SamplingParams(float(temperature), int(top_k), float(top_p), int(max_decode_steps))
  if isinstance(prompts, str):
    raise ValueError("prompts must be a sequence of strings, not a single string")
  ids = [vocab_lib.encode_prompt(vocab, p) or _empty_prompt(vocab, i) for i, p in enumerate(prompts)]
  for i, p in enumerate(ids):
    if len(p) + max_decode_steps > lm.cfg.max_seq_len:
      raise ValueError(f"prompt {i} has {len(p)} tokens; with max_decode_steps={max_decode_steps} "
                       f"it exceeds the model context model.max_seq_len={lm.cfg.max_seq_len}")
  stops = stop_token_sequences(vocab, stop_strings)
  n = len(ids)
  if n == 0:
    return []
  pi = np.repeat(np.arange(n) + prompt_offset, num_samples)
  sj = np.tile(np.arange(num_samples), n)
  keys = row_keys(seed, pi, sj).reshape(n, num_samples, -1)
  out = batching.sample_prompts(lm, ids, keys, params=params, eos_id=vocab.eos_id, pad_id=0,
                                vocab_limit=vocab.vocab_size, stop_sequences=stops,
                                batch_size=batch_size, progress=progress)
  return [[to_sample(vocab, row, stop_strings) for row in rows] for rows in out]


def _empty_prompt(vocab, i: int) -> list[int]:
  """An empty prompt of a tokenizer that adds no BOS starts from its BOS token, as
  transformers' `generate()` without input ids does; without one there is nothing to
  condition on."""
  try:
    bos = vocab.bos_id
  except (AttributeError, NotImplementedError):
    bos = None
  if bos is None or int(bos) < 0:
    raise ValueError(f"prompt {i} is empty and the tokenizer has no BOS token to start from")
  return [int(bos)]


def to_sample(vocab, row: batching.Row, stop_strings: Sequence[str]) -> Sample:
  """One engine row (tokens, log-probs, stop reason) as a text `Sample`, cut at a stop string."""
  toks = [int(t) for t in row.tokens]
  reason = STOP_REASONS[row.reason]
  body = toks[:-1] if reason == "eos" else toks
  text = vocab.decode(body)
  for s in stop_strings:
    if s and s in text:
      text, reason = text[:text.index(s)], "stop"
  return Sample(text, tuple(toks), tuple(float(x) for x in row.logprobs), reason)
