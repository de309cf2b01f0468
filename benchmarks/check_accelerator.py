"""Checks on an accelerator (GPU/TPU) that the CPU test suite cannot make.

* The default (``"auto"``) selection on this device gives thresholds bit-identical to a NumPy
  sort of the same magnitudes: random trees with ties, zeros, tiny and huge magnitudes,
  bfloat16/float16 leaves, several κ (the same patterns as tests/test_masking.py, smaller set).
* ``threshold.kth_magnitude`` with ``method="radix"`` and ``"sort"`` gives the same bits.
* Reported, not checked: the ``while`` loops and ``conditional``s in the optimised HLO of the
  compiled ``art()`` update and of ``magnitude_mask`` on this device (on a GPU each reads a
  predicate back to the host).

    python benchmarks/check_accelerator.py [--out checks.json]

Prints one JSON object; exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hypersparse_jax as hs
from hypersparse_jax import threshold


def _patterns(rng, n):
  yield "normal", rng.standard_normal(n).astype(np.float32) * 0.05
  yield "ties", (rng.choice(np.float32([0.25, 0.5, 0.75, 1.0, 2.0]), n)
                 * rng.choice(np.float32([-1, 1]), n))
  half = rng.standard_normal(n).astype(np.float32)
  half[rng.permutation(n)[: n // 2]] = 0
  yield "half_zero", half
  ext = rng.standard_normal(n).astype(np.float32)
  ext[: n // 3] *= np.float32(1e-38)
  ext[n // 3: n // 2] *= np.float32(1e30)
  yield "extreme", ext


def check_bits(rng) -> list:
  shapes = [(3, 3, 64, 128), (511, 401), (97, 211), (1, 3), (1200, 1000)]
  sizes = [int(np.prod(s)) for s in shapes]
  out = []
  for name, flat in _patterns(rng, sum(sizes)):
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
      parts = np.split(flat, np.cumsum(sizes)[:-1])
      params = {f"l{i}": {"kernel": jnp.asarray(p.reshape(s), dtype)}
                for i, (p, s) in enumerate(zip(parts, shapes))}
      mags = np.sort(np.abs(np.concatenate(
          [np.asarray(params[f"l{i}"]["kernel"].astype(jnp.float32)).ravel()
           for i in range(len(shapes))])))
      for kappa in (0.0, 0.5, 0.9, 0.98, 0.999):
        got = np.float32(jax.jit(lambda p: hs.magnitude_threshold(p, kappa))(params))
        want = mags[min(int(math.floor(kappa * mags.size)), mags.size - 1)]
        out.append({"pattern": name, "dtype": jnp.dtype(dtype).name, "kappa": kappa,
                    "identical": bool(got.view(np.uint32) == want.view(np.uint32))})
  return out


def control_flow(compiled_text: str) -> dict:
  return {"while": compiled_text.count(" while("), "conditional": compiled_text.count(
      " conditional(")}


def check_control_flow() -> dict:
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": jnp.asarray(rng.standard_normal((300, 400)), jnp.float32),
                  "bias": jnp.zeros(400)},
            "b": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 64, 64)), jnp.float32)}}
  result = {}
  for penalty in ("hypersparse", "l1"):
    tx = optax.chain(hs.art(0.98, steps_per_epoch=10, warmup_epochs=1, penalty=penalty),
                     optax.sgd(0.1, momentum=0.9))
    state = tx.init(params)

    def step(p, s):
      u, s = tx.update(p, s, p)
      return optax.apply_updates(p, u), s

    result[f"art_{penalty}"] = control_flow(
        jax.jit(step).lower(params, state).compile().as_text())
  text = jax.jit(lambda p: hs.magnitude_mask(p, 0.98)).lower(params).compile().as_text()
  result["magnitude_mask"] = control_flow(text)
  return result


def check_methods(rng) -> list:
  arrays = [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in
            [(3, 3, 64, 128), (511, 401), (1200, 1000)]]
  mags = np.sort(np.abs(np.concatenate([np.asarray(a).ravel() for a in arrays])))
  out = []
  for method in threshold.METHODS:
    for k in (0, mags.size // 2, int(0.98 * mags.size), mags.size - 1):
      got = np.float32(threshold.kth_magnitude(arrays, k, method=method))
      out.append({"method": method, "k": k,
                  "identical": bool(got.view(np.uint32) == mags[k].view(np.uint32))})
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  out = {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
         "jax": jax.__version__,
         "bits": check_bits(np.random.default_rng(1)),
         "methods": check_methods(np.random.default_rng(2)),
         "control_flow": check_control_flow()}
  out["ok"] = {"bits_identical": all(r["identical"] for r in out["bits"]),
               "methods_identical": all(r["identical"] for r in out["methods"])}
  text = json.dumps(out, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  sys.exit(0 if all(out["ok"].values()) else 1)


if __name__ == "__main__":
  main()
