"""How often the two ART window rules decide differently, on seeded random accuracy sequences.

    python benchmarks/controller_rules.py --out benchmarks/results/controller_rules.json

Runs ``ARTController(rule='reference')`` and ``ARTController(rule='best_mean')`` on the same
sequences of (pruned accuracy, dense accuracy) per regularisation epoch and counts the
sequences where they stop at another epoch or remember another entry (the one fine-tuning
starts from). Two kinds of sequence, ``--sequences`` of each, window b = ``--window``, at most
``--max-epochs`` epochs:

* ``uniform``: pruned and dense accuracy independent and uniform on the multiples of 1/64 in
  [0, 1] (the property test's inputs in ``tests/test_controller.py``).
* ``trend``: the shape of a real run: pruned accuracy rising from about 0.5 by 0.03 per epoch
  with Gaussian noise (std 0.03), dense accuracy about 0.95 (noise std 0.01), clipped to [0, 1].

Host-side Python only (no JAX computation); takes a few seconds.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from hypersparse_jax.controller import ARTController


def decide(rule, pruned, dense, window, max_epochs):
  """(stop epoch, remembered epoch) of one controller over one sequence."""
  ctl = ARTController(window=window, max_epochs=max_epochs, rule=rule)
  for epoch, (p, d) in enumerate(zip(pruned, dense)):
    if ctl.update(epoch, float(p), float(d)).stop:
      return epoch, ctl.best.epoch
  raise AssertionError("max_epochs must end every sequence")


def sequences(kind, rng, n, max_epochs):
  if kind == "uniform":
    pruned = rng.integers(0, 65, size=(n, max_epochs)) / 64
    dense = rng.integers(0, 65, size=(n, max_epochs)) / 64
  else:
    e = np.arange(max_epochs)
    pruned = 0.5 + 0.03 * e + rng.normal(0.0, 0.03, size=(n, max_epochs))
    dense = 0.95 + rng.normal(0.0, 0.01, size=(n, max_epochs))
  return np.clip(pruned, 0.0, 1.0), np.clip(dense, 0.0, 1.0)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sequences", type=int, default=10000)
  p.add_argument("--window", type=int, default=1)
  p.add_argument("--max-epochs", type=int, default=30)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  report = dict(benchmark="controller_rules", settings=vars(args).copy(), results={})
  for kind in ("uniform", "trend"):
    rng = np.random.default_rng([args.seed, ("uniform", "trend").index(kind)])
    pruned, dense = sequences(kind, rng, args.sequences, args.max_epochs)
    stop_differs = kept_differs = either = 0
    for ps, ds in zip(pruned, dense):
      a = decide("reference", ps, ds, args.window, args.max_epochs)
      b = decide("best_mean", ps, ds, args.window, args.max_epochs)
      stop_differs += a[0] != b[0]
      kept_differs += a[1] != b[1]
      either += a != b
    n = args.sequences
    report["results"][kind] = dict(
        sequences=n, stop_epoch_differs=stop_differs / n, remembered_epoch_differs=kept_differs / n,
        decision_differs=either / n)
  text = json.dumps(report, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
