"""PyTorch side of ``bench_training.py``: an eager CPU training step of the twin models.

Same architectures as the Flax models (:func:`hypersparse_jax.torch_models.create_torch_model`),
batch 64, cross-entropy, ``torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=1e-4)``,
``torch.set_num_threads(os.cpu_count())``. Importable (``make_torch_step``) or runnable alone::

    python benchmarks/torch_step.py --model resnet --steps 5 [--channels-last]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from hypersparse_jax.torch_models import create_torch_model


def make_torch_step(model_name: str, *, batch: int = 64, channels_last: bool = False, seed=0):
  """Returns ``step()`` running one eager training step (forward, backward, SGD update).

  The returned callable takes no arguments and returns the loss as a Python float (one host sync
  per step, as a training loop that logs the loss has).
  """
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(seed)
  if model_name == "resnet":
    model = create_torch_model("resnet", depth=32, num_classes=10)
  else:
    model = create_torch_model("vgg", depth=19, batch_norm=True, num_classes=10)
  model.train()
  rng = np.random.default_rng(seed)
  x = torch.from_numpy(rng.standard_normal((batch, 3, 32, 32), np.float32))
  y = torch.from_numpy(rng.integers(0, 10, batch)).long()
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()

  return step


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=["resnet", "vgg"], default="resnet")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--channels-last", action="store_true")
  args = parser.parse_args(argv)
  step = make_torch_step(args.model, channels_last=args.channels_last)
  for _ in range(args.warmup):
    step()
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  ms = float(np.median(times) * 1e3)
  print(json.dumps({"model": args.model, "channels_last": args.channels_last,
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "step_ms": ms, "images_per_s": 64 / ms * 1e3}))


if __name__ == "__main__":
  sys.exit(main())
