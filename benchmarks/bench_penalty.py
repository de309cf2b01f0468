"""Benchmark: exact HyperSparse gradient vs a sort-based one vs one fused elementwise pass.

Parameter trees are shaped like ResNet-32 (widths 32/64/128, 1,855,584 prunable weights) and
VGG-19-BN (20,024,000) for CIFAR-10. Figures are medians of repeated jit-compiled calls measured
in one run, so the ratios compare like with like on the same machine.

    python benchmarks/bench_penalty.py [--repeats 20] [--out results.json]

Prints one JSON object: configuration, per-size timings in ms, the ratios
``hypersparse_grad / fused_pass`` and ``sort_based / fused_pass``, the ratio with ART's
threshold hint, and whether the thresholds are bit-identical to the sort. With PyTorch installed
it also times the authors' HyperSparse term (:func:`reference_term_step`, forward + backward
through autograd, torch CPU) on the same weights in the same process, and reports
``ratio_reference_to_grad`` (reference time / ``hypersparse_grad`` time). Timings are
interleaved (every variant once per round) and the medians of the rounds are reported, with the
load average before and after each tree/sparsity.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import hypersparse_jax as hs
import report
from hypersparse_jax import penalties


def resnet32_shapes(num_classes=10):
  shapes = [(3, 3, 3, 32)]
  cin = 32
  for width in (32, 64, 128):
    for block in range(5):
      if cin != width:
        shapes.append((1, 1, cin, width))
      shapes += [(3, 3, cin, width), (3, 3, width, width)]
      cin = width
  shapes.append((128, num_classes))
  return shapes


def vgg19_shapes(num_classes=10):
  cfg = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]
  shapes, cin = [], 3
  for c in cfg:
    shapes.append((3, 3, cin, c))
    cin = c
  shapes.append((512, num_classes))
  return shapes


def make_params(shapes, seed=0):
  rng = np.random.default_rng(seed)
  params = {}
  for i, shape in enumerate(shapes):
    fan = int(np.prod(shape[:-1]))
    params[f"layer{i}"] = {"kernel": jnp.asarray(rng.standard_normal(shape, np.float32) *
                                                 np.sqrt(2.0 / fan)),
                           "bias": jnp.zeros(shape[-1], jnp.float32)}
  return params


def sort_based_grad(params, sparsity):
  """The reference's way: sort all |w| to find t, then the closed-form gradient."""
  leaves = [x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
            if hs.default_where(p, x)]
  a = jnp.concatenate([jnp.abs(x).reshape(-1) for x in leaves])
  t = jnp.sort(a)[int(np.floor(sparsity * a.shape[0]))]
  s = penalties.REFERENCE_SCALE / t
  ratio = jnp.sum(a) / jnp.sum(jnp.tanh(s * a))
  grads = jax.tree_util.tree_map_with_path(
      lambda p, x: (jnp.sign(x) * s * (1 - jnp.tanh(s * jnp.abs(x)) ** 2) * ratio
                    if hs.default_where(p, x) else jnp.zeros_like(x)), params)
  return grads, t


def fused_pass(params):
  return sum(jnp.sum(jnp.tanh(jnp.abs(x))) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
             if hs.default_where(p, x))


def reference_term_step(weights, prune_rate):
  """The authors' HyperSparse term, forward and backward, as their PyTorch code computes it.

  Re-states ``hyperSparse(model, prune_rate)`` of GreenAutoML4FAS/HyperSparse
  (``loss/HyperSparse.py``, the "add it to the loss" way their README and ``train.py`` use),
  written anew: every prunable weight tensor reshaped to a column and concatenated, squeezed to
  ``w``; ``a = |w|``; the threshold read from a full ``torch.sort`` of the detached ``a`` at
  index ``floor(prune_rate · n)``; ``s = 0.6585 / t``; ``u = tanh(s·a)``; the per-weight loss
  ``a · Σu / stop_grad(Σu) − |w|`` (``|w|`` taken a second time, as they do) summed to a scalar;
  then ``backward()`` through autograd into each weight's ``.grad`` (cleared before the call).
  ``weights``: list of ``torch.Tensor`` leaves with ``requires_grad``. Returns the loss.
  """
  import torch
  for p in weights:
    p.grad = None
  w = torch.cat([torch.reshape(p, [-1, 1]) for p in weights], dim=0).squeeze()
  magnitudes = w.abs()
  ordered = torch.sort(magnitudes.detach())[0]
  scale = 0.6585 / ordered[math.floor(prune_rate * ordered.shape[0])]
  squashed = torch.tanh(scale * magnitudes)
  per_weight = (magnitudes * torch.sum(squashed)).reshape(-1)
  per_weight = per_weight / squashed.sum().detach()
  per_weight = per_weight - w.abs()
  loss = per_weight.sum()
  loss.backward()
  return loss


def torch_weights(params):
  """The prunable leaves of ``params`` as torch leaf tensors (same values and shapes)."""
  try:
    import torch
  except ImportError:
    return None
  return [torch.tensor(np.asarray(x)).requires_grad_(True)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if hs.default_where(p, x)]


