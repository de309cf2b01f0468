"""End-to-end tests of ``hypersparse-train`` (``hypersparse_jax.cli``, ``hypersparse_jax.train``) on the bundled digits.

Every run uses a tiny ART protocol (1 warm-up epoch, at most 3 regularisation epochs, 2 fine-tune
epochs). Compilation dominates the cost of such a run, so this module switches on JAX's
persistent compilation cache in a temporary folder (for this module only, subprocesses included):
the first run compiles, the others load the same executables.

Assertions are made against independent facts: the files a run leaves, arrays read back from the
orbax checkpoints and ``model_sparse.npz`` with NumPy, numbers recomputed from those arrays, and
equality between an uninterrupted run and one that was SIGKILLed and resumed.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import hypersparse_jax
from hypersparse_jax import checkpointing, cli, config, models, train
from hypersparse_jax import data as hs_data

TINY = ["--model", "mlp", "--warmup-epochs", "1", "--epochs", "2", "--max-art-epochs", "3",
        "--lambda-init", "1e-3", "--eta", "2", "--no-progress"]
LAMBDA_INIT, ETA, SPARSITY, WARMUP, FT_EPOCHS = 1e-3, 2.0, 0.9, 1, 2
SUMMARY_KEYS = ("dataset", "model", "sparsity_target", "sparsity_achieved", "test_accuracy",
                "selection", "selected_epoch", "val_accuracy", "best_val_accuracy",
                "best_test_accuracy", "best_test_epoch", "final_test_accuracy", "val_fraction",
                "num_train", "num_val", "art_rule", "pruned_eval", "art_epochs", "lambda_final",
                "num_weights", "num_nonzero_weights", "dense_bytes", "sparse_bytes",
                "compression_ratio")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_ENV = {}
# hypersparse-train as its console script runs it
TRAIN_CMD = "from hypersparse_jax.console import train; train()"


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache in a temporary folder, restored afterwards."""
  try:  # private: reset so that the new settings take effect after earlier compilations
    from jax._src.compilation_cache import reset_cache
  except ImportError:  # pragma: no cover - only slower
    reset_cache = lambda: None  # noqa: E731

  path = str(tmp_path_factory.mktemp("jax_cache"))
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {n: getattr(jax.config, n) for n in names}
  for name, value in zip(names, (path, 0.0, -1)):
    jax.config.update(name, value)
  reset_cache()
  CACHE_ENV.update(JAX_COMPILATION_CACHE_DIR=path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  reset_cache()
  CACHE_ENV.clear()


def tiny(**options):
  """``TINY`` with some options replaced, e.g. ``tiny(model="cnn")``."""
  argv = list(TINY)
  for name, value in options.items():
    argv[argv.index("--" + name.replace("_", "-")) + 1] = str(value)
  return argv


def call_main(argv):
  """``cli.main(argv)``'s exit code, argparse's SystemExit included."""
  try:
    return cli.main([str(a) for a in argv])
  except SystemExit as e:
    return e.code


def read_ckpt(run_dir, kind, step=None):
  """The ``state`` item of checkpoint ``kind`` (newest step by default) as NumPy arrays."""
  directory = os.path.join(run_dir, "checkpoints", kind)
  if step is None:
    step = max(int(s) for s in os.listdir(directory) if s.isdigit())
  tree = ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), "state"))
  return jax.tree.map(np.asarray, tree)


def ckpt_steps(run_dir, kind):
  directory = os.path.join(run_dir, "checkpoints", kind)
  return sorted(int(s) for s in os.listdir(directory) if s.isdigit())


def read_json(path):
  with open(path) as f:
    return json.load(f)


def read_metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def without_time(records):
  return [{k: v for k, v in r.items() if k != "time"} for r in records]


