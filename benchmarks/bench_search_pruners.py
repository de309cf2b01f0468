"""What trial pruning saves in ``hypersparse-search`` on the digits preset.

Runs ``hypersparse-search --trials N --sampler-seed 0 --pruner P`` for P in none / median /
hyperband, one after the other, each in a fresh study folder, and reports per pruner the wall
time of the whole command, the trials' own seconds, how many were pruned, the best validation
accuracy and the best trial's test accuracy. With the same sampler seed the TPE sampler's first
(random) trials get the same parameters in every study, so the comparison is paired until
pruning changes what TPE has seen.

Run: ``python benchmarks/bench_search_pruners.py --trials 6 --out
benchmarks/results/search_pruners.json`` (``--workdir`` keeps the studies; ``--reuse`` only
summarises studies that an earlier run left there, with the wall times it recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import report

PRUNERS = ("none", "median", "hyperband")


def summarise(outdir: str) -> dict:
  import optuna
  study = optuna.load_study(study_name="hypersparse",
                            storage="sqlite:///" + os.path.abspath(os.path.join(outdir, "study.db")))
  trials = study.get_trials()
  complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
  pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
  best = max(complete, key=lambda t: t.value)
  return {"trials_complete": len(complete), "trials_pruned": len(pruned),
          "trial_seconds_sum": round(sum(t.user_attrs.get("seconds", 0.0) for t in trials), 1),
          "best_value": best.value, "best_trial": best.number,
          "best_test_accuracy": best.user_attrs.get("test_accuracy"),
          "values": [t.value for t in trials],
          "pruned_at_finetune_epoch": [t.user_attrs.get("pruned_at_finetune_epoch")
                                       for t in pruned]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trials", type=int, default=6)
  parser.add_argument("--workdir", default="search_pruners")
  parser.add_argument("--reuse", action="store_true")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  times_path = os.path.join(args.workdir, "times.json")
  times = {}
  if args.reuse and os.path.exists(times_path):
    with open(times_path) as f:
      times = json.load(f)
  rows = []
  for pruner in PRUNERS:
    outdir = os.path.join(args.workdir, pruner)
    command = ["hypersparse-search", "--trials", str(args.trials), "--pruner", pruner,
               "--sampler-seed", "0", "--outdir", outdir, "--no-progress"]
    if not args.reuse:
      start = time.perf_counter()
      subprocess.run([sys.executable, "-m", "hypersparse_jax.search"] + command[1:], check=True)
      times[pruner] = time.perf_counter() - start
      with open(times_path, "w") as f:
        json.dump(times, f)
    if pruner not in times or not os.path.exists(os.path.join(outdir, "study.db")):
      continue
    rows.append({"pruner": pruner, "command": " ".join(command),
                 "wall_seconds": round(times[pruner], 1), **summarise(outdir)})
    print(rows[-1], flush=True)
  report.emit({"benchmark": "search_pruners", "machine": report.machine_info(),
               "trials": args.trials, "rows": rows}, args.out)


if __name__ == "__main__":
  main()
