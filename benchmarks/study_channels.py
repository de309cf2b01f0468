"""Channel study: ART + group HyperSparse against ART + group L1, L1-norm filter pruning (one-shot
and gradual) and network slimming, at 50 / 75 / 90 % of the prunable channels removed.

    python benchmarks/study_channels.py --dataset fashion_mnist --model lenet5
    python benchmarks/study_channels.py --dataset fashion_mnist --model vgg --depth 11 --width 0.25
    python benchmarks/study_channels.py --quick --out /tmp/c     # digits CNN, a few epochs

Methods per (fraction, seed), on the schedule of ``benchmarks/study.py`` for the dataset and
model (the same initial weights per seed):

* ``art_hypersparse``: ``hypersparse-train --structure channel`` (group HyperSparse on the
  channel magnitudes: BatchNorm scales where BatchNorm follows, else the weights' L2 norms,
  divided by their layer's mean; :mod:`hypersparse_jax.channels`).
* ``art_l1``: the same protocol with the group-L1 penalty ``Σ m̃`` on the same normalised
  magnitudes (a group lasso; with BatchNorm, an L1 on the scales ÷ their layer's mean), λ
  growing as ART's and ART's stop rule: the paper's L1 baseline carried over to channels, not
  network slimming (below).
* ``art_hypersparse_uniform``: ``art_hypersparse`` with ``--distribution uniform``: every
  prunable layer loses ``floor(fraction·C)`` of its ``C`` channels, a HyperSparse term and
  threshold per layer. Li et al.'s count, so its slimmed models have exactly the widths, FLOPs
  and parameters of ``l1_filter``'s and ``gmp_filter``'s: the like-for-like comparison (the
  global threshold of ``art_hypersparse`` removes unevenly, mostly from the widest layer).
* ``l1_filter``: L1-norm filter pruning (Li et al. 2017) of the trained dense model: in every
  prunable layer the same fraction of channels, those of smallest weight L1 norm, then the same
  masked fine-tuning as ART's. Its total is the dense schedule's epochs + the fine-tune epochs,
  fewer than ART's (below).
* ``gmp_filter``: the same criterion applied gradually, with the same epochs as ART + group
  HyperSparse: after the dense warm-up, the fraction follows GMP's cubic ramp
  ``s_t = x (1 − (1 − t/T)^3)`` (``benchmarks/study.py``'s ``gmp``) over ``T`` = as many epochs
  as ART + group HyperSparse regularised for this seed and fraction, Li et al.'s per-layer mask
  recomputed every epoch at ``s_t`` and applied after every step, then the same masked
  fine-tuning.
* ``slimming``: network slimming (Liu et al. 2017), only for models whose every prunable
  layer is followed by BatchNorm (their method prunes by the BatchNorm scales): training from
  the same initial weights with the fixed-λ subgradient ``λ·sign(γ)`` added to the scales' gradients (``art(..., penalty='l1',
  structure='channel', normalized=False)`` with η = 1 and no warm-up) for as many epochs as
  ART's warm-up + its cap on regularisation (``warmup_epochs + max_art_epochs``) at ART's
  constant lr, so that with the fine-tuning its total equals ART's longest; then one global
  threshold on the raw ``|γ|`` (``channel_mask(..., normalized=False)``; every layer keeps its
  largest channel) and the same masked fine-tuning. Liu et al. use λ = 1e-4 for VGG on CIFAR
  over 160 epochs of 391 steps at lr 0.1 / 0.01 / 0.001: a total pull ``Σ lr·λ`` of 0.33 per
  scale. Our sparsity training is a few epochs, so λ is scaled to give the same total pull
  (:func:`slimming_lambda`; ``--slimming-lambda`` overrides). The sparsity-trained model does
  not depend on the fraction: it is trained once per seed (``<out>/.slim_cache/``).
* ``dense`` once per seed (warm-up + fine-tune epochs), taken from ``benchmarks/study.py``'s
  results of the same settings where they exist (``--reuse``), with its kept dense models.

Each finished run also records the slimmed model's parameters and XLA FLOPs. The headline is
the final fine-tune epoch's test accuracy. Resumable like the other studies.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import multiprocessing
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study  # noqa: E402

METHODS = ("art_hypersparse", "art_l1", "art_hypersparse_uniform", "l1_filter", "gmp_filter",
           "slimming")
LABELS = {"art_hypersparse": "ART + group HyperSparse", "art_l1": "ART + group L1",
          "art_hypersparse_uniform": "ART + group HyperSparse, per layer",
          "l1_filter": "L1-norm filters + FT (Li et al.)",
          "gmp_filter": "gradual L1-norm filters + FT (same epochs)",
          "slimming": "network slimming + FT (Liu et al.)", "dense": "dense"}
FRACTIONS = (0.5, 0.75, 0.9)
# Liu et al. 2017, VGG on CIFAR: λ = 1e-4 summed over 160 epochs × 391 steps at lr 0.1, 0.01
# (from epoch 80), 0.001 (from 120): the L1 term's total pull on a scale.
LIU_PULL = 1e-4 * 391 * (80 * 0.1 + 40 * 0.01 + 40 * 0.001)


def slimming_epochs(cfg):
  """Network slimming's sparsity-training epochs: ART's warm-up + its cap on regularisation."""
  return cfg.warmup_epochs + cfg.max_art_epochs


def slimming_lambda(cfg, steps_per_epoch):
  """λ whose total pull ``Σ lr·λ`` over the sparsity training (:func:`slimming_epochs` at the
  constant lr ``cfg.lr``) equals Liu et al.'s (:data:`LIU_PULL`)."""
  return LIU_PULL / (cfg.lr * slimming_epochs(cfg) * steps_per_epoch)