def flat(tree):
  """``{path string: array}`` of a pytree of arrays (dicts, lists, None)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def assert_trees_equal(a, b):
  fa, fb = flat(a), flat(b)
  assert sorted(fa) == sorted(fb)
  assert fa, "empty trees"
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


def snapshot(directory):
  """``{relative path: (mtime_ns, sha256)}`` of every file under ``directory``.

  The run-directory lock file is left out: every run that takes the lock writes its PID there.
  """
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      if name == ".lock" and root == directory:
        continue
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      out[os.path.relpath(path, directory)] = (os.stat(path).st_mtime_ns, digest)
  return out


def copy_run(src, dst):
  shutil.copytree(src, dst, copy_function=shutil.copy2)
  return str(dst)


def kernels(params):
  """``{layer name: kernel}`` of a ``{layer: {kernel, bias}}`` dict."""
  return {name: np.asarray(leaf["kernel"]) for name, leaf in params.items()
          if "kernel" in leaf and np.ndim(leaf["kernel"]) >= 2}


def error_lines(err):
  return [line for line in err.splitlines() if "error:" in line]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, _compilation_cache):
  """An uninterrupted tiny run (shared: tests that change a run work on a copy)."""
  outdir = str(tmp_path_factory.mktemp("run") / "a")
  assert call_main(TINY + ["--outdir", outdir]) == 0
  return outdir


# ------------------------------------------------------------------------------------------------
# 1. A complete run
# ------------------------------------------------------------------------------------------------


def test_run_writes_files_and_consistent_summary(run_a):
  for name in ("config.json", "metrics.jsonl", "summary.json", "model_sparse.npz"):
    assert os.path.isfile(os.path.join(run_a, name)), name
  for kind in ("latest", "best", "init"):
    assert ckpt_steps(run_a, kind), kind

  config = read_json(os.path.join(run_a, "config.json"))
  assert (config["dataset"], config["model"], config["sparsity"]) == ("digits", "mlp", SPARSITY)
  assert (config["lambda_init"], config["eta"], config["warmup_epochs"], config["epochs"],
          config["max_art_epochs"]) == (LAMBDA_INIT, ETA, WARMUP, FT_EPOCHS, 3)

  summary = read_json(os.path.join(run_a, "summary.json"))
  assert set(SUMMARY_KEYS) <= set(summary)
  # the preprocessing a deployment needs: digits' statistics of its training split (75 %,
  # stratified, seed 0), recomputed here from scikit-learn's images
  from sklearn import datasets as sk_datasets, model_selection
  digits = sk_datasets.load_digits()
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
  train_x = model_selection.train_test_split(images, digits.target, test_size=0.25,
                                             random_state=0, stratify=digits.target)[0]
  pre = summary["preprocessing"]
  assert (pre["layout"], pre["dtype"], pre["input_shape"]) == ("NHWC", "uint8", [8, 8, 1])
  assert pre["scale"] == pytest.approx(1 / 255)
  assert pre["mean"] == pytest.approx([train_x.mean() / 255], rel=1e-9)
  assert pre["std"] == pytest.approx([train_x.std() / 255], rel=1e-9)
  assert (summary["dataset"], summary["model"], summary["sparsity_target"]) == (
      "digits", "mlp", SPARSITY)

  # Recount from the exported final weights.
  exported = hypersparse_jax.load_sparse(os.path.join(run_a, "model_sparse.npz"))
  ks = kernels(exported["params"])
  assert sorted(ks) == ["fc1", "fc2", "fc3"]
  n = sum(v.size for v in ks.values())
  nonzero = sum(int(np.count_nonzero(v)) for v in ks.values())
  assert summary["num_weights"] == n == 64 * 256 + 256 * 128 + 128 * 10
  assert summary["num_nonzero_weights"] == nonzero
  assert summary["sparsity_achieved"] == pytest.approx(1 - nonzero / n, abs=1e-12)
  assert 1 - nonzero / n >= SPARSITY - 1e-9
  # Global magnitude pruning keeps |w| > sort(|w|)[floor(κ n)]: at most n - floor(κ n) - 1 kept.
  assert nonzero <= n - int(np.floor(SPARSITY * n)) - 1
  assert summary["sparse_bytes"] == os.path.getsize(os.path.join(run_a, "model_sparse.npz"))
  assert summary["dense_bytes"] == sum(v.nbytes for v in flat(exported).values())
  assert summary["compression_ratio"] == pytest.approx(
      summary["dense_bytes"] / summary["sparse_bytes"])

  # The exported weights are the final weights: same as the newest `latest` checkpoint.
  latest = read_ckpt(run_a, "latest")
  assert_trees_equal(exported["params"], latest["train"]["params"])

  # Final test accuracy recomputed with NumPy from the exported weights (ReLU MLP).
  data = hs_data.load_dataset("digits")
  x = (data.test_images.astype(np.float32) / 255 - np.asarray(data.mean, np.float32)) / np.asarray(
      data.std, np.float32)
  h = x.reshape(len(x), -1)
  p = exported["params"]
  h = np.maximum(h @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
  h = np.maximum(h @ p["fc2"]["kernel"] + p["fc2"]["bias"], 0)
  logits = h @ p["fc3"]["kernel"] + p["fc3"]["bias"]
  accuracy = float(np.mean(np.argmax(logits, -1) == data.test_labels))
  assert summary["final_test_accuracy"] == pytest.approx(accuracy, abs=2 / len(x))


def test_metrics_phases_and_lambda_schedule(run_a):
  summary = read_json(os.path.join(run_a, "summary.json"))
  records = read_metrics(run_a)
  art_epochs = summary["art_epochs"]
  assert 1 <= art_epochs <= 3
  assert [r["epoch"] for r in records] == list(range(WARMUP + art_epochs + FT_EPOCHS))
  assert [r["phase"] for r in records] == (
      ["warmup"] * WARMUP + ["art"] * art_epochs + ["finetune"] * FT_EPOCHS)
  if art_epochs < 3:
    assert summary["stop_reason"] == "converged"
  else:
    assert summary["stop_reason"] in ("converged", "max_epochs")

  art = [r for r in records if r["phase"] == "art"]
  lambdas = [r["lambda"] for r in art]
  expected = [np.float32(LAMBDA_INIT * ETA ** i) for i in range(art_epochs)]  # λ is float32
  np.testing.assert_allclose(lambdas, expected, rtol=1e-6)
  for prev, cur in zip(lambdas, lambdas[1:]):
    assert cur / prev == pytest.approx(ETA, rel=1e-6)
  assert summary["lambda_final"] == pytest.approx(LAMBDA_INIT * ETA ** (art_epochs - 1), rel=1e-6)
  assert all(r["lambda"] == 0 for r in records if r["phase"] != "art")
  for r in art:
    assert 0 <= r["pruned_train_accuracy"] <= 1 and r["window_mean"] is not None

  ft = [r for r in records if r["phase"] == "finetune"]
  # without a validation split the headline is the final epoch's; the reference's convention
  # (best fine-tune epoch on the test set) is kept apart
  assert summary["selection"] == "final" and summary["selected_epoch"] == ft[-1]["epoch"]
  assert summary["test_accuracy"] == summary["final_test_accuracy"] == ft[-1]["test_accuracy"]
  assert summary["best_test_accuracy"] == max(r["test_accuracy"] for r in ft)
  best = max(ft, key=lambda r: r["test_accuracy"])  # first of the maxima
  assert summary["best_test_epoch"] == best["epoch"] == ckpt_steps(run_a, "best")[-1]
  assert summary["val_accuracy"] is None and summary["best_val_accuracy"] is None
  assert summary["num_val"] == 0 and all(r["val_accuracy"] is None for r in records)
  assert (summary["art_rule"], summary["pruned_eval"]) == ("reference", "augmented")
  assert all(r["sparsity"] == pytest.approx(summary["sparsity_achieved"]) for r in ft)
  assert all(r["sparsity"] == 0 for r in records if r["phase"] == "warmup")


def test_pruned_weights_stay_zero_during_finetune(run_a):
  steps = ckpt_steps(run_a, "latest")
  assert len(steps) == 2  # both fine-tune epochs (keep=2)
  states = [read_ckpt(run_a, "latest", s)["train"] for s in steps]
  mask = kernels(states[0]["opt_state"][0]["mask"])
  np.testing.assert_equal(kernels(states[1]["opt_state"][0]["mask"]), mask)
  for state in states:
    for k, w in kernels(state["params"]).items():
      assert np.all(w[~mask[k]] == 0), k          # pruned entries exactly zero
      assert np.all(w[mask[k]] != 0), k           # kept entries still trained
  kept = sum(int(m.sum()) for m in mask.values())
  assert kept == read_json(os.path.join(run_a, "summary.json"))["num_nonzero_weights"]
  # The kept weights moved between the two fine-tune epochs; the pruned ones did not.
  w0, w1 = kernels(states[0]["params"]), kernels(states[1]["params"])
  assert any(not np.array_equal(w0[k], w1[k]) for k in w0)
  best = read_ckpt(run_a, "best")
  for k, w in kernels(best["params"]).items():
    assert np.all(w[~mask[k]] == 0)


# ------------------------------------------------------------------------------------------------
# 2. Exact resume after SIGKILL
# ------------------------------------------------------------------------------------------------


def _start(outdir, argv=TINY):
  env = dict(os.environ, **CACHE_ENV)
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.Popen([sys.executable, "-c", TRAIN_CMD, *argv, "--outdir",
                           outdir], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                          cwd=REPO_ROOT)


def _kill_when(proc, outdir, phase, timeout=240.0, path="metrics.jsonl"):
  """SIGKILLs ``proc`` as soon as ``metrics.jsonl`` holds a record of ``phase`` (``phase=None``:
  as soon as the file ``path`` exists)."""
  path = os.path.join(outdir, path)
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      out = proc.stdout.read().decode(errors="replace")
      pytest.fail(f"run ended (rc {proc.returncode}) before a {phase} epoch:\n{out[-3000:]}")
    try:
      with open(path) as f:
        text = f.read()
    except FileNotFoundError:
      text = None
    if text is not None and (phase is None or f'"phase": "{phase}"' in text):
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      out = proc.stdout.read().decode(errors="replace")
      proc.stdout.close()
      return out
    time.sleep(0.005)
  proc.kill()
  proc.wait()
  pytest.fail(f"no {phase} epoch within {timeout} s")


def test_resume_after_sigkill_in_art_and_finetune_is_exact(run_a, tmp_path, capsys):
  outdir = str(tmp_path / "b")

  _kill_when(_start(outdir), outdir, "art")
  assert not os.path.exists(os.path.join(outdir, "summary.json"))
  phases = [json.loads(line)["phase"] for line in open(os.path.join(outdir, "metrics.jsonl"))
            if line.strip().endswith("}")]
  assert phases[-1] == "art"  # killed during the regularisation phase

  out = _kill_when(_start(outdir), outdir, "finetune")
  assert "resuming" in out
  assert not os.path.exists(os.path.join(outdir, "summary.json"))

  assert call_main(TINY + ["--outdir", outdir]) == 0
  assert "resuming" in capsys.readouterr().out

  assert read_json(os.path.join(outdir, "summary.json")) == read_json(
      os.path.join(run_a, "summary.json"))
  assert without_time(read_metrics(outdir)) == without_time(read_metrics(run_a))
  assert read_json(os.path.join(outdir, "config.json")) == read_json(
      os.path.join(run_a, "config.json"))
  assert_trees_equal(hypersparse_jax.load_sparse(os.path.join(outdir, "model_sparse.npz")),
                     hypersparse_jax.load_sparse(os.path.join(run_a, "model_sparse.npz")))
  for kind in ("best", "init", "latest"):
    assert ckpt_steps(outdir, kind) == ckpt_steps(run_a, kind)
    assert_trees_equal(read_ckpt(outdir, kind), read_ckpt(run_a, kind))


def _assert_same_run(outdir, run_a):
  assert read_json(os.path.join(outdir, "summary.json")) == read_json(
      os.path.join(run_a, "summary.json"))
  assert without_time(read_metrics(outdir)) == without_time(read_metrics(run_a))
  for kind in ("best", "init", "latest"):
    assert ckpt_steps(outdir, kind) == ckpt_steps(run_a, kind)
    assert_trees_equal(read_ckpt(outdir, kind), read_ckpt(run_a, kind))


def test_resume_after_sigkill_before_first_checkpoint_and_in_warmup(run_a, tmp_path, capsys):
  outdir = str(tmp_path / "early")
  # as soon as config.json is written: before any checkpoint or epoch
  _kill_when(_start(outdir), outdir, None, path="config.json")
  assert not os.path.exists(os.path.join(outdir, "metrics.jsonl")) or not read_metrics(outdir)
  # then as soon as the warm-up epoch's record is out (its checkpoint may or may not be)
  _kill_when(_start(outdir), outdir, "warmup")
  assert [r["phase"] for r in read_metrics(outdir)] == ["warmup"]
  assert not os.path.exists(os.path.join(outdir, "summary.json"))
  assert call_main(TINY + ["--outdir", outdir]) == 0
  capsys.readouterr()
  _assert_same_run(outdir, run_a)


def test_resume_from_state_left_by_kill_while_writing(run_a, tmp_path, capsys):
  """Killed after the last checkpoint but before summary/export, mid-line in metrics.jsonl,
  with an orbax temporary step folder left behind: the rerun completes identically."""
  outdir = copy_run(run_a, tmp_path / "w")
  os.remove(os.path.join(outdir, "summary.json"))
  os.remove(os.path.join(outdir, "model_sparse.npz"))
  metrics = os.path.join(outdir, "metrics.jsonl")
  with open(metrics, "a") as f:
    f.write('{"epoch": 6, "phase": "fine')  # a record cut by the kill
  tmp_step = os.path.join(outdir, "checkpoints", "latest", "6.orbax-checkpoint-tmp-123")
  os.makedirs(os.path.join(tmp_step, "state"))
  with open(os.path.join(tmp_step, "state", "partial"), "wb") as f:
    f.write(b"\0garbage")

  assert call_main(TINY + ["--outdir", outdir]) == 0
  capsys.readouterr()
  assert read_json(os.path.join(outdir, "summary.json")) == read_json(
      os.path.join(run_a, "summary.json"))
  assert without_time(read_metrics(outdir)) == without_time(read_metrics(run_a))
  assert_trees_equal(hypersparse_jax.load_sparse(os.path.join(outdir, "model_sparse.npz")),
                     hypersparse_jax.load_sparse(os.path.join(run_a, "model_sparse.npz")))


# ------------------------------------------------------------------------------------------------
# 3. A finished run is left alone
# ------------------------------------------------------------------------------------------------


def test_rerun_of_finished_run_changes_nothing(run_a, tmp_path, capsys):
  outdir = copy_run(run_a, tmp_path / "done")
  before = snapshot(outdir)
  assert call_main(TINY + ["--outdir", outdir]) == 0
  out = capsys.readouterr().out
  assert "already finished" in out
  assert "epoch" not in out.replace("already finished", "")  # no training epoch logged
  assert snapshot(outdir) == before


# ------------------------------------------------------------------------------------------------
# 4. Bad input: one-line error, non-zero exit, no traceback, nothing written
# ------------------------------------------------------------------------------------------------


def _assert_clean_error(argv, capsys, outdir=None, must_contain=None):
  rc = call_main(argv)
  out, err = capsys.readouterr()
  assert rc not in (0, None), (rc, out, err)
  assert "Traceback" not in err and "Traceback" not in out
  lines = error_lines(err)
  assert len(lines) == 1, err
  assert lines[0].startswith("hypersparse-train: error:")
  if must_contain is not None:
    assert must_contain.lower() in lines[0].lower(), lines[0]
  if outdir is not None:
    assert not os.path.exists(outdir), os.listdir(outdir)
  return lines[0]


@pytest.mark.parametrize("extra,needle", [
    (["--dataset", "mnist"], "mnist"),
    (["--model", "lenet"], "lenet"),
    (["--model", "resnet", "--depth", "33"], "33"),
    (["--sparsity", "1.0"], "sparsity"),
    (["--sparsity=-0.1"], "sparsity"),
    (["--init-from", "/nonexistent/run"], "/nonexistent/run"),
    (["--dataset", "tinyimagenet", "--data-dir", "/nonexistent"], "/nonexistent"),
], ids=["dataset", "model", "resnet33", "sparsity1", "sparsity-neg", "init-missing",
        "tinyimagenet-missing"])
def test_bad_input_errors_cleanly(extra, needle, tmp_path, capsys):
  outdir = str(tmp_path / "out")
  _assert_clean_error(TINY + extra + ["--outdir", outdir], capsys, outdir, needle)


def test_cifar10_without_data_errors_cleanly(tmp_path, capsys):
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  outdir = str(tmp_path / "out")
  line = _assert_clean_error(["--dataset", "cifar10", "--model", "mlp", "--data-dir",
                              str(data_dir), "--no-progress", "--outdir", outdir], capsys, outdir)
  assert os.listdir(data_dir) == []
  assert "--download" in line and "--data-dir" in line  # the CLI's options, not Python's
  assert "download=True" not in line and "data_dir=" not in line


def test_other_config_in_existing_outdir_errors(run_a, tmp_path, capsys):
  outdir = copy_run(run_a, tmp_path / "other")
  before = snapshot(outdir)
  line = _assert_clean_error(tiny(max_art_epochs=4) + ["--outdir", outdir], capsys, must_contain="configuration")
  assert "max_art_epochs" in line
  assert snapshot(outdir) == before


def test_init_from_other_architecture_errors(run_a, tmp_path, capsys):
  before = snapshot(run_a)
  outdir = str(tmp_path / "cnn")
  _assert_clean_error(tiny(model="cnn") + ["--outdir", outdir, "--init-from", run_a], capsys, outdir)
  assert snapshot(run_a) == before


def test_init_from_folder_without_checkpoint_errors(tmp_path, capsys):
  source = tmp_path / "empty_run"
  source.mkdir()
  outdir = str(tmp_path / "out")
  _assert_clean_error(TINY + ["--outdir", outdir, "--init-from", str(source)], capsys, outdir,
                      "no hypersparse-jax checkpoint")
  assert os.listdir(source) == []  # nothing created in the source folder


def _corrupt(step_dir):
  for root, _, files in os.walk(step_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00not a checkpoint\xff")


def test_corrupt_latest_checkpoint_falls_back_to_previous_step(run_a, tmp_path, capsys):
  """Documented in ``checkpointing``: a damaged newest step is skipped, the previous one used."""
  outdir = copy_run(run_a, tmp_path / "corrupt")
  steps = ckpt_steps(outdir, "latest")
  _corrupt(os.path.join(outdir, "checkpoints", "latest", str(steps[-1])))
  os.remove(os.path.join(outdir, "summary.json"))
  assert call_main(TINY + ["--outdir", outdir]) == 0
  out, err = capsys.readouterr()
  assert f"from checkpoint {steps[-2]}" in out
  assert read_json(os.path.join(outdir, "summary.json")) == read_json(
      os.path.join(run_a, "summary.json"))
  assert without_time(read_metrics(outdir)) == without_time(read_metrics(run_a))
  assert_trees_equal(read_ckpt(outdir, "latest", steps[-1]), read_ckpt(run_a, "latest",
                                                                        steps[-1]))


def test_all_checkpoints_corrupt_errors_cleanly(run_a, tmp_path, capsys):
  outdir = copy_run(run_a, tmp_path / "corrupt_all")
  for step in ckpt_steps(outdir, "latest"):
    _corrupt(os.path.join(outdir, "checkpoints", "latest", str(step)))
  before = snapshot(outdir)
  line = _assert_clean_error(TINY + ["--outdir", outdir], capsys, must_contain="checkpoint")
  log = os.path.join("checkpoints", "restore-errors.log")
  assert log in line
  after = snapshot(outdir)
  assert after.pop(log) and after == before


# ------------------------------------------------------------------------------------------------
# 5. --init-from an earlier run
# ------------------------------------------------------------------------------------------------


def test_init_from_earlier_run_loads_its_best_weights(run_a, tmp_path, capsys):
  outdir = str(tmp_path / "c")
  assert call_main(TINY + ["--outdir", outdir, "--init-from", run_a]) == 0
  capsys.readouterr()
  best_a = read_ckpt(run_a, "best")
  init_c = read_ckpt(outdir, "init")
  assert_trees_equal(init_c, best_a)
  assert read_json(os.path.join(outdir, "config.json"))["init_from"] == run_a
  # Starting from a trained, pruned model: the first (dense warm-up) epoch starts at its zeros.
  initial = read_ckpt(run_a, "init")
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(initial["params"]), jax.tree.leaves(init_c["params"])))
  assert os.path.isfile(os.path.join(outdir, "summary.json"))


def test_init_from_reference_pytorch_checkpoint(tmp_path, capsys):
  """``--init-from file.pth.tar`` (the reference's format) starts from exactly those weights."""
  import torch  # installed by the README's test command
  from hypersparse_jax import torch_models
  net = torch_models.TorchDigitsMLP()
  with torch.no_grad():
    net.fc2.weight[:, :10] = 0.0  # pruned weights in the source must arrive as exact zeros
  path = str(tmp_path / "ref.pth.tar")
  torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, path)
  outdir = str(tmp_path / "from_torch")
  assert call_main(TINY + ["--outdir", outdir, "--init-from", path]) == 0
  init = read_ckpt(outdir, "init")["params"]
  # Independent of our importer: PyTorch Linear stores (out, in); Flax Dense kernels are (in, out).
  np.testing.assert_array_equal(init["fc1"]["kernel"], net.fc1.weight.detach().numpy().T)
  np.testing.assert_array_equal(init["fc2"]["bias"], net.fc2.bias.detach().numpy())
  assert np.all(init["fc2"]["kernel"][:10, :] == 0.0)


