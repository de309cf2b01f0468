"""Runs the sparsity study in --quick mode and checks what it writes."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = {"art_hypersparse", "art_l1", "art_l2", "oneshot", "gmp", "dense"}


def _bench(*names):
  """The benchmark scripts ``names`` (modules of benchmarks/) imported."""
  import importlib
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    return [importlib.import_module(n) for n in names]
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))


def _run_quick(script, out, tmp_path, *extra):
  """``benchmarks/<script> --quick`` into ``out`` in a subprocess (outside the repository, so
  that no committed study is reused); its CompletedProcess after checking the exit code."""
  cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out),
         "--workers", "1", "--jit-cache", str(tmp_path / "jit"), *extra]
  proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def test_quick_study(tmp_path):
  out = tmp_path / "study"
  _run_quick("study.py", out, tmp_path)
  for name in ("study.json", "study.md", "study.png"):
    assert (out / name).is_file() and (out / name).stat().st_size > 0, name
  assert (out / "study.png").read_bytes().startswith(b"\x89PNG")
  report = json.loads((out / "study.json").read_text())
  settings = report["settings"]
  assert settings["quick"] is True and settings["seeds"] == [0]
  assert len(settings["sparsities"]) == 2
  assert report["complete"] is True
  runs = report["runs"]
  assert {r["method"] for r in runs} == METHODS
  assert len(runs) == 1 + 5 * len(settings["sparsities"])
  for r in runs:
    for key in ("best_test_accuracy", "final_test_accuracy"):
      assert 0.0 <= r[key] <= 1.0, r
    assert r["best_test_accuracy"] >= r["final_test_accuracy"] - 1e-12
    if r["method"] != "dense":
      assert r["target"] in settings["sparsities"]
      assert r["sparsity"] >= r["target"] - 1e-6, r
    assert r["time"] > 0
  cells = {(c["method"], c["target"]) for c in report["cells"]}
  assert ("dense", 0.0) in cells
  for m in METHODS - {"dense"}:
    for s in settings["sparsities"]:
      assert (m, s) in cells
  for c in report["cells"]:
    for key in ("best_test_accuracy", "final_test_accuracy", "sparsity", "time"):
      assert set(c[key]) == {"mean", "std", "n"}
  table = (out / "study.md").read_text()
  assert "ART + HyperSparse" in table and "| method |" in table

  # Resumable: a study stopped after some cells keeps them and runs only the rest. Drop one
  # cell (all methods of the last sparsity) from the file, as if the study had died there.
  last = settings["sparsities"][-1]
  cut = dict(report, runs=[r for r in runs if r["target"] != last])
  (out / "study.json").write_text(json.dumps(cut))
  # ... and within that cell, its ART + L2 run had finished (kept in .partial/): not redone
  study, = _bench("study")
  sargs = study.build_parser().parse_args(["--quick", "--out", str(out)])
  sargs.dataset = "digits"
  key = study.settings_key(study.make_config(sargs, last, "hypersparse", 0))
  l2 = next(r for r in runs if r["target"] == last and r["method"] == "art_l2")
  kept_l2 = {k: v for k, v in l2.items() if k not in ("method", "target", "seed")}
  kept_l2["time"] = 12345.0  # a mark: recomputed it would differ
  (out / ".partial").mkdir(exist_ok=True)
  (out / ".partial" / f"k{last:g}_s0.json").write_text(
      json.dumps({"key": key, "results": {"art_l2": kept_l2}}))
  again = _run_quick("study.py", out, tmp_path)
  assert f"kept {len(cut['runs'])} finished runs" in again.stdout, again.stdout[-2000:]
  assert "0 dense runs and 1 cells to go" in again.stdout, again.stdout[-2000:]
  resumed = json.loads((out / "study.json").read_text())
  assert resumed["complete"] is True and len(resumed["runs"]) == len(runs)
  assert next(r for r in resumed["runs"] if r["target"] == last
              and r["method"] == "art_l2")["time"] == 12345.0
  assert not (out / ".partial" / f"k{last:g}_s0.json").exists()
  kept = [r for r in resumed["runs"] if r["target"] != last]
  key = lambda r: (r["method"], r["target"], r["seed"])  # noqa: E731
  assert sorted(kept, key=key) == sorted(cut["runs"], key=key)  # kept as they were
  # Extendable: more seeds later (``--seeds 1``, here at one sparsity) keep every earlier run;
  # the report covers both seeds and says it is not complete (seed 1 lacks the first sparsity).
  more = _run_quick("study.py", out, tmp_path, "--seeds", "1", "--sparsities", str(last))
  assert "1 dense runs and 1 cells to go" in more.stdout, more.stdout[-2000:]
  extended = json.loads((out / "study.json").read_text())
  assert extended["settings"]["seeds"] == [0, 1]
  assert extended["settings"]["sparsities"] == settings["sparsities"]
  assert extended["complete"] is False
  assert sorted([r for r in extended["runs"] if r["seed"] == 0], key=key) == sorted(
      resumed["runs"], key=key)
  seed1 = {(r["method"], r["target"]) for r in extended["runs"] if r["seed"] == 1}
  assert seed1 == {("dense", 0.0)} | {(m, last) for m in METHODS - {"dense"}}
  # the seed's dense run was trained once and kept for its cells (one-shot starts from it)
  import pickle
  with open(out / ".dense_cache" / "seed1.pkl", "rb") as f:
    cached = pickle.load(f)
  dense1 = next(r for r in extended["runs"] if r["seed"] == 1 and r["method"] == "dense")
  # the kept final state is the model the dense run reported: its test accuracy recomputed
  # with a NumPy forward pass of the MLP on the digits' test split
  from hypersparse_jax import data
  ds = data.load_dataset("digits", None)
  x = (np.asarray(ds.test_images, np.float32) / 255 - np.asarray(ds.mean)) / np.asarray(ds.std)
  h = x.reshape(len(x), -1)
  p = {k: {n: np.asarray(v, np.float32) for n, v in layer.items()}
       for k, layer in cached["final"]["params"].items()}
  names = sorted(p, key=lambda k: int(k[2:]))  # fc1, fc2, fc3
  for name in names[:-1]:
    h = np.maximum(h @ p[name]["kernel"] + p[name]["bias"], 0)
  logits = h @ p[names[-1]]["kernel"] + p[names[-1]]["bias"]
  accuracy = float(np.mean(logits.argmax(1) == np.asarray(ds.test_labels)))
  assert abs(accuracy - dense1["final_test_accuracy"]) <= 1 / len(x) + 1e-12
  dense_cell = next(c for c in extended["cells"] if c["method"] == "dense")
  assert dense_cell["final_test_accuracy"]["n"] == 2

  # the headline pivot reports the final epoch (no selection on the test set), recomputed here
  pivot = table.split("Final fine-tune test accuracy")[1]
  row = next(line for line in pivot.splitlines() if line.startswith("| ART + HyperSparse |"))
  for s, cell in zip(settings["sparsities"], row.strip("|").split("|")[1:]):
    finals = [r["final_test_accuracy"] for r in runs
              if r["method"] == "art_hypersparse" and r["target"] == s]
    assert cell.strip().startswith(f"{100 * sum(finals) / len(finals):.2f} ±"), (cell, finals)


def test_pysource_tables_and_plot_from_runs(tmp_path):
  """The pysource report (bits per byte, lower is better) from hand-made runs: means and stds
  recomputed here, and the two ART penalties, one-shot, GMP and dense as the methods."""
  study, = _bench("study")
  assert study.methods("pysource") == ("art_hypersparse", "art_l1", "oneshot", "gmp", "dense")
  sparsities, runs = [0.9, 0.98], []
  for seed, shift in ((0, 0.0), (1, 0.1)):
    runs.append(dict(method="dense", target=0.0, seed=seed, test_bits_per_byte=2.5 + shift,
                     test_accuracy=0.55, best_test_accuracy=0.5, final_test_accuracy=0.5,
                     sparsity=0.0, art_epochs=None, time=1.0))
    for m in ("art_hypersparse", "art_l1", "oneshot", "gmp"):
      for s in sparsities:
        runs.append(dict(method=m, target=s, seed=seed, test_bits_per_byte=2.6 + s + shift,
                         test_accuracy=0.5, best_test_accuracy=0.5, final_test_accuracy=0.5,
                         sparsity=s, art_epochs=1, time=2.0))
  settings = dict(dataset="pysource", model="transformer", layers=2, d_model=64, heads=4, context=64, seeds=[0, 1],
                  optimizer="adamw", lr=3e-3, batch_size=32, steps_per_epoch=100,
                  warmup_epochs=5, max_art_epochs=6, lambda_init=2e-3, eta=2.0, epochs=4,
                  lr_decay=0.1, lr_steps=[2, 3], sparsities=sparsities,
                  methods=list(study.methods("pysource")))
  report = {"settings": settings, "wall_time": 3.0, "runs": runs,
            "cells": study.aggregate(runs, sparsities)}
  study.write_markdown(tmp_path / "study.md", report)
  study.write_plot(tmp_path / "study.png", report)
  assert (tmp_path / "study.png").read_bytes().startswith(b"\x89PNG")
  table = (tmp_path / "study.md").read_text()
  pivot = table.split("Test bits per byte, mean ± std:")[1]
  row = next(line for line in pivot.splitlines() if line.startswith("| ART + HyperSparse |"))
  for s, cell in zip(sparsities, row.strip("|").split("|")[1:]):
    values = [2.6 + s, 2.7 + s]
    assert cell.strip() == f"{sum(values) / 2:.3f} ± {float(np.std(values, ddof=1)):.3f}"
  assert "ART + L2" not in table


def test_default_out_is_per_dataset():
  """Without --out, each dataset's study writes to its own folder (the digits study keeps
  benchmarks/results/study), so running one study never overwrites another's results."""
  study, = _bench("study")
  results = pathlib.Path("benchmarks") / "results"
  assert pathlib.Path(study.default_out("digits")) == results / "study"
  assert pathlib.Path(study.default_out("pysource")) == results / "study_pysource"
  assert pathlib.Path(study.default_out("cifar10")) == results / "study_cifar10"
  assert len({study.default_out(d) for d in ("digits", "pysource", "cifar10")}) == 3
  assert pathlib.Path(study.default_out("fashion_mnist", "lenet5")) == (
      results / "study_fashion_mnist_lenet5")
  assert study.build_parser().parse_args([]).out is None  # resolved per dataset in main()


