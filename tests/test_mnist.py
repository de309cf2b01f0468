"""Tests of the MNIST / Fashion-MNIST IDX reader (:mod:`hypersparse_jax.data.mnist`).

The real-file tests read Debian's ``dataset-fashion-mnist`` package (60,000 + 10,000 images) and
compare with figures computed here from the same files with ``gzip`` + ``struct`` + NumPy, not
with the module. Where the package is missing they fail (no silent skip) with the command that
installs it. The error paths run on small IDX files the tests write.
"""

from __future__ import annotations

import gzip
import json
import os
import struct

import numpy as np
import pytest

from hypersparse_jax import data
from hypersparse_jax.data import mnist

REAL_DIR = "/usr/share/datasets/fashion-mnist"
NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")


def _real_path(name):
  path = os.path.join(REAL_DIR, name + ".gz")
  if not os.path.isfile(path):
    pytest.fail(f"{path} is missing: install Debian's package with "
                "`apt-get install dataset-fashion-mnist` (as root; .ci/run does)")
  return path


def _raw_idx(name):
  """``(dims, body bytes)`` of a real IDX file, read with gzip + struct only."""
  with gzip.open(_real_path(name), "rb") as f:
    raw = f.read()
  magic, = struct.unpack(">I", raw[:4])
  ndim = raw[3]
  assert magic >> 8 == 0x08  # unsigned bytes
  dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
  return dims, raw[4 + 4 * ndim:]


@pytest.fixture(scope="module")
def real():
  for name in NAMES:
    _real_path(name)
  return data.load_dataset("fashion_mnist")


def _write_idx(path, magic, dims, body, *, gz):
  raw = struct.pack(">I", magic) + struct.pack(">" + "I" * len(dims), *dims) + bytes(body)
  if gz:
    with gzip.open(str(path) + ".gz", "wb") as f:
      f.write(raw)
  else:
    with open(path, "wb") as f:
      f.write(raw)


