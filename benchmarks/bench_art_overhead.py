"""Benchmark: what ART and the fine-tune mask add to a training step (ResNet-32, VGG-19-BN).

For each model a fresh process holds only three jit-compiled steps (``plain``, ``art`` in its
regularisation phase, ``mask`` = the fine-tune step; see ``bench_training.py``) and reports:

* ``steps``: whole steps, round-robin with the order rotated, ratios per round (wall and process
  CPU time). On a shared 2-core machine single steps scatter by ±10 %, so these ratios carry a
  few per cent of noise even as medians of 16 rounds.
* ``update_only``: the optimiser update alone (``tx.update`` + ``apply_updates``), the only part
  in which the three steps differ (the forward and backward pass are the same program), timed
  from the same training states. ``step_ratio_from_update`` = ``1 + (update_art − update_plain)
  / step_plain`` is the overhead with that noise removed.

    python benchmarks/bench_art_overhead.py [--models resnet vgg] [--rounds 16] [--out f.json]
"""

from __future__ import annotations

import argparse
import time

import bench_training as bt
import report


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", choices=["resnet", "vgg"], default=["resnet", "vgg"])
  parser.add_argument("--rounds", type=int, default=16)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  out = {"benchmark": "art_overhead", "machine": bt.machine(),
         "config": {"batch": bt.BATCH, "sparsity": bt.SPARSITY,
                    "art": f"art({bt.SPARSITY}, steps_per_epoch={bt.STEPS_PER_EPOCH}, "
                           "warmup_epochs=0)",
                    "optimizer": "add_decayed_weights(1e-4) + sgd(0.1, momentum=0.9)",
                    "retain_freed_memory": True},
         "results": {}}
  for name in args.models:
    bt.log(f"== {name}")
    res = bt.run_overhead(name, args.rounds, 3000)
    if "update_only" in res:
      upd, step = res["update_only"]["update_ms"], res["step_ms"]["plain"]
      res["step_ratio_from_update"] = {k: 1 + (upd[k] - upd["plain"]) / step
                                       for k in ("art", "mask")}
    out["results"][{"resnet": "resnet32", "vgg": "vgg19_bn"}[name]] = res
  out["wall_s"] = time.perf_counter() - start
  report.emit(out, args.out)


if __name__ == "__main__":
  main()