def time_torch(weights, prune_rate, repeats):
  reference_term_step(weights, prune_rate)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    reference_term_step(weights, prune_rate)
    times.append(time.perf_counter() - start)
  return float(np.median(times) * 1e3)


def timeit(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times) * 1e3)


def run(repeats: int, sparsities, sort_repeats: int, rounds: int = 3,
        reference: bool = True, reference_repeats: int = 2, models=("resnet32", "vgg19")):
  results = []
  for name, shapes in (("resnet32", resnet32_shapes()), ("vgg19", vgg19_shapes())):
    if name not in models:
      continue
    params = make_params(shapes)
    n = sum(int(np.prod(s)) for s in shapes)
    for sparsity in sparsities:
      grad = jax.jit(lambda p: penalties.hypersparse_grad_and_threshold(p, sparsity))
      t_exact = float(grad(params)[1])
      hinted = jax.jit(lambda p, h: penalties.hypersparse_grad_and_threshold(
          p, sparsity, threshold_hint=h))
      sort_grad = jax.jit(lambda p: sort_based_grad(p, sparsity))
      fused = jax.jit(fused_pass)
      a = np.concatenate([np.abs(np.asarray(x)).ravel() for x in
                          jax.tree_util.tree_leaves({k: v["kernel"] for k, v in params.items()})])
      t_numpy = float(np.sort(a)[int(np.floor(sparsity * a.size))])
      hint = jnp.float32(t_exact * 1.0005)  # as after one SGD step: t moves by a hair
      weights = torch_weights(params) if reference else None
      # Interleave the timings so a noisy neighbour hurts all of them alike; medians of rounds.
      load_before = os.getloadavg()
      t_fused, t_grad, t_hint, t_ref = [], [], [], []
      for _ in range(rounds):
        t_fused.append(timeit(fused, params, repeats=repeats))
        t_grad.append(timeit(grad, params, repeats=repeats))
        t_hint.append(timeit(hinted, params, hint, repeats=repeats))
        if weights is not None:
          t_ref.append(time_torch(weights, sparsity, reference_repeats))
      t_sort = timeit(sort_grad, params, repeats=sort_repeats) if sort_repeats else None
      f, g, h = (float(np.median(t)) for t in (t_fused, t_grad, t_hint))
      entry = {
          "model": name, "num_weights": n, "sparsity": sparsity,
          "fused_pass_ms": f, "hypersparse_grad_ms": g, "hypersparse_grad_hinted_ms": h,
          "sort_based_ms": t_sort,
          "ratio_grad_to_pass": g / f, "ratio_hinted_to_pass": h / f,
          "ratio_sort_to_pass": None if t_sort is None else t_sort / f,
          "rounds_ms": {"fused_pass": t_fused, "hypersparse_grad": t_grad,
                        "hypersparse_grad_hinted": t_hint},
          "threshold_identical_to_sort": t_exact == t_numpy,
      }
      if t_ref:
        # Same gradient? (the reference's autograd vs ours, on the same weights)
        reference_term_step(weights, sparsity)
        ours = [np.asarray(x, np.float64) for p, x in jax.tree_util.tree_flatten_with_path(
            grad(params)[0])[0] if hs.default_where(p, x)]
        diff = max(float(np.max(np.abs(w.grad.numpy() - o))) for w, o in zip(weights, ours))
        entry["reference_grad_max_abs_diff"] = diff
        entry["grad_max_abs"] = max(float(np.max(np.abs(o))) for o in ours)
        r = float(np.median(t_ref))
        entry.update({"reference_term_ms": r, "ratio_reference_to_grad": r / g,
                      "ratio_reference_to_hinted": r / h})
        entry["rounds_ms"]["reference_term"] = t_ref
      entry["load_average"] = {"before": load_before, "after": os.getloadavg()}
      results.append(entry)
      print(json.dumps(results[-1]), file=sys.stderr)
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--sort-repeats", type=int, default=2)
  parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.98])
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
  parser.add_argument("--reference-repeats", type=int, default=2,
                      help="calls of the PyTorch reference term per round (median)")
  parser.add_argument("--no-reference", dest="reference", action="store_false",
                      help="skip the PyTorch reference term")
  parser.add_argument("--models", nargs="+", default=["resnet32", "vgg19"])
  parser.add_argument("--out", default=None, help="also write the JSON here")
  parser.add_argument("--no-retain-host-memory", dest="retain_host_memory", action="store_false",
                      help="glibc's default malloc (see hypersparse_jax.host_memory)")
  args = parser.parse_args(argv)
  # As in training (the CLI's default): outputs reuse freed pages instead of faulting in new ones.
  retained = args.retain_host_memory and hs.host_memory.retain_freed_memory()
  report.emit({"benchmark": "hypersparse_grad",
               "machine": {**report.machine_info(), "retain_freed_memory": retained},
               "results": run(args.repeats, args.sparsities, args.sort_repeats, args.rounds,
                              args.reference, args.reference_repeats, args.models),
               "load_average_at_end": os.getloadavg()}, args.out)

if __name__ == "__main__":
  main()
