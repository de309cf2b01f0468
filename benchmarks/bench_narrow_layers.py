"""The CPU paths for narrow layers (:mod:`hypersparse_jax.conv`) against plain XLA, whole models.

    python benchmarks/bench_narrow_layers.py      # -> benchmarks/results/narrow_layers.json

LeNet-5 and VGG-11-BN on Fashion-MNIST's 28×28×1 at widths that channel pruning leaves, from
a few filters to the dense quarter-width VGG-11: the eval-mode forward at batch 256 as the
models run by default on CPU (a grey-scale first layer of at most 8 filters as shifted
products, pools of at most 8 channels as four strided slices) and with
``lax.conv_general_dilated`` and Flax's pool throughout
(:func:`hypersparse_jax.conv.plain_convolutions`): ``bench_slim_speed.py``'s ``xla`` and
``xla_lax`` engines and its timing (repeats of all models and both paths interleaved in one
process, medians). ``ratio`` is plain / library: above 1 the library's path is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_slim_speed import time_variants, xla_forwards  # noqa: E402

LENET5 = [(1, 5, 50), (2, 5, 50), (4, 12, 100), (6, 16, 100), (8, 20, 200), (9, 20, 200),
          (10, 25, 250), (20, 50, 500)]
VGG11 = [(2, 4, 7, 7, 13, 13, 13, 13), (3, 5, 7, 8, 9, 14, 10, 12),
         (4, 8, 16, 16, 32, 32, 32, 32), (7, 13, 20, 20, 24, 29, 24, 34),
         (8, 16, 32, 32, 64, 64, 64, 64), (10, 20, 40, 40, 80, 80, 80, 80),
         (16, 32, 64, 64, 128, 128, 128, 128)]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "narrow_layers.json"))
  p.add_argument("--repeats", type=int, default=9)
  p.add_argument("--batch", type=int, default=256)
  args = p.parse_args(argv)
  import jax
  import jax.numpy as jnp
  from hypersparse_jax import models
  x = jnp.asarray(np.random.default_rng(0).random((args.batch, 28, 28, 1)), jnp.float32)
  variants, keys = {}, {}
  for name, widths in [("lenet5", w) for w in LENET5] + [("vgg11", w) for w in VGG11]:
    model = (models.LeNet5(widths=widths) if name == "lenet5"
             else models.VGG(depth=11, widths=widths, batch_norm=True))
    # time_variants wants one 'dense' entry: the dense quarter-width VGG-11
    key = "dense" if (name, widths) == ("vgg11", VGG11[-1]) else f"{name} {widths}"
    variants[key] = (model, model.init(jax.random.PRNGKey(0), x[:1], train=False))
    keys[(name, widths)] = key
  for model, variables in variants.values():  # both paths compute the same logits
    library, plain = xla_forwards(model, variables)
    np.testing.assert_allclose(library(x), plain(x), rtol=1e-4, atol=1e-4)
  # bench_slim_speed's timing: 'xla' is the library's path, 'xla_lax' plain XLA (conv and pool)
  timed = time_variants(variants, (28, 28, 1), args.repeats, False, batches=(args.batch,))
  rows = []
  for (name, widths), key in keys.items():
    t = timed[key]
    lib, plain = (t[e][f"batch_{args.batch}"]["median_ms"] for e in ("xla", "xla_lax"))
    rows.append({"model": name, "widths": list(widths), "library_ms": lib, "plain_ms": plain,
                 "ratio": plain / lib})
    print(json.dumps(rows[-1]))
  out = {"batch": args.batch, "repeats": args.repeats,
         "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                     "jax": jax.__version__, "load_average_start": os.getloadavg()},
         "results": rows}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as fh:
    json.dump(out, fh, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