# ------------------------------------------------------------------------------------------------
# 6. Guarded run directories, early validation, divergence, interruption
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,needle", [
    (["--lr-decay", "-2"], "--lr-decay"),
    (["--momentum", "1.5"], "--momentum"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--lr", "inf"], "--lr"),
    (["--lr-steps", "1", "0"], "increasing"),
    (["--lr-steps", "5"], "--epochs"),
    (["--seed", "-1"], "--seed"),
    (["--depth", "3"], "--depth"),
    (["--shard-params", "--devices", "1"], "--shard-params"),
], ids=["lr-decay", "momentum", "weight-decay", "lr-inf", "lr-steps-order", "lr-steps-range",
        "seed", "depth-mlp", "shard-params-1-device"])
def test_bad_options_are_refused_before_the_first_step(extra, needle, tmp_path, capsys):
  """Options that used to fail after ART (``--lr-decay -2``), diverge (``--momentum 1.5``) or
  fail in a later epoch are refused before anything is written."""
  outdir = str(tmp_path / "out")
  line = _assert_clean_error(TINY + extra + ["--outdir", outdir], capsys, outdir, needle)
  assert "=None" not in line and "=True" not in line  # user terms, not Python's


def test_epochs_zero_is_refused(tmp_path, capsys):
  outdir = str(tmp_path / "out")
  _assert_clean_error(tiny(epochs=0) + ["--outdir", outdir], capsys, outdir, "--epochs")