def test_channel_report_of_an_unfinished_study_says_its_seeds_per_cell(tmp_path):
  """A channel study still running (50 %: two seeds in, 75 %: one) says so in study.md, with
  the seeds per cell; its 50 % cell is the mean ± std (ddof 1) of the two runs, computed here.
  Once every cell has its seeds, the note goes."""
  study, study_channels = _bench("study", "study_channels")
  acc = {(0.5, 0): 0.91, (0.5, 1): 0.93, (0.75, 0): 0.88}
  runs = [dict(fraction=0.0, method="dense", seed=s, final_test_accuracy=0.92,
               best_test_accuracy=0.92, sparsity=0.0, art_epochs=None, time=1.0) for s in (0, 1)]
  runs += [dict(fraction=x, method="l1_filter", seed=s, final_test_accuracy=a,
                best_test_accuracy=a, sparsity=x, art_epochs=0, epochs=9, time=1.0,
                flops_slim=1.0, flops_dense=4.0, params_slim=1.0, params_dense=2.0)
           for (x, s), a in acc.items()]
  settings = dict(dataset="fashion_mnist", model="vgg", seeds=[0, 1], fractions=[0.5, 0.75],
                  methods=["l1_filter"], warmup_epochs=3, epochs=3)

  def markdown(rs, complete):
    report = {"settings": settings, "wall_time": 60.0, "complete": complete, "runs": rs,
              "cells": study_channels.aggregate(rs, settings["fractions"], settings)}
    study_channels.write_markdown(tmp_path / "study.md", report)
    return (tmp_path / "study.md").read_text()

  text = markdown(runs, False)
  assert "(incomplete: 1–2 seed(s) per cell so far)" in text
  row = next(line for line in text.splitlines() if line.startswith("| L1-norm filters"))
  two = [100 * acc[(0.5, 0)], 100 * acc[(0.5, 1)]]
  assert row.split("|")[2].strip() == f"{np.mean(two):.2f} ± {np.std(two, ddof=1):.2f}"
  assert row.split("|")[3].strip() == "88.00 ± 0.00"
  done = runs + [dict(runs[-1], seed=1, final_test_accuracy=0.86)]
  assert "incomplete" not in markdown(done, True)


