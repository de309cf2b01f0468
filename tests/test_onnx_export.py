"""Tests of ``export_onnx`` and ``hypersparse-export`` against onnxruntime, an independent runtime.

Every exported file is run with onnxruntime and compared with ``model.apply`` of the same
variables in eval mode (logits within 1e-4 of the largest |logit|, batch sizes 1 and 3 from one
file). Weights are read back from the file with ``onnx.numpy_helper`` (sparse initializers
expanded here with NumPy) and compared with the Flax kernels. The command-line test trains a
tiny digits run, exports it, and checks onnxruntime's test accuracy against the run's own log.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# the [onnx] extra is part of the test extra: a broken install fails here, it is not skipped
import jax2onnx  # noqa: F401,E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import orbax.checkpoint as ocp  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import hypersparse_jax  # noqa: E402
from hypersparse_jax import cli, models, onnx_export  # noqa: E402
from hypersparse_jax import data as hs_data  # noqa: E402

RTOL = 1e-4  # of the largest |logit|
SPARSITY = 0.9

MODELS = {
    "resnet20": lambda: models.create_model("resnet", num_classes=10, depth=20),
    "vgg11_bn": lambda: models.create_model("vgg", num_classes=10, depth=11, batch_norm=True),
    "vgg11": lambda: models.create_model("vgg", num_classes=10, depth=11, batch_norm=False),
    "mlp": lambda: models.create_model("mlp", num_classes=10),
    "cnn": lambda: models.create_model("cnn", num_classes=10),
}


def random_variables(model, seed=0):
  """Variables with random weights, biases and BatchNorm statistics, pruned to SPARSITY.

  Kernels are He-normal (fan-in) so that the global magnitude mask keeps part of every layer
  (the default init's N(0, 0.01) head would be pruned away entirely); BatchNorm gets non-trivial
  running statistics so that eval mode is actually tested.
  """
  shape = (1,) + model.default_input_shape[1:]
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(seed), jnp.zeros(shape),
                                                train=False))
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  out = []
  for path, leaf in leaves:
    name = str(path[-1].key)
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)
    elif name == "var":
      value = rng.uniform(0.5, 2.0, leaf.shape)
    elif name == "scale":
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:  # bias, mean
      value = 0.1 * rng.standard_normal(leaf.shape)
    out.append(value.astype(np.float32))
  variables = jax.tree_util.tree_unflatten(treedef, out)
  # Global magnitude pruning in NumPy: drop |w| <= the floor(SPARSITY * n)-th smallest |w|.
  kernel_list = kernels(variables)
  magnitudes = np.sort(np.concatenate([np.abs(k).reshape(-1) for k in kernel_list]))
  threshold = magnitudes[int(np.floor(SPARSITY * magnitudes.size))]
  for k in kernel_list:
    k[np.abs(k) <= threshold] = 0.0
  return variables


def flax_logits(model, variables, x):
  return np.asarray(model.apply(variables, x, train=False))


def images(model, batch, seed):
  return np.random.default_rng(seed).standard_normal(
      (batch,) + model.default_input_shape[1:]).astype(np.float32)


def dense_initializers(path):
  """``{name: array}`` of a file's initializers, sparse ones expanded with NumPy here."""
  proto = onnx.load(path)
  out = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
  for sparse in proto.graph.sparse_initializer:
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices)
    assert indices.ndim == 1, "expected linearised indices"
    dense = np.zeros(int(np.prod(sparse.dims)), values.dtype)
    dense[indices] = values
    out[sparse.values.name] = dense.reshape(tuple(sparse.dims))
  return out


def kernels(variables):
  return [np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(
      variables["params"]) if str(path[-1].key) == "kernel"]


def assert_kernels_stored_exactly(path, variables):
  """Each Flax kernel is in the file (up to layout) value for value, its zeros exact zeros."""
  stored = [np.sort(a.reshape(-1)) for a in dense_initializers(path).values() if a.ndim >= 2]
  for kernel in kernels(variables):
    flat = np.sort(kernel.reshape(-1))
    assert any(s.shape == flat.shape and np.array_equal(s, flat) for s in stored), kernel.shape
  zeros_in_file = sum(int(np.sum(a == 0)) for a in dense_initializers(path).values()
                      if a.ndim >= 2)
  assert zeros_in_file == sum(int(np.sum(k == 0)) for k in kernels(variables))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """``{name: (model, variables, dense file, report)}``, exported once per module."""
  folder = tmp_path_factory.mktemp("onnx")
  out = {}
  for name, make in MODELS.items():
    model = make()
    variables = random_variables(model)
    path = str(folder / f"{name}.onnx")
    report = hypersparse_jax.export_onnx(model, variables, path,
                                         input_shape=(None,) + model.default_input_shape[1:],
                                         verify=False)
    out[name] = (model, variables, path, report)
  return out


