"""Benchmark: exact HyperSparse gradient vs a sort-based one vs one fused elementwise pass.

Parameter trees are shaped like ResNet-32 (widths 32/64/128, 1,855,584 prunable weights) and
VGG-19-BN (20,024,000) for CIFAR-10. Figures are medians of repeated jit-compiled calls measured
in one run, so the ratios compare like with like on the same machine.

    python benchmarks/bench_penalty.py [--repeats 20] [--out results.json]

Prints one JSON object: configuration, per-size timings in ms, the ratios
``hypersparse_grad / fused_pass`` and ``sort_based / fused_pass``, the ratio with ART's
threshold hint, and whether the thresholds are bit-identical to the sort.
"""

from __future__ import annotations

import argparse
import json
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
  s = penalties.SCALE / t
  ratio = jnp.sum(a) / jnp.sum(jnp.tanh(s * a))
  grads = jax.tree_util.tree_map_with_path(
      lambda p, x: (jnp.sign(x) * s * (1 - jnp.tanh(s * jnp.abs(x)) ** 2) * ratio
                    if hs.default_where(p, x) else jnp.zeros_like(x)), params)
  return grads, t


def fused_pass(params):
  return sum(jnp.sum(jnp.tanh(jnp.abs(x))) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
             if hs.default_where(p, x))


def timeit(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times) * 1e3)


def run(repeats: int, sparsities, sort_repeats: int):
  results = []
  for name, shapes in (("resnet32", resnet32_shapes()), ("vgg19", vgg19_shapes())):
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
      # Interleave the timings so a noisy neighbour hurts all of them alike.
      t_fused, t_grad, t_hint = [], [], []
      for _ in range(3):
        t_fused.append(timeit(fused, params, repeats=repeats))
        t_grad.append(timeit(grad, params, repeats=repeats))
        t_hint.append(timeit(hinted, params, hint, repeats=repeats))
      t_sort = timeit(sort_grad, params, repeats=sort_repeats)
      f, g, h = min(t_fused), min(t_grad), min(t_hint)
      results.append({
          "model": name, "num_weights": n, "sparsity": sparsity,
          "fused_pass_ms": f, "hypersparse_grad_ms": g, "hypersparse_grad_hinted_ms": h,
          "sort_based_ms": t_sort,
          "ratio_grad_to_pass": g / f, "ratio_hinted_to_pass": h / f,
          "ratio_sort_to_pass": t_sort / f,
          "threshold_identical_to_sort": t_exact == t_numpy,
      })
      print(json.dumps(results[-1]), file=sys.stderr)
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--sort-repeats", type=int, default=2)
  parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.98])
  parser.add_argument("--out", default=None, help="also write the JSON here")
  parser.add_argument("--no-retain-host-memory", dest="retain_host_memory", action="store_false",
                      help="glibc's default malloc (see hypersparse_jax.host_memory)")
  args = parser.parse_args(argv)
  # As in training (the CLI's default): outputs reuse freed pages instead of faulting in new ones.
  retained = args.retain_host_memory and hs.host_memory.retain_freed_memory()
  report.emit({"benchmark": "hypersparse_grad",
               "machine": {**report.machine_info(), "retain_freed_memory": retained},
               "results": run(args.repeats, args.sparsities, args.sort_repeats)}, args.out)

if __name__ == "__main__":
  main()
