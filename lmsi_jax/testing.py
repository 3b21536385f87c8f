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
