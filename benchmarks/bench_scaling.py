"""Data-parallel scaling of an ART train step over 1, 2, 4 and 8 devices (JSON out).

    python benchmarks/bench_scaling.py [--model cnn] [--batch-size 256] [--steps 20]

On CPU the script forces 8 host devices (XLA_FLAGS, set before JAX starts). Forced host devices
share the machine's physical cores, so images/s here measure the overhead of sharding (SPMD
partitioning, collectives) rather than a speed-up; on real accelerators the same code scales.
The step is hypersparse-train's (augmentation, forward/backward, art() in the regularisation
phase with the global threshold and HyperSparse sums, weight decay, SGD with momentum).
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from hypersparse_jax import input_pipeline, models, train, transform  # noqa: E402
from hypersparse_jax import sharding as sh  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="cnn", choices=("cnn", "mlp"))
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--devices", type=int, nargs="*", default=[1, 2, 4, 8])
  p.add_argument("--fsdp", action="store_true", help="also shard params/optimiser state")
  args = p.parse_args()

  ds = input_pipeline.load_dataset("digits", None, False)
  model = models.create_model(args.model, num_classes=10, depth=None, batch_norm=True)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + ds.image_shape), train=False)
  tx = optax.chain(transform.art(0.9, 1e-4, 1.05, steps_per_epoch=10, warmup_epochs=0),
                   optax.add_decayed_weights(1e-4), optax.sgd(0.05, momentum=0.9))
  batch = next(input_pipeline.train_batches(ds, args.batch_size, seed=0, epoch=0))
  results = []
  for n in args.devices:
    if n > jax.device_count():
      continue
    state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
             "opt_state": tx.init(variables["params"])}
    state = jax.tree.map(jnp.array, state)
    shardings, b = None, batch
    if n > 1:
      mesh = sh.make_mesh(n)
      shardings = sh.state_shardings(state, mesh, fsdp=args.fsdp)
      state = jax.device_put(state, shardings)
      b = sh.shard_batch(batch, mesh)
    step = train.make_train_step(model, tx, ds, state_shardings=shardings)
    t0 = time.perf_counter()
    state, m = step(state, b, jax.random.PRNGKey(0))
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
      state, m = step(state, b, jax.random.PRNGKey(i + 1))
    jax.block_until_ready(state)
    dt = time.perf_counter() - t0
    results.append({"devices": n, "images_per_s": args.steps * args.batch_size / dt,
                    "step_ms": 1e3 * dt / args.steps, "first_step_s": compile_s})
  base = results[0]["images_per_s"]
  for r in results:
    r["relative_to_1_device"] = r["images_per_s"] / base
  print(json.dumps({
      "benchmark": "data-parallel scaling of the ART train step",
      "model": args.model, "batch_size": args.batch_size, "steps": args.steps,
      "fsdp": args.fsdp, "platform": jax.devices()[0].platform,
      "physical_cores": os.cpu_count(),
      "note": ("forced host devices share the same physical CPU cores: these figures measure "
               "sharding overhead, not speed-up" if jax.devices()[0].platform == "cpu" else ""),
      "results": results}, indent=2))


if __name__ == "__main__":
  main()