def test_outdir_naming_a_file_errors_in_user_terms(tmp_path, capsys):
  path = tmp_path / "a_file"
  path.write_text("x")
  for outdir in (str(path), str(path / "sub")):
    line = _assert_clean_error(TINY + ["--outdir", outdir], capsys, must_contain="--outdir")
    assert "Errno" not in line and "not a directory" in line
  assert path.read_text() == "x"


def test_second_run_on_a_live_outdir_is_refused_naming_the_holder(tmp_path, capsys):
  """A run directory has one owner: a second command exits at once naming the holder's PID,
  and does not touch the first run's files; after the holder is SIGKILLed the lock is stale."""
  outdir = str(tmp_path / "live")
  proc = _start(outdir)
  try:
    metrics = os.path.join(outdir, "metrics.jsonl")
    deadline = time.time() + 240
    while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
      assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
      time.sleep(0.01)
    with open(os.path.join(outdir, "config.json")) as f:
      config_before = f.read()
    start = time.time()
    line = _assert_clean_error(TINY + ["--outdir", outdir], capsys, must_contain="in use")
    assert time.time() - start < 10  # at once, not after loading data and compiling
    assert f"PID {proc.pid}" in line
    with open(os.path.join(outdir, "config.json")) as f:
      assert f.read() == config_before
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
  from hypersparse_jax import run_dir
  with run_dir.RunDirLock(outdir):  # the killed holder left a stale lock: free again
    pass