def test_quick_pattern_study_and_resume(tmp_path):
  """benchmarks/study_patterns.py --quick on the digits: global and ERK at 90 % and 2:4, each
  with ART + HyperSparse, one-shot and GMP; the models have the pattern's sparsity; a second
  run keeps every finished cell."""
  out = tmp_path / "patterns"
  _run_quick("study_patterns.py", out, tmp_path)
  report = json.loads((out / "study.json").read_text())
  assert report["complete"] is True
  runs = report["runs"]
  keys = {(r["pattern"], r["method"]) for r in runs}
  assert keys == {("dense", "dense")} | {(p, m) for p in ("global@0.9", "erk@0.9", "nm2:4")
                                         for m in ("art_hypersparse", "oneshot", "gmp")}
  for r in runs:
    if r["pattern"] == "nm2:4":
      assert r["sparsity"] == 0.5  # the MLP's kernels all have inputs divisible by 4
    elif r["pattern"] != "dense":
      assert 0.9 <= r["sparsity"] < 0.9 + 3 / 1000, r
  table = (out / "study.md").read_text()
  assert "| erk | ART + HyperSparse |" in table and "| 2:4 | 50.00 % |" in table
  assert (out / "study.png").read_bytes().startswith(b"\x89PNG")
  again = _run_quick("study_patterns.py", out, tmp_path)
  assert "kept 10 runs; 0 dense runs and 0 cells to go" in again.stdout
  assert json.loads((out / "study.json").read_text())["runs"] == runs
  # the report is rewritten on resume and keeps the given row order (global before ERK), not
  # an alphabetical one
  assert json.loads((out / "study.json").read_text())["settings"]["distributions"] == [
      "global", "erk"]
  table = (out / "study.md").read_text()
  assert table.index("| global | ART") < table.index("| erk | ART"), table


