"""``width=`` / ``--width``: models with every hidden width scaled. Parameter counts against
counts worked out by hand from the layer shapes, bad values refused in one line, a digits run
at half width end to end (its files, its export, a resume that must match), and the committed
studies still resumable (their settings did not change with the new option)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hypersparse_jax import cli, config, models

TINY = ["--model", "cnn", "--warmup-epochs", "1", "--epochs", "1", "--max-art-epochs", "2",
        "--lambda-init", "1e-3", "--eta", "2", "--no-progress"]


def _count(model, shape):
  v = jax.eval_shape(lambda k: model.init(k, jnp.zeros(shape), train=False),
                     jax.random.PRNGKey(0))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(v["params"]))


def _conv(k, cin, cout, bias=True):
  return k * k * cin * cout + (cout if bias else 0)


def _dense(nin, nout):
  return nin * nout + nout


def test_lenet5_and_lenet300_counts_by_hand():
  # half width: LeNet-5 (10, 25, 250), maps 28 -> 24 -> 12 -> 8 -> 4
  want = _conv(5, 1, 10) + _conv(5, 10, 25) + _dense(4 * 4 * 25, 250) + _dense(250, 10)
  assert want == 109_295
  assert _count(models.create_model("lenet5", num_classes=10, width=0.5), (1, 28, 28, 1)) == want
  # quarter width, a half in it: (5, 12.5 -> 12 (Python's round: halves to even), 125)
  want = _conv(5, 1, 5) + _conv(5, 5, 12) + _dense(4 * 4 * 12, 125) + _dense(125, 10)
  assert _count(models.create_model("lenet5", num_classes=10, width=0.25), (1, 28, 28, 1)) == want
  assert (models.scale_width(7, 0.5), models.scale_width(5, 0.5)) == (4, 2)
  # LeNet-300-100 at 1/3: round(100) = 100, round(33.3) = 33
  want = _dense(784, 100) + _dense(100, 33) + _dense(33, 10)
  assert _count(models.create_model("lenet300", num_classes=10, width=1 / 3),
                (1, 28, 28, 1)) == want
  # the published sizes at width 1 (issue 22: 430,500 + 580 and 266,200 + 410)
  assert _count(models.create_model("lenet5", num_classes=10), (1, 28, 28, 1)) == 431_080
  assert _count(models.create_model("lenet300", num_classes=10), (1, 28, 28, 1)) == 266_610


def test_quarter_width_vgg11_bn_by_hand():
  widths = (16, 32, 64, 64, 128, 128, 128, 128)  # VGG-11's 64-128-256-256-512-... / 4
  cins = (1,) + widths[:-1]
  want = sum(_conv(3, i, o) + 2 * o for i, o in zip(cins, widths)) + _dense(128, 10)  # + BN
  model = models.create_model("vgg", depth=11, num_classes=10, width=0.25)
  assert tuple(model.widths) == widths
  assert _count(model, (1, 28, 28, 1)) == want
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 1))
  v = model.init(jax.random.PRNGKey(0), x, train=False)
  assert np.isfinite(np.asarray(model.apply(v, x, train=False))).all()


def test_resnet_stage_widths_scale_and_default_is_the_reference():
  assert models.create_model("resnet", depth=20, num_classes=10).stage_widths == (32, 64, 128)
  model = models.create_model("resnet", depth=20, num_classes=10, width=0.25)
  assert model.stage_widths == (8, 16, 32)
  v = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 28, 28, 1)), train=False),
                     jax.random.PRNGKey(0))["params"]
  assert v["conv1"]["kernel"].shape == (3, 3, 1, 8)
  assert v["layer2_0"]["conv1"]["kernel"].shape == (3, 3, 8, 16)
  assert v["layer3_2"]["conv2"]["kernel"].shape == (3, 3, 32, 32)
  assert v["fc"]["kernel"].shape == (32, 10)


def test_tiny_widths_keep_one_unit():
  model = models.create_model("lenet5", num_classes=10, width=0.01)
  assert tuple(model.widths) == (1, 1, 5)


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), float("inf"), True, "half"])
def test_bad_width_is_refused(bad):
  with pytest.raises(ValueError, match=r"width must be a positive finite number.*got"):
    models.create_model("lenet5", num_classes=10, width=bad)


def test_transformer_refuses_a_width():
  with pytest.raises(ValueError, match="d_model"):
    models.create_model("transformer", num_classes=256, width=0.5)


@pytest.mark.parametrize("extra,needle", [
    (["--width", "0"], "width must be a positive finite number"),
    (["--width", "nan"], "width must be a positive finite number"),
    (["--dataset", "pysource", "--model", "transformer", "--width", "0.5"], "--d-model"),
])
def test_bad_width_on_the_command_line_is_one_line(extra, needle, tmp_path, capsys):
  code = cli.main(TINY + extra + ["--outdir", str(tmp_path / "x")])
  err = capsys.readouterr().err
  assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_half_width_run_export_and_resume_check(tmp_path, capsys):
  from hypersparse_jax import onnx_export
  run = str(tmp_path / "run")
  assert cli.main(TINY + ["--width", "0.5", "--outdir", run]) == 0
  with open(os.path.join(run, "config.json")) as f:
    assert json.load(f)["width"] == 0.5
  model, variables, _ = onnx_export.load_run_variables(run)
  assert tuple(model.widths) == (16, 32)  # DigitsCNN's (32, 64) halved
  assert variables["params"]["conv1"]["kernel"].shape[-1] == 16
  # the same directory with another width is refused, naming both values
  capsys.readouterr()
  code = cli.main(TINY + ["--width", "1", "--outdir", run])
  err = capsys.readouterr().err
  assert code == 2 and "'width': (0.5, 1.0)" in err, err


def test_old_config_without_width_counts_as_full_width():
  saved = {"model": "cnn", "depth": None}  # written before --width existed
  assert config.resume_differences(saved, {"model": "cnn", "depth": None, "width": 1.0}) == {}
  diff = config.resume_differences(saved, {"model": "cnn", "depth": None, "width": 0.5})
  assert list(diff) == ["width"]


def _study():
  bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
  sys.path.insert(0, bench)
  try:
    import study
  finally:
    sys.path.remove(bench)
  return study, bench


@pytest.mark.parametrize("folder,argv", [
    ("study_fashion_mnist", ["--dataset", "fashion_mnist"]),
    ("study_fashion_mnist_lenet5", ["--dataset", "fashion_mnist", "--model", "lenet5"]),
    ("study", []),
])
def test_committed_studies_keep_their_settings(folder, argv):
  """The studies' settings (and so their kept runs) are those of the code that wrote them: an
  option added later at its old value does not make a study start afresh."""
  study, bench = _study()
  args = study.build_parser().parse_args(argv)
  if args.dataset is None:
    args.dataset = "digits"
  _, settings, _, _ = study.study_settings(args)
  out = os.path.join(bench, "results", folder)
  runs, _, old = study._kept_runs(out, settings)
  assert old is not None and runs, f"{folder}: the committed runs would be discarded"
  # most were written before --width existed (no key: width 1); a study rerun since records it
  assert settings["width"] == 1.0 and old.get("width", 1.0) == 1.0
  # a study at another width is another study
  assert study._kept_runs(out, dict(settings, width=0.5))[2] is None


def test_a_finished_method_written_before_width_is_kept(tmp_path):
  study, _ = _study()
  args = study.build_parser().parse_args(["--out", str(tmp_path)])
  args.dataset = "digits"
  cfg = study.make_config(args, 0.9, "hypersparse", 0)
  key = json.loads(study.settings_key(cfg))
  old_key = json.dumps({k: v for k, v in key.items() if k != "width"}, sort_keys=True)
  os.makedirs(tmp_path / ".partial")
  with open(tmp_path / ".partial" / "k0.9_s0.json", "w") as f:
    json.dump({"key": old_key, "results": {"art_l1": {"final_test_accuracy": 0.5}}}, f)
  kept = study.Partial(args, "k0.9_s0", study.settings_key(cfg))
  assert kept.results == {"art_l1": {"final_test_accuracy": 0.5}}
  other = dataclasses.replace(cfg, width=0.5)
  assert study.Partial(args, "k0.9_s0", study.settings_key(other)).results == {}
