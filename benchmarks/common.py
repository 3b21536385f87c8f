"""Shared by the benchmark scripts (run as `python benchmarks/<name>.py`)."""

import platform


def cpu_model() -> str:
  """The CPU model name (for recording results with the machine)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"
