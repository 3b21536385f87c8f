"""What `python -m lmsi_jax.main` runs: `config.mode` names a runner.

A runner is a class built as `Runner(cfg, workdir)` (config and data errors
raise ValueError here, before any work) whose `run()` returns the report
dict and writes it under the workdir, and whose `to_markdown(report)` is
what the command line prints (report.py's sections plus the runner's own). Modules are imported only when their
mode is selected. To add a mode, add one line here.
"""

from __future__ import annotations

import importlib

MODES = {
    "lmsi": "lmsi_jax.rounds:Pipeline",              # base -> LMSI rounds -> oracle/control arms
    "format_ablation": "lmsi_jax.ablation:FormatAblation",   # LMSI Table 5 on one base
    "strategies": "lmsi_jax.ablation:StrategyComparison",    # rounds.init continue vs restart
    "w2s": "lmsi_jax.w2s:W2S",                        # teacher labels -> student (weak-to-strong)
    "learners": "lmsi_jax.learners.compare:LearnerComparison",   # sft vs vote_rl vs vote_dpo
}


def build(cfg, workdir: str, **kw):
  """The configured mode's runner (call `.run()` on it); `kw` go to its constructor (e.g.
  `sampler=testing.ScriptedSampler(...)`)."""
  if cfg.mode not in MODES:
    raise ValueError(f"config.mode={cfg.mode!r}: expected one of {sorted(MODES)}")
  module, name = MODES[cfg.mode].split(":")
  return getattr(importlib.import_module(module), name)(cfg, workdir, **kw)