def test_resume_ignores_download_data_dir_of_digits_and_trailing_slash(run_a, tmp_path, capsys):
  outdir = copy_run(run_a, tmp_path / "again")
  before = snapshot(outdir)
  rc = call_main(TINY + ["--outdir", outdir + "/", "--data-dir", "/somewhere/", "--download"])
  out, err = capsys.readouterr()
  assert rc == 0, err
  assert "already finished" in out
  assert snapshot(outdir) == before


def test_resume_differences_compares_only_what_changes_the_result():
  base = dataclasses.asdict(config.TrainConfig(dataset="cifar10", data_dir="/data/tfds"))
  base["lr_steps"] = list(base["lr_steps"])
  assert config.resume_differences(base, dict(base, data_dir="/data/tfds/")) == {}
  assert config.resume_differences(base, dict(base, data_dir="/data/x/../tfds")) == {}
  assert config.resume_differences(dict(base, download=True), base) == {}
  assert set(config.resume_differences(base, dict(base, data_dir="/data/other"))) == {"data_dir"}
  assert set(config.resume_differences(base, dict(base, lr=0.2))) == {"lr"}
  # lr steps at or past --epochs never fire: same result
  epochs = base["epochs"]
  assert config.resume_differences(dict(base, lr_steps=[1, epochs + 5]),
                                  dict(base, lr_steps=[1])) == {}
  # A key that a config.json of 0.1 lacks counts as what 0.1 did; an unknown one differs.
  old = {k: v for k, v in base.items() if k not in ("val_fraction", "art_rule", "pruned_eval")}
  assert config.resume_differences(old, dict(old, val_fraction=0.0, art_rule="best_mean",
                                            pruned_eval="clean")) == {}
  assert set(config.resume_differences(old, dict(old, val_fraction=0.1))) == {"val_fraction"}
  diff = config.resume_differences(old, dict(old, art_rule="reference"))
  assert set(diff) == {"art_rule"} and "'best_mean'" in diff["art_rule"][0]
  assert set(config.resume_differences(old, dict(old, pruned_eval="augmented"))) == {
      "pruned_eval"}
  assert config.resume_differences(old, dict(old, future_option=1)) == {
      "future_option": ("<missing>", 1)}


def test_diverging_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
  outdir = str(tmp_path / "diverge")
  rc = call_main(tiny(lambda_init=1e30) + ["--outdir", outdir])
  out, err = capsys.readouterr()
  assert rc == 1
  assert "Traceback" not in err
  lines = error_lines(err)
  assert len(lines) == 1, err
  assert "epoch 1 (art)" in lines[0] and "non-finite" in lines[0] and "lambda" in lines[0]
  assert [r["epoch"] for r in read_metrics(outdir)] == [0]  # nothing of the bad epoch
  assert ckpt_steps(outdir, "latest") == [0]
  state = read_ckpt(outdir, "latest", 0)["train"]
  assert all(np.all(np.isfinite(v)) for v in flat(state["params"]).values())
  assert not os.path.exists(os.path.join(outdir, "summary.json"))


def test_ctrl_c_says_where_and_how_to_resume(tmp_path):
  outdir = str(tmp_path / "interrupted")
  proc = _start(outdir)
  metrics = os.path.join(outdir, "metrics.jsonl")
  deadline = time.time() + 240
  while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
    assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
    time.sleep(0.01)
  proc.send_signal(signal.SIGINT)
  out = proc.communicate(timeout=120)[0].decode(errors="replace")
  assert proc.returncode == 130, out
  assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
  last = read_metrics(outdir)[-1]["epoch"]  # interrupted in epoch last + 1, or while saving last
  assert any(f"interrupted at epoch {e}; run the same command to resume" in out
             for e in (last, last + 1)), out


def _importing_numpy(pid: int) -> bool:
  """Whether process ``pid`` has NumPy's core extension mapped: the command's own imports have
  begun (hypersparse_jax.console imports JAX, and NumPy first, after installing its handler).
  Earlier, in the interpreter's own start-up (``site``), Ctrl-C is Python's business."""
  try:
    with open(f"/proc/{pid}/maps") as f:
      return "_multiarray_umath" in f.read()
  except OSError:
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_ctrl_c_at_any_moment_is_one_line_and_exit_130(tmp_path):
  """SIGINT during the imports, the data loading, the first compilations and training, with
  six runs starting at once on a busy machine: every one ends with exit 130 and one line, never
  a traceback or a crash. (Before hypersparse_jax.console ended interrupted runs with
  os._exit, the interpreter's final garbage collection destroyed JAX's CPU client while an
  interrupted asynchronous compilation still used it: SIGSEGV, exit 139, in start-up.) Delays
  count from the moment the command's imports begin. The run interrupted last resumes."""
  delays = (0.0, 0.6, 1.4, 2.4, 4.0, 6.0)
  procs = {delay: _start(str(tmp_path / f"run{delay}")) for delay in delays}
  ready, signalled, deadline = {}, set(), time.time() + 120
  while len(signalled) < len(delays) and time.time() < deadline:
    for delay, proc in procs.items():
      if delay in signalled:
        continue
      if proc.poll() is not None:  # finished (or failed) before its signal: judged below
        signalled.add(delay)
      elif delay not in ready and _importing_numpy(proc.pid):
        ready[delay] = time.time()
      elif delay in ready and time.time() >= ready[delay] + delay:
        proc.send_signal(signal.SIGINT)
        signalled.add(delay)
    time.sleep(0.005)
  assert len(signalled) == len(delays), f"never began importing: {set(delays) - set(ready)}"
  for delay, proc in procs.items():
    out = proc.communicate(timeout=180)[0].decode(errors="replace")
    if proc.returncode == 0:  # finished before the signal (only possible for the latest)
      assert delay == delays[-1], out
      continue
    assert proc.returncode == 130, f"delay {delay}: exit {proc.returncode}\n{out}"
    lines = [line for line in out.splitlines() if line.strip()]
    # The interruption adds exactly one line, the last; what precedes it is the run's normal
    # progress (epoch lines, and on a fast machine the stop-rule message and sparsity table of
    # a run already fine-tuning), never a trace of the signal.
    assert "interrupted" in lines[-1], f"delay {delay}:\n{out}"
    assert sum("interrupted" in line for line in lines) == 1, f"delay {delay}:\n{out}"
    for bad in ("Traceback", "Fatal", "Exception", "Error", "KeyboardInterrupt", "Segmentation"):
      assert bad not in out, f"delay {delay}: {bad}\n{out}"
  resumed = _start(str(tmp_path / f"run{delays[-1]}"))
  out = resumed.communicate(timeout=240)[0].decode(errors="replace")
  assert resumed.returncode == 0, out
  assert read_json(str(tmp_path / f"run{delays[-1]}" / "summary.json"))["sparsity_achieved"] >= 0.9


