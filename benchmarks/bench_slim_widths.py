"""Does a slimmed model's speed follow its FLOPs? Widths that are and are not multiples of 8.

    python benchmarks/bench_slim_widths.py      # -> benchmarks/results/slim_widths.json

Quarter-width VGG-11-BN on 28×28×1 (untrained weights: speed depends on the widths only) at the
widths the channel study's trained 50 % models have (``results/channels_fashion_mnist_vgg11_w0.25``,
seed 0: ART + group HyperSparse, network slimming, the filter methods), each beside the same
widths rounded to multiples of 8 (up for the ART and slimming models, down by one for the
filter methods' all-multiple widths). Timed like ``bench_slim_speed.py`` (its
``time_variants``: XLA and onnxruntime, repeats interleaved in one process, medians), batch
256 and 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_slim_speed import time_variants  # noqa: E402

WIDTHS = {
    "dense": (16, 32, 64, 64, 128, 128, 128, 128),
    "art_hypersparse_50": (14, 28, 43, 44, 40, 54, 45, 75),
    "art_hypersparse_50_up8": (16, 32, 48, 48, 40, 56, 48, 80),
    "slimming_50": (16, 32, 61, 58, 55, 38, 28, 55),
    "slimming_50_up8": (16, 32, 64, 64, 56, 40, 32, 56),
    "filters_50": (8, 16, 32, 32, 64, 64, 64, 64),
    "filters_50_minus1": (7, 15, 31, 31, 63, 63, 63, 63),
}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "slim_widths.json"))
  p.add_argument("--repeats", type=int, default=15)
  args = p.parse_args(argv)
  import jax
  import numpy as np
  from hypersparse_jax import models
  x = np.zeros((1, 28, 28, 1), np.float32)
  variants = {}
  for key, widths in WIDTHS.items():
    m = models.VGG(depth=11, widths=widths, batch_norm=True)
    variants[key] = (m, m.init(jax.random.PRNGKey(0), x, train=False))
  load = os.getloadavg()
  timed = time_variants(variants, (28, 28, 1), args.repeats, True)
  for key, widths in WIDTHS.items():
    timed[key]["widths"] = list(widths)
    print(key, widths, {e: round(timed[key][e]["batch_256"]["median_ms"], 2)
                        for e in ("xla", "onnxruntime")})
  out = {"repeats": args.repeats, "machine": {
      "cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
      "load_average_start": load, "load_average_end": os.getloadavg()}, "variants": timed}
  with open(args.out, "w", encoding="utf-8") as fh:
    json.dump(out, fh, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
