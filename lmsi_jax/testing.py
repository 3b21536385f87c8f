"""Test doubles that ship with the package: inject them, do not patch modules.

  fake = testing.ScriptedSampler(lambda prompts, settings, seed: [[" The answer is 3."] * ...])
  pipe = rounds.Pipeline(cfg, workdir, sampler=fake)      # every stage samples through it

A script returns, per prompt, `settings.num_samples` texts (or `sampler.Sample`s);
every call is recorded in `fake.calls` (prompts, settings, seed, model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from lmsi_jax import generation


@dataclasses.dataclass(frozen=True)
class Sample:
  """The fields of `sampler.Sample` that stages read (no JAX import needed)."""
  text: str
  tokens: tuple[int, ...] = (1,)
  logprobs: tuple[float, ...] = (-0.5,)
  stop_reason: str = "eos"

  @property
  def sum_logprob(self) -> float:
    return float(sum(self.logprobs))

  @property
  def mean_logprob(self) -> float:
    return self.sum_logprob / max(len(self.logprobs), 1)


@dataclasses.dataclass(frozen=True)
class Call:
  prompts: list[str]
  settings: generation.SamplingSettings
  seed: int
  lm: object

  @property
  def num_samples(self) -> int:
    return self.settings.num_samples

  @property
  def temperature(self) -> float:
    return self.settings.temperature


class ScriptedSampler:
  """A `generation.Sampler` stand-in whose outputs come from `script(prompts, settings, seed)`."""

  def __init__(self, script: Callable[[list[str], generation.SamplingSettings, int],
                                      Sequence[Sequence[object]]], *, lm=None, calls=None):
    self.script, self.lm = script, lm
    self.calls: list[Call] = [] if calls is None else calls

  def for_model(self, lm) -> "ScriptedSampler":
    """The same script and call log, recording `lm` as the model sampled."""
    return ScriptedSampler(self.script, lm=lm, calls=self.calls)

  def generate(self, prompts, settings: generation.SamplingSettings, *, seed: int,
               prompt_offset: int = 0, progress=None) -> list[list[Sample]]:
    del prompt_offset
    prompts = list(prompts)
    self.calls.append(Call(prompts, settings, seed, self.lm))
    rows = self.script(prompts, settings, seed)
    if len(rows) != len(prompts):
      raise ValueError(f"script returned {len(rows)} rows for {len(prompts)} prompts")
    out = [[x if hasattr(x, "text") else Sample(str(x)) for x in row] for row in rows]
    if progress is not None:
      progress(sum(len(r) for r in out))
    return out


def all_options_lm(mesh, seed: int = 1):
  """A 3-layer model with every `ModelConfig` option on at once (sliding-window and global
  layers, softcaps, q/k norm, post-norms, GeGLU, llama3 RoPE), its weights perturbed so that
  no option is a no-op: the model of the decode-vs-full-forward parity tests."""
  import jax  # pylint: disable=g-import-not-at-top  (this module imports no JAX otherwise)
  from lmsi_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  cfg = model_lib.ModelConfig(
      vocab_size=128, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
      intermediate_size=64, head_dim=8, qk_norm=True, norm_offset=1.0, post_norms=True,
      mlp_activation="gelu_tanh", embed_scale=True, query_pre_attn_scalar=12.0,
      attn_logit_softcap=2.0, final_logit_softcap=5.0, rope_type="llama3", rope_factor=4.0,
      rope_original_max_len=16, rope_theta=1e5, rope_local_theta=1e3, sliding_window=3,
      layer_types=("sliding_attention", "full_attention", "sliding_attention"), max_seq_len=64)
  lm = model_lib.LM.init(cfg, mesh, seed=seed)
  lm.state = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape),
                          lm.state)
  return lm