def _write_set(folder, *, n_train=12, n_test=5, gz=True, seed=0):
  """Writes a small valid IDX set; returns its arrays (images (N, 28, 28), labels)."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in (("train", n_train), ("t10k", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    _write_idx(folder / f"{split}-images-idx3-ubyte", 2051, (n, 28, 28), images.tobytes(), gz=gz)
    _write_idx(folder / f"{split}-labels-idx1-ubyte", 2049, (n,), labels.tobytes(), gz=gz)
    arrays[split] = (images, labels)
  return arrays


# ----- the real files ------------------------------------------------------------------------


def test_real_counts_shapes_and_dtypes(real):
  assert real.train_images.shape == (60000, 28, 28, 1)
  assert real.test_images.shape == (10000, 28, 28, 1)
  assert real.train_images.dtype == np.uint8 and real.train_labels.dtype == np.int32
  assert (real.num_classes, real.crop_padding, real.flip) == (10, 4, True)


def test_real_label_histograms(real):
  assert np.bincount(real.train_labels, minlength=10).tolist() == [6000] * 10
  assert np.bincount(real.test_labels, minlength=10).tolist() == [1000] * 10


def test_real_pixels_and_labels_match_an_independent_read(real):
  for images_name, labels_name, images, labels in (
      (NAMES[0], NAMES[1], real.train_images, real.train_labels),
      (NAMES[2], NAMES[3], real.test_images, real.test_labels)):
    (n, rows, cols), body = _raw_idx(images_name)
    size = rows * cols
    for i in (0, 1, 1234, n - 1):
      assert int(images[i].sum()) == sum(body[i * size:(i + 1) * size])
    # row-major pixels: image 0's first row as stored
    assert images[0, 0, :, 0].tolist() == list(body[:cols])
    (m,), label_body = _raw_idx(labels_name)
    assert m == n == len(labels)
    assert labels[:20].tolist() == list(label_body[:20])
    assert labels[-1] == label_body[-1]
  # Zalando's first training and test images are both class 9 (ankle boot)
  assert real.train_labels[0] == 9 and real.test_labels[0] == 9


def test_fashion_mnist_normalisation_constants_match_the_training_file():
  _, body = _raw_idx(NAMES[0])
  pixels = np.frombuffer(body, np.uint8).astype(np.float64) / 255.0
  assert mnist.FASHION_MNIST_MEAN[0] == pytest.approx(pixels.mean(), rel=1e-12)
  assert mnist.FASHION_MNIST_STD[0] == pytest.approx(pixels.std(), rel=1e-12)
  # the values the module docstring states
  assert f"{pixels.mean():.6f}, {pixels.std():.6f}" == "0.286041, 0.353024"


# ----- written files ------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_written_set_round_trips(tmp_path, gz):
  arrays = _write_set(tmp_path, gz=gz)
  ds = data.load_dataset("mnist", tmp_path)
  np.testing.assert_array_equal(ds.train_images[..., 0], arrays["train"][0])
  np.testing.assert_array_equal(ds.train_labels, arrays["train"][1].astype(np.int32))
  np.testing.assert_array_equal(ds.test_images[..., 0], arrays["t10k"][0])
  np.testing.assert_array_equal(ds.test_labels, arrays["t10k"][1].astype(np.int32))
  # MNIST: mean / std of its own training pixels, no flip
  pixels = arrays["train"][0].astype(np.float64) / 255.0
  assert ds.mean[0] == pytest.approx(pixels.mean(), rel=1e-12)
  assert ds.std[0] == pytest.approx(pixels.std(), rel=1e-12)
  assert (ds.crop_padding, ds.flip) == (4, False)


def test_fashion_mnist_from_a_folder_keeps_its_constants(tmp_path):
  _write_set(tmp_path, gz=False)
  ds = data.load_dataset("fashion_mnist", tmp_path)
  assert (ds.mean, ds.std) == ((0.2860405969887955,), (0.35302424451492254,))
  assert ds.num_train == 12 and ds.flip


def _one_line(err):
  message = str(err.value)
  assert "\n" not in message
  return message


def test_truncated_gzip_is_named(tmp_path):
  _write_set(tmp_path)
  path = tmp_path / "train-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(ValueError) as err:
    data.load_dataset("mnist", tmp_path)
  assert _one_line(err).startswith(f"{path}: unreadable")


def test_truncated_raw_file_reports_header_and_size(tmp_path):
  _write_set(tmp_path, gz=False)
  path = tmp_path / "t10k-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-28])
  with pytest.raises(ValueError) as err:
    data.load_dataset("mnist", tmp_path)
  message = _one_line(err)
  assert message.startswith(f"{path}: header says 5x28x28")
  assert f"file holds {16 + 5 * 784 - 28} bytes" in message


def test_file_shorter_than_its_header(tmp_path):
  _write_set(tmp_path, gz=False)
  (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
  with pytest.raises(ValueError, match="train-labels-idx1-ubyte: 3 bytes, too short"):
    data.load_dataset("mnist", tmp_path)


def test_wrong_magic_is_named(tmp_path):
  _write_set(tmp_path)
  # an image file where the labels belong
  _write_idx(tmp_path / "train-labels-idx1-ubyte", 2051, (12, 28, 28), bytes(12 * 784), gz=True)
  with pytest.raises(ValueError) as err:
    data.load_dataset("mnist", tmp_path)
  assert "train-labels-idx1-ubyte.gz: magic number 2051" in _one_line(err)
  assert "expected 2049" in str(err.value)


def test_wrong_image_size_is_named(tmp_path):
  _write_set(tmp_path)
  _write_idx(tmp_path / "t10k-images-idx3-ubyte", 2051, (5, 32, 32), bytes(5 * 1024), gz=True)
  with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz: images are 32x32, expected "
                     r"28x28$"):
    data.load_dataset("mnist", tmp_path)


def test_label_out_of_range_is_named(tmp_path):
  _write_set(tmp_path)
  labels = np.zeros(5, np.uint8)
  labels[3] = 10
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte", 2049, (5,), labels.tobytes(), gz=True)
  with pytest.raises(ValueError) as err:
    data.load_dataset("mnist", tmp_path)
  assert _one_line(err).endswith(
      "t10k-labels-idx1-ubyte.gz: labels must lie in 0..9, found 10 at index 3 (1 such labels)")


def test_count_mismatch_names_both_files(tmp_path):
  _write_set(tmp_path)
  _write_idx(tmp_path / "train-labels-idx1-ubyte", 2049, (11,), bytes(11), gz=True)
  with pytest.raises(ValueError) as err:
    data.load_dataset("mnist", tmp_path)
  assert _one_line(err) == (f"{tmp_path}/train-images-idx3-ubyte.gz holds 12 images but "
                            f"{tmp_path}/train-labels-idx1-ubyte.gz holds 11 labels")


def test_missing_file_is_named(tmp_path):
  _write_set(tmp_path)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(FileNotFoundError) as err:
    data.load_dataset("mnist", tmp_path)
  assert _one_line(err) == (f"{tmp_path}: neither t10k-labels-idx1-ubyte.gz nor "
                            "t10k-labels-idx1-ubyte found")


def test_missing_folder_says_how_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    data.load_dataset("fashion_mnist", tmp_path / "nowhere")
  message = _one_line(err)
  assert f"folder {tmp_path / 'nowhere'} does not exist" in message
  assert "apt-get install dataset-fashion-mnist" in message and "data_dir=" in message


def test_mnist_needs_a_folder():
  with pytest.raises(ValueError) as err:
    data.load_dataset("mnist")
  assert _one_line(err).startswith("mnist needs data_dir=")


# ----- --no-augment --------------------------------------------------------------------------


def _image_task(**options):
  from hypersparse_jax import config, sharding, tasks
  cfg = config.TrainConfig(**options)
  cfg.validate()
  return tasks.create_task(cfg, sharding.Placement(None), eval_batch_size=450)


def test_no_augment_trains_and_measures_the_pruned_copy_on_clean_images():
  import jax
  import jax.numpy as jnp
  task = _image_task(dataset="digits", augment=False, pruned_eval="augmented")
  assert (task.data.crop_padding, task.data.flip) == (0, False)
  images, labels = task.data.train_images, task.data.train_labels
  clean = (images.astype(np.float32) / 255.0 - np.float32(task.data.mean[0])) / np.float32(
      task.data.std[0])
  # what the training step does to a batch with these settings: normalisation only
  served = jax.jit(lambda key, x: data.augment(
      key, x, mean=task.data.mean, std=task.data.std, crop_padding=task.data.crop_padding,
      flip=task.data.flip))(jax.random.PRNGKey(3), jnp.asarray(images[:64]))
  np.testing.assert_allclose(np.asarray(served), clean[:64], rtol=1e-6, atol=1e-6)
  # the pruned copy's accuracy: the clean training images' (any epoch)
  variables = task.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)
  logits = np.asarray(task.model.apply(variables, clean, train=False))
  expected = float(np.mean(logits.argmax(-1) == labels))
  for epoch in (1, 2):
    assert task.pruned_train_accuracy(variables["params"], {}, epoch) == pytest.approx(expected)


def test_augmentation_stays_on_by_default():
  task = _image_task(dataset="digits")
  assert (task.data.crop_padding, task.data.flip) == (1, False)  # the digits loader's own


def test_no_augment_is_refused_for_text():
  from hypersparse_jax import config
  cfg = config.TrainConfig(dataset="pysource", model="transformer", **{
      k: v for k, v in config.PYSOURCE_PRESET.items() if k not in ("model", "augment")},
        augment=False)
  with pytest.raises(ValueError) as err:
    cfg.validate()
  assert _one_line(err).startswith("--no-augment is for the image datasets (digits, cifar10")
  assert "--dataset pysource has no augmentation" in str(err.value)


def test_runs_without_the_augment_key_resume_as_augmented():
  import dataclasses
  from hypersparse_jax import config
  new = dataclasses.asdict(config.TrainConfig(dataset="fashion_mnist"))
  old = {k: v for k, v in new.items() if k != "augment"}
  assert config.resume_differences(old, new) == {}
  diff = config.resume_differences(old, dict(new, augment=False))
  assert set(diff) == {"augment"} and "True" in diff["augment"][0]


# ----- hypersparse-train end to end ----------------------------------------------------------

# what summary.json holds for every image run (train.py's Trainer._finish and the image task)
SUMMARY_KEYS = {
    "preprocessing",
    "dataset", "model", "depth", "penalty", "seed", "sparsity_target", "sparsity_achieved",
    "test_accuracy", "selection", "selected_epoch", "val_accuracy", "best_val_accuracy",
    "best_test_accuracy", "best_test_epoch", "final_test_accuracy", "val_fraction", "num_train",
    "num_val", "num_test", "art_rule", "pruned_eval", "art_epochs", "art_best_epoch",
    "stop_reason", "lambda_final", "num_weights", "num_nonzero_weights", "dense_bytes",
    "sparse_bytes", "compression_ratio", "dense_test_accuracy",
    "distribution", "nm", "pattern", "layer_sparsity"}
TINY = ["--warmup-epochs", "1", "--epochs", "2", "--max-art-epochs", "3", "--lambda-init", "1e-3",
        "--eta", "2", "--lr", "0.05", "--eval-batch-size", "200", "--sparsity", "0.9",
        "--no-progress"]


def _call_main(argv):
  from hypersparse_jax import cli
  try:
    return cli.main([str(a) for a in argv])
  except SystemExit as e:
    return e.code


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
  """The first 600 training and 200 test examples of the real files, as gzip IDX files."""
  folder = tmp_path_factory.mktemp("fashion_small")
  for (images_name, labels_name), n in (((NAMES[0], NAMES[1]), 600), ((NAMES[2], NAMES[3]), 200)):
    (_, rows, cols), body = _raw_idx(images_name)
    _write_idx(folder / images_name, 2051, (n, rows, cols), body[:n * rows * cols], gz=True)
    _, label_body = _raw_idx(labels_name)
    _write_idx(folder / labels_name, 2049, (n,), label_body[:n], gz=True)
  return folder


def test_hypersparse_train_on_a_fashion_mnist_slice(small_folder, tmp_path, capsys):
  outdir = tmp_path / "run"
  rc = _call_main(["--dataset", "fashion_mnist", "--model", "lenet300", "--data-dir",
                   small_folder, "--outdir", outdir] + TINY)
  out, err = capsys.readouterr()
  assert rc == 0, err
  with open(outdir / "summary.json") as f:
    summary = json.load(f)
  assert set(summary) == SUMMARY_KEYS
  assert (summary["distribution"], summary["nm"], summary["pattern"]) == (
      "global", None, {"kind": "global", "sparsity": 0.9})
  assert [l["name"] for l in summary["layer_sparsity"]] == ["fc1/kernel", "fc2/kernel",
                                                            "fc3/kernel"]
  assert sum(l["kept"] for l in summary["layer_sparsity"]) == summary["num_nonzero_weights"]
  assert (summary["dataset"], summary["model"], summary["depth"]) == ("fashion_mnist",
                                                                       "lenet300", None)
  assert (summary["num_train"], summary["num_test"], summary["num_weights"]) == (600, 200,
                                                                                 266_200)
  # the global magnitude mask keeps |w| > sort(|w|)[floor(0.9 * 266,200) = 239,580]: the
  # 239,581 smallest go (no ties among trained float weights)
  assert summary["num_nonzero_weights"] == 266_200 - 239_581
  assert summary["sparsity_achieved"] == pytest.approx(239_581 / 266_200, abs=1e-9)
  assert 0.1 < summary["test_accuracy"] <= 1.0  # learnt something in 4+ epochs on 600 images
  with open(outdir / "config.json") as f:
    assert json.load(f)["augment"] is False  # the preset: LeNet-300-100 on the clean images
  # the run's fine-tuned model reads back for export (28x28x1, LeNet-300-100's shapes)
  from hypersparse_jax import onnx_export
  model, variables, info = onnx_export.load_run_variables(str(outdir))
  assert info["image_shape"] == (28, 28, 1) and type(model).__name__ == "LeNet300"
  assert variables["params"]["fc3"]["kernel"].shape == (100, 10)


@pytest.mark.parametrize("argv, expected", [
    (["--dataset", "fashion_mnist", "--data-dir", "/nonexistent/fashion"],
     ["folder /nonexistent/fashion does not exist",
      "apt-get install dataset-fashion-mnist", "--data-dir <a folder"]),
    (["--dataset", "mnist"], ["mnist needs --data-dir <a folder with train-images-idx3-ubyte"]),
    (["--dataset", "pysource", "--no-augment"], ["--no-augment is for the image datasets"]),
    (["--dataset", "fashion_mnist", "--model", "lenet5", "--depth", "5"],
     ["--depth is not used by --model lenet5"]),
])
def test_hypersparse_train_start_errors_are_one_line(argv, expected, tmp_path, capsys):
  assert _call_main(argv + ["--outdir", tmp_path / "run"] + TINY) == 2
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("hypersparse-train: error: "), lines
  for part in expected:
    assert part in lines[0], lines[0]


def test_init_from_a_pytorch_lenet5(small_folder, tmp_path):
  import jax
  import torch
  from hypersparse_jax import config, train
  from hypersparse_jax.torch_models import TorchLeNet5
  torch.manual_seed(0)
  torch_model = TorchLeNet5().eval()
  path = tmp_path / "lenet5.pth.tar"
  torch.save({"epoch": 1, "state_dict": torch_model.state_dict()}, path)
  cfg = config.TrainConfig(dataset="fashion_mnist", data_dir=str(small_folder), model="lenet5",
                           init_from=str(path))
  cfg.validate()
  trainer = train.Trainer(cfg, str(tmp_path / "run"), progress=False)
  images = trainer.dataset.test_images[:16]  # real Fashion-MNIST images
  x = (images.astype(np.float32) / 255.0 - 0.2860406) / 0.3530242
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  params = jax.device_get(trainer.params)
  logits = np.asarray(trainer.model.apply({"params": params}, x, train=False))
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)


def test_fashion_preset_and_the_augment_switch():
  """Bare --dataset fashion_mnist takes its preset (LeNet-300-100, clean images, 98 %); the
  switch overrides the preset either way, and the other datasets keep augmenting."""
  from hypersparse_jax import cli

  def cfg(*argv):
    return cli.config_from_args(cli.build_parser().parse_args(list(argv)))

  bare = cfg("--dataset", "fashion_mnist")
  assert (bare.model, bare.sparsity, bare.augment, bare.batch_size) == ("lenet300", 0.98,
                                                                        False, 128)
  assert (bare.warmup_epochs, bare.max_art_epochs, bare.epochs, bare.lr_steps) == (5, 25, 6,
                                                                                   (3, 5))
  assert cfg("--dataset", "fashion_mnist", "--augment").augment is True
  assert cfg("--dataset", "mnist", "--data-dir", "/x").model == "lenet300"
  assert cfg("--dataset", "digits").augment is True
  assert cfg("--dataset", "digits", "--no-augment").augment is False
  lenet5 = cfg("--dataset", "fashion_mnist", "--model", "lenet5", "--augment")
  assert (lenet5.model, lenet5.depth, lenet5.augment) == ("lenet5", None, True)
