"""Time to a sparse model on Fashion-MNIST: seconds per warm-up, ART and fine-tune epoch, and
ART's pruned-copy measurement, for LeNet-300-100 and LeNet-5, in one process.

    python benchmarks/bench_epoch_times.py                 # -> results/epoch_times.json
    python benchmarks/bench_epoch_times.py --models lenet300 --rounds 5

The three kinds of epoch differ only in the optimiser chain of the same jitted step of
:class:`hypersparse_jax.train.Trainer`: warm-up is ``art()`` with λ = 0 (its step count before
the end of warm-up), ART is the same transformation past warm-up (λ > 0: the exact global
threshold and the HyperSparse gradient every step), fine-tuning is ``fixed_mask()``. Each is
timed on the same batches of the training set (``--steps`` of them, default a whole epoch;
seconds per epoch are scaled from them), interleaved over ``--rounds`` rounds after one
compiling round, medians reported. The pruned-copy measurement (magnitude-prune a copy, its
accuracy on the 60,000 training images in eval mode) is timed apart: the method needs it after
every ART epoch, and the authors' code pays it too. Goal (issue 22): an ART epoch's training
within 1.1x a warm-up epoch's. The whole protocol's wall time is in results/fashion_preset.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent


def _steps(trainer, step, state, batches, key):
  import jax
  start = time.perf_counter()
  for i, batch in enumerate(batches):
    state, metrics = step(state, batch, jax.random.fold_in(key, i))
  jax.block_until_ready((state, metrics))
  return state, time.perf_counter() - start


def measure(model: str, rounds: int, steps: int | None) -> dict:
  import jax
  import jax.numpy as jnp
  from hypersparse_jax import config as config_lib
  from hypersparse_jax.train import Trainer
  preset = dict(config_lib.FASHION_MNIST_PRESET, model=model)
  fields = {f.name for f in dataclasses.fields(config_lib.TrainConfig)}
  cfg = config_lib.TrainConfig(dataset="fashion_mnist",
                               **{k: v for k, v in preset.items() if k in fields})
  with tempfile.TemporaryDirectory() as tmp:
    trainer = Trainer(cfg, tmp, progress=False, log=lambda *_: None)
  spe = trainer.steps_per_epoch
  n = spe if steps is None else min(steps, spe)
  host = list(batch for _, batch in zip(range(n), trainer.task.train_batches(0, None)))
  batches = [jax.device_put(b) for b in host]  # on the device once: the steps alone are timed
  params, stats = trainer.params, trainer.batch_stats
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (the step donates its state)

  art_opt = trainer.art_tx.init(params)
  warm_opt = art_opt
  past_warmup = art_opt[0]._replace(count=jnp.int32(cfg.warmup_epochs * spe))
  art_opt = (past_warmup,) + tuple(art_opt[1:])
  mask = trainer.mask_fn(params)
  ft_tx = trainer.finetune_tx(mask)
  kinds = {
      "warmup": (trainer._make_step(trainer.art_tx, params),
                 {"params": params, "batch_stats": stats, "opt_state": warm_opt}),
      "art": (trainer._make_step(trainer.art_tx, params),
              {"params": params, "batch_stats": stats, "opt_state": art_opt}),
      "finetune": (trainer._make_step(ft_tx, params),
                   {"params": params, "batch_stats": stats, "opt_state": ft_tx.init(params)}),
  }
  key = jax.random.PRNGKey(0)
  times = {k: [] for k in kinds}
  lambdas = {}
  for r in range(rounds + 1):  # round 0 compiles
    for kind, (step, state) in kinds.items():
      new_state, seconds = _steps(trainer, step, copy(state), batches, key)
      if r:
        times[kind].append(seconds)
      lambdas[kind] = float(new_state["opt_state"][0].lambda_) if kind != "finetune" else 0.0
  pruned_times = []
  for r in range(rounds + 1):
    start = time.perf_counter()
    pruned = trainer.prune_fn(params)
    trainer._pruned_train_accuracy(pruned, stats, cfg.warmup_epochs)
    if r:
      pruned_times.append(time.perf_counter() - start)
  per_epoch = {k: statistics.median(v) * spe / n for k, v in times.items()}
  return {
      "model": model, "steps_per_epoch": spe, "timed_steps": n, "batch_size": cfg.batch_size,
      "num_weights": trainer.num_weights, "lambda_in_timed_step": lambdas,
      "seconds_per_epoch": {k: round(v, 3) for k, v in per_epoch.items()},
      "seconds_per_round": {k: [round(s, 3) for s in v] for k, v in times.items()},
      "pruned_copy_measurement_seconds": round(statistics.median(pruned_times), 3),
      "art_over_warmup": round(per_epoch["art"] / per_epoch["warmup"], 3),
      "finetune_over_warmup": round(per_epoch["finetune"] / per_epoch["warmup"], 3),
      "pruned_measurement_over_warmup_epoch": round(
          statistics.median(pruned_times) / per_epoch["warmup"], 3),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", nargs="*", default=["lenet300", "lenet5"])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, nargs="*", default=None,
                 help="batches timed per epoch kind, one per model (default: a whole epoch)")
  p.add_argument("--out", default=str(HERE / "results" / "epoch_times.json"))
  args = p.parse_args(argv)
  import jax
  from hypersparse_jax import host_memory
  host_memory.retain_freed_memory(warn=False)  # as hypersparse-train does
  steps = args.steps or [None] * len(args.models)
  report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "jax": jax.__version__, "load_average_start": os.getloadavg()},
            "rounds": args.rounds, "models": []}
  for model, n in zip(args.models, steps):
    result = measure(model, args.rounds, n)
    print(json.dumps(result), flush=True)
    report["models"].append(result)
  report["machine"]["load_average_end"] = os.getloadavg()
  pathlib.Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
