"""What every benchmark prints: the machine it ran on, and the JSON report (stdout + --out)."""

from __future__ import annotations

import json
import os
import platform
import time


def machine_info() -> dict:
  """Platform, CPU count, Python/JAX/PyTorch versions, device, XLA flags, load at start."""
  import jax
  device = jax.devices()[0]
  info = {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__, "backend": jax.default_backend(),
          "device": f"{device.platform}:{device.device_kind}", "device_count": jax.device_count(),
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
  try:
    import torch
    info["torch"] = torch.__version__
  except ImportError:
    pass
  try:
    info["load_average_at_start"] = os.getloadavg()
  except OSError:
    pass
  return info


def emit(report: dict, out_path: str | None = None) -> None:
  """Prints ``report`` (with today's date) as JSON and writes it to ``out_path`` if given."""
  report.setdefault("date", time.strftime("%Y-%m-%d"))
  text = json.dumps(report, indent=2)
  print(text)
  if out_path:
    with open(out_path, "w") as f:
      f.write(text + "\n")
