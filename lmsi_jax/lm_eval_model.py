"""lm-evaluation-harness adapter: any lmsi_jax checkpoint as an `lm_eval` model.

  python -m lmsi_jax.lm_eval_model --model lmsi_jax \
      --model_args checkpoint=WORKDIR/round_1/train,mesh_shape=-1x1x1,max_gen_toks=256 \
      --batch_size 16 --tasks gsm8k --num_fewshot 5 --limit 50 --output_path out/

is lm_eval's own command line (every `lm_eval` flag works) with the model
"lmsi_jax" registered first: the harness has no plugin discovery, so a bare
`lm_eval --model lmsi_jax` only works from Python after
`import lmsi_jax.lm_eval_model` (then `lm_eval.simple_evaluate(model="lmsi_jax",
model_args=...)`, or pass an `LmsiJaxLM(lm=..., vocab=...)` instance).

`checkpoint` is what `lmsi_jax.sample --checkpoint` takes (loading.load_any):
a Hugging Face directory, a .gguf file or an lmsi_jax training directory
(WORKDIR/round_k/train); text is tokenized with that checkpoint's vocabulary.

- `generate_until`: lmsi_jax.sampler's jitted decode, batched; requests are
  grouped by their gen_kwargs (`until`, `max_gen_toks` and its aliases,
  `do_sample`/`temperature`, `top_k`, `top_p`; greedy unless sampling is asked
  for). Decoding stops at EOS or a stop string; the text is cut at the first
  stop string. Prompts longer than max_seq_len - max_gen_toks keep their last
  tokens. Sample i of a call uses key fold_in(key(seed), i).
- `loglikelihood`: sum of the continuation tokens' log-softmax (over the
  tokenizer's vocabulary, as the sampler: padded embedding rows are masked) and
  whether every continuation token is the argmax; one jitted forward per batch
  of right-padded rows.
- `loglikelihood_rolling`: the same over lm_eval's disjoint rolling windows
  (prefix token: the tokenizer's BOS prefix if it adds one, else EOS).

lm_eval is optional: importing this module needs it (`pip install lm-eval`);
`import lmsi_jax` does not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

try:
  from lm_eval.api import registry as _registry
  from lm_eval.api.model import TemplateLM
  from lm_eval.models import utils as _lm_utils
  import lm_eval.models  # noqa: F401  registers the harness's own models before ours
  from lm_eval import utils as _lm_eval_utils
except ImportError as e:  # pragma: no cover - exercised only without the package
  raise ImportError("lmsi_jax.lm_eval_model needs lm-evaluation-harness: pip install lm-eval "
                    f"(or pip install -e '.[test]'): {e}") from e

from lmsi_jax import model as model_lib
from lmsi_jax import sampler
from lmsi_jax import sharding
from lmsi_jax.data import vocab as vocab_lib

MODEL_NAME = "lmsi_jax"
# Constructor keys lm_eval itself adds (simple_evaluate's additional_config).
_HARNESS_KEYS = ("max_batch_size", "device")
_GEN_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")
_NEG_INF = float(jnp.finfo(jnp.float32).min)


def parse_mesh_shape(spec) -> tuple[int, ...]:
  """"2x2x2" (model_args are comma-separated, so not "2,2,2"), or a sequence of three ints."""
  if isinstance(spec, str):
    parts = spec.replace(":", "x").split("x")
  else:
    parts = list(spec)
  try:
    shape = tuple(int(s) for s in parts)
  except (TypeError, ValueError):
    shape = ()
  if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"lmsi_jax model_args mesh_shape={spec!r}: expected three integers like "
                     "2x2x2 (data x fsdp x model; one may be -1)")
  return shape


def _score(graphdef, state, tokens, valid, targets, *, vocab_limit: int):
  """tokens/targets [B,T] right-padded, valid [B,T]: target log-probs and argmax hits."""
  model = model_lib.nnx.merge(graphdef, state)
  t = tokens.shape[1]
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], tokens.shape)
  logits, _ = model(tokens, positions, model_lib.causal_mask(t, valid))
  logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, _NEG_INF)
  lp = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0] - jax.nn.logsumexp(logits, -1)
  return lp, sampler.argmax_last(logits) == targets


_score_jit = jax.jit(_score, static_argnums=(0,), static_argnames=("vocab_limit",))


class LmsiJaxLM(TemplateLM):
  """An lmsi_jax model (LM + vocabulary) behind lm_eval's LM API."""

  def __init__(self, checkpoint: str | None = None, *, lm: model_lib.LM | None = None,
               vocab=None, mesh_shape="-1x1x1", dtype: str = "float32",
               max_seq_len: int | None = None, batch_size: int | str | None = 16,
               max_gen_toks: int = 256, seed: int = 0, top_k: int = 0, top_p: float = 1.0,
               **kwargs):
    super().__init__()
    unknown = sorted(k for k in kwargs if k not in _HARNESS_KEYS)
    if unknown:
      raise ValueError(f"lmsi_jax model_args: unknown key {unknown[0]!r} (expected checkpoint, "
                       "mesh_shape, dtype, max_seq_len, batch_size, max_gen_toks, seed, top_k, "
                       "top_p)")
    if (checkpoint is None) == (lm is None):
      raise ValueError("lmsi_jax model_args: give exactly one of checkpoint=PATH or lm=/vocab= "
                       "objects")
    if lm is not None and vocab is None:
      raise ValueError("lmsi_jax: lm= needs its vocab=")
    self._batch_size = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") \
        else int(batch_size)
    if self._batch_size < 1:
      raise ValueError(f"lmsi_jax model_args batch_size={batch_size!r}: must be >= 1")
    self.max_gen_toks = int(max_gen_toks)
    if self.max_gen_toks < 1:
      raise ValueError(f"lmsi_jax model_args max_gen_toks={max_gen_toks!r}: must be >= 1")
    self.seed, self.top_k, self.top_p = int(seed), int(top_k), float(top_p)
    sampler.SamplingParams(0.0, self.top_k, self.top_p, self.max_gen_toks)   # validates
    if lm is None:
      shape = parse_mesh_shape(mesh_shape)
      from lmsi_jax import loading  # pylint: disable=g-import-not-at-top
      lm, vocab = loading.load_any(str(checkpoint), sharding.make_mesh(shape), dtype=dtype,
                                     max_seq_len=int(max_seq_len) if max_seq_len else None)
    self.lm, self.vocab = lm, vocab
    self.calls = {"generate_until": 0, "loglikelihood": 0, "loglikelihood_rolling": 0}

  @classmethod
  def create_from_arg_obj(cls, arg_dict, additional_config=None):
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    both = sorted(set(arg_dict) & set(extra))
    if both:
      raise ValueError(f"lmsi_jax model_args: {both[0]!r} is set by the harness (e.g. "
                       f"--{both[0]}); leave it out of model_args")
    return cls(**arg_dict, **extra)

  @classmethod
  def create_from_arg_string(cls, arg_string, additional_config=None):
    return cls.create_from_arg_obj(_lm_eval_utils.simple_parse_args_string(arg_string),
                                   additional_config)

  # --- tokenization (TemplateLM) --------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return int(self.vocab.eos_id)

  @property
  def prefix_token_id(self) -> int:
    prefix = vocab_lib.prompt_prefix(self.vocab)
    return int(prefix[0]) if prefix else self.eot_token_id

  @property
  def max_length(self) -> int:
    return int(self.lm.cfg.max_seq_len)

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return f"lmsi_jax:{type(self.vocab).__name__}"

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """As the sampler encodes prompts (the tokenizer's own BOS prefix, if any), unless
    add_special_tokens=False."""
    if add_special_tokens is False:
      return [int(i) for i in self.vocab.encode(string)]
    return vocab_lib.encode_prompt(self.vocab, string)

  def tok_decode(self, tokens: Sequence[int]) -> str:
    return self.vocab.decode([int(t) for t in tokens])

  # --- scoring --------------------------------------------------------------------------

  def _padded_rows(self, n: int) -> int:
    div = sharding.batch_divisor(self.lm.mesh)
    return -(-max(n, self._batch_size) // div) * div

  def score_tokens(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]]
                   ) -> list[tuple[float, bool, list[float]]]:
    """(context ids, continuation ids) -> (sum log-prob, is_greedy, per-token log-probs).

    Rows longer than max_length + 1 keep their last max_length + 1 tokens (the context
    side is cut first, as lm_eval's HF model does)."""
    out: list = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
    limit = self.max_length
    bs = sharding.batch_sharding(self.lm.mesh, 2)
    for start in range(0, len(order), self._batch_size):
      chunk = order[start:start + self._batch_size]
      seqs = []
      for i in chunk:
        ctx, cont = list(rows[i][0]), list(rows[i][1])
        if not cont:
          raise ValueError(f"loglikelihood request {i}: the continuation is empty")
        if not ctx:
          raise ValueError(f"loglikelihood request {i}: the context is empty")
        seqs.append(((ctx + cont)[-(limit + 1):], len(cont)))
      t = min(sampler.bucket_length(max(len(s) - 1 for s, _ in seqs)), limit)
      b = self._padded_rows(len(chunk))
      tok = np.zeros((b, t), np.int32)
      tgt = np.zeros((b, t), np.int32)
      valid = np.zeros((b, t), bool)
      valid[:, 0] = True
      for r, (s, _) in enumerate(seqs):
        tok[r, :len(s) - 1] = s[:-1]
        tgt[r, :len(s) - 1] = s[1:]
        valid[r, :len(s) - 1] = True
      with jax.set_mesh(self.lm.mesh):
        put = lambda x: jax.make_array_from_callback(x.shape, bs, lambda idx: x[idx])
        lp, hit = _score_jit(self.lm.graphdef, self.lm.state, put(tok), put(valid), put(tgt),
                             vocab_limit=int(self.vocab.vocab_size))
      lp, hit = np.asarray(lp), np.asarray(hit)
      for r, (i, (s, n)) in enumerate(zip(chunk, seqs)):
        end = len(s) - 1
        tl = lp[r, end - n:end]
        out[i] = (float(tl.sum()), bool(hit[r, end - n:end].all()), [float(x) for x in tl])
    return out

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    self.calls["loglikelihood"] += len(requests)
    scored = self.score_tokens([(ctx, cont) for _, ctx, cont in requests])
    res = []
    for (key, _, _), (lp, greedy, _) in zip(requests, scored):
      res.append((lp, greedy))
      self.cache_hook.add_partial("loglikelihood", key, (lp, greedy))
    return res

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    self.calls["loglikelihood_rolling"] += len(requests)
    windows, owner = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      for w in map(_lm_eval_utils.make_disjoint_window, _lm_eval_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string, add_special_tokens=False),
          prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
        windows.append(w)
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (lp, _, _) in zip(owner, self.score_tokens(windows)):
      totals[i] += lp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
    return totals

  # --- generation -----------------------------------------------------------------------

  def _sampling(self, gen_kwargs: dict) -> tuple[sampler.SamplingParams, list[str]]:
    if not isinstance(gen_kwargs, dict):
      raise ValueError(f"lmsi_jax generate_until: gen_kwargs must be a dict, got {gen_kwargs!r}")
    kw = dict(_lm_utils.normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
    until = [s for s in kw.pop("until") if isinstance(s, str) and s]
    n = kw.pop("max_gen_toks")
    sample = bool(kw.pop("do_sample", False))
    temperature = float(kw.pop("temperature", 0.0) or 0.0)
    temperature = temperature if sample else 0.0
    top_k = int(kw.pop("top_k", self.top_k) or 0)
    top_p = float(kw.pop("top_p", self.top_p) or 1.0)
    if kw:
      raise ValueError(f"lmsi_jax generate_until: unsupported gen_kwargs key {sorted(kw)[0]!r} "
                       f"(supported: {', '.join(_GEN_KEYS)} and max_gen_toks' aliases)")
    if n >= self.max_length:
      raise ValueError(f"lmsi_jax generate_until: max_gen_toks={n} leaves no room for a prompt "
                       f"in max_seq_len={self.max_length}")
    return sampler.SamplingParams(temperature, top_k, top_p, int(n)), until

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    self.calls["generate_until"] += len(requests)
    args = [req.args for req in requests]
    groups: dict[str, list[int]] = {}
    for i, (_, gk) in enumerate(args):
      groups.setdefault(json.dumps(gk, sort_keys=True, default=str), []).append(i)
    out: list[str] = [""] * len(args)
    for idx in groups.values():
      params, until = self._sampling(args[idx[0]][1])
      room = self.max_length - params.max_decode_steps
      ids = {}
      for i in idx:
        p = self.tok_encode(args[i][0]) or sampler._empty_prompt(self.vocab, i)  # pylint: disable=protected-access
        if len(p) > room:
          logging.warning("lmsi_jax generate_until: request %d has %d prompt tokens; keeping "
                          "the last %d", i, len(p), room)
          p = p[-room:]
        ids[i] = p
      order = sorted(idx, key=lambda i: -len(ids[i]))
      for start in range(0, len(order), self._batch_size):
        chunk = order[start:start + self._batch_size]
        keys = sampler.row_keys(self.seed, np.array(chunk), np.zeros(len(chunk), np.int64))
        res = sampler.generate_ids(self.lm, self.vocab, [ids[i] for i in chunk], keys,
                                   params=params, stop_strings=until,
                                   batch_size=self._batch_size)
        for s, i in zip(res, chunk):
          text = s.text
          out[i] = text
          self.cache_hook.add_partial("generate_until", args[i], text)
    return out


if __name__ == "__main__":
  # Run as a script: register the importable class lazily (the harness imports it when the
  # model is asked for), not this __main__ copy.
  _registry.model_registry.register(MODEL_NAME, target="lmsi_jax.lm_eval_model:LmsiJaxLM")
else:
  _registry.register_model(MODEL_NAME)(LmsiJaxLM)


def main() -> None:
  """`lm_eval`'s command line with the "lmsi_jax" model registered."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
  cli_evaluate()


if __name__ == "__main__":
  main()