def methods_for(cfg):
  """The study's methods for this model: network slimming needs BatchNorm after every prunable
  layer (LeNet-5 has none)."""
  import jax
  import jax.numpy as jnp
  from hypersparse_jax import channels, models
  model = models.create_model(cfg.model, num_classes=10, depth=cfg.depth,
                              batch_norm=cfg.batch_norm, width=cfg.width)
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros(model.default_input_shape),
                                               train=False), jax.random.PRNGKey(0))
  bn = all(g.norm is not None for g in channels.channel_groups(shapes["params"]))
  return METHODS if bn else tuple(m for m in METHODS if m != "slimming")


def l1_filter_mask(params, fraction):
  """Li et al.'s criterion: per prunable layer, remove ``floor(fraction·C)`` channels of
  smallest weight L1 norm (ties: the stable sort removes the earlier channel first)."""
  import jax.numpy as jnp
  from hypersparse_jax import channels
  groups = channels.channel_groups(params)
  keeps = []
  for g in groups:  # the channels' uniform budget, on the weights' L1 norms
    k = np.asarray(channels._get(params, g.producer)["kernel"], np.float32)
    l1 = np.abs(np.moveaxis(k, -1, 0).reshape(k.shape[-1], -1)).sum(axis=1)
    keeps.append(np.asarray(channels._uniform_keep(jnp.asarray(l1), fraction)[0]))
  return channels._mask_from_keep(params, groups, keeps)


def _art(args, fraction, penalty, seed, distribution="global"):
  a = copy.copy(args)
  a.structure, a.distribution = "channel", distribution
  return study._art_run(a, fraction, penalty, seed)


def _sizes(base, state):
  """:func:`hypersparse_jax.channels.slim_summary`'s fields for a masked state."""
  import jax
  from hypersparse_jax import channels
  variables = jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})
  if not variables["batch_stats"]:
    variables.pop("batch_stats")
  sizes = channels.slim_summary(base.model, variables, (1,) + tuple(base.dataset.image_shape))
  return {k: sizes[k] for k in study.CHANNEL_SIZES}


def partial_name(fraction, seed):
  """The ``.partial/`` name of the cell (fraction of channels, seed)."""
  return f"c{fraction:g}_s{seed}"