def test_ctrl_c_swallowed_in_a_gc_callback_is_still_pending(monkeypatch):
  """Python reports and drops an exception raised in a gc callback (JAX registers one): a
  Ctrl-C whose KeyboardInterrupt lands there must still be seen by the training loop."""
  swallowed = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: swallowed.append(u.exc_type))
  fired = []

  def callback(phase, info):
    if phase == "start" and not fired:
      fired.append(True)
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(1000):  # bytecodes: the handler runs here, inside the callback
        pass

  previous = signal.signal(signal.SIGINT, checkpointing.on_sigint)
  checkpointing.clear_interrupt()
  gc.callbacks.append(callback)
  try:
    gc.collect()
  finally:
    gc.callbacks.remove(callback)
    signal.signal(signal.SIGINT, previous)
  assert swallowed == [KeyboardInterrupt]  # Python dropped it ...
  assert checkpointing.interrupt_pending()  # ... the flag did not
  checkpointing.clear_interrupt()
  assert not checkpointing.interrupt_pending()


# ------------------------------------------------------------------------------------------------
# 7. --init-from: what the path is, in one line
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content,needle", [
    (b"hello, not a checkpoint\n", "text file"),
    (b"", "empty"),
    (bytes(range(256)) * 8, "unknown format"),
], ids=["text", "empty", "random"])
@pytest.mark.parametrize("torch_available", [True, False], ids=["torch", "no-torch"])
def test_init_from_a_file_that_is_no_checkpoint_says_what_it_is(content, needle, torch_available,
                                                                tmp_path, capsys, monkeypatch):
  if not torch_available:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  path = tmp_path / "weights.pth"
  path.write_bytes(content)
  outdir = str(tmp_path / "out")
  line = _assert_clean_error(TINY + ["--outdir", outdir, "--init-from", str(path)], capsys,
                             outdir, needle)
  assert "not a checkpoint" in line and "PyTorch" in line and "needs PyTorch" not in line


def test_init_from_sparse_export_says_it_is_an_npz(run_a, tmp_path, capsys):
  outdir = str(tmp_path / "out")
  _assert_clean_error(TINY + ["--outdir", outdir, "--init-from",
                              os.path.join(run_a, "model_sparse.npz")], capsys, outdir, ".npz")


def test_init_from_damaged_torch_zip_errors_cleanly(tmp_path, capsys):
  import torch  # installed by the README's test command
  path = str(tmp_path / "ref.pth")
  torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
  with open(path, "r+b") as f:  # keep the zip directory, damage the pickled data
    data = bytearray(f.read())
    start = data.index(b"data.pkl") + len(b"data.pkl")
    data[start:start + 40] = b"\x00" * 40
    f.seek(0)
    f.write(data)
  outdir = str(tmp_path / "out")
  _assert_clean_error(TINY + ["--outdir", outdir, "--init-from", path], capsys, outdir, "ref.pth")


def test_init_from_checkpoint_kind_and_step_folders(run_a, tmp_path, capsys):
  """``--init-from RUN/checkpoints/best`` and ``.../best/STEP`` load that exact checkpoint."""
  from hypersparse_jax import init_source
  best_step = ckpt_steps(run_a, "best")[-1]
  latest_step = ckpt_steps(run_a, "latest")[0]
  ckpts = os.path.join(run_a, "checkpoints")
  assert init_source.identify(os.path.join(ckpts, "best")) == ("orbax", ckpts, "best", None)
  assert init_source.identify(os.path.join(ckpts, "latest", str(latest_step))) == (
      "orbax", ckpts, "latest", latest_step)
  assert init_source.identify(run_a) == ("orbax", ckpts, None, None)
  # End to end on the step folder of an older `latest` (not what a run dir would give).
  outdir = str(tmp_path / "from_step")
  trainer = train.Trainer(config.TrainConfig(
      model="mlp", init_from=os.path.join(ckpts, "latest", str(latest_step))), outdir,
      progress=False, log=lambda *_: None)
  expected = read_ckpt(run_a, "latest", latest_step)["train"]["params"]
  assert_trees_equal(jax.device_get(trainer.params), expected)
  trainer = train.Trainer(config.TrainConfig(model="mlp", init_from=os.path.join(ckpts, "best")),
                          str(tmp_path / "from_best"), progress=False, log=lambda *_: None)
  assert_trees_equal(jax.device_get(trainer.params), read_ckpt(run_a, "best", best_step)["params"])


def test_unreadable_newest_checkpoint_is_one_line_with_details_in_a_log(run_a, tmp_path, capfd):
  """Array data of the newest step damaged (its metadata intact): orbax's reader threads print
  ~100 lines of tracebacks; the user sees one line, the details are in the log file."""
  outdir = copy_run(run_a, tmp_path / "damaged")
  steps = ckpt_steps(outdir, "latest")
  state_dir = os.path.join(outdir, "checkpoints", "latest", str(steps[-1]), "state")
  for root, _, files in os.walk(state_dir):
    for name in files:
      if os.path.basename(root) == "d":  # the chunk files: keep 10 bytes of each
        path = os.path.join(root, name)
        with open(path, "rb") as f:
          head = f.read(10)
        with open(path, "wb") as f:
          f.write(head)
  os.remove(os.path.join(outdir, "summary.json"))
  assert call_main(TINY + ["--outdir", outdir]) == 0
  out, err = capfd.readouterr()
  assert "Traceback" not in err and "Traceback" not in out, err[-2000:]
  log = os.path.join(outdir, "checkpoints", "restore-errors.log")
  assert [line for line in out.splitlines() if line.startswith("checkpoint step")] == [
      f"checkpoint step {steps[-1]} is unreadable (details in {log}); using step {steps[-2]}"]
  with open(log) as f:
    assert "Traceback" in f.read()
  assert read_json(os.path.join(outdir, "summary.json")) == read_json(
      os.path.join(run_a, "summary.json"))


# ------------------------------------------------------------------------------------------------
# 8. What a log file and the run directory look like
# ------------------------------------------------------------------------------------------------


def test_log_without_terminal_files_with_umask_and_art_progress(tmp_path, capfd):
  """Progress bars requested but stderr is no terminal (captured): no bar output. The stop
  message follows the epoch line it refers to; ART epochs show the near-zero fraction; the run's
  files get the permissions of the umask."""
  outdir = str(tmp_path / "plain")
  old_umask = os.umask(0o027)
  try:
    assert call_main([a for a in TINY if a != "--no-progress"] + ["--outdir", outdir]) == 0
  finally:
    os.umask(old_umask)
  out, err = capfd.readouterr()
  assert "\r" not in err and "it/s" not in err, err[-500:]
  for name in ("config.json", "metrics.jsonl", "summary.json", "model_sparse.npz"):
    assert os.stat(os.path.join(outdir, name)).st_mode & 0o777 == 0o640, name
  lines = out.splitlines()
  art_lines = [i for i, line in enumerate(lines) if " art " in line and line.startswith("epoch")]
  stop = [i for i, line in enumerate(lines)
          if "regularisation done" in line or "stop rule not met" in line]
  assert len(stop) == 1 and stop[0] == art_lines[-1] + 1, out
  records = read_metrics(outdir)
  art_records = [r for r in records if r["phase"] == "art"]
  assert all(("near_zero" in r) == (r["phase"] == "art") for r in records)
  for i, r in zip(art_lines, art_records):
    assert f"near-zero {r['near_zero']:.4f}" in lines[i]


