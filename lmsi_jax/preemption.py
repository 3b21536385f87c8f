"""Preemption: SIGTERM (TPU VMs, SLURM) and SIGINT stop a run without losing work.

`preemptible()` wraps a run: a signal raises `Preempted` at once, except inside a
`deferred_stop()` loop (training, vote_rl), which only records it; the loop polls
`stop_requested()` at a point where it can save, saves its current step, then calls
`stop_after_save`. A second signal while the first is pending stops at once. The
entry point turns `Preempted` into one line and exit status 128 + signal.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class Preempted(Exception):
  """SIGTERM/SIGINT stopped the run (after training saved its current step)."""

  def __init__(self, signum: int, msg: str):
    super().__init__(msg)
    self.signum = signum


class _Signals:
  received = 0          # the first SIGTERM/SIGINT seen while a training loop runs
  training = 0          # nesting depth of running training loops


def _handler(signum, frame):
  del frame
  name = signal.Signals(signum).name
  if _Signals.training and not _Signals.received:
    _Signals.received = signum        # the loop saves this step, then raises Preempted
    logging.warning("%s received: saving a checkpoint at the current step", name)
    return
  raise Preempted(signum, f"preempted by {name}: finished stages, checkpoints and sample "
                          "shards are kept; rerun the same command to resume")


@contextlib.contextmanager
def preemptible():
  """SIGTERM and SIGINT raise `Preempted`: at once outside a training loop, and inside
  one after it saved a checkpoint at its current step. Main thread only (elsewhere a no-op)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  old = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for s, h in old.items():
      signal.signal(s, h)
    if not any(h is _handler for h in old.values()):
      _Signals.received = 0


@contextlib.contextmanager
def deferred_stop():
  """A loop that can save mid-way (training, vote_rl): inside, SIGTERM/SIGINT only record
  the signal; the loop polls `stop_requested()` at a point where it can save, saves its
  current step, then calls `stop_after_save`."""
  with preemptible():
    _Signals.training += 1
    try:
      yield
    finally:
      _Signals.training -= 1


def stop_requested() -> int:
  """The signal to stop on (0: none), agreed by every process (one allgather per step when
  there are several: a host that saved alone would leave the others in a collective)."""
  sig = _Signals.received
  if jax.process_count() > 1:
    sig = int(np.max(multihost_utils.process_allgather(np.array([sig], np.int32))))
  return sig


def stop_after_save(signum: int, ckpt, saved: str):
  """Waits for `ckpt`'s pending save, then raises `Preempted` with one line: `saved` (what
  was saved, e.g. "round_1/train saved a checkpoint at step 40 of 300") and where."""
  ckpt.wait()
  raise Preempted(signum, f"preempted by {signal.Signals(signum).name}: {saved} in "
                          f"{ckpt.directory}; rerun the same command to resume")
