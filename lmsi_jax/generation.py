"""The sampling seam: every sampling knob in one object, and a Sampler bound to a model.

`SamplingSettings` carries what `sampler.generate` needs besides the model and
the prompts (validated when it is built, once, from the config); `Sampler`
(model, vocab, mesh) is what stages call:

  s = generation.SamplingSettings.from_config(cfg)          # the pool's sampling knobs
  rows = ctx.sampler.for_model(lm).generate(prompts, s, seed=seed)   # [prompt][sample]

Tests inject `lmsi_jax.testing.ScriptedSampler` (same interface) instead of
patching modules. The numerics are `sampler.generate`'s, unchanged: sample j of
prompt i uses a key of (seed, prompt_offset + i, j).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """Every sampling knob. temperature 0 = greedy; top_k 0 / top_p 1 = off."""
  num_samples: int = 1
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  max_decode_steps: int = 256
  stop_strings: tuple[str, ...] = ()
  batch_size: int = 32

  def __post_init__(self):
    object.__setattr__(self, "stop_strings", tuple(s for s in self.stop_strings if s))
    for name, lo in (("num_samples", 1), ("top_k", 0), ("max_decode_steps", 1),
                     ("batch_size", 1)):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"sampling {name} must be an int >= {lo}, got {v!r}")
    if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
      raise ValueError(f"sampling temperature must be >= 0, got {self.temperature!r}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p!r}")

  @classmethod
  def from_config(cls, cfg) -> "SamplingSettings":
    """The pool's sampling (config.sampling; stops at config.task.stop)."""
    s = cfg.sampling
    return cls(num_samples=s.num_samples, temperature=s.temperature, top_k=s.top_k,
               top_p=s.top_p, max_decode_steps=s.max_decode_steps,
               stop_strings=(cfg.task.stop,), batch_size=s.batch_size)

  def replace(self, **changes) -> "SamplingSettings":
    return dataclasses.replace(self, **changes)

  def greedy(self) -> "SamplingSettings":
    return self.replace(num_samples=1, temperature=0.0)


class SamplerLike(Protocol):
  """What stages need from a sampler (Sampler, or testing.ScriptedSampler)."""

  def for_model(self, lm) -> "SamplerLike": ...

  def generate(self, prompts: Sequence[str], settings: SamplingSettings, *, seed: int,
               prompt_offset: int = 0, progress: Callable[[int], None] | None = None
               ) -> list[list]: ...


@dataclasses.dataclass(frozen=True)
class Sampler:
  """`lm` (a model_lib.LM, its params on `mesh`) with its tokenizer `vocab`."""
  lm: object
  vocab: object
  mesh: object = None

  def for_model(self, lm) -> "Sampler":
    """The same tokenizer and mesh, another model (e.g. a round's fine-tune)."""
    return self if lm is self.lm else dataclasses.replace(self, lm=lm)

  def generate(self, prompts: Sequence[str], settings: SamplingSettings, *, seed: int,
               prompt_offset: int = 0, progress: Callable[[int], None] | None = None
               ) -> list[list]:
    """`settings.num_samples` `sampler.Sample`s per prompt ([prompt][sample])."""
    from lmsi_jax import sampler  # pylint: disable=g-import-not-at-top  (JAX)
    s = settings
    return sampler.generate(self.lm, self.vocab, prompts, num_samples=s.num_samples,
                            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                            max_decode_steps=s.max_decode_steps, stop_strings=s.stop_strings,
                            seed=seed, batch_size=s.batch_size, prompt_offset=prompt_offset,
                            progress=progress)