def cell_task(args, fraction, seed, have=None):
  """The methods of one (fraction, seed) that ``have`` (method → kept result) lacks; returns
  ``(fraction, seed, new results)``."""
  import jax
  have = dict(have or {})
  cfg = study.make_config(args, fraction, "hypersparse", seed)
  todo = [m for m in methods_for(cfg) if m not in have]
  partial = study.Partial(args, partial_name(fraction, seed), study.settings_key(cfg))
  results = {}

  def run(method, fn):
    if method in todo:
      results[method] = partial.run(method, fn)
      print(f"  channels={fraction:g} seed={seed} {method}: {study._fmt(results[method])}",
            flush=True)

  for m in ("art_hypersparse", "art_l1"):
    run(m, lambda m=m: _art(args, fraction, m[len("art_"):], seed))
  run("art_hypersparse_uniform", lambda: _art(args, fraction, "hypersparse", seed, "uniform"))
  base = study.Baselines(cfg)
  base.mask_at = lambda params, s: l1_filter_mask(jax.device_get(params), s)
  if "l1_filter" in todo or "gmp_filter" in todo:
    _, warm, final = study.dense_states(args, base, seed)

  def l1_filter():
    # the slimmed model's size first: the fine-tuning below donates the state's arrays
    from hypersparse_jax import masking
    params = jax.device_get(final["params"])
    sizes = _sizes(base, dict(final, params=masking.apply_mask(
        params, l1_filter_mask(params, fraction))))
    return dict(base.oneshot(final, fraction), **sizes)

  def gmp_filter():
    ramp = max(1, int({**have, **results}["art_hypersparse"]["art_epochs"]))
    result, state = base.gmp(warm, fraction, ramp, base.spe, with_state=True)
    return dict(result, **_sizes(base, state))

  run("l1_filter", l1_filter)
  run("gmp_filter", gmp_filter)
  run("slimming", lambda: slimming(args, base, fraction, seed))
  return fraction, seed, results


def slimming_states(args, base, seed, lam):
  """The sparsity-trained model of network slimming for this seed (see the module doc):
  ``(result, final state)``, kept in ``<out>/.slim_cache/seed<seed>.pkl``."""
  import optax
  from hypersparse_jax import transform
  cfg = base.cfg

  epochs = slimming_epochs(cfg)

  def train():
    start = time.time()
    tx = optax.chain(transform.art(0.0, lambda_init=lam, eta=1.0, steps_per_epoch=base.spe,
                                   warmup_epochs=0, penalty="l1", structure="channel",
                                   normalized=False), base.ramp_tx)
    step = base.image_task.make_train_step(base.model, tx, base.dataset)
    state = base.initial_state(tx)
    for epoch in range(epochs):
      state = base.run_epoch(step, state, epoch)
    return dict(test_accuracy=base.test_accuracy(state), time=time.time() - start), state

  path = os.path.join(args.out, ".slim_cache", f"seed{seed}.pkl")
  return study.cached_states(path, study.cell_key(cfg, slimming_lambda=lam,
                                                  slimming_epochs=epochs), ("final",), train)


def slimming(args, base, fraction, seed):
  """Network slimming at ``fraction``: prune the sparsity-trained model by the raw BatchNorm
  scales (one global threshold), then the same masked fine-tuning as the other methods."""
  import jax
  from hypersparse_jax import channels, masking
  lam = args.slimming_lambda or slimming_lambda(base.cfg, base.spe)
  trained, final = slimming_states(args, base, seed, lam)
  start = time.time()
  mask = channels.channel_mask(final["params"], fraction, normalized=False)
  variables = jax.device_get({"params": masking.apply_mask(final["params"], mask),
                              "batch_stats": final["batch_stats"]})
  sizes = channels.slim_summary(base.model, variables, (1,) + tuple(base.dataset.image_shape))
  first = slimming_epochs(base.cfg)
  state, accs = base.finetune(final["params"], final["batch_stats"], mask, first)
  return dict(base._result(state, accs, start, 0, first + base.cfg.epochs),
              slimming_lambda=lam, sparsity_trained_accuracy=trained["test_accuracy"],
              sparsity_training_time=trained["time"], **{k: sizes[k] for k in study.CHANNEL_SIZES})


def _epochs(run, settings):
  """The epochs a run trained in all: recorded by the baselines; ART's are its warm-up, its
  regularisation epochs and its fine-tuning."""
  if run.get("epochs") is not None:
    return run["epochs"]
  if run.get("art_epochs") is None or settings is None:
    return None
  return settings["warmup_epochs"] + run["art_epochs"] + settings["epochs"]


