"""Data-parallel scaling of an ART train step over 1, 2, 4 and 8 devices (JSON out).

    python benchmarks/bench_scaling.py [--model cnn] [--batch-size 256] [--steps 20]
    python benchmarks/bench_scaling.py --processes 2 --devices 2 4 --out benchmarks/results/scaling_processes.json

With ``--processes P`` it also runs P real processes on this machine (``jax.distributed`` on
127.0.0.1, gloo collectives), each with ``D / P`` forced devices and feeding only its rows of
the global batch, for every total device count ``D`` of ``--devices`` divisible by P, beside the
one-process runs with the same D and global batch: same step, same figures. On one machine the
processes share its cores, so this measures what several processes cost (cross-process
collectives, per-process overhead), not a speed-up.

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

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from hypersparse_jax import data, models, transform  # noqa: E402
from hypersparse_jax.tasks import image as image_task  # noqa: E402
from hypersparse_jax import sharding as sh  # noqa: E402


def measure(step, state, batch, steps):
  """``(first step s, images/s part, step ms)`` of ``steps`` steps after a first one."""
  t0 = time.perf_counter()
  state, _ = step(state, batch, jax.random.PRNGKey(0))
  jax.block_until_ready(state)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for i in range(steps):
    state, _ = step(state, batch, jax.random.PRNGKey(i + 1))
  jax.block_until_ready(state)
  return first, time.perf_counter() - t0


def setup(args):
  ds = data.load_dataset("digits", None, False)
  model = models.create_model(args.model, num_classes=10, depth=None, batch_norm=True)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + ds.image_shape), train=False)
  tx = optax.chain(transform.art(0.9, 1e-4, 1.05, steps_per_epoch=10, warmup_epochs=0),
                   optax.add_decayed_weights(1e-4), optax.sgd(0.05, momentum=0.9))
  state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
           "opt_state": tx.init(variables["params"])}
  return ds, model, tx, state


def process_worker(args):
  """One of ``--processes`` processes (started by :func:`run_processes`); process 0 prints."""
  from hypersparse_jax import distributed
  port, pid, count = args.worker
  distributed.initialize(f"127.0.0.1:{port}", count, pid)
  ds, model, tx, state = setup(args)
  mesh = sh.make_mesh()
  shardings = sh.state_shardings(state, mesh, fsdp=args.fsdp)
  state = jax.device_put(state, shardings)
  rows = sh.process_rows(mesh, args.batch_size)
  batch = next(data.train_batches(ds, args.batch_size, seed=0, epoch=0, rows=rows))
  batch = sh.shard_batch(batch, mesh)
  step = image_task.make_train_step(model, tx, ds, state_shardings=shardings)
  first, dt = measure(step, state, batch, args.steps)
  if pid == 0:
    print(json.dumps({"processes": count, "devices": jax.device_count(),
                      "images_per_s": args.steps * args.batch_size / dt,
                      "step_ms": 1e3 * dt / args.steps, "first_step_s": first}))


def run_processes(args, devices):
  """Runs ``args.processes`` workers with ``devices / processes`` devices each."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  per = devices // args.processes
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={per}")
  argv = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--batch-size",
          str(args.batch_size), "--steps", str(args.steps)] + (["--fsdp"] if args.fsdp else [])
  procs = [subprocess.Popen(argv + ["--worker", str(port), str(i), str(args.processes)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, text=True)
           for i in range(args.processes)]
  try:
    outs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  if any(p.returncode for p in procs):
    raise RuntimeError(f"a benchmark process failed: exit codes {[p.returncode for p in procs]}")
  return json.loads(outs[0].strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="cnn", choices=("cnn", "mlp"))
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--devices", type=int, nargs="*", default=[1, 2, 4, 8])
  p.add_argument("--fsdp", action="store_true", help="also shard params/optimiser state")
  p.add_argument("--processes", type=int, default=1,
                 help="also run this many real processes for each device count it divides")
  p.add_argument("--out", default=None, help="also write the JSON here")
  p.add_argument("--worker", type=int, nargs=3, default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker is not None:
    return process_worker(args)

  ds, model, tx, initial = setup(args)
  batch = next(data.train_batches(ds, args.batch_size, seed=0, epoch=0))
  results = []
  for n in args.devices:
    if n > jax.device_count():
      continue
    state = jax.tree.map(jnp.array, initial)  # copies: the step donates its state
    shardings, b = None, batch
    if n > 1:
      mesh = sh.make_mesh(n)
      shardings = sh.state_shardings(state, mesh, fsdp=args.fsdp)
      state = jax.device_put(state, shardings)
      b = sh.shard_batch(batch, mesh)
    step = image_task.make_train_step(model, tx, ds, state_shardings=shardings)
    first, dt = measure(step, state, b, args.steps)
    results.append({"processes": 1, "devices": n,
                    "images_per_s": args.steps * args.batch_size / dt,
                    "step_ms": 1e3 * dt / args.steps, "first_step_s": first})
  if args.processes > 1:
    for n in args.devices:
      if n % args.processes == 0:
        results.append(run_processes(args, n))
  base = results[0]["images_per_s"]
  one_process = {r["devices"]: r["images_per_s"] for r in results if r["processes"] == 1}
  for r in results:
    r["relative_to_1_device"] = r["images_per_s"] / base
    if r["processes"] > 1 and r["devices"] in one_process:
      r["relative_to_1_process_same_devices"] = r["images_per_s"] / one_process[r["devices"]]
  report = json.dumps({
      "benchmark": "data-parallel scaling of the ART train step",
      "model": args.model, "batch_size": args.batch_size, "steps": args.steps,
      "fsdp": args.fsdp, "platform": jax.devices()[0].platform,
      "physical_cores": os.cpu_count(),
      "note": ("forced host devices share the same physical CPU cores: these figures measure "
               "sharding overhead, not speed-up" if jax.devices()[0].platform == "cpu" else ""),
      "processes_note": ("several processes on one machine share its cores: their figures "
                         "measure the cost of processes (cross-process collectives over gloo, "
                         "per-process overhead), not a speed-up" if args.processes > 1 else ""),
      "results": results}, indent=2)
  print(report)
  if args.out:
    with open(args.out, "w") as f:
      f.write(report + "\n")


if __name__ == "__main__":
  main()
