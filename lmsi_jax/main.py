"""Runs the LMSI self-improvement pipeline.

  python -m lmsi_jax.main --config=configs/demo.py[:smoke] --workdir=DIR [--config.a.b=value ...]
                         [--restart_from=STAGE] [--debug]
  python -m lmsi_jax.main --config=configs/demo.py --workdir=DIR --seeds=0-4   # DIR/seed_<s>/ each

Intentionally thin: `config.mode` picks the runner (lmsi_jax.modes; the LMSI
pipeline is lmsi_jax.rounds, importable from a notebook). Re-running the same
command resumes where a killed or preempted run stopped; a changed config is
refused (lmsi_jax/store.py) unless --restart_from names the first stage to
redo (it and the stages recorded after it are removed first).

A user error (a bad config value, a missing file, a refused store: ValueError,
FileNotFoundError, store.StoreError, ...) prints one line naming the key or
file and exits with status 2; --debug (or LMSI_DEBUG=1) shows its traceback.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/<name>.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (local path or gs://...).")
_RESTART = flags.DEFINE_string(
    "restart_from", "", "A stage of DIR/stages.json (e.g. round_1/train) to start over, with "
    "every stage recorded after it; their files are removed first. Use once: a requeued "
    "command that keeps the flag would start that stage over again.")
_SEEDS = flags.DEFINE_string(
    "seeds", None, "Run the config once per seed ('0-4' or '0,1,2'), each in WORKDIR/seed_<s>/, "
    "then write WORKDIR/aggregate.{json,md} and accuracy.png (mean ± sd; lmsi_jax/multiseed.py).")
_DEBUG = flags.DEFINE_bool(
    "debug", False, "Show the full traceback of a user error (config, data, store) instead of "
    "one line; LMSI_DEBUG=1 does the same.")

# What a user can fix from the message alone (one line, no traceback without --debug).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError)


def debug_enabled() -> bool:
  return _DEBUG.value or os.environ.get("LMSI_DEBUG", "") not in ("", "0")


def _quiet_orbax(record) -> bool:
  """Orbax logs a dozen INFO lines per checkpoint save; the CLI keeps its warnings only."""
  return record.levelno >= 30 or f"{os.sep}orbax{os.sep}" not in record.pathname


def parse_flags(argv):
  """absl's parser, with config-override mistakes reported as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"lmsi_jax: error: {e}")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    msg = " ".join(str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'").split())
    sys.exit(f"lmsi_jax: error: bad config override among {bad}: {msg}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  cfg = _CONFIG.value
  logging.get_absl_logger().addFilter(_quiet_orbax)
  try:
    return _run(cfg)
  except USER_ERRORS as e:     # store.StoreError is a ValueError
    if debug_enabled():
      raise
    msg = str(e).replace("\n", " ") or type(e).__name__
    print(f"lmsi_jax: error: {msg}", file=sys.stderr)
    return 2


def _run(cfg) -> int:
  from lmsi_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from lmsi_jax import distributed  # pylint: disable=g-import-not-at-top
  from lmsi_jax import multiseed  # pylint: disable=g-import-not-at-top
  from lmsi_jax import preemption  # pylint: disable=g-import-not-at-top
  from lmsi_jax import wandb_logger  # pylint: disable=g-import-not-at-top
  config_lib.validate(cfg)
  from lmsi_jax import compile_cache  # pylint: disable=g-import-not-at-top
  compile_cache.enable(cfg.compile_cache)    # before anything compiles
  seeds = multiseed.parse_seeds(_SEEDS.value) if _SEEDS.value is not None else None
  distributed.initialize(cfg.distributed)
  from lmsi_jax import modes  # pylint: disable=g-import-not-at-top
  from lmsi_jax import store  # pylint: disable=g-import-not-at-top
  if seeds and _RESTART.value:
    raise ValueError("--restart_from names a stage of one workdir; with --seeds, run it on "
                     "WORKDIR/seed_<s> without --seeds")
  pipeline = None
  if not seeds:
    # Lock, restart, check every recorded stage against cfg, record DIR/config.json.
    store.open_store(_WORKDIR.value, cfg, restart_from=_RESTART.value)
    pipeline = modes.build(cfg, _WORKDIR.value)
  logging.info("overrides: %s", config_flags.get_override_values(flags.FLAGS["config"]))
  try:
    # SIGTERM/SIGINT: training saves its step, then exits here. W&B: only with a project.
    with preemption.preemptible(), wandb_logger.session(cfg, _WORKDIR.value):
      if seeds:
        agg = multiseed.run_seeds(cfg, _WORKDIR.value, seeds)
        if distributed.is_main_process():
          print(multiseed.to_markdown(agg))
        return 0
      report = pipeline.run()
  except preemption.Preempted as e:
    print(f"lmsi_jax: {e}", file=sys.stderr)
    return 128 + e.signum
  if distributed.is_main_process():
    print(pipeline.to_markdown(report))
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