def test_pattern_study_takes_the_main_studys_global_runs():
  """The pattern study's global-threshold cells are the main study's runs: on the committed
  LeNet-300-100 results (where the pattern study ran them itself, before it could reuse them)
  what it would take from the main study equals what it computed, run for run; with other
  settings it takes nothing."""
  study, study_patterns = _bench("study", "study_patterns")
  results = ROOT / "benchmarks" / "results"
  own = json.loads((results / "patterns_fashion_mnist_lenet300" / "study.json").read_text())
  settings, seeds = own["settings"], own["settings"]["seeds"]
  cells = [({"distribution": "global", "nm": None, "sparsity": x}, s)
           for x in settings["sparsities"] for s in seeds]
  cells += [({"distribution": "erk", "nm": None, "sparsity": 0.9}, 0),
            ({"distribution": "global", "nm": "2:4", "sparsity": 0.5}, 0)]
  main = str(results / "study_fashion_mnist")
  report = json.loads((results / "study_fashion_mnist" / "study.json").read_text())
  assert study.same_settings(report["settings"], settings, study_patterns._MAIN_ONLY)
  taken = study_patterns.reused_runs(main, report, cells, seeds)
  assert len(taken) == 3 * len(settings["sparsities"]) * len(seeds) + len(seeds)
  mine = {(r["pattern"], r["method"], r["seed"]): r for r in own["runs"]}
  for r in taken:
    assert r["from"] == main
    computed = mine[(r["pattern"], r["method"], r["seed"])]
    for k in ("final_test_accuracy", "best_test_accuracy", "sparsity", "art_epochs"):
      assert r[k] == computed[k], (r, computed)
  assert not study.same_settings(report["settings"], dict(settings, lr=0.1),
                                 study_patterns._MAIN_ONLY)


def test_pattern_study_finds_the_main_study(monkeypatch):
  """LeNet-300-100 is Fashion-MNIST's preset model: its main study is the dataset's folder
  (run without --model); other settings find none (and then the pattern study keeps its own
  dense cache)."""
  study, study_patterns = _bench("study", "study_patterns")
  monkeypatch.chdir(ROOT)
  settings = json.loads((ROOT / "benchmarks" / "results" / "patterns_fashion_mnist_lenet300" /
                         "study.json").read_text())["settings"]
  args = study_patterns.build_parser().parse_args(["--dataset", "fashion_mnist", "--model",
                                                   "lenet300"])
  find = lambda s: study.find_main_study(args, s, study_patterns._MAIN_ONLY)  # noqa: E731
  folder, report = find(settings)
  assert folder == os.path.join("benchmarks", "results", "study_fashion_mnist")
  assert report["settings"]["model"] == "lenet300" and report["runs"]
  assert find(dict(settings, lr=0.1)) == (None, None)
  args.reuse = ""
  assert find(settings) == (None, None)
  # folders per depth and width
  assert study.default_out("fashion_mnist", "vgg", 11, 0.25).endswith(
      "study_fashion_mnist_vgg11_w0.25")
  assert study.default_out("fashion_mnist", "lenet5", None, 1.0).endswith(
      "study_fashion_mnist_lenet5")