@pytest.mark.parametrize("name", list(MODELS))
def test_onnxruntime_matches_flax_at_batch_1_and_3(exported, name):
  model, variables, path, _ = exported[name]
  session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  (inp,) = session.get_inputs()
  assert isinstance(inp.shape[0], str), inp.shape  # one file, dynamic batch
  for batch, seed in ((1, 1), (3, 2)):
    x = images(model, batch, seed)
    expected = flax_logits(model, variables, x)
    (got,) = session.run(None, {inp.name: x})
    assert got.shape == expected.shape == (batch, 10)
    scale = np.max(np.abs(expected))
    assert scale > 1e-3, "degenerate logits would make the comparison meaningless"
    np.testing.assert_allclose(got, expected, rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_weights_are_exact_zeros_in_the_file(exported, name):
  _, variables, path, report = exported[name]
  assert_kernels_stored_exactly(path, variables)
  zeros = sum(int(np.sum(k == 0)) for k in kernels(variables))
  total = sum(k.size for k in kernels(variables))
  assert zeros >= int(SPARSITY * total)
  assert report["weights"] == total and report["zero_weights"] == zeros
  assert report["bytes"] == os.path.getsize(path) and report["sparse_initializers"] == 0


def test_sparse_initializers_load_in_onnxruntime_and_shrink_the_file(exported, tmp_path):
  model, variables, dense_path, dense_report = exported["resnet20"]
  path = str(tmp_path / "sparse.onnx")
  report = hypersparse_jax.export_onnx(model, variables, path, input_shape=(None, 32, 32, 3),
                                       sparse_initializers=True, verify=False)
  proto = onnx.load(path)
  assert len(proto.graph.sparse_initializer) == report["sparse_initializers"] > 0
  assert os.path.getsize(path) < 0.4 * os.path.getsize(dense_path)
  # The same tensors as the dense file, once the sparse ones are expanded.
  dense, sparse = dense_initializers(dense_path), dense_initializers(path)
  assert sorted(dense) == sorted(sparse)
  for key in dense:
    np.testing.assert_array_equal(sparse[key], dense[key], err_msg=key)
  assert_kernels_stored_exactly(path, variables)
  session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  x = images(model, 3, 4)
  expected = flax_logits(model, variables, x)
  np.testing.assert_allclose(session.run(None, {"images": x})[0], expected, rtol=0,
                             atol=RTOL * np.max(np.abs(expected)))
  assert report["zero_weights"] == dense_report["zero_weights"]


def test_verify_reports_the_onnxruntime_error_and_fixed_batch(exported, tmp_path):
  model, variables, _, _ = exported["cnn"]
  path = str(tmp_path / "fixed.onnx")
  report = hypersparse_jax.export_onnx(model, variables, path, input_shape=(2, 8, 8, 1),
                                       metadata={"note": "fixed batch"})
  assert 0.0 <= report["max_rel_error"] <= RTOL
  proto = onnx.load(path)
  dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
  assert dims == [2, 8, 8, 1]
  assert {p.key: p.value for p in proto.metadata_props}["note"] == "fixed batch"


def test_file_gets_the_users_umask(exported, tmp_path):
  model, variables, _, _ = exported["mlp"]
  old = os.umask(0o027)
  try:
    hypersparse_jax.export_onnx(model, variables, str(tmp_path / "m.onnx"),
                                input_shape=(None, 8, 8, 1))
  finally:
    os.umask(old)
  assert os.stat(tmp_path / "m.onnx").st_mode & 0o777 == 0o640  # not mkstemp's 0600


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


class _Eigh(nn.Module):
  """A model with an operation jax2onnx does not convert (a 10x10 eigendecomposition)."""

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Dense(10)(x.reshape(x.shape[0], -1))
    return jnp.linalg.eigh(h.T @ h)[0][None, :] + h


def test_unexportable_model_raises_a_clear_error(tmp_path):
  model = _Eigh()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
  path = tmp_path / "eigh.onnx"
  with pytest.raises(hypersparse_jax.OnnxExportError, match="cannot export _Eigh.*eigh"):
    hypersparse_jax.export_onnx(model, variables, str(path), input_shape=(None, 8, 8, 1))
  assert not os.path.exists(path) and os.listdir(tmp_path) == []


@pytest.mark.parametrize("shape, needle", [
    ((None,), "input_shape must be"), ((None, 0, 8, 1), "dimension 1"),
    ((-1, 8, 8, 1), "dimension 0"), ("abc", "input_shape must be"),
    ((None, 8, 8, 3), "cannot be applied"),
])
def test_bad_input_shape_errors(exported, tmp_path, shape, needle):
  model, variables, _, _ = exported["cnn"]
  with pytest.raises(ValueError, match=needle):
    hypersparse_jax.export_onnx(model, variables, str(tmp_path / "x.onnx"), input_shape=shape)
  assert os.listdir(tmp_path) == []


def test_bad_variables_error(exported, tmp_path):
  model, variables, _, _ = exported["cnn"]
  with pytest.raises(ValueError, match="'params'"):
    hypersparse_jax.export_onnx(model, variables["params"], str(tmp_path / "x.onnx"),
                                input_shape=(None, 8, 8, 1))


def test_missing_extra_names_the_pip_command(exported, tmp_path, monkeypatch, capsys):
  model, variables, _, _ = exported["mlp"]
  monkeypatch.setitem(sys.modules, "jax2onnx", None)  # import jax2onnx -> ImportError
  with pytest.raises(ImportError, match=r"pip install -e '\.\[onnx\]'"):
    hypersparse_jax.export_onnx(model, variables, str(tmp_path / "x.onnx"),
                                input_shape=(None, 8, 8, 1))
  assert onnx_export.main([str(tmp_path), str(tmp_path / "x.onnx")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "pip install -e '.[onnx]'" in err[0]  # what works from a clone


# ------------------------------------------------------------------------------------------------
# hypersparse-export on a real (tiny) run
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny digits CNN run with a validation split (BatchNorm: batch_stats are restored too)."""
  outdir = str(tmp_path_factory.mktemp("run") / "cnn")
  argv = ["--model", "cnn", "--warmup-epochs", "1", "--epochs", "2", "--max-art-epochs", "2",
          "--lambda-init", "1e-3", "--eta", "2", "--val-fraction", "0.2", "--no-progress",
          "--outdir", outdir]
  assert cli.main(argv) == 0
  return outdir


def _restore(run_dir, kind):
  directory = os.path.join(run_dir, "checkpoints", kind)
  step = max(int(s) for s in os.listdir(directory) if s.isdigit())
  state = ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), "state"))
  return step, jax.tree.map(np.asarray, state)


def _onnx_test_accuracy(path):
  data = hs_data.load_dataset("digits")
  x = np.asarray(hs_data.normalize(data.test_images, data.mean, data.std))
  session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  logits = session.run(None, {"images": x})[0]
  return float(np.mean(np.argmax(logits, -1) == data.test_labels)), x


def _records(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return {r["epoch"]: r for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def selected_onnx(run_dir, tmp_path_factory):
  """``hypersparse-export RUN_DIR digits.onnx`` (the default checkpoint): (path, JSON report)."""
  out = str(tmp_path_factory.mktemp("selected") / "digits.onnx")
  import contextlib
  import io
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    assert onnx_export.main([run_dir, out]) == 0
  return out, json.loads(stdout.getvalue().strip().splitlines()[-1])


def test_cli_exports_the_selected_checkpoint(run_dir, selected_onnx):
  out, report = selected_onnx
  with open(os.path.join(run_dir, "summary.json")) as f:
    summary = json.load(f)
  # With a validation split the selected model is the best-validation epoch (checkpoint best_val).
  assert summary["selection"] == "best_val"
  step, state = _restore(run_dir, "best_val")
  assert report["checkpoint"] == "best_val" and report["epoch"] == step == summary["selected_epoch"]
  assert report["selection"] == "best_val" and "validation" in report["selection_reason"]
  # onnxruntime's accuracy on the test split is the run's headline test accuracy.
  accuracy, x = _onnx_test_accuracy(out)
  assert accuracy == pytest.approx(summary["test_accuracy"], abs=1e-12)
  assert accuracy == pytest.approx(_records(run_dir)[step]["test_accuracy"], abs=1e-12)
  model = models.create_model("cnn", num_classes=10)
  expected = flax_logits(model, state, x[:3])
  got = ort.InferenceSession(out).run(None, {"images": x[:3]})[0]
  np.testing.assert_allclose(got, expected, rtol=0, atol=RTOL * np.max(np.abs(expected)))
  assert_kernels_stored_exactly(out, state)
  assert report["zero_weights"] >= int(SPARSITY * report["weights"])


def test_the_file_carries_what_deployment_needs(run_dir, selected_onnx):
  """The metadata's preprocessing, applied to the raw uint8 test images, gives onnxruntime the
  run's own headline test accuracy; mean and std are the ones the trainer normalised with."""
  out, report = selected_onnx
  meta = {p.key: p.value for p in onnx.load(out).metadata_props}
  pre = json.loads(meta["preprocessing"])
  assert pre["layout"] == "NHWC" and pre["dtype"] == "uint8" and pre["scale"] == 1 / 255
  data = hs_data.load_dataset("digits")
  np.testing.assert_allclose(pre["mean"], data.mean, rtol=1e-12)
  np.testing.assert_allclose(pre["std"], data.std, rtol=1e-12)
  assert json.loads(meta["input_shape"]) == [None, 8, 8, 1]
  assert meta["num_classes"] == "10" and meta["dataset"] == "digits"
  with open(os.path.join(run_dir, "summary.json")) as f:
    summary = json.load(f)
  assert meta["selected_epoch"] == str(summary["selected_epoch"])
  assert meta["selection"] == summary["selection"]
  images = np.asarray(data.test_images)  # uint8 NHWC
  x = ((images * pre["scale"] - np.asarray(pre["mean"])) / np.asarray(pre["std"]))
  logits = ort.InferenceSession(out).run(None, {"images": x.astype(np.float32)})[0]
  accuracy = float(np.mean(np.argmax(logits, -1) == data.test_labels))
  assert accuracy == pytest.approx(summary["test_accuracy"], abs=1e-12)


def test_readme_onnxruntime_snippet_runs(selected_onnx, tmp_path, monkeypatch, capsys):
  import re
  readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
  with open(readme) as f:
    text = f.read()
  body = text[text.index("**Deploying the file.**"):]
  code = re.search(r"```python\n(.*?)```", body, re.S).group(1)
  out, report = selected_onnx
  shutil.copy(out, tmp_path / "digits.onnx")
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "readme_snippet"}
  exec(compile(code, "README.md", "exec"), namespace)
  printed = capsys.readouterr().out
  # the snippet's class is the one onnxruntime gives the first digit normalised as in training
  data = hs_data.load_dataset("digits")
  from sklearn.datasets import load_digits
  first = np.rint(load_digits().images[0] * 255 / 16).astype(np.uint8)[None, :, :, None]
  x = np.asarray(hs_data.normalize(first, data.mean, data.std))
  expected = int(np.argmax(ort.InferenceSession(out).run(None, {"images": x})[0], -1)[0])
  assert printed.startswith(f"class {expected} (label 0), 10 classes, epoch {report['epoch']}")


def test_cli_final_with_sparse_initializers(run_dir, tmp_path, capsys):
  out = str(tmp_path / "final.onnx")
  assert onnx_export.main([run_dir, out, "--final", "--sparse-initializers"]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  records = _records(run_dir)
  last = max(records)
  assert records[last]["phase"] == "finetune" and report["epoch"] == last
  assert report["sparse_initializers"] > 0 and report["checkpoint"] == "latest"
  accuracy, _ = _onnx_test_accuracy(out)
  assert accuracy == pytest.approx(records[last]["test_accuracy"], abs=1e-12)
  _, state = _restore(run_dir, "latest")
  assert_kernels_stored_exactly(out, state["train"])


def test_cli_errors_are_one_line(run_dir, tmp_path, capsys):
  cases = [
      ([str(tmp_path), str(tmp_path / "a.onnx")], "no config.json"),
      ([run_dir, str(tmp_path / "missing" / "a.onnx")], "does not exist"),
  ]
  no_best = str(tmp_path / "no_best")
  shutil.copytree(run_dir, no_best)
  shutil.rmtree(os.path.join(no_best, "checkpoints", "best"))
  shutil.rmtree(os.path.join(no_best, "checkpoints", "best_val"), ignore_errors=True)
  cases.append(([no_best, str(tmp_path / "b.onnx")], "no fine-tuned checkpoint"))
  cases.append(([no_best, "--checkpoint", "best-test", str(tmp_path / "c.onnx")],
                "no fine-tuned checkpoint in checkpoints/best "))
  for argv, needle in cases:
    assert onnx_export.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
  assert not any(name.endswith(".onnx") for name in os.listdir(tmp_path))


def test_a_bad_output_path_is_refused_before_anything_is_loaded(run_dir, tmp_path, capsys,
                                                               monkeypatch):
  def never(*args, **kwargs):
    raise AssertionError("loaded or converted before the output path was checked")

  monkeypatch.setattr(onnx_export, "load_run_variables", never)
  monkeypatch.setattr(onnx_export, "export_onnx", never)
  (tmp_path / "folder.onnx").mkdir()
  cases = [(str(tmp_path / "folder.onnx"), "is a directory"),
           (str(tmp_path / "missing" / "a.onnx"), "does not exist"),
           ("/proc/hypersparse-export-test.onnx", "not writable")]  # even root cannot write
  for output, needle in cases:
    assert onnx_export.main([run_dir, output]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and output in err[0], err


@pytest.fixture(scope="module")
def run_no_val(tmp_path_factory):
  """A tiny digits MLP run without a validation split: its headline is the final epoch."""
  outdir = str(tmp_path_factory.mktemp("run") / "mlp")
  argv = ["--model", "mlp", "--warmup-epochs", "1", "--epochs", "3", "--max-art-epochs", "2",
          "--lambda-init", "1e-3", "--eta", "2", "--no-progress", "--outdir", outdir]
  assert cli.main(argv) == 0
  return outdir


def test_cli_without_a_validation_split_exports_the_final_epoch(run_no_val, tmp_path, capsys):
  """Not checkpoint ``best`` (the best *test* epoch): the model summary.json's headline is."""
  out = str(tmp_path / "final.onnx")
  assert onnx_export.main([run_no_val, out, "--no-verify"]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  with open(os.path.join(run_no_val, "summary.json")) as f:
    summary = json.load(f)
  records = _records(run_no_val)
  assert summary["selection"] == "final" and summary["selected_epoch"] == max(records)
  assert report["epoch"] == max(records) and report["selection"] == "final"
  assert report["checkpoint"] == "latest"
  accuracy, _ = _onnx_test_accuracy(out)
  assert accuracy == pytest.approx(summary["test_accuracy"], abs=1e-12)
  assert accuracy == pytest.approx(records[max(records)]["test_accuracy"], abs=1e-12)


def test_cli_best_test_only_when_asked(run_no_val, tmp_path, capsys):
  out = str(tmp_path / "best.onnx")
  assert onnx_export.main([run_no_val, out, "--checkpoint", "best-test", "--no-verify"]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  with open(os.path.join(run_no_val, "summary.json")) as f:
    summary = json.load(f)
  assert report["checkpoint"] == "best" and report["epoch"] == summary["best_test_epoch"]
  assert report["selection"] == "best_test" and "test set" in report["selection_reason"]
  accuracy, _ = _onnx_test_accuracy(out)
  assert accuracy == pytest.approx(summary["best_test_accuracy"], abs=1e-12)
  assert "selected on the test set" in " ".join(onnx_export.build_parser().format_help().split())


def test_preprocessing_is_read_from_summary_json_when_recorded(run_no_val, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(run_no_val, copy, ignore=shutil.ignore_patterns("checkpoints"))
  summary = json.loads((copy / "summary.json").read_text())
  recorded = {"layout": "NHWC", "dtype": "uint8", "scale": 1 / 255, "mean": [0.25],
              "std": [0.5]}
  (copy / "summary.json").write_text(json.dumps({**summary, "preprocessing": recorded}))
  assert onnx_export.preprocessing(str(copy)) == recorded
  summary.pop("preprocessing", None)
  (copy / "summary.json").write_text(json.dumps(summary))
  data = hs_data.load_dataset("digits")  # else: as the trainer computes it
  assert onnx_export.preprocessing(str(copy))["mean"] == pytest.approx(list(data.mean))


def test_plain_convolutions_context_traces_lax_convolution():
  """Inside conv.plain_convolutions() the CPU specialisation (a custom_vjp) is not traced."""
  from hypersparse_jax import conv
  x = jnp.ones((1, 2, 2, 4))  # 2x2 output < 3x3 taps: the specialised path is a matmul on CPU
  w = jnp.ones((3, 3, 4, 5))

  def trace():  # a new function each time: JAX caches traces per function
    return str(jax.make_jaxpr(lambda x, w: conv.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))(x, w))

  with conv.plain_convolutions():
    plain = trace()
  assert "conv_general_dilated" in plain and "custom_vjp" not in plain
  if jax.default_backend() == "cpu":
    assert "custom_vjp" in trace()  # the context was left
