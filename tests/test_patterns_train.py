"""``hypersparse-train --distribution`` and ``--nm`` end to end on the bundled digits: the run's
files have the pattern (read back with NumPy), a run stopped in ART and resumed equals an
uninterrupted one, the ONNX export keeps the zeros in N:M groups, and bad options are refused."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest

import hypersparse_jax as hs
from hypersparse_jax import budgets, cli, train

TINY = ["--model", "mlp", "--warmup-epochs", "1", "--epochs", "2", "--max-art-epochs", "3",
        "--lambda-init", "1e-3", "--eta", "2", "--no-progress"]
QUIET = dict(progress=False, log=lambda *_: None)


def _config(extra):
  return cli.config_from_args(cli.build_parser().parse_args(TINY + extra))


def _kernels(tree):
  return {k: np.asarray(v["kernel"]) for k, v in tree["params"].items() if "kernel" in v}


class _Stop(Exception):
  pass


def _stop_in_art(record):
  if record["phase"] == "art":
    raise _Stop


@pytest.mark.parametrize("extra", [["--nm", "2:4"], ["--distribution", "erk", "--sparsity", "0.95"],
                                   ["--model", "cnn", "--structure", "channel", "--sparsity",
                                    "0.5"],
                                   ["--model", "cnn", "--structure", "channel", "--distribution",
                                    "uniform", "--sparsity", "0.5"]])
def test_pattern_run_files_and_exact_resume(extra, tmp_path):
  whole = str(tmp_path / "whole")
  summary = train.Trainer(_config(extra), whole, **QUIET).run()
  exported = hs.load_sparse(os.path.join(whole, "model_sparse.npz"))
  kernels = _kernels(exported)
  if extra[0] == "--nm":
    assert summary["nm"] == "2:4" and summary["sparsity_target"] == 0.5
    assert summary["pattern"]["groups_over_n"] == 0
    for name, w in kernels.items():  # every group of 4 inputs holds at most 2 non-zeros
      nonzero = (w != 0).reshape(w.shape[0] // 4, 4, w.shape[1]).sum(axis=1)
      assert nonzero.max() <= 2, name
    assert budgets.nm_violations(exported["params"], 2, 4) == 0
  elif "--structure" in extra:
    assert summary["structure"] == "channel"
    k1, k2 = summary["channels_kept"]["conv1"], summary["channels_kept"]["conv2"]
    p = exported["params"]
    # the removed channels are exactly zero: conv kernels, BatchNorm scales and biases
    for conv, bn, k in (("conv1", "bn1", k1), ("conv2", "bn2", k2)):
      alive = np.any(np.asarray(p[conv]["kernel"]).reshape(-1, p[conv]["kernel"].shape[-1]) != 0,
                     axis=0)
      assert alive.sum() == k
      assert np.all(np.asarray(p[bn]["scale"])[~alive] == 0)
      assert np.all(np.asarray(p[bn]["bias"])[~alive] == 0)
    # the budget is on channels: no weight target, and the recorded pattern counts channels
    assert summary["sparsity_target"] is None and summary["channel_sparsity_target"] == 0.5
    assert summary["pattern"] == {"kind": "channel", "sparsity": 0.5,
                                  "distribution": "uniform" if "uniform" in extra else "global",
                                  "channels_removed": 96 - k1 - k2, "channels_total": 96}
    assert all(l["target"] is None for l in summary["layer_sparsity"])
    if "uniform" in extra:  # floor(0.5·32) and floor(0.5·64) removed, whatever the weights
      assert (k1, k2) == (16, 32)
    else:
      assert summary["channels_removed"] == 96 - k1 - k2 >= math.floor(0.5 * 96) + 1 - 2
    # the slimmed digits CNN's parameters, counted by hand: convs 3x3 (no bias), BatchNorm
    # scale + bias, the head reads the 2x2 map of conv2's channels
    assert summary["params_slim"] == 9 * 1 * k1 + 2 * k1 + 9 * k1 * k2 + 2 * k2 + 4 * k2 * 10 + 10
    assert summary["params_dense"] == 9 * 32 + 64 + 9 * 32 * 64 + 128 + 4 * 64 * 10 + 10
    assert summary["flops_slim"] < summary["flops_dense"]
    # ART's epochs record the share of magnitude the channels to be removed still carry
    records = [json.loads(l) for l in open(os.path.join(whole, "metrics.jsonl"))]
    art = [r for r in records if r["phase"] == "art"]
    assert art and all(0 < r["removed_channel_share"] < 1 and "near_zero" not in r for r in art)
    assert all("removed_channel_share" not in r for r in records if r["phase"] != "art")
  else:
    assert summary["distribution"] == "erk"
    shapes = [kernels[k].shape for k in sorted(kernels)]
    densities = budgets.erk_densities(shapes, 0.95)
    for (name, w), d in zip(sorted(kernels.items()), densities):
      # each layer lost floor(κ_l n_l) + 1 weights (the reference's rule per layer), or none
      kappa = 1 - d
      removed = int(np.sum(w == 0))
      assert removed == (math.floor(kappa * w.size) + 1 if kappa > 0 else 0), name
    layers = {l["name"]: l for l in summary["layer_sparsity"]}
    assert layers["fc1/kernel"]["target"] == pytest.approx(1 - densities[0])

  stopped = str(tmp_path / "stopped")
  with pytest.raises(_Stop):
    train.Trainer(_config(extra), stopped, on_epoch=_stop_in_art, **QUIET).run()
  resumed = train.Trainer(_config(extra), stopped, **QUIET).run()
  assert resumed == summary
  again = hs.load_sparse(os.path.join(stopped, "model_sparse.npz"))
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(exported)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # a resume with another pattern is refused: the pattern is part of the saved configuration,
  # and a config.json from before the patterns existed counts as global
  from hypersparse_jax import config as config_lib
  saved = json.loads(json.dumps(cli.dataclasses.asdict(_config(extra))))
  other = json.loads(json.dumps(cli.dataclasses.asdict(_config(["--nm", "1:4"]))))
  assert {"nm", "sparsity"} <= set(config_lib.resume_differences(saved, other))
  old = {k: v for k, v in saved.items() if k not in ("nm", "distribution")}
  assert "distribution" in config_lib.resume_differences(
      old, json.loads(json.dumps(cli.dataclasses.asdict(_config(
          ["--distribution", "erk", "--sparsity", "0.95"])))))


def test_nm_onnx_export_keeps_the_pattern(tmp_path, capsys):
  import onnx  # the [test] extra installs it: no skip in CI
  from onnx import numpy_helper
  from hypersparse_jax import onnx_export
  run = str(tmp_path / "run")
  assert cli.main(TINY + ["--nm", "1:4", "--outdir", run]) == 0
  out = str(tmp_path / "m.onnx")
  assert onnx_export.main([run, out]) == 0
  printed = capsys.readouterr().out
  assert "(1:4 pattern: every group checked)" in printed
  model = onnx.load(out)
  meta = {p.key: p.value for p in model.metadata_props}
  assert meta["nm"] == "1:4"
  mats = [numpy_helper.to_array(i) for i in model.graph.initializer]
  mats = [w for w in mats if w.ndim == 2 and w.shape[0] % 4 == 0 and w.size > 64]
  assert len(mats) == 3  # the MLP's three kernels (in, out), read from the file
  for w in mats:
    nonzero = (w != 0).reshape(w.shape[0] // 4, 4, w.shape[1]).sum(axis=1)
    assert nonzero.max() <= 1 and nonzero.min() == 1


@pytest.mark.parametrize("extra,needle", [
    (["--nm", "2:4", "--sparsity", "0.9"], "--nm 2:4 prunes 1 - 2/4 = 0.5"),
    (["--nm", "4:4"], "1 <= N < M"),
    (["--nm", "2/4"], "written N:M"),
    (["--nm", "2:4", "--distribution", "erk"], "does not combine with --distribution erk"),
])
def test_bad_pattern_options_are_one_line(extra, needle, tmp_path, capsys):
  code = cli.main(TINY + extra + ["--outdir", str(tmp_path / "x")])
  err = capsys.readouterr().err
  assert code == 2 and needle in err, err
  assert not os.path.exists(tmp_path / "x" / "metrics.jsonl")


def test_bad_distribution_is_refused_by_the_parser(capsys):
  with pytest.raises(SystemExit) as e:
    cli.build_parser().parse_args(["--distribution", "layerwise"])
  assert e.value.code == 2
  assert "invalid choice: 'layerwise'" in capsys.readouterr().err


def test_slim_export_onnx_and_npz_give_the_runs_logits(tmp_path, capsys):
  import onnxruntime as ort  # the [test] extra installs it
  from hypersparse_jax import data, onnx_export
  run = str(tmp_path / "run")
  assert cli.main(TINY + ["--model", "cnn", "--structure", "channel", "--sparsity", "0.75",
                          "--outdir", run]) == 0
  model, variables, _ = onnx_export.load_run_variables(run)
  ds = data.load_dataset("digits", None)
  x = np.asarray(ds.test_images[:16], np.float32)
  want = np.asarray(model.apply(variables, x, train=False))
  big = str(tmp_path / "dense.onnx")
  assert onnx_export.main([run, big]) == 0
  small = str(tmp_path / "slim.onnx")
  assert onnx_export.main([run, small, "--slim"]) == 0
  out = capsys.readouterr().out
  assert "slimmed:" in out
  sess = ort.InferenceSession(small, providers=["CPUExecutionProvider"])
  got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  assert os.path.getsize(small) < 0.6 * os.path.getsize(big)
  npz = str(tmp_path / "slim.npz")
  assert onnx_export.main([run, npz, "--slim"]) == 0
  m2, v2 = onnx_export.load_slim_npz(npz)
  assert m2.widths[0] < 32 and m2.widths[1] < 64
  np.testing.assert_allclose(np.asarray(m2.apply(v2, x, train=False)), want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())
  # a weight-pruned run has no channels to drop: one line
  weight_run = str(tmp_path / "weights")
  assert cli.main(TINY + ["--outdir", weight_run]) == 0
  assert onnx_export.main([weight_run, str(tmp_path / "w.onnx"), "--slim"]) == 2
  assert "--slim needs a run trained with --structure channel" in capsys.readouterr().err


@pytest.mark.parametrize("extra,needle", [
    (["--structure", "channel", "--nm", "2:4"], "does not combine with --nm"),
    (["--structure", "channel", "--penalty", "l2"], "hypersparse or l1"),
    (["--structure", "channel", "--distribution", "erk"], "global (one threshold over"),
])
def test_bad_structure_options_are_one_line(extra, needle, tmp_path, capsys):
  code = cli.main(TINY + extra + ["--outdir", str(tmp_path / "x")])
  err = capsys.readouterr().err
  assert code == 2 and needle in err, err
