"""Multi-host start-up: one `initialize(cfg.distributed)` for every launcher.

- TPU pods / GKE / SLURM / Open MPI: `jax.distributed.initialize()` detects
  the cluster from its environment (no arguments needed).
- GPU clusters without a detector, and CPU multi-process runs (tests,
  launch/local_multiprocess.sh): pass `coordinator_address` ("host:port"),
  `num_processes` and `process_id` in config, or set the environment
  variables LMSI_COORDINATOR_ADDRESS, LMSI_NUM_PROCESSES, LMSI_PROCESS_ID
  (and LMSI_CPU_DEVICES for the CPU devices of each process).
- A single process (a laptop, one GPU, Colab) does nothing.

Must run before the first JAX computation. In a multi-process run it also
prefixes every log line with `[process i/N]` and makes failures end the job
instead of hanging it:

- A process killed outright: its peers' next collective may fail at once (on
  CPU, gloo sees the closed connection); in any case the coordination service
  notices the missing heartbeats within `heartbeat_timeout_seconds` and
  terminates every task ("...distributed service detected fatal errors").
- A process whose Python code raises: a normal exit would wait in jax's
  shutdown barrier (5 min) while its peers block in a collective that it
  never joins. The installed `sys.excepthook` prints the traceback and leaves
  with `os._exit(1)` instead, so the peers fail fast as above.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

import jax

_ENV = ("LMSI_COORDINATOR_ADDRESS", "LMSI_NUM_PROCESSES", "LMSI_PROCESS_ID")


def _cluster_detected() -> bool:
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts


def initialize(dcfg=None) -> bool:
  """Initialises jax.distributed when a multi-process run is configured or detected.

  Returns True when this is a multi-process run.
  """
  addr = (dcfg.coordinator_address if dcfg is not None else "") or os.environ.get(_ENV[0], "")
  nproc = (dcfg.num_processes if dcfg is not None else 0) or int(os.environ.get(_ENV[1], "0"))
  pid = dcfg.process_id if dcfg is not None and dcfg.process_id >= 0 else int(
      os.environ.get(_ENV[2], "-1"))
  timeout = int(dcfg.initialization_timeout) if dcfg is not None else 300
  heartbeat = int(dcfg.heartbeat_timeout_seconds) if dcfg is not None else 0
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  cpu_devices = int(os.environ.get("LMSI_CPU_DEVICES", "0"))
  if cpu_devices:   # CPU multi-process runs: devices per process, before initialize
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  kw = dict(initialization_timeout=timeout)
  if heartbeat:
    kw["heartbeat_timeout_seconds"] = heartbeat
  if addr:
    if nproc < 1 or pid < 0:
      raise ValueError("config.distributed.coordinator_address is set: also set "
                       "distributed.num_processes and distributed.process_id")
    if not 0 <= pid < nproc:
      raise ValueError(f"config.distributed.process_id={pid} not in [0, {nproc})")
    jax.distributed.initialize(coordinator_address=addr, num_processes=nproc, process_id=pid, **kw)
  elif _cluster_detected():
    jax.distributed.initialize(**kw)
  else:
    return False
  if jax.process_count() > 1:
    _label_logs(f"[process {jax.process_index()}/{jax.process_count()}]")
    sys.excepthook = _exit_now_on_error(sys.excepthook, jax.process_index(), jax.process_count())
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return jax.process_count() > 1


class _Prefix(logging.Filter):
  """Prepends `[process i/N]` to each record's message (once per record)."""

  def __init__(self, prefix: str):
    super().__init__()
    self.prefix = prefix

  def filter(self, record: logging.LogRecord) -> bool:
    if not getattr(record, "lmsi_prefixed", False):
      record.msg, record.lmsi_prefixed = f"{self.prefix} {record.msg}", True
    return True


def _label_logs(prefix: str) -> None:
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  handlers = set(logging.getLogger().handlers) | {absl_logging.get_absl_handler()}
  for h in handlers:
    if not any(isinstance(f, _Prefix) for f in h.filters):
      h.addFilter(_Prefix(prefix))


def _exit_now_on_error(prev_hook, index: int, count: int):
  """An excepthook that reports the error and exits without jax's shutdown barrier."""
  def hook(etype, value, tb):
    try:
      prev_hook(etype, value, tb)
    except Exception:  # pylint: disable=broad-except
      traceback.print_exception(etype, value, tb)
    print(f"lmsi_jax: error: [process {index}/{count}] "
          f"{etype.__name__}: {value}\n(multi-process run: exiting now so the other processes "
          "fail fast; if this is a collective/gloo/distributed error, another process probably "
          "died first: see its log)", file=sys.stderr)
    for f in (sys.stdout, sys.stderr):
      try:
        f.flush()
      except Exception:  # pylint: disable=broad-except
        pass
    logging.shutdown()
    os._exit(1)
  return hook


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (e.g. before reading a file process 0 wrote)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def is_main_process() -> bool:
  return jax.process_index() == 0


def write_json(path: str, obj) -> None:
  """Process 0 writes `obj` as JSON atomically; the other processes do nothing."""
  if is_main_process():
    from lmsi_jax import fileio  # pylint: disable=g-import-not-at-top
    fileio.write_json_atomic(path, obj)


def agreed(value: int) -> int:
  """Process 0's `value` (an int), on every process: the one multi-host agreement path.

  Stage-skipping decisions must be identical on all hosts, or one host would
  enter a collective (sampling, training) that the others skip.
  """
  if jax.process_count() == 1:
    return int(value)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(multihost_utils.broadcast_one_to_all(np.int32(value if is_main_process() else 0)))


def agreed_exists(path: str) -> bool:
  """Whether `path` exists, as process 0 sees it, on every process (see `agreed`)."""
  from lmsi_jax import fileio  # pylint: disable=g-import-not-at-top
  return bool(agreed(int(fileio.exists(path)) if is_main_process() else 0))
