"""Checks on an accelerator (GPU/TPU) that the CPU test suite cannot make.

* The default (``"auto"``) selection on this device gives thresholds bit-identical to a NumPy
  sort of the same magnitudes: random trees with ties, zeros, tiny and huge magnitudes,
  bfloat16/float16 leaves, several κ (the same patterns as tests/test_masking.py, smaller set).
* The compiled ``art()`` training update and ``magnitude_mask`` hold no ``while`` loop and no
  ``conditional`` in the optimised HLO for this device (each would read a predicate back to the
  host every step), while the CPU form (``former_form`` in bench_gpu.py) does.

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
from hypersparse_jax import masking, threshold


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
  sys.path.insert(0, __import__("os").path.dirname(__file__))
  from bench_gpu import former_form
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": jnp.asarray(rng.standard_normal((300, 400)), jnp.float32),
                  "bias": jnp.zeros(400)},
            "b": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 64, 64)), jnp.float32)}}
  result = {}
  for penalty in ("hypersparse", "l1"):
    for former in (False, True):
      tx = optax.chain(hs.art(0.98, steps_per_epoch=10, warmup_epochs=1, penalty=penalty),
                       optax.sgd(0.1, momentum=0.9))
      state = tx.init(params)

      def step(p, s):
        u, s = tx.update(p, s, p)
        return optax.apply_updates(p, u), s

      with former_form(former):
        text = jax.jit(step).lower(params, state).compile().as_text()
      result[f"art_{penalty}{'_former' if former else ''}"] = control_flow(text)
  text = jax.jit(lambda p: hs.magnitude_mask(p, 0.98)).lower(params).compile().as_text()
  result["magnitude_mask"] = control_flow(text)
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  out = {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
         "jax": jax.__version__,
         "bits": check_bits(np.random.default_rng(1)), "control_flow": check_control_flow()}
  accelerator = jax.default_backend() != "cpu"
  cf = out["control_flow"]
  out["ok"] = {
      "bits_identical": all(r["identical"] for r in out["bits"]),
      "no_control_flow": (not accelerator) or all(
          v == {"while": 0, "conditional": 0} for k, v in cf.items() if "former" not in k),
      "former_form_has_control_flow": cf["art_hypersparse_former"]["while"] > 0,
  }
  text = json.dumps(out, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  sys.exit(0 if all(out["ok"].values()) else 1)


if __name__ == "__main__":
  main()