def test_near_zero_fraction_against_numpy():
  rng = np.random.default_rng(0)
  w1 = rng.normal(size=(40, 30)).astype(np.float32)
  w1[:, :20] *= 1e-6  # two thirds of this kernel pushed towards zero
  w2 = rng.normal(size=(30, 10)).astype(np.float32)
  params = {"a": {"kernel": w1, "bias": np.zeros(30, np.float32)}, "b": {"kernel": w2}}
  a = np.sort(np.abs(np.concatenate([w1.ravel(), w2.ravel()])))
  t = a[int(np.floor(0.9 * a.size))]
  want = np.mean(a < 1e-3 * t)
  assert 0.5 < want < 0.9
  assert float(train.near_zero_fraction(params, 0.9)) == pytest.approx(want, abs=1e-7)


@pytest.mark.parametrize("distribution", ["global", "uniform"])
def test_removed_channel_share_against_numpy(distribution):
  """The digits MLP (no BatchNorm: a channel's magnitude is its kernel column's norm): fc1 has
  40 units, a quarter pushed to 1e-6 of their size, fc2 20 units, one pushed; fc3 (logits) is
  not prunable. NumPy restates the normalised magnitudes, the removed set and the share."""
  rng = np.random.default_rng(1)
  w1 = rng.normal(size=(64, 40)).astype(np.float32)
  w1[:, :10] *= 1e-6
  w2 = rng.normal(size=(40, 20)).astype(np.float32)
  w2[:, 3] *= 1e-6
  w3 = rng.normal(size=(20, 10)).astype(np.float32)
  params = {"fc1": {"kernel": w1, "bias": np.zeros(40, np.float32)},
            "fc2": {"kernel": w2, "bias": np.zeros(20, np.float32)},
            "fc3": {"kernel": w3, "bias": np.zeros(10, np.float32)}}
  mags = []
  for w in (w1, w2):
    m = np.sqrt((w.astype(np.float64) ** 2).sum(0))
    mags.append(m / m.mean())
  kappa = 0.3
  if distribution == "global":  # m̃ <= sort(m̃)[floor(0.3·60)] goes; each layer keeps its largest
    t = np.sort(np.concatenate(mags))[int(np.floor(kappa * 60))]
    removed = [(m <= t) & (np.arange(m.size) != np.argmax(m)) for m in mags]
  else:  # the floor(0.3·40) = 12 and floor(0.3·20) = 6 smallest of each layer
    removed = [np.isin(np.arange(m.size), np.argsort(m, kind="stable")[:int(kappa * m.size)])
               for m in mags]
  assert sum(int(r.sum()) for r in removed) == (19 if distribution == "global" else 18)
  want = sum(m[r].sum() for m, r in zip(mags, removed)) / 60  # each layer's m̃ sums to its width
  assert 0 < want < 0.3
  got = train.removed_channel_share(params, kappa, distribution=distribution)
  assert float(got) == pytest.approx(want, rel=1e-5)
  # the pushed channels carry nothing: pushing the rest of the removed ones too empties the share
  for w, r in zip((w1, w2), removed):
    w[:, r] *= 1e-6
  assert float(train.removed_channel_share(params, kappa, distribution=distribution)) < 1e-5


# 6. Selection on a validation split; the pruned copy measured as the training loader serves it
# ------------------------------------------------------------------------------------------------


def _mlp_logits(params, images, mean, std):
  """The digits MLP in NumPy (independent of Flax)."""
  x = (images.astype(np.float32) / 255 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  h = x.reshape(len(x), -1)
  h = np.maximum(h @ params["fc1"]["kernel"] + params["fc1"]["bias"], 0)
  h = np.maximum(h @ params["fc2"]["kernel"] + params["fc2"]["bias"], 0)
  return h @ params["fc3"]["kernel"] + params["fc3"]["bias"]


def test_val_fraction_selects_on_validation_not_test(tmp_path, capsys):
  outdir = str(tmp_path / "val")
  assert call_main(tiny(epochs=3) + ["--val-fraction", "0.1", "--outdir", outdir]) == 0
  capsys.readouterr()
  summary = read_json(os.path.join(outdir, "summary.json"))
  records = read_metrics(outdir)
  full = hs_data.load_dataset("digits")
  assert summary["num_val"] == round(0.1 * full.num_train) == 135
  assert summary["num_train"] == full.num_train - 135 and summary["val_fraction"] == 0.1
  assert all(r["val_accuracy"] is not None for r in records)
  ft = [r for r in records if r["phase"] == "finetune"]
  chosen = max(ft, key=lambda r: r["val_accuracy"])  # the first epoch with the best val accuracy
  assert summary["selection"] == "best_val" and summary["selected_epoch"] == chosen["epoch"]
  assert summary["test_accuracy"] == chosen["test_accuracy"]
  assert summary["val_accuracy"] == summary["best_val_accuracy"] == chosen["val_accuracy"]
  assert summary["best_test_accuracy"] == max(r["test_accuracy"] for r in ft)
  assert summary["final_test_accuracy"] == ft[-1]["test_accuracy"]
  # the best_val checkpoint holds that epoch's weights: NumPy recomputes both accuracies
  assert ckpt_steps(outdir, "best_val")[-1] == chosen["epoch"]
  params = read_ckpt(outdir, "best_val")["params"]
  data = hs_data.with_validation_split(full, 0.1, seed=0)
  val_acc = np.mean(np.argmax(_mlp_logits(params, data.val_images, data.mean, data.std), -1)
                    == data.val_labels)
  test_acc = np.mean(np.argmax(_mlp_logits(params, data.test_images, data.mean, data.std), -1)
                     == data.test_labels)
  assert val_acc == pytest.approx(chosen["val_accuracy"], abs=1.5 / 135)
  assert test_acc == pytest.approx(chosen["test_accuracy"], abs=1.5 / full.num_test)


class _SeeingModel:
  """A model that also records, in order, every batch of images its eval-mode ``apply`` is
  given inside the jitted step (``jax.debug.callback``): what the network actually saw."""

  def __init__(self, model):
    self.model, self.seen = model, []

  def init(self, *args, **kwargs):
    return self.model.init(*args, **kwargs)

  def apply(self, variables, images, train=False, **kwargs):
    if not train:
      jax.debug.callback(lambda x: self.seen.append(np.asarray(x)), images, ordered=True)
    return self.model.apply(variables, images, train=train, **kwargs)

  def take(self, n):
    """The first ``n`` images recorded since the last call (the rest is batch padding)."""
    seen, self.seen = np.concatenate(self.seen)[:n], []
    return seen


def _random_rgb_dataset(n_train=160, size=8, pad=2):
  """CIFAR-like data in memory: random RGB images (no crop or mirror of one equals another),
  random labels, 2-pixel crop padding and flips on, as CIFAR's training loader serves it."""
  rng = np.random.default_rng(7)
  images = lambda n: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)  # noqa: E731
  labels = lambda n: rng.integers(0, 10, n).astype(np.int32)  # noqa: E731
  return hs_data.Dataset("random-rgb", images(n_train), labels(n_train), images(20), labels(20),
                         num_classes=10, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3),
                         crop_padding=pad, flip=True)


