"""The persistent compilation cache (lmsi_jax/compile_cache.py)."""
import json
import os
import subprocess
import sys

import ml_collections

from lmsi_jax import compile_cache
from lmsi_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles one program with the cache of config.compile_cache.dir=argv[1]; prints the
# directory, the cache hits and the result.
_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, ml_collections
from jax import monitoring
from lmsi_jax import compile_cache
hits = []
monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
d = compile_cache.enable(ml_collections.ConfigDict(dict(dir=sys.argv[1], min_compile_time_secs=0.0)))
x = jnp.arange(64, dtype=jnp.float32).reshape(8, 8)
y = jax.jit(lambda a: jnp.tanh(a @ a.T / 64.0).sum(0))(x)
print(json.dumps({"dir": d, "hits": len(hits), "y": [float(v) for v in y]}))
"""


def _run(path: str, env_dir: str | None = None) -> dict:
  env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV}
  if env_dir is not None:
    env[compile_cache.ENV] = env_dir
  out = subprocess.run([sys.executable, "-c", _SCRIPT, path], env=env, cwd=REPO, check=True,
                       capture_output=True, text=True, timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_dir_has_one_subdirectory_per_cpu(monkeypatch):
  key = compile_cache.host_cpu_key()
  assert key.startswith("cpu-") and len(key) == 16 and key == compile_cache.host_cpu_key()
  monkeypatch.setenv("HOME", "/home/u")
  assert compile_cache.cache_dir("~/.cache/x") == f"/home/u/.cache/x/{key}"
  assert compile_cache.cache_dir("gs://b/cache/") == f"gs://b/cache/{key}"
  assert compile_cache.cache_dir("") == ""


def test_default_config_enables_it():
  c = config_lib.base_config()
  assert c.compile_cache.dir and c.compile_cache.min_compile_time_secs >= 0
  c.compile_cache.min_compile_time_secs = -1.0
  try:
    config_lib.validate(c)
  except ValueError as e:
    assert "compile_cache.min_compile_time_secs" in str(e)
  else:
    raise AssertionError("a negative min_compile_time_secs was accepted")


def test_environment_variable_wins(monkeypatch, tmp_path):
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
  cc = ml_collections.ConfigDict(dict(dir=str(tmp_path / "cfg"), min_compile_time_secs=0.0))
  assert compile_cache.enable(cc) == str(tmp_path / "env")
  assert not (tmp_path / "cfg").exists()


def test_a_second_process_loads_the_program_and_gets_the_same_floats(tmp_path):
  first = _run(str(tmp_path / "xla"))
  assert first["dir"] == os.path.join(str(tmp_path / "xla"), compile_cache.host_cpu_key())
  assert first["hits"] == 0 and os.listdir(first["dir"])      # compiled, then written
  second = _run(str(tmp_path / "xla"))
  assert second["hits"] >= 1 and second["y"] == first["y"]     # loaded, same result
  off = _run("")                                               # dir="" : no cache at all
  assert off["dir"] == "" and off["hits"] == 0 and off["y"] == first["y"]
