"""Benchmark: Winograd F(2×2, 3×3) against the current CPU convolution, one layer at a time.

For the stride-1 3×3 layers of ResNet-32 (batch 64: 32×32×32→32, 16×16×64→64, 8×8×128→128)
it times forward + backward (``jax.vjp``: input and kernel gradient) of

* ``current``: :func:`hypersparse_jax.conv.conv_general_dilated` (XLA's forward and input
  gradient, matmul kernel gradient on CPU);
* ``winograd``: :func:`hypersparse_jax.conv.winograd_conv3x3` (forward as 16 batched matrix
  products between transformed 4×4 input tiles and transformed kernels; its gradients by
  autodiff, again batched matrix products and the transposed transforms);
* ``winograd_rows``: Winograd forward, the input gradient as the Winograd convolution of the
  output gradient with the rotated kernel, the current row-wise matmul kernel gradient;
* ``xla``: ``lax.conv_general_dilated`` with XLA's own gradients.

All variants of a layer run interleaved, round-robin, in one process; figures are medians over
rounds and the ratios medians of per-round ratios (on a shared machine, neighbours slow all
variants of a round alike). Also the largest deviation of the Winograd variants' results (relative to the largest entry) from
``lax.conv_general_dilated`` at ``precision='highest'``.

    python benchmarks/bench_winograd.py [--rounds 9] [--out winograd.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import report
from hypersparse_jax import conv

LAYERS = ((64, 32, 32, 32), (64, 16, 64, 64), (64, 8, 128, 128))  # batch, size, in, out
_NHWC = ("NHWC", "HWIO", "NHWC")


def log(*args):
  print(*args, file=sys.stderr, flush=True)


def fwd_bwd(fn):
  def run(x, w, dy):
    y, vjp = jax.vjp(fn, x, w)
    dx, dw = vjp(dy)
    return y, dx, dw
  return jax.jit(run)


@jax.custom_vjp
def winograd_rows(x, w):
  """Winograd forward and input gradient, the current (row-wise matmul) kernel gradient."""
  return conv.winograd_conv3x3(x, w)


def _winograd_rows_fwd(x, w):
  return conv.winograd_conv3x3(x, w), (x, w)


def _winograd_rows_bwd(residuals, dy):
  x, w = residuals
  # Stride 1, padding 1: the input gradient is the same convolution of dy with the kernel
  # rotated by 180° and its channel axes swapped.
  dx = conv.winograd_conv3x3(dy, jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2)))
  dw = conv._kernel_grad_rows(x, dy, 3, 3, ((1, 1), (1, 1)))
  return dx, dw.astype(w.dtype)


winograd_rows.defvjp(_winograd_rows_fwd, _winograd_rows_bwd)


def variants():
  same = ((1, 1), (1, 1))
  return {
      "current": lambda x, w: conv.conv_general_dilated(x, w, (1, 1), same,
                                                        dimension_numbers=_NHWC),
      "winograd": conv.winograd_conv3x3,
      "winograd_rows": winograd_rows,
      "xla": lambda x, w: lax.conv_general_dilated(x, w, (1, 1), same, dimension_numbers=_NHWC),
  }


def bench_layer(shape, rounds):
  n, size, cin, cout = shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, size, size, cin), np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) * np.sqrt(2 / (9 * cin)))
  dy = jnp.asarray(rng.standard_normal((n, size, size, cout), np.float32))
  fns = {k: fwd_bwd(f) for k, f in variants().items()}
  ref = fwd_bwd(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                      dimension_numbers=_NHWC,
                                                      precision=lax.Precision.HIGHEST))(x, w, dy)
  error = {}
  for k in ("winograd", "winograd_rows"):
    got = fns[k](x, w, dy)
    error[k] = {name: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                for name, a, b in zip(("y", "dx", "dw"), got, ref)}
  for f in fns.values():
    jax.block_until_ready(f(x, w, dy))
  times = {k: [] for k in fns}
  for r in range(rounds):
    order = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]
    for k in order:
      start = time.perf_counter()
      jax.block_until_ready(fns[k](x, w, dy))
      times[k].append(time.perf_counter() - start)
    log(f"  {shape} round {r}: " + ", ".join(f"{k}={times[k][-1] * 1e3:.1f}ms" for k in fns))
  ms = {k: float(np.median(v) * 1e3) for k, v in times.items()}
  ratio = {f"{k}_over_current": float(np.median([a / b for a, b in zip(times[k],
                                                                        times["current"])]))
           for k in fns if k != "current"}
  flops = 3 * 2 * n * size * size * 9 * cin * cout  # direct forward + two gradients
  return {"layer": f"3x3 {cin}->{cout}, {n}x{size}x{size}, forward+backward", "ms": ms,
          "ms_all": {k: [round(t * 1e3, 2) for t in v] for k, v in times.items()},
          "median_round_ratio": ratio,
          "direct_gflops_per_s": {k: flops / (v / 1e3) / 1e9 for k, v in ms.items()},
          "winograd_max_relative_error": error}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  out = {"benchmark": "winograd", "machine": report.machine_info(), "rounds": args.rounds,
         "layers": []}
  for shape in LAYERS:
    out["layers"].append(bench_layer(shape, args.rounds))
    log(json.dumps({k: out["layers"][-1][k] for k in ("layer", "ms", "median_round_ratio")}))
  report.emit(out, args.out)


if __name__ == "__main__":
  main()