def _which_crop_and_flip(seen, images, pad, mean, std):
  """NumPy: for each normalised image the network saw, the ``(top, left, flipped)`` of the
  crop of its zero-padded original it is, found by trying every crop and flip (asserts that it
  is exactly one of them)."""
  pixels = (seen * np.asarray(std) + np.asarray(mean)) * 255.0
  raw = np.rint(pixels)
  np.testing.assert_allclose(pixels, raw, atol=1e-3)  # whole pixel values: nothing resampled
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h, w = images.shape[1:3]
  found = []
  for j in range(len(images)):
    matches = [(top, left, flipped)
               for top in range(2 * pad + 1) for left in range(2 * pad + 1) for flipped in (0, 1)
               if np.array_equal(raw[j], (lambda c: c[:, ::-1] if flipped else c)(
                   padded[j, top:top + h, left:left + w]))]
    assert len(matches) == 1, (j, matches)
    found.append(matches[0])
  return np.array(found)


def _apply_crop_and_flip(images, augmentation, pad):
  """NumPy: each image zero-padded, cropped at ``(top, left)`` and mirrored if ``flipped``."""
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h, w = images.shape[1:3]
  out = [padded[j, t:t + h, l:l + w] for j, (t, l, _) in enumerate(augmentation)]
  return np.stack([c[:, ::-1] if f else c for c, (_, _, f) in zip(out, augmentation)])


@pytest.mark.parametrize("mode", ["augmented", "clean"])
def test_pruned_accuracy_is_measured_as_the_training_loader_serves_it(mode, monkeypatch):
  """The pruned copy's accuracy on the training data: with ``--pruned-eval augmented`` every
  image the network sees is a random crop of the zero-padded image, mirrored or not, as the
  training loader serves it (recovered in NumPy from what the network saw: all crops, and both
  flipped and unflipped images occur), the same whatever the batch size and for the same epoch,
  another for another epoch; with ``clean`` the images themselves. The accuracy is NumPy's MLP on
  the NumPy-cropped and -flipped images."""
  dataset = _random_rgb_dataset()
  monkeypatch.setattr(hs_data, "load_dataset", lambda *args, **kwargs: dataset)
  real_create_model = models.create_model
  seeing = []
  monkeypatch.setattr(models, "create_model", lambda *a, **k: seeing.append(
      _SeeingModel(real_create_model(*a, **k))) or seeing[-1])

  def make_trainer(eval_batch_size):
    cfg = cli.config_from_args(cli.build_parser().parse_args(
        TINY + ["--pruned-eval", mode, "--eval-batch-size", str(eval_batch_size)]))
    return train.Trainer(cfg, "/nonexistent-unused", progress=False, log=lambda *_: None)

  def measure(trainer, epoch):
    accuracy = trainer._pruned_train_accuracy(trainer.params, trainer.batch_stats, epoch)
    seen = seeing[-1].take(n)
    return accuracy, _which_crop_and_flip(seen, dataset.train_images, p, data.mean, data.std)

  trainer = make_trainer(64)  # 3 batches, the last one padded
  data, n, p = trainer.dataset, dataset.num_train, dataset.crop_padding
  assert data is dataset and len(seeing) == 1
  params = jax.tree.map(np.asarray, trainer.params)
  got, augmentation = measure(trainer, 3)
  top_left, flipped = augmentation[:, :2], augmentation[:, 2].astype(bool)
  if mode == "augmented":
    assert 0.3 < flipped.mean() < 0.7  # some images mirrored, some not
    for axis in range(2):
      assert set(top_left[:, axis]) == set(range(2 * p + 1))  # every offset occurs
    assert np.mean(np.all(top_left == p, axis=1)) < 0.2  # mostly moved
  else:
    assert not flipped.any() and np.all(top_left == p)  # the images themselves
  images = _apply_crop_and_flip(dataset.train_images, augmentation, p)
  logits = _mlp_logits(params, images, data.mean, data.std)
  correct = int(np.sum(np.argmax(logits, -1) == dataset.train_labels))
  assert got == pytest.approx(correct / n, abs=2 / n)
  # the same epoch again: the same augmentation; another epoch: another (clean: the images)
  again, same = measure(trainer, 3)
  assert again == got
  np.testing.assert_array_equal(same, augmentation)
  _, other = measure(trainer, 4)
  assert np.array_equal(other, augmentation) == (mode == "clean")
  assert trainer._val_accuracy(trainer.params, trainer.batch_stats) is None
  # independent of the batch size (and so of the device count, which pads it): 2 batches
  wider = make_trainer(128)
  again, same = measure(wider, 3)
  assert again == got
  np.testing.assert_array_equal(same, augmentation)


@pytest.mark.parametrize("extra,needle", [
    (["--val-fraction", "1.0"], "val-fraction"),
    (["--val-fraction=-0.1"], "val-fraction"),
    (["--eta", "2", "--max-art-epochs", "200"], "float32"),
], ids=["val1", "val-neg", "lambda-overflow"])
def test_fidelity_options_bad_input(extra, needle, tmp_path, capsys):
  outdir = str(tmp_path / "out")
  _assert_clean_error(TINY + extra + ["--outdir", outdir], capsys, outdir, needle)


def test_on_epoch_hook_and_resume_with_another_window_rule_is_refused(tmp_path):
  """``on_epoch`` sees each record after its checkpoint; an exception from it leaves ``run``
  with the run resumable. Resuming ART state made with one window rule under the other is
  refused, naming the rule to use (state of 0.1, which had no rule, restores as 'best_mean')."""
  outdir = str(tmp_path / "rule")
  seen = []

  class Stop(Exception):
    pass

  def stop_in_art(record):
    seen.append((record["epoch"], record["phase"]))
    if record["phase"] == "art":
      raise Stop

  def config(extra):
    return cli.config_from_args(cli.build_parser().parse_args(TINY + extra))

  quiet = dict(progress=False, log=lambda *_: None)
  with pytest.raises(Stop):
    train.Trainer(config(["--art-rule", "best_mean"]), outdir, on_epoch=stop_in_art,
                  **quiet).run()
  assert seen == [(0, "warmup"), (1, "art")]
  assert ckpt_steps(outdir, "latest")[-1] == 1  # the ART epoch was saved before the hook ran
  with pytest.raises(ValueError, match="--art-rule best_mean"):
    train.Trainer(config([]), outdir, **quiet).run()
  summary = train.Trainer(config(["--art-rule", "best_mean"]), outdir, **quiet).run()
  assert summary["art_rule"] == "best_mean"
  assert [r["epoch"] for r in read_metrics(outdir)] == list(range(len(read_metrics(outdir))))