def test_channel_study_takes_the_main_studys_dense_runs(monkeypatch):
  """The channel study of LeNet-5 finds the main LeNet-5 study (same schedule) for its dense
  runs; the quarter-width VGG has none and trains its own."""
  study, study_channels = _bench("study", "study_channels")
  monkeypatch.chdir(ROOT)

  def settings(argv):
    args = study.build_parser().parse_args(argv)
    args.reuse = None
    cfg = study.make_config(args, 0.5, "hypersparse", 0)
    s = study.base_settings(cfg)
    s.update(lr_steps=list(cfg.lr_steps), fractions=[0.5], seeds=[0], quick=False)
    return args, s

  args, s = settings(["--dataset", "fashion_mnist", "--model", "lenet5"])
  assert study.find_main_study(args, s, study_channels._MAIN_ONLY)[0] == os.path.join(
      "benchmarks", "results", "study_fashion_mnist_lenet5")
  args, s = settings(["--dataset", "fashion_mnist", "--model", "vgg", "--depth", "11",
                      "--width", "0.25"])
  assert study.find_main_study(args, s, study_channels._MAIN_ONLY) == (None, None)


def test_quick_channel_study_and_resume(tmp_path):
  """benchmarks/study_channels.py --quick (digits CNN, 50 % of the channels): the six methods
  and the dense run, each pruned run with its slimmed architecture, which has the parameter
  count it reports; both L1-norm filter methods and per-layer ART + HyperSparse keep
  C − floor(C/2) channels in every layer (the same slimmed model's size), the gradual filter
  method over ART's epochs; network slimming's channels are those of a NumPy global
  threshold on the raw BatchNorm scales of its kept sparsity-trained model, with λ from Liu et
  al.'s total pull worked out here; a second run keeps every run, and a method added to a
  finished study runs alone, the others kept."""
  out = tmp_path / "channels"
  _run_quick("study_channels.py", out, tmp_path)
  report = json.loads((out / "study.json").read_text())
  assert report["complete"] is True
  runs = report["runs"]
  assert sorted(r["method"] for r in runs) == ["art_hypersparse", "art_hypersparse_uniform",
                                               "art_l1", "dense", "gmp_filter", "l1_filter",
                                               "slimming"]
  import jax
  import jax.numpy as jnp
  from hypersparse_jax import channels
  for r in runs:
    if r["method"] == "dense":
      continue
    assert 0.4 < r["sparsity"] < 0.6 and r["params_slim"] < r["params_dense"]
    m = channels.model_from_description(r["slim_model"])
    shapes = jax.eval_shape(lambda k, m=m: m.init(k, jnp.zeros((1, 8, 8, 1)), train=False),
                            jax.random.PRNGKey(0))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"])) == (
        r["params_slim"])
  assert "| ART + group HyperSparse |" in (out / "study.md").read_text()
  by = {r["method"]: r for r in runs}
  s = report["settings"]
  for m in ("l1_filter", "gmp_filter", "art_hypersparse_uniform"):  # 32 and 64 channels
    assert by[m]["channels_kept"] == {"conv1": 32 - 16, "conv2": 64 - 32}, by[m]["channels_kept"]
  assert by["art_hypersparse_uniform"]["flops_slim"] == by["l1_filter"]["flops_slim"]
  art = by["art_hypersparse"]
  assert by["gmp_filter"]["art_epochs"] == art["art_epochs"] >= 1
  assert by["gmp_filter"]["epochs"] == s["warmup_epochs"] + art["art_epochs"] + s["epochs"]
  assert by["l1_filter"]["epochs"] == s["warmup_epochs"] + 2 * s["epochs"]
  # network slimming: λ = 1e-4·391·(80·0.1 + 40·0.01 + 40·0.001) / Σ lr over its sparsity
  # training (warm-up + ART's cap on regularisation, constant lr)
  import math
  import pickle
  from hypersparse_jax import data
  spe = math.ceil(data.load_dataset("digits", None).num_train / s["batch_size"])
  sparse_epochs = s["warmup_epochs"] + s["max_art_epochs"]
  slim = by["slimming"]
  assert slim["slimming_lambda"] == pytest.approx(
      1e-4 * 391 * 8.44 / (spe * s["lr"] * sparse_epochs))
  assert slim["epochs"] == sparse_epochs + s["epochs"]
  with open(out / ".slim_cache" / "seed0.pkl", "rb") as f:
    trained = pickle.load(f)["final"]["params"]
  gammas = [np.abs(np.asarray(trained[bn]["scale"], np.float32)) for bn in ("bn1", "bn2")]
  allg = np.concatenate(gammas)
  t = np.sort(allg)[int(math.floor(0.5 * allg.size))]
  kept = [int(max(1, (g > t).sum() + (g.max() <= t))) for g in gammas]
  assert [slim["channels_kept"]["conv1"], slim["channels_kept"]["conv2"]] == kept
  again = _run_quick("study_channels.py", out, tmp_path)
  assert "kept 7 runs; 0 dense runs and 0 cells to go" in again.stdout
  assert json.loads((out / "study.json").read_text())["runs"] == runs
  # a study written before gmp_filter and slimming existed, on a machine without the cached
  # models: only those two run, the rest is kept; the cell trains the dense model itself, and
  # slimming's training after it still starts from the initial weights (the dense training's
  # donated buffers are its own copies)
  import shutil
  new_methods = ("gmp_filter", "slimming")
  old = dict(report, runs=[r for r in runs if r["method"] not in new_methods], complete=False)
  old["settings"] = dict(s, methods=[m for m in s["methods"] if m not in new_methods])
  (out / "study.json").write_text(json.dumps(old))
  shutil.rmtree(out / ".dense_cache")
  shutil.rmtree(out / ".slim_cache")
  again = _run_quick("study_channels.py", out, tmp_path)
  assert "kept 5 runs; 0 dense runs and 1 cells to go" in again.stdout, again.stdout
  assert "gmp_filter:" in again.stdout and "slimming:" in again.stdout
  assert "art_l1:" not in again.stdout
  new = json.loads((out / "study.json").read_text())
  assert new["complete"] is True and not (out / ".partial" / "c0.5_s0.json").exists()
  key = lambda r: (r["method"], r["seed"])  # noqa: E731
  kept = {key(r): r for r in runs if r["method"] not in new_methods}
  assert {key(r): r for r in new["runs"] if r["method"] not in new_methods} == kept
  # the same models as the first time: each run's training is a function of its seed
  for m in new_methods:
    first, second = by[m], {r["method"]: r for r in new["runs"]}[m]
    assert second["channels_kept"] == first["channels_kept"]
    assert second["final_test_accuracy"] == pytest.approx(first["final_test_accuracy"], abs=0.02)