def _slim_fraction(run, what):
  """The slimmed model's ``what`` ('flops' or 'params') as a fraction of the dense model's."""
  dense = run.get(f"{what}_dense")
  return run[f"{what}_slim"] / dense if dense else None


def aggregate(runs, fractions, settings=None):
  cells = []
  for key in list(fractions) + [0.0]:
    for method in (("dense",) if key == 0.0 else METHODS):
      rs = [r for r in runs if r["fraction"] == key and r["method"] == method]
      if rs:
        cells.append({"fraction": key, "method": method, "seeds": [r["seed"] for r in rs],
                      **{k: study._stats([r.get(k) for r in rs]) for k in (
                          "final_test_accuracy", "best_test_accuracy", "sparsity",
                          "art_epochs", "time")},
                      "epochs": study._stats([_epochs(r, settings) for r in rs]),
                      "flops_fraction": study._stats([_slim_fraction(r, "flops") for r in rs]),
                      "params_fraction": study._stats([_slim_fraction(r, "params")
                                                       for r in rs])})
  return cells


def write_markdown(path, report):
  s = report["settings"]
  by = {(c["fraction"], c["method"]): c for c in report["cells"]}
  dense = by.get((0.0, "dense"))
  lines = [f"# Channel study: {s['dataset']} / {s['model']}", "",
           f"Seeds {s['seeds']}; the schedule of benchmarks/study.py; final fine-tune test "
           f"accuracy (%), mean ± std; wall time {report['wall_time'] / 60:.1f} min"
           + ("" if report["complete"] else
              f" (incomplete: {study.seeds_per_cell(report)} seed(s) per cell so far)") + ".", "",
           "Dense: " + (study._pm(dense["final_test_accuracy"]) if dense else "–"), "",
           "| method | " + " | ".join(f"{x * 100:g} % of channels" for x in s["fractions"]) + " |",
           "|---|" + "---|" * len(s["fractions"])]
  for m in METHODS:
    if m == "slimming" and m not in s.get("methods", METHODS):
      row = ["n/a (no BatchNorm)"] * len(s["fractions"])
    else:
      row = [study._pm(by[(x, m)]["final_test_accuracy"]) if (x, m) in by else "–"
             for x in s["fractions"]]
    lines.append(f"| {LABELS[m]} | " + " | ".join(row) + " |")
  lines += ["", "The slimmed models' XLA FLOPs (one image) and parameters, % of the dense model's "
            "(mean over seeds), and the epochs each method trained in all (mean):", "",
            "| method | " + " | ".join(f"{x * 100:g} %: FLOPs / params / epochs"
                                      for x in s["fractions"]) + " |",
            "|---|" + "---|" * len(s["fractions"])]
  for m in METHODS:
    if m not in s.get("methods", METHODS):
      continue
    row = []
    for x in s["fractions"]:
      c = by.get((x, m))
      if c is None or c.get("flops_fraction") is None:
        row.append("–")
        continue
      ep = c.get("epochs")
      row.append(f"{100 * c['flops_fraction']['mean']:.1f} / "
                 f"{100 * c['params_fraction']['mean']:.1f} / "
                 + (f"{ep['mean']:.1f}" if ep else "–"))
    lines.append(f"| {LABELS[m]} | " + " | ".join(row) + " |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


# the settings of benchmarks/study.py's report that do not change its dense runs
_MAIN_ONLY = ("seeds", "sparsities", "fractions", "workers", "methods", "gmp_every", "slimming_lambda",
              "steps_per_epoch")


def main(argv=None):
  p = study.build_parser()
  p.description = __doc__.split("\n\n")[0]
  p.add_argument("--fractions", type=float, nargs="*", default=None)
  p.add_argument("--slimming-lambda", type=float, default=None,
                 help="network slimming's fixed λ (default: Liu et al.'s total pull on this "
                      "schedule, slimming_lambda())")
  p.add_argument("--reuse", default=None, metavar="DIR",
                 help="take the dense runs (and kept dense models) of this folder's "
                      "benchmarks/study.py results of the same settings (default: the main "
                      "study's folder for the dataset and model; '' to train them here)")
  args = p.parse_args(argv)
  if args.dataset is None:
    args.dataset = "digits"
  if args.model is None and args.dataset == "digits":
    args.model = "cnn"
  if args.out is None:
    args.out = os.path.join("benchmarks", "results", f"channels_{args.dataset}_{args.model}"
                            + (str(args.depth) if args.depth else "")
                            + (f"_w{args.width:g}" if args.width not in (None, 1) else ""))
  fractions = tuple(args.fractions or ((0.5,) if args.quick else FRACTIONS))
  seeds = tuple(args.seeds if args.seeds is not None else ((0,) if args.quick else study.SEEDS))
  os.makedirs(args.out, exist_ok=True)
  cfg = study.make_config(args, 0.5, "hypersparse", seeds[0])
  settings = study.base_settings(cfg)
  methods = methods_for(cfg)
  settings.update(lr_steps=list(cfg.lr_steps), fractions=list(fractions), seeds=list(seeds),
                  quick=args.quick, methods=list(methods), slimming_lambda=args.slimming_lambda)
  print(f"channel study: {json.dumps(settings)}", flush=True)
  # a method added to the study keeps the earlier methods' runs: only the new one runs
  runs, wall, old = study._kept_runs(args.out, settings,
                                     free=("seeds", "fractions", "workers", "methods"))
  if old is not None:  # the report covers the earlier cells and these
    for k in ("seeds", "fractions"):
      settings[k] = sorted(set(old[k]) | set(settings[k]))
    runs = [r for r in runs if r["method"] == "dense" or r["method"] in methods]
  done = {(r["fraction"], r["method"], r["seed"]) for r in runs}
  folder, main = study.find_main_study(args, settings, _MAIN_ONLY)
  if folder:  # the dense runs of benchmarks/study.py with these settings, and its dense models
    taken = [study.borrow_run(r, folder, fraction=0.0, method="dense", seed=r["seed"])
             for r in main["runs"] if r["method"] == "dense" and r["seed"] in seeds
             and (0.0, "dense", r["seed"]) not in done]
    if taken:
      print(f"took {len(taken)} dense runs of {folder}", flush=True)
    runs += taken
    done |= {(0.0, "dense", r["seed"]) for r in taken}
    args.dense_cache = os.path.join(folder, ".dense_cache")
  todo_dense = [s for s in seeds if (0.0, "dense", s) not in done]
  todo = [(x, s) for s in seeds for x in fractions
          if not all((x, m, s) in done for m in methods)]
  have = {(x, s): {r["method"]: {k: v for k, v in r.items()
                                 if k not in ("fraction", "method", "seed")}
                   for r in runs if (r["fraction"], r["seed"]) == (x, s)} for x, s in todo}
  print(f"kept {len(runs)} runs; {len(todo_dense)} dense runs and {len(todo)} cells to go",
        flush=True)
  start = time.time()
  with concurrent.futures.ProcessPoolExecutor(
      max_workers=max(1, args.workers), mp_context=multiprocessing.get_context("spawn"),
      initializer=study._worker_init, initargs=(args.jit_cache,)) as pool:
    futures = [pool.submit(study.dense_task, args, s) for s in todo_dense]
    futures += [pool.submit(cell_task, args, x, s, have[(x, s)]) for x, s in todo]
    failures = []
    for out in study.finished(futures, failures):
      cell = None
      if len(out) == 2:
        runs.append(dict(fraction=0.0, method="dense", seed=out[0], **out[1]))
      else:
        x, s, results = out
        cell = partial_name(x, s)
        for method, r in results.items():
          runs.append(dict(fraction=x, method=method, seed=s, **r))
      expected = len(settings["seeds"]) * (1 + len(methods) * len(settings["fractions"]))
      report = {"settings": settings, "wall_time": wall + time.time() - start,
                "complete": len(runs) == expected,
                "cells": aggregate(runs, settings["fractions"], settings), "runs": runs}
      study.write_json(args.out, report)
      write_markdown(os.path.join(args.out, "study.md"), report)
      if cell:
        study.Partial.drop(args.out, cell)
      print(f"[{time.time() - start:.0f}s] {len(runs)} runs done", flush=True)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
