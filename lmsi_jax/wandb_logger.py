"""Weights & Biases beside TensorBoard (optional; off unless config.logging.wandb.project is set).

  python -m lmsi_jax.main --config=configs/demo.py --workdir=DIR \
      --config.logging.wandb.project=lmsi --config.logging.wandb.mode=offline

`session(cfg, workdir)` opens one run for the invocation (main.py); while it is
open, on the main process:

- `log_scalars(desc, metrics, step)`: every training scalar train.py writes to
  TensorBoard (`{desc}/{key}`, e.g. round_1/train/loss), with `{desc}/step` as
  that stage's x-axis (each stage counts its steps from 0);
- `log_round(round_dir, summary)`: a round's numeric summary (round/greedy_acc,
  round/pseudo_label_precision, ... against round/index) and a wandb.Table
  `round_{r}/paths` built from the round's files on disk: for the first
  `table_questions` questions of round_r/samples, every sampled path with the
  question, its vote (votes.jsonl: majority answer, count, share, correct) and
  whether voting kept it (pseudo_labels.jsonl's path_index).

Without a session every hook returns at once and wandb is never imported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os

from lmsi_jax import fileio
from lmsi_jax.data import jsonl

MODES = ("online", "offline", "disabled")
TABLE_COLUMNS = ("round", "question_id", "question", "path_index", "path", "stop_reason",
                 "vote_answer", "vote_count", "vote_share", "vote_correct", "kept")

_run = None                 # the open wandb run (main process only)
_step_metrics: set[str] = set()


def settings(cfg):
  """config.logging.wandb, or None when no project is set."""
  w = cfg.logging.wandb
  return w if w.project else None


def validate(cfg, check) -> None:
  """Config checks (lmsi_jax.config.validate's `check(ok, key, msg)`)."""
  w = cfg.logging.wandb
  check(w.mode in MODES, "logging.wandb.mode", f"expected one of {MODES}")
  check(w.table_questions >= 0, "logging.wandb.table_questions", "must be >= 0 (0 = no table)")
  if w.project:
    try:
      import wandb  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
      ok = True
    except ImportError:
      ok = False
    check(ok, "logging.wandb.project", "needs the wandb package (pip install wandb)")


def active() -> bool:
  return _run is not None


@contextlib.contextmanager
def session(cfg, workdir: str):
  """One wandb run for this invocation when config.logging.wandb.project is set."""
  global _run
  w = settings(cfg)
  from lmsi_jax import distributed  # pylint: disable=g-import-not-at-top
  if w is None or not distributed.is_main_process() or _run is not None:
    yield None
    return
  import wandb  # pylint: disable=g-import-not-at-top
  run = wandb.init(project=w.project, entity=w.entity or None, name=w.name or None, mode=w.mode,
                   dir=w.dir or None, config=json.loads(cfg.to_json()),
                   notes=f"workdir: {os.path.abspath(workdir)}")
  run.define_metric("round/index")
  run.define_metric("round/*", step_metric="round/index")
  _run = run
  _step_metrics.clear()
  try:
    yield run
  finally:
    _run = None
    run.finish()


def _numeric(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def log_scalars(desc: str, metrics: dict, step: int) -> None:
  """The scalars train.py writes to TensorBoard at `step` of stage `desc`."""
  if _run is None:
    return
  if desc not in _step_metrics:
    _step_metrics.add(desc)
    _run.define_metric(f"{desc}/step")
    _run.define_metric(f"{desc}/*", step_metric=f"{desc}/step")
  _run.log({f"{desc}/step": int(step), **{f"{desc}/{k}": float(v) for k, v in metrics.items()}})


def round_table_rows(round_dir: str, round_index: int, max_questions: int) -> list[list]:
  """Rows of the round's paths table (TABLE_COLUMNS) from its files on disk."""
  from lmsi_jax import pseudo_labels as pl  # pylint: disable=g-import-not-at-top
  try:
    samples = pl.read_samples(os.path.join(round_dir, "samples"))
  except FileNotFoundError:
    return []
  samples = samples[:max_questions]
  read = lambda name: (jsonl.read_jsonl(os.path.join(round_dir, name))
                       if fileio.exists(os.path.join(round_dir, name)) else [])
  votes = {v["id"]: v for v in read("votes.jsonl")}
  kept: dict = {}
  for rec in read("pseudo_labels.jsonl"):
    kept.setdefault(rec["id"], set()).add(rec.get("path_index"))
  rows = []
  for rec in samples:
    v = votes.get(rec["id"], {})
    for j, s in enumerate(rec["samples"]):
      rows.append([round_index, str(rec["id"]), rec["question"], j, s["text"],
                   s.get("stop_reason"), v.get("answer"), v.get("count"), v.get("share"),
                   v.get("correct"), j in kept.get(rec["id"], ())])
  return rows


def log_round(cfg, round_dir: str, summary: dict) -> None:
  """A finished round: its numeric summary and its paths table."""
  if _run is None:
    return
  r = int(summary["round"])
  scalars = {f"round/{k}": float(v) for k, v in summary.items() if k != "round" and _numeric(v)}
  payload = {"round/index": r, **scalars}
  n = cfg.logging.wandb.table_questions
  if n:
    import wandb  # pylint: disable=g-import-not-at-top
    try:
      rows = round_table_rows(round_dir, r, n)
    except (OSError, ValueError, KeyError) as e:   # logging never stops a run
      logging.warning("wandb: round %d paths table skipped: %s", r, e)
      rows = []
    if rows:
      payload[f"round_{r}/paths"] = wandb.Table(columns=list(TABLE_COLUMNS), data=rows)
  _run.log(payload)