def test_l1_filter_mask_matches_numpy():
  """Li et al.'s criterion in the channel study: per layer, the floor(κ·C) channels of smallest
  weight L1 norm go (NumPy's stable argsort; a tie put in on purpose goes to the earlier)."""
  study_channels, = _bench("study_channels")
  rng = np.random.default_rng(0)
  params = {"fc1": {"kernel": rng.normal(size=(6, 7)).astype(np.float32), "bias": np.zeros(7)},
            "fc2": {"kernel": rng.normal(size=(7, 5)).astype(np.float32), "bias": np.zeros(5)},
            "fc3": {"kernel": rng.normal(size=(5, 3)).astype(np.float32), "bias": np.zeros(3)}}
  params["fc1"]["kernel"][:, 4] = params["fc1"]["kernel"][:, 2]  # equal L1 norms
  for kappa in (0.3, 0.5, 0.9):
    mask = study_channels.l1_filter_mask(params, kappa)
    for name in ("fc1", "fc2"):
      l1 = np.abs(params[name]["kernel"]).sum(axis=0)
      want = np.ones(l1.size, bool)
      want[np.argsort(l1, kind="stable")[:min(int(np.floor(kappa * l1.size)), l1.size - 1)]] = False
      np.testing.assert_array_equal(np.asarray(mask[name]["bias"]), want, err_msg=name)
    assert np.asarray(mask["fc3"]["kernel"]).all()


def _slow_state(path, log):
  """A worker's compute of a cached state: logs itself, takes a while, returns a result."""
  study, = _bench("study")

  def compute():
    with open(log, "a") as f:
      f.write(f"{os.getpid()}\n")
    time.sleep(2.0)
    return {"acc": 0.5}, {"w": np.arange(3.0)}
  result, state = study.cached_states(path, '{"k": 1}', ("final",), compute)
  return result["acc"], np.asarray(state["w"]).tolist()


