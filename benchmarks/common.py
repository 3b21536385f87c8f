"""Shared by the benchmark scripts (run as `python benchmarks/<name>.py`)."""

import platform


def cpu_model() -> str:
  """The CPU model name with its family and model numbers, as `lscpu` shows them (for
  recording results with the machine: "AMD EPYC" names several kinds of different speed)."""
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "cpu family", "model") and key.strip() not in fields:
          fields[key.strip()] = value.strip()
        if not line.strip() and fields:
          break
  except OSError:
    pass
  if "model name" in fields:
    extra = ", ".join(f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields)
    return f"{fields['model name']} ({extra})" if extra else fields["model name"]
  return platform.processor() or "unknown"
