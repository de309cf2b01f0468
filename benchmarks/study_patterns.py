"""Pattern study: ART + HyperSparse under per-layer budgets and N:M patterns, against one-shot and
gradual magnitude pruning with the same pattern.

    python benchmarks/study_patterns.py --dataset fashion_mnist --model lenet300
    python benchmarks/study_patterns.py --dataset fashion_mnist --model lenet5
    python benchmarks/study_patterns.py --quick --out /tmp/p     # digits, a few epochs

Patterns (each a *cell* per seed):

* budgets: ``global`` (the paper's one threshold), ``uniform`` (κ in every layer) and ``erk``
  (Erdős–Rényi-Kernel) at each ``--sparsities`` (default 90 / 98 / 99 %);
* N:M: each ``--nm`` pattern (default 2:4 and 1:4), along every kernel's input axis (layers
  whose input size is not a multiple of M stay dense: :mod:`hypersparse_jax.budgets`).

Methods per cell, on the schedule of ``benchmarks/study.py`` for the dataset and model (same
warm-up, ART cap, fine-tuning; the same initial weights per seed):

* ``art_hypersparse``: the ART protocol of ``hypersparse-train`` with ``--distribution`` or
  ``--nm`` (HyperSparse with a threshold and a term per layer or per group).
* ``oneshot``: the dense baseline's trained model pruned to the pattern in one shot, then the
  same masked fine-tuning.
* ``gmp``: gradual pruning from the warm-up over as many epochs as ART + HyperSparse
  regularised: the cubic schedule of Zhu & Gupta, the mask recomputed every epoch at the
  schedule's sparsity in the same pattern (per-layer budgets at ``s_t``; for N:M the groups keep
  ``M − floor(s_t·M)`` weights, never fewer than N), then the same masked fine-tuning.
* ``dense`` once per seed (warm-up + fine-tune epochs), shared with every cell of the seed.

The ``global`` cells and the dense runs are ``benchmarks/study.py``'s runs of the same
configuration: where that study's results hold them with the same settings (``--reuse DIR``;
by default its folder for the dataset and model, or the dataset's folder for the preset's
model), they are taken from there, marked ``"from"``, and not run again; its kept dense
models (``.dense_cache/``) are used too. Without such a study everything runs here.

The headline is the final fine-tune epoch's test accuracy (no selection on the test set).
Finished cells are kept in ``study.json`` and skipped when the study is run again. Written to
``--out``: ``study.json``, ``study.md`` (tables), ``study.png`` (accuracy against sparsity per
budget; N:M beside it).
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
import study  # noqa: E402  (the schedule, the baselines, the dense cache)

METHODS = ("art_hypersparse", "oneshot", "gmp")
LABELS = {"art_hypersparse": "ART + HyperSparse", "oneshot": "one-shot + FT",
          "gmp": "gradual (GMP)", "dense": "dense"}
DISTRIBUTIONS = ("global", "uniform", "erk")
SPARSITIES = (0.9, 0.98, 0.99)
NM = ("2:4", "1:4")


def pattern_key(p):
  """``'erk@0.98'`` or ``'nm2:4'``: a cell's pattern as text (the runs' key)."""
  return f"nm{p['nm']}" if p.get("nm") else f"{p['distribution']}@{p['sparsity']:g}"


def patterns(args):
  out = [{"distribution": d, "nm": None, "sparsity": s}
         for d in args.distributions for s in args.sparsities]
  from hypersparse_jax import budgets
  for text in args.nm:
    n, m = budgets.parse_nm(text)
    out.append({"distribution": "global", "nm": text, "sparsity": 1 - n / m})
  return out


def _with_pattern(args, p):
  a = copy.copy(args)
  a.distribution, a.nm = p["distribution"], p["nm"]
  return a


def partial_name(p, seed):
  """The ``.partial/`` name of the cell (pattern, seed)."""
  return f"{pattern_key(p).replace(':', '-')}_s{seed}"


def cell_task(args, p, seed):
  """ART + HyperSparse, one-shot and GMP for one pattern and seed."""
  pa = _with_pattern(args, p)
  cfg = study.make_config(pa, p["sparsity"], "hypersparse", seed)
  partial = study.Partial(args, partial_name(p, seed), study.settings_key(cfg))
  results = {"art_hypersparse": partial.run("art_hypersparse", lambda: study._art_run(
      pa, p["sparsity"], "hypersparse", seed))}
  base = study.Baselines(cfg)
  _, warm, final = study.dense_states(args, base, seed)
  results["oneshot"] = partial.run("oneshot", lambda: base.oneshot(final, p["sparsity"]))
  ramp = max(1, int(results["art_hypersparse"]["art_epochs"]))
  results["gmp"] = partial.run("gmp", lambda: base.gmp(warm, p["sparsity"], ramp,
                                                       args.gmp_every or base.spe))
  for method, r in results.items():
    print(f"  {pattern_key(p)} seed={seed} {method}: {study._fmt(r)}", flush=True)
  return p, seed, results


def _merged(new, old):
  """``new`` then what only ``old`` has: numbers in ascending order, names (budgets, N:M
  patterns) in the order given, so that a resumed study's tables keep their row order."""
  extra = [x for x in old if x not in new]
  if all(isinstance(x, (int, float)) for x in list(new) + extra):
    return sorted(set(new) | set(extra))
  return list(new) + extra