def test_cached_state_is_computed_once_by_workers_that_need_it_at_once(tmp_path):
  """Three real processes ask for the same uncached state at once (network slimming's per-seed
  model is needed by every fraction's cell): one computes it, the others wait for its lock and
  read its file; all get the same state."""
  import concurrent.futures
  import multiprocessing
  path, log = str(tmp_path / "cache" / "seed0.pkl"), str(tmp_path / "log")
  with concurrent.futures.ProcessPoolExecutor(
      3, mp_context=multiprocessing.get_context("spawn")) as pool:
    outs = list(pool.map(_slow_state, [path] * 3, [log] * 3))
  assert outs == [(0.5, [0.0, 1.0, 2.0])] * 3
  with open(log) as f:
    assert len(f.read().split()) == 1  # computed once
  assert _slow_state(path, log) == outs[0]  # later: read from the file, not computed
  with open(log) as f:
    assert len(f.read().split()) == 1


def test_study_workers_exit_when_the_study_is_killed(tmp_path):
  """A study killed by SIGKILL (no chance to clean up) leaves no worker computing on: each
  worker's watchdog (study.exit_with_parent, installed by the pool's initializer) sees its
  parent gone and exits within seconds."""
  import signal
  import time
  driver = tmp_path / "driver.py"
  driver.write_text(
      "import concurrent.futures, multiprocessing, os, sys, time\n"
      f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
      "import study\n"
      "if __name__ == '__main__':\n"
      "  with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("
      "'spawn'), initializer=study._worker_init, initargs=(None,)) as pool:\n"
      "    print(pool.submit(os.getpid).result(), flush=True)\n"
      "    pool.submit(time.sleep, 300).result()\n")
  proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, text=True)
  try:
    worker = int(proc.stdout.readline())
    os.kill(worker, 0)  # alive
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      try:
        os.kill(worker, 0)
        with open(f"/proc/{worker}/stat") as f:  # a zombie not yet reaped has exited too
          if f.read().rsplit(")", 1)[1].split()[0] == "Z":
            break
      except (ProcessLookupError, FileNotFoundError):
        break
      time.sleep(0.2)
    else:
      os.kill(worker, signal.SIGKILL)
      pytest.fail(f"worker {worker} still running 30 s after its study was killed")
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def test_a_failed_cell_does_not_lose_the_cells_beside_it(capsys):
  """study.finished: a cell that raises is told in one line and counted, and the cells that
  finish before and after it are still handed over (to be written to study.json; their
  .partial/ files are removed by the main process only after that)."""
  import concurrent.futures
  study, = _bench("study")
  futures = [concurrent.futures.Future() for _ in range(3)]
  futures[0].set_result((0.5, 2, {"art_hypersparse": {"final_test_accuracy": 0.9}}))
  futures[1].set_exception(RuntimeError("Array has been deleted with shape=float32[16]."))
  futures[2].set_result((0.9, 2, {"slimming": {"final_test_accuracy": 0.1}}))
  failures = []
  got = list(study.finished(futures, failures))
  assert sorted(g[0] for g in got) == [0.5, 0.9]
  assert len(failures) == 1 and "deleted" in str(failures[0])
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "a cell failed (RuntimeError: Array has been deleted" in err


def test_partial_file_stays_until_the_main_process_drops_it(tmp_path):
  """A cell's finished methods are kept in .partial/ by the worker and removed by
  Partial.drop (the main process, after study.json is written), not by the worker."""
  import argparse
  study, = _bench("study")
  args = argparse.Namespace(out=str(tmp_path))
  p = study.Partial(args, "c0.75_s2", "{}")
  assert p.run("l1_filter", lambda: {"final_test_accuracy": 0.8974}) == {
      "final_test_accuracy": 0.8974}
  again = study.Partial(args, "c0.75_s2", "{}")
  assert again.run("l1_filter", lambda: pytest.fail("recomputed a kept method")) == {
      "final_test_accuracy": 0.8974}
  assert (tmp_path / ".partial" / "c0.75_s2.json").exists()
  study.Partial.drop(str(tmp_path), "c0.75_s2")
  assert not (tmp_path / ".partial" / "c0.75_s2.json").exists()
  study.Partial.drop(str(tmp_path), "c0.75_s2")  # already gone: nothing to do
