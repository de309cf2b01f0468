"""benchmarks/bench_slim_speed.py --from-study on small hand-made study files: every distinct
slimmed architecture is timed once against the dense model, with parameter counts worked out
by hand, and the accuracy/speed plot is drawn."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    import bench_slim_speed
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))
  return bench_slim_speed


def _lenet300(h1, h2):
  return {"class": "LeNet300", "num_classes": 10, "hidden": [h1, h2]}


def _stat(x):
  return {"mean": x, "std": 0.0, "n": 1}


def test_from_study_times_each_architecture_once(tmp_path):
  bench = _bench()
  settings = {"dataset": "fashion_mnist", "model": "lenet300", "depth": None,
              "batch_norm": True, "width": 1.0}
  runs = [{"method": "art_hypersparse", "fraction": 0.5, "seed": 0, "final_test_accuracy": 0.88,
           "slim_model": _lenet300(150, 50)},
          {"method": "art_hypersparse", "fraction": 0.5, "seed": 1, "final_test_accuracy": 0.87,
           "slim_model": _lenet300(150, 50)},  # the same widths: timed once
          {"method": "l1_filter", "fraction": 0.9, "seed": 0, "final_test_accuracy": 0.80,
           "slim_model": _lenet300(30, 10)},
          {"method": "slimming", "fraction": 0.9, "seed": 0, "final_test_accuracy": 0.10,
           "slim_model": _lenet300(30, 10)},  # collapsed: drawn on the axis' lower edge
          {"method": "dense", "fraction": 0.0, "seed": 0, "final_test_accuracy": 0.89}]
  cells = [{"method": "dense", "final_test_accuracy": _stat(0.89)}]
  (tmp_path / "ch").mkdir()
  (tmp_path / "ch" / "study.json").write_text(json.dumps(
      {"settings": settings, "runs": runs, "cells": cells}))
  (tmp_path / "un").mkdir()
  (tmp_path / "un" / "study.json").write_text(json.dumps(
      {"settings": dict(settings, sparsities=[0.9]), "runs": [],
       "cells": [{"method": "art_hypersparse", "target": 0.9,
                  "final_test_accuracy": _stat(0.885)},
                 {"method": "dense", "target": 0.0, "final_test_accuracy": _stat(0.89)}]}))
  out, png = tmp_path / "speed.json", tmp_path / "t.png"
  assert bench.main(["--from-study", str(tmp_path / "ch"), "--unstructured", str(tmp_path / "un"),
                     "--repeats", "1", "--no-onnx", "--out", str(out), "--plot", str(png)]) == 0
  study = json.loads(out.read_text())["studies"][0]
  v = study["variants"]
  assert sorted(v) == ["arch0", "arch1", "dense", "weights_0.9"]
  # parameters by hand: 784-h1-h2-10 with biases
  count = lambda h1, h2: 784 * h1 + h1 + h1 * h2 + h2 + h2 * 10 + 10  # noqa: E731
  assert v["dense"]["params"] == count(300, 100) == 266_610
  assert v["arch0"]["params"] == count(150, 50) and v["arch1"]["params"] == count(30, 10)
  assert v["weights_0.9"]["params"] == count(300, 100)  # zeros are still parameters
  for key in v:
    for batch in ("batch_1", "batch_256"):
      assert v[key]["xla"][batch]["median_ms"] > 0
      assert v[key]["xla_lax"][batch]["median_ms"] > 0
  for key in ("arch0", "arch1"):  # each ratio is the dense median over its own
    for b in ("batch_1", "batch_256"):
      for engine in ("xla", "xla_lax"):
        t = v[key][engine][b]
        assert t["speedup_vs_dense"] == pytest.approx(v["dense"][engine][b]["median_ms"] /
                                                      t["median_ms"])
  assert [r["arch"] for r in study["runs"]] == ["arch0", "arch0", "arch1", "arch1"]
  assert study["dense_accuracy"] == 0.89
  assert study["unstructured"][0]["cells"][0]["target"] == 0.9
  assert png.read_bytes().startswith(b"\x89PNG")


def test_accuracy_axis_leaves_collapsed_runs_on_its_edge():
  """Hand-worked: dense 92.4 %, runs at 92, 91, 85 and 10 %. 10 % is more than 20 points below
  dense, so the axis ends 1.5 points below the lowest other run, 85 - 1.5 = 83.5; without a
  collapsed run (or without a dense accuracy) it fits everything."""
  bench = _bench()
  assert bench.y_floor([92.0, 91.0, 10.0, 85.0], 92.4) == pytest.approx(83.5)
  assert bench.y_floor([92.0, 91.0, 85.0, 72.5], 92.4) is None  # 19.9 points below: kept
  assert bench.y_floor([92.0, 10.0], None) is None
  assert bench.y_floor([10.0, 10.0], 92.4) is None  # nothing left to scale the axis to


def test_collapsed_runs_of_one_fraction_share_one_label():
  """Hand-worked labels: three runs at chance read as one, two that differ list both."""
  bench = _bench()
  assert bench.collapsed_label(0.9, [0.1, 0.1, 0.1]) == "90 %: 10.0 % (3 runs)"
  assert bench.collapsed_label(0.75, [0.7723, 0.6218]) == "75 %: 62.2 / 77.2 %"
  assert bench.collapsed_label(0.75, [0.6218]) == "75 %: 62.2 %"


def test_from_study_without_slim_models_says_so(tmp_path):
  bench = _bench()
  (tmp_path / "study.json").write_text(json.dumps(
      {"settings": {"dataset": "fashion_mnist", "model": "lenet5"},
       "runs": [{"method": "l1_filter", "fraction": 0.5, "seed": 0}], "cells": []}))
  try:
    bench.main(["--from-study", str(tmp_path), "--no-onnx", "--out", str(tmp_path / "o.json")])
  except SystemExit as e:
    assert "no run records its slimmed model" in str(e)
  else:
    raise AssertionError("a study without slim_model was accepted")


def test_xla_lax_forward_never_takes_the_library_convolution(monkeypatch):
  """A 3x3 convolution on a 2x2 map (fewer output positions than taps, as VGG's last stage on
  28x28 inputs) is a case the library's CPU convolution computes as a patch product; the
  ``xla_lax`` forward must not, on any batch size."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from hypersparse_jax import conv
  calls = []
  real = conv._patches
  monkeypatch.setattr(conv, "_patches", lambda *a, **k: calls.append(1) or real(*a, **k))

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Conv(8, (3, 3), padding=1, conv_general_dilated=conv.conv_general_dilated)(x)

  m = Tiny()
  v = m.init(jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 16)))
  default, plain = _bench().xla_forwards(m, v)
  calls.clear()  # init ran the library's convolution
  x1, x3 = jnp.ones((1, 2, 2, 16)), jnp.ones((3, 2, 2, 16))
  a1, a3 = plain(x1), plain(x3)
  assert calls == []
  b1, b3 = default(x1), default(x3)
  assert calls, "the default forward should use the patch product here"
  np.testing.assert_allclose(np.asarray(a1), np.asarray(b1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(a3), np.asarray(b3), rtol=1e-4, atol=1e-5)
