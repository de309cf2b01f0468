"""The Fashion-MNIST preset against a dense model trained for as many epochs, in one run.

    python benchmarks/fashion_preset.py                     # -> results/fashion_preset.json
    python benchmarks/fashion_preset.py --variants lenet5   # also LeNet-5 with augmentation

Runs the bare ``hypersparse-train --dataset fashion_mnist`` (LeNet-300-100 on the clean images,
98 % sparsity; see ``FASHION_MNIST_PRESET`` in hypersparse_jax/config.py) as a fresh process and
times it; then trains the same model densely for the same total number of epochs (warm-up + the
ART epochs the run took + fine-tune, the fine-tune lr steps at the same places, from the same
initial weights) with the study's dense baseline (benchmarks/study.py); and, as variants, the
preset with the reference's augmentation (``--augment``: random crop of 4 px + flip) and, with
``--variants lenet5``, ``--model lenet5 --augment``. Each figure is the test accuracy of the
final epoch (no selection on the test set). Needs ``apt-get install dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
TRAIN = "from hypersparse_jax.console import train; train()"


def run_cli(outdir: str, *options: str) -> dict:
  """``hypersparse-train --dataset fashion_mnist OPTIONS`` as a fresh process."""
  start = time.time()
  proc = subprocess.run([sys.executable, "-c", TRAIN, "--dataset", "fashion_mnist", *options,
                         "--no-progress", "--outdir", outdir], capture_output=True, text=True)
  wall = time.time() - start
  if proc.returncode != 0:
    raise SystemExit(f"hypersparse-train {' '.join(options)} failed:\n{proc.stderr[-3000:]}")
  with open(os.path.join(outdir, "summary.json")) as f:
    summary = json.load(f)
  with open(os.path.join(outdir, "config.json")) as f:
    config = json.load(f)
  epochs = config["warmup_epochs"] + summary["art_epochs"] + config["epochs"]
  return {"options": list(options), "wall_seconds": round(wall, 1), "total_epochs": epochs,
          "model": config["model"], "augment": config["augment"],
          **{k: summary[k] for k in ("test_accuracy", "best_test_accuracy", "sparsity_target",
                                     "sparsity_achieved", "art_epochs", "stop_reason",
                                     "dense_test_accuracy", "num_weights",
                                     "num_nonzero_weights")}}


def dense_same_epochs(outdir: str) -> dict:
  """The preset's model trained densely for the run's total epochs (study.py's dense)."""
  sys.path.insert(0, str(HERE))
  import study
  from hypersparse_jax.config import TrainConfig
  with open(os.path.join(outdir, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(outdir, "summary.json")) as f:
    summary = json.load(f)
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  values = {k: v for k, v in config.items() if k in fields}
  values["lr_steps"] = tuple(values["lr_steps"])
  # warm-up + ART epochs dense at the constant lr, then the fine-tune epochs with their steps
  values["warmup_epochs"] = config["warmup_epochs"] + summary["art_epochs"]
  start = time.time()
  result, _, _ = study.Baselines(TrainConfig(**values)).dense()
  return {"total_epochs": values["warmup_epochs"] + values["epochs"],
          "test_accuracy": result["final_test_accuracy"],
          "best_test_accuracy": result["best_test_accuracy"],
          "wall_seconds": round(time.time() - start, 1)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=str(HERE / "results" / "fashion_preset.json"))
  p.add_argument("--variants", nargs="*", default=["augment"], choices=["augment", "lenet5"])
  args = p.parse_args(argv)
  import jax
  report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "jax": jax.__version__,
                        "load_average_start": os.getloadavg()}}
  with tempfile.TemporaryDirectory() as tmp:
    preset_dir = os.path.join(tmp, "preset")
    report["preset"] = run_cli(preset_dir)
    print("preset:", report["preset"], flush=True)
    report["dense_same_epochs"] = dense_same_epochs(preset_dir)
    print("dense:", report["dense_same_epochs"], flush=True)
    report["points_below_dense"] = round(
        100 * (report["dense_same_epochs"]["test_accuracy"] - report["preset"]["test_accuracy"]),
        2)
    if "augment" in args.variants:
      report["preset_augment"] = run_cli(os.path.join(tmp, "augment"), "--augment")
      print("preset --augment:", report["preset_augment"], flush=True)
    if "lenet5" in args.variants:
      report["lenet5_augment"] = run_cli(os.path.join(tmp, "lenet5"), "--model", "lenet5",
                                         "--augment")
      print("--model lenet5 --augment:", report["lenet5_augment"], flush=True)
  report["machine"]["load_average_end"] = os.getloadavg()
  pathlib.Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
  print(json.dumps(report, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
