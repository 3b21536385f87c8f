"""The persistent XLA compilation cache (`config.compile_cache`), on by default.

A re-run of a command (another seed, an override, a resumed run) loads the programs it
compiled before instead of compiling them again: on a 2-core AMD EPYC (family 25, model 1) a
re-run of the smoke run takes 0.79x the wall time of one without the cache (BENCHMARKS.md).
Executables are exact: a cached program computes the same floats as a fresh compile, so
results do not depend on the cache.

As MaxText's `jax_cache_dir`. XLA:CPU compiles for the host's instruction set, and JAX's cache
key names the platform ("cpu"), not the CPU, so a directory shared by different machines (a
home directory on NFS) gets one subdirectory per CPU model and feature set. An explicit
`JAX_COMPILATION_CACHE_DIR` in the environment wins over the config (the tests set it).
"""

from __future__ import annotations

import hashlib
import os
import platform

import jax

from lmsi_jax import fileio

ENV = "JAX_COMPILATION_CACHE_DIR"


def host_cpu_key() -> str:
  """'cpu-<12 hex>': a digest of this host's CPU model and feature flags."""
  text = platform.machine() + platform.processor()
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      fields = {}
      for line in f:
        k, _, v = line.partition(":")
        fields.setdefault(k.strip(), v.strip())
    text += fields.get("model name", "") + fields.get("flags", fields.get("Features", ""))
  except OSError:   # not Linux: the platform strings above
    pass
  return "cpu-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_dir(path: str) -> str:
  """The directory `path` (~ expanded) resolves to on this host; '' when disabled."""
  if not path:
    return ""
  return fileio.join(os.path.expanduser(path), host_cpu_key())


def enable(cc) -> str:
  """Turns the cache on as `cc` (config.compile_cache: dir, min_compile_time_secs) says,
  before the first compilation of the process. Returns the directory in use ('' = none)."""
  if os.environ.get(ENV):
    return os.environ[ENV]
  d = cache_dir(cc.dir)
  if d:
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(cc.min_compile_time_secs))
  return d