def aggregate(runs, pats):
  cells = []
  keys = [pattern_key(p) for p in pats]
  for key in keys + ["dense"]:
    for method in (("dense",) if key == "dense" else METHODS):
      rs = [r for r in runs if r["pattern"] == key and r["method"] == method]
      if rs:
        cells.append({"pattern": key, "method": method, "seeds": [r["seed"] for r in rs],
                      **{k: study._stats([r.get(k) for r in rs]) for k in (
                          "final_test_accuracy", "best_test_accuracy", "sparsity",
                          "art_epochs", "time")}})
  return cells


def write_markdown(path, report):
  s = report["settings"]
  by = {(c["pattern"], c["method"]): c for c in report["cells"]}
  dense = by.get(("dense", "dense"))
  lines = [f"# Pattern study: {s['dataset']} / {s['model']}", "",
           f"Seeds {s['seeds']}; the schedule of benchmarks/study.py (warm-up "
           f"{s['warmup_epochs']} epochs, ART at most {s['max_art_epochs']} epochs with λ_init "
           f"{s['lambda_init']} and η {s['eta']}, fine-tune {s['epochs']} epochs, lr × "
           f"{s['lr_decay']} at {s['lr_steps']}). Final fine-tune test accuracy (%), mean ± std "
           f"over seeds; total wall time {report['wall_time'] / 60:.1f} min"
           + ("" if report["complete"] else " (incomplete: cells still to run; "
              f"{study.seeds_per_cell(report)} seed(s) per cell so far)") + ".", "",
           f"Dense ({s['warmup_epochs'] + s['epochs']} epochs): "
           + (study._pm(dense["final_test_accuracy"]) if dense else "–"), ""]
  sources = sorted({r["from"] for r in report["runs"] if r.get("from")})
  if sources:
    lines += [f"The global-threshold runs and the dense runs come from {', '.join(sources)} "
              "(benchmarks/study.py's runs of the same configuration; the wall time above does "
              "not include them).", ""]
  budget_rows = [d for d in s["distributions"]]
  if budget_rows:
    lines += ["| budget | method | " + " | ".join(f"{x * 100:g} %" for x in s["sparsities"])
              + " |", "|---|---|" + "---|" * len(s["sparsities"])]
    for d in budget_rows:
      for m in METHODS:
        row = [study._pm(by[(f"{d}@{x:g}", m)]["final_test_accuracy"])
               if (f"{d}@{x:g}", m) in by else "–" for x in s["sparsities"]]
        lines.append(f"| {d} | {LABELS[m]} | " + " | ".join(row) + " |")
  if s["nm"]:
    lines += ["", "| N:M | sparsity | " + " | ".join(LABELS[m] for m in METHODS) + " |",
              "|---|---|" + "---|" * len(METHODS)]
    for text in s["nm"]:
      key = f"nm{text}"
      sp = next((c["sparsity"] for c in report["cells"] if c["pattern"] == key), None)
      row = [study._pm(by[(key, m)]["final_test_accuracy"]) if (key, m) in by else "–"
             for m in METHODS]
      lines.append(f"| {text} | " + (f"{sp['mean'] * 100:.2f} %" if sp else "–") + " | "
                   + " | ".join(row) + " |")
  lines += ["", "ART epochs (mean) per cell: " + ", ".join(
      f"{c['pattern']} {c['art_epochs']['mean']:.1f}" for c in report["cells"]
      if c["method"] == "art_hypersparse" and c["art_epochs"])]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def write_plot(path, report):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  s = report["settings"]
  by = {(c["pattern"], c["method"]): c for c in report["cells"]}
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
  ax = axes[0]
  xs = np.arange(len(s["sparsities"]))
  colors = {"global": "C0", "uniform": "C1", "erk": "C2"}
  styles = {"art_hypersparse": "-", "oneshot": "--", "gmp": ":"}
  for d in s["distributions"]:
    for m in METHODS:
      pts = [(i, by[(f"{d}@{x:g}", m)]["final_test_accuracy"]) for i, x in
             enumerate(s["sparsities"]) if (f"{d}@{x:g}", m) in by]
      if pts:
        ax.errorbar([i + 0.04 * METHODS.index(m) for i, _ in pts],
                    [q["mean"] * 100 for _, q in pts], yerr=[q["std"] * 100 for _, q in pts],
                    color=colors[d], ls=styles[m], marker="o", ms=3, capsize=2,
                    label=f"{d}: {LABELS[m]}")
  dense = by.get(("dense", "dense"))
  for a in axes:
    if dense:
      a.axhline(dense["final_test_accuracy"]["mean"] * 100, color="k", lw=1, ls="--")
    a.grid(alpha=0.3)
  ax.set_xticks(xs, [f"{x * 100:g}" for x in s["sparsities"]])
  ax.set_xlabel("sparsity κ (%)")
  ax.set_ylabel("final test accuracy (%)")
  ax.set_title(f"per-layer budgets ({s['dataset']} / {s['model']}, {len(s['seeds'])} seeds)")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=6, ncol=3)
  ax = axes[1]
  width = 0.25
  for j, m in enumerate(METHODS):
    vals = [by.get((f"nm{t}", m)) for t in s["nm"]]
    ax.bar(np.arange(len(s["nm"])) + (j - 1) * width,
           [v["final_test_accuracy"]["mean"] * 100 if v else np.nan for v in vals], width,
           yerr=[v["final_test_accuracy"]["std"] * 100 if v else 0 for v in vals], capsize=2,
           label=LABELS[m])
  ax.set_xticks(np.arange(len(s["nm"])), list(s["nm"]))
  lo = [c["final_test_accuracy"]["mean"] * 100 for c in report["cells"]
        if c["pattern"].startswith("nm")]
  if lo:
    ax.set_ylim(min(lo) - 3, max(lo + [dense["final_test_accuracy"]["mean"] * 100
                                       if dense else 0]) + 1)
  ax.set_title("N:M (dashed: dense)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def build_parser():
  p = study.build_parser()
  p.description = __doc__.split("\n\n")[0]
  p.add_argument("--distributions", nargs="*", default=None, choices=DISTRIBUTIONS)
  p.add_argument("--nm", nargs="*", default=None, help="N:M patterns (default 2:4 1:4)")
  p.add_argument("--reuse", default=None, metavar="DIR",
                 help="take the global-threshold cells and dense runs that this folder's "
                      "benchmarks/study.py results hold for the same settings instead of "
                      "running them again (default: the main study's folder for the dataset "
                      "and model, or the dataset's for its preset model; '' to run everything)")
  return p


# the settings of benchmarks/study.py's report that do not change what one of its runs computes
_MAIN_ONLY = ("seeds", "sparsities", "distributions", "nm", "workers", "methods")


def reused_runs(folder, main, cells, seeds):
  """Runs of the main study (``main``: ``benchmarks/study.py``'s report in ``folder``, of the
  same settings, :func:`study.find_main_study`) that are this study's runs: its ART +
  HyperSparse, one-shot and GMP runs at κ are the ``global@κ`` cells (the same configuration,
  the same code path: on LeNet-300-100 all 30 such runs of the two studies agreed to the last
  digit), and its dense runs of ``seeds`` are the dense runs. ``cells``: the ``(pattern,
  seed)`` still to run. Returns the runs in this study's form, each marked ``"from": folder``."""
  by = {(r["method"], r["target"], r["seed"]): r for r in main.get("runs", [])}
  out = []
  for p, s in cells:
    if p.get("nm") or p["distribution"] != "global":
      continue
    found = [by.get((m, p["sparsity"], s)) for m in METHODS]
    if all(found):
      out += [study.borrow_run(r, folder, pattern=pattern_key(p), method=m, seed=s)
              for m, r in zip(METHODS, found)]
  out += [study.borrow_run(by[("dense", 0.0, s)], folder, pattern="dense", method="dense",
                           seed=s) for s in seeds if ("dense", 0.0, s) in by]
  return out


def main(argv=None):
  args = build_parser().parse_args(argv)
  if args.dataset is None:
    args.dataset = "digits"
  if args.out is None:
    args.out = os.path.join("benchmarks", "results", f"patterns_{args.dataset}"
                            + (f"_{args.model}{args.depth or ''}" if args.model else "")
                            + (f"_w{args.width:g}" if args.width not in (None, 1) else ""))
  quick = args.quick
  args.sparsities = tuple(args.sparsities or ((0.9,) if quick else SPARSITIES))
  args.distributions = tuple(args.distributions if args.distributions is not None else
                             (("global", "erk") if quick else DISTRIBUTIONS))
  args.nm = tuple(args.nm if args.nm is not None else (("2:4",) if quick else NM))
  seeds = tuple(args.seeds if args.seeds is not None else ((0,) if quick else study.SEEDS))
  pats = patterns(args)
  os.makedirs(args.out, exist_ok=True)
  cfg = study.make_config(args, 0.9, "hypersparse", seeds[0])
  from hypersparse_jax import data
  spe = data.steps_per_epoch(data.load_dataset(cfg.dataset, cfg.data_dir).num_train,
                             cfg.batch_size)
  settings = study.base_settings(cfg)
  settings.update(lr_steps=list(cfg.lr_steps), sparsities=list(args.sparsities),
                  distributions=list(args.distributions), nm=list(args.nm), seeds=list(seeds),
                  quick=quick, steps_per_epoch=spe, gmp_every=args.gmp_every or spe)
  print(f"pattern study: {json.dumps(settings)}", flush=True)

  grown = ("seeds", "sparsities", "distributions", "nm")
  runs, wall, old = study._kept_runs(args.out, settings, free=grown + ("workers",))
  if old is not None:  # the report covers the earlier cells and these
    for k in grown:  # this run's order first (the tables' row order), then the earlier extras
      settings[k] = _merged(settings[k], old[k])
  done = {(r["pattern"], r["method"], r["seed"]) for r in runs}
  todo = [(p, s) for s in seeds for p in pats
          if not all((pattern_key(p), m, s) in done for m in METHODS)]
  reuse, main = study.find_main_study(args, settings, _MAIN_ONLY)
  if reuse:
    taken = [r for r in reused_runs(reuse, main, todo,
                                    [s for s in seeds if ("dense", "dense", s) not in done])
             if (r["pattern"], r["method"], r["seed"]) not in done]
    if taken:
      print(f"took {len(taken)} runs of {reuse}", flush=True)
    runs = [r for r in runs if (r["pattern"], r["seed"]) not in
            {(t["pattern"], t["seed"]) for t in taken if t["method"] != "dense"}] + taken
    done = {(r["pattern"], r["method"], r["seed"]) for r in runs}
    todo = [(p, s) for p, s in todo if not all((pattern_key(p), m, s) in done for m in METHODS)]
    args.dense_cache = os.path.join(reuse, ".dense_cache")  # its trained dense models too
  todo_dense = [s for s in seeds if ("dense", "dense", s) not in done]
  runs = [r for r in runs if r["method"] == "dense" or
          (r["pattern"], r["seed"]) not in {(pattern_key(p), s) for p, s in todo}]
  print(f"kept {len(runs)} runs; {len(todo_dense)} dense runs and {len(todo)} cells to go",
        flush=True)
  all_pats = [{"distribution": d, "nm": None, "sparsity": x} for d in settings["distributions"]
              for x in settings["sparsities"]] + [
      {"distribution": "global", "nm": t, "sparsity": None} for t in settings["nm"]]
  start = time.time()
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(
      max_workers=max(1, args.workers), mp_context=ctx, initializer=study._worker_init,
      initargs=(args.jit_cache,)) as pool:
    futures = [pool.submit(study.dense_task, args, s) for s in todo_dense]
    futures += [pool.submit(cell_task, args, p, s) for p, s in todo]
    failures = []
    for out in study.finished(futures, failures):
      cell = None
      if len(out) == 2:
        runs.append(dict(pattern="dense", method="dense", seed=out[0], **out[1]))
      else:
        p, s, results = out
        cell = partial_name(p, s)
        for method, r in results.items():
          runs.append(dict(pattern=pattern_key(p), method=method, seed=s, **r))
      _report(args.out, settings, runs, all_pats, wall + time.time() - start)
      if cell:
        study.Partial.drop(args.out, cell)
      print(f"[{time.time() - start:.0f}s] {len(runs)} runs done", flush=True)
  if not futures:  # nothing left to run: the report is rewritten from the kept runs
    _report(args.out, settings, runs, all_pats, wall)
  return 1 if failures else 0


def _report(out, settings, runs, all_pats, wall_time):
  """study.json, study.md and study.png for the runs so far."""
  expected = len(settings["seeds"]) * (1 + len(METHODS) * len(all_pats))
  report = {"settings": settings, "wall_time": wall_time, "complete": len(runs) == expected,
            "cells": aggregate(runs, all_pats), "runs": runs}
  study.write_json(out, report)
  write_markdown(os.path.join(out, "study.md"), report)
  write_plot(os.path.join(out, "study.png"), report)


if __name__ == "__main__":
  sys.exit(main())
