"""Tests for hypersparse_jax.data, checked against independent NumPy / PIL computations."""

from __future__ import annotations

import re
import threading

import jax
import numpy as np
import pytest
from PIL import Image

from hypersparse_jax import data as ip
from hypersparse_jax.data import cifar, records, tinyimagenet

# ------------------------------------------------------------------------------------------------
# Helpers


def _indexed_dataset(n_train=10, n_test=7, num_classes=3):
    """Images whose every pixel holds the example's index, so batches reveal which examples ran."""
    train = np.broadcast_to(
        np.arange(n_train, dtype=np.uint8)[:, None, None, None], (n_train, 2, 2, 1)
    )
    test = np.broadcast_to(
        np.arange(n_test, dtype=np.uint8)[:, None, None, None], (n_test, 2, 2, 1)
    )
    return ip.Dataset(
        "indexed",
        np.ascontiguousarray(train),
        (np.arange(n_train) % num_classes).astype(np.int32),
        np.ascontiguousarray(test),
        (np.arange(n_test) % num_classes).astype(np.int32),
        num_classes=num_classes,
        mean=(0.5,),
        std=(0.25,),
        crop_padding=0,
        flip=False,
    )


def _maybe_jit(fn, use_jit):
    return jax.jit(fn) if use_jit else fn


def _np_normalize(x, mean, std):
    return (x.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)


# ------------------------------------------------------------------------------------------------
# Digits


def test_digits_shapes_counts_and_constants():
    from sklearn.datasets import load_digits

    ds = ip.load_dataset("digits")
    assert ds.name == "digits" and ds.num_classes == 10
    assert ds.crop_padding == 1 and ds.flip is False
    assert ds.image_shape == (8, 8, 1)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert ds.num_train + ds.num_test == 1797
    assert ds.num_test == 450  # ceil(0.25 * 1797)
    assert ds.train_images.min() == 0 and ds.train_images.max() == 255

    # Same multiset of (image, label) as sklearn's data, 0..16 mapped linearly to 0..255.
    raw = load_digits()
    expected = np.rint(raw.images * 255.0 / 16.0).astype(np.uint8).reshape(1797, -1)
    got = np.concatenate([ds.train_images, ds.test_images]).reshape(1797, -1)
    got_labels = np.concatenate([ds.train_labels, ds.test_labels])
    key = lambda imgs, labels: sorted(zip(labels.tolist(), map(bytes, imgs)))
    assert key(got, got_labels) == key(expected, raw.target)

    # Stratified: each class's test share is 25 % up to rounding.
    for c in range(10):
        n_c = np.sum(raw.target == c)
        assert abs(np.sum(ds.test_labels == c) - 0.25 * n_c) <= 1

    # Normalisation constants from the train split, in [0, 1] units.
    x = ds.train_images.astype(np.float64) / 255.0
    np.testing.assert_allclose(ds.mean, [x.mean()], rtol=1e-12)
    np.testing.assert_allclose(ds.std, [x.std()], rtol=1e-12)


def test_digits_split_is_deterministic():
    a, b = ip.load_dataset("digits"), ip.load_dataset("digits")
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.train_labels, b.train_labels)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)


def test_validation_split_sizes_membership_and_determinism():
    full = ip.load_dataset("digits")
    n = full.num_train
    split = ip.with_validation_split(full, 0.1, seed=3)
    assert split.num_val == round(0.1 * n) and split.num_train == n - split.num_val
    assert full.num_val == 0 and full.val_images is None
    # the two parts are exactly the original examples, each once, in their original order
    key = lambda images, labels: [im.tobytes() + bytes([lab]) for im, lab in zip(images, labels)]
    original = key(full.train_images, full.train_labels)
    parts = key(split.train_images, split.train_labels) + key(split.val_images, split.val_labels)
    assert sorted(parts) == sorted(original)
    positions = {k: i for i, k in enumerate(original)}  # digits has no duplicate images
    if len(positions) == n:
        for part in (split.train_images, split.val_images):
            labels = split.train_labels if part is split.train_images else split.val_labels
            idx = [positions[k] for k in key(part, labels)]
            assert idx == sorted(idx)
    # a function of the seed only
    again = ip.with_validation_split(full, 0.1, seed=3)
    np.testing.assert_array_equal(again.val_images, split.val_images)
    other = ip.with_validation_split(full, 0.1, seed=4)
    assert not np.array_equal(other.val_images, split.val_images)
    # test split and constants untouched
    assert split.test_images is full.test_images and split.mean == full.mean


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1e-5, 0.99999])
def test_validation_split_errors(fraction):
    full = ip.load_dataset("digits")
    with pytest.raises(ValueError, match="fraction|validation"):
        ip.with_validation_split(full, fraction, seed=0)
    split = ip.with_validation_split(full, 0.2, seed=0)
    with pytest.raises(ValueError, match="already"):
        ip.with_validation_split(split, 0.2, seed=0)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="imagenet21k.*digits, cifar10, cifar100, tinyimagenet"):
        ip.load_dataset("imagenet21k")


# ------------------------------------------------------------------------------------------------
# CIFAR through TFDS data_source (mocked)

# tensorflow-datasets is a dependency: a broken install must fail these tests (not skip them),
# and only these (imported here, not at module level, so the other tests still run).


@pytest.fixture(name="tfds")
def _tfds():
    import tensorflow_datasets

    return tensorflow_datasets


_CIFAR = [("cifar10", 10, (0.4914, 0.4822, 0.4465)), ("cifar100", 100, (0.5071, 0.4867, 0.4408))]


def _read_mock_split(tfds, name, split):
    """The mocked examples, read one by one straight from TFDS."""
    source = tfds.data_source(name, split=split, download=False)
    examples = [source[i] for i in range(len(source))]
    return np.stack([e["image"] for e in examples]), np.array([int(e["label"]) for e in examples])


@pytest.mark.parametrize("name,num_classes,mean", _CIFAR)
def test_cifar_from_mocked_data_source(name, num_classes, mean, tmp_path, monkeypatch, tfds):
    # mock_data patches DatasetBuilder.as_data_source: any result here came through data_source.
    # No metadata files are shipped, so the AUTO policy resolves to USE_CODE.
    monkeypatch.setattr(cifar, "READ_CHUNK", 2)  # several chunks, one partial
    monkeypatch.setattr(records, "READ_CHUNK", 2)
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.AUTO):
        ds = ip.load_dataset(name, data_dir=tmp_path)
        want_train = _read_mock_split(tfds, name, "train")
        want_test = _read_mock_split(tfds, name, "test")
    assert ds.name == name and ds.num_classes == num_classes
    assert ds.train_images.shape == (5, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32 and ds.test_images.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(ds.train_images, want_train[0])
    np.testing.assert_array_equal(ds.train_labels, want_train[1])
    np.testing.assert_array_equal(ds.test_images, want_test[0])
    np.testing.assert_array_equal(ds.test_labels, want_test[1])
    assert ds.mean == mean and ds.crop_padding == 4 and ds.flip is True


def test_cifar_batched_reads_are_used(tmp_path, monkeypatch, tfds):
    # TFDS 4.9's mock binds __getitems__ without `self` (the loader then falls back to single
    # reads); give it a working batched read and check the loader uses it.
    from tensorflow_datasets.testing import mocking

    calls = []

    def batched(record_keys, generator, serialized=False):
        calls.append(list(record_keys))
        return [generator[k] for k in record_keys]

    monkeypatch.setattr(mocking, "_getitems", batched)
    monkeypatch.setattr(cifar, "READ_CHUNK", 3)
    monkeypatch.setattr(records, "READ_CHUNK", 3)
    with tfds.testing.mock_data(num_examples=7):
        ds = ip.load_dataset("cifar10", data_dir=tmp_path)
        want = _read_mock_split(tfds, "cifar10", "train")
    assert [0, 1, 2] in calls and [6] in calls
    np.testing.assert_array_equal(ds.train_images, want[0])
    np.testing.assert_array_equal(ds.train_labels, want[1])


def test_cifar_missing_data_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(tmp_path))}.*--data-dir.*download"):
        ip.load_dataset("cifar10", data_dir=tmp_path, download=False)


# ------------------------------------------------------------------------------------------------
# TinyImageNet from a generated folder

_WNIDS = ["n03", "n01", "n02"]  # deliberately unsorted: labels follow the sorted order


def _write_jpeg(path, rng, grey=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if grey:
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), mode="L").save(path)
    else:
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)


def _make_tinyimagenet(root, rng=None):
    rng = rng or np.random.default_rng(0)
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(_WNIDS) + "\n")
    for wnid in _WNIDS:
        for i in range(4):
            _write_jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", rng, grey=i == 1)
    lines = []
    for i in range(6):
        _write_jpeg(root / "val" / "images" / f"val_{i}.JPEG", rng, grey=i == 4)
        lines.append(f"val_{i}.JPEG\t{_WNIDS[i % 3]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def _pil_rgb(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_tinyimagenet_folder(tmp_path):
    root = _make_tinyimagenet(tmp_path / "tiny")
    ds = ip.load_dataset("tinyimagenet", data_dir=root, cache=False)
    assert ds.num_classes == 3 and ds.image_shape == (64, 64, 3)
    assert ds.num_train == 12 and ds.num_test == 6
    assert ds.train_images.dtype == np.uint8 and ds.test_labels.dtype == np.int32
    label_of = {w: i for i, w in enumerate(sorted(_WNIDS))}
    # Each train image equals PIL's own RGB decoding of the file of its class.
    for wnid in _WNIDS:
        rows = np.flatnonzero(ds.train_labels == label_of[wnid])
        assert len(rows) == 4
        want = [_pil_rgb(p) for p in sorted((root / "train" / wnid / "images").iterdir())]
        np.testing.assert_array_equal(ds.train_images[rows], np.stack(want))
    for i in range(6):
        np.testing.assert_array_equal(
            ds.test_images[i], _pil_rgb(root / "val/images" / f"val_{i}.JPEG")
        )
        assert ds.test_labels[i] == label_of[_WNIDS[i % 3]]
    grey = ds.test_images[4]
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], grey[..., 2])
    assert not (tmp_path / "tiny" / "hypersparse_jax_cache.npz").exists()


def test_tinyimagenet_cache(tmp_path, monkeypatch):
    root = _make_tinyimagenet(tmp_path / "tiny")
    first = ip.load_dataset("tinyimagenet", data_dir=root)
    cache_files = [p.name for p in root.iterdir() if p.is_file() and p.name != "wnids.txt"]
    assert cache_files == ["hypersparse_jax_cache.npz"]  # no temporary file left behind

    def no_decoding(paths):
        raise AssertionError("decoded although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(tinyimagenet, "_decode_all", no_decoding)
        second = ip.load_dataset("tinyimagenet", data_dir=root)
    np.testing.assert_array_equal(first.train_images, second.train_images)
    np.testing.assert_array_equal(first.test_images, second.test_images)
    np.testing.assert_array_equal(first.train_labels, second.train_labels)

    # A new image invalidates the cache.
    _write_jpeg(root / "train" / "n01" / "images" / "n01_9.JPEG", np.random.default_rng(1))
    third = ip.load_dataset("tinyimagenet", data_dir=root)
    assert third.num_train == 13


def test_tinyimagenet_errors(tmp_path):
    with pytest.raises(ValueError, match="data_dir"):
        ip.load_dataset("tinyimagenet")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        ip.load_dataset("tinyimagenet", data_dir=missing)

    root = _make_tinyimagenet(tmp_path / "tiny")
    (root / "wnids.txt").unlink()
    with pytest.raises(FileNotFoundError, match="wnids.txt"):
        ip.load_dataset("tinyimagenet", data_dir=root, cache=False)

    root = _make_tinyimagenet(tmp_path / "tiny2")
    with open(root / "val" / "val_annotations.txt", "a") as f:
        f.write("val_0.JPEG\tn99\t0\t0\t63\t63\n")
    with pytest.raises(ValueError, match="val_annotations.txt:7.*n99"):
        ip.load_dataset("tinyimagenet", data_dir=root, cache=False)

    root = tmp_path / "empty"
    for wnid in _WNIDS:
        (root / "train" / wnid / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(_WNIDS))
    with pytest.raises(ValueError, match=f"No training images.*{re.escape(str(root))}"):
        ip.load_dataset("tinyimagenet", data_dir=root, cache=False)


# ------------------------------------------------------------------------------------------------
# Batching


def test_steps_per_epoch():
    assert ip.steps_per_epoch(10, 4) == 3
    assert ip.steps_per_epoch(8, 4) == 2
    assert ip.steps_per_epoch(0, 4) == 0
    assert ip.steps_per_epoch(50000, 64) == 782
    with pytest.raises(ValueError, match="batch_size"):
        ip.steps_per_epoch(10, 0)


def test_train_batches_cover_epoch_once_with_padding():
    ds = _indexed_dataset(n_train=10)
    batches = list(ip.train_batches(ds, 4, seed=3, epoch=0))
    assert len(batches) == 3
    for b in batches:
        assert b["image"].shape == (4, 2, 2, 1) and b["image"].dtype == np.uint8
        assert b["label"].shape == (4,) and b["label"].dtype == np.int32
        assert b["mask"].dtype == bool
        ids = b["image"][:, 0, 0, 0]
        np.testing.assert_array_equal(b["label"], ids % 3)  # labels travel with their images
    np.testing.assert_array_equal(batches[-1]["mask"], [True, True, False, False])
    seen = np.concatenate([b["image"][b["mask"], 0, 0, 0] for b in batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(10))
    assert batches[-1]["image"][~batches[-1]["mask"]].max() < 10  # padding holds real examples


def test_train_batch_order_depends_only_on_seed_and_epoch():
    ds = _indexed_dataset(n_train=50)

    def order(seed, epoch):
        return np.concatenate(
            [b["image"][:, 0, 0, 0] for b in ip.train_batches(ds, 10, seed=seed, epoch=epoch)]
        )

    np.testing.assert_array_equal(order(0, 1), order(0, 1))
    assert not np.array_equal(order(0, 1), order(0, 2))
    assert not np.array_equal(order(0, 1), order(1, 1))


def test_train_batches_resume_at_start_step():
    ds = _indexed_dataset(n_train=23)
    full = list(ip.train_batches(ds, 5, seed=7, epoch=4))
    resumed = list(ip.train_batches(ds, 5, seed=7, epoch=4, start_step=3))
    assert len(resumed) == 2
    for a, b in zip(full[3:], resumed):
        for k in ("image", "label", "mask"):
            np.testing.assert_array_equal(a[k], b[k])
    assert list(ip.train_batches(ds, 5, seed=7, epoch=4, start_step=5)) == []
    with pytest.raises(ValueError, match="start_step"):
        next(ip.train_batches(ds, 5, seed=7, epoch=4, start_step=6))


@pytest.mark.parametrize("batch_size", [3, 7, 16])
def test_eval_batches_in_order(batch_size):
    ds = _indexed_dataset(n_test=7)
    batches = list(ip.eval_batches(ds.test_images, ds.test_labels, batch_size))
    assert len(batches) == -(-7 // batch_size)
    assert all(b["image"].shape[0] == batch_size for b in batches)
    ids = np.concatenate([b["image"][b["mask"], 0, 0, 0] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(7))
    assert sum(int(b["mask"].sum()) for b in batches) == 7


def test_prefetch_yields_in_order_and_propagates_errors():
    assert list(ip.prefetch(iter(range(20)), buffer_size=3)) == list(range(20))
    assert list(ip.prefetch(range(5), transfer=lambda x: 2 * x)) == [0, 2, 4, 6, 8]

    def failing():
        yield 1
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError, match="producer failed"):
        list(ip.prefetch(failing()))

    before = threading.active_count()
    it = ip.prefetch(iter(range(1000)), buffer_size=2)
    assert next(it) == 0
    it.close()  # leaving early stops the producer thread
    assert threading.active_count() == before


# ------------------------------------------------------------------------------------------------
# Augmentation

_MEAN = (0.4914, 0.4822, 0.4465)
_STD = (0.2023, 0.1994, 0.2010)


def _random_images(n, h=6, w=5, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def _np_augment(images, offsets, flips, pad):
    """NumPy reference: zero-pad the raw image, slice at the offset, mirror, normalise."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.stack([padded[i, oy : oy + h, ox : ox + w] for i, (oy, ox) in enumerate(offsets)])
    out = np.where(np.asarray(flips)[:, None, None, None], out[:, :, ::-1], out)
    return _np_normalize(out, _MEAN, _STD)


@pytest.mark.parametrize("use_jit", [True, False])
def test_flip_is_an_exact_mirror(use_jit):
    images = _random_images(16)
    key = jax.random.key(1)
    _, flips = ip.sample_augmentation(key, 16, crop_padding=0, flip=True)
    flips = np.asarray(flips)
    assert flips.any() and not flips.all()
    fn = _maybe_jit(
        lambda k, x: ip.augment(k, x, mean=_MEAN, std=_STD, crop_padding=0, flip=True), use_jit
    )
    got = np.asarray(fn(key, images))
    want = _np_normalize(
        np.where(flips[:, None, None, None], images[:, :, ::-1], images), _MEAN, _STD
    )
    assert got.dtype == np.float32 and got.shape == images.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_jit", [True, False])
@pytest.mark.parametrize("flip", [False, True])
def test_crop_equals_numpy_pad_and_slice(use_jit, flip):
    pad = 2
    images = _random_images(12)
    key = jax.random.key(5)
    offsets, flips = ip.sample_augmentation(key, 12, crop_padding=pad, flip=flip)
    offsets = np.asarray(offsets)
    assert offsets.dtype == np.int32 and offsets.shape == (12, 2)
    assert offsets.min() >= 0 and offsets.max() <= 2 * pad and len(np.unique(offsets, axis=0)) > 1
    if not flip:
        assert not np.asarray(flips).any()
    fn = _maybe_jit(
        lambda k, x: ip.augment(k, x, mean=_MEAN, std=_STD, crop_padding=pad, flip=flip), use_jit
    )
    np.testing.assert_allclose(
        np.asarray(fn(key, images)), _np_augment(images, offsets, flips, pad), rtol=1e-5, atol=1e-5
    )


def test_apply_augmentation_hand_picked_offsets():
    images = _random_images(3, h=4, w=4, c=3)
    offsets = np.array([[0, 0], [2, 2], [0, 2]], np.int32)  # top-left, centre (identity), top-right
    flips = np.array([False, False, True])
    got = jax.jit(
        lambda x, o, f: ip.apply_augmentation(x, o, f, mean=_MEAN, std=_STD, crop_padding=2)
    )(images, offsets, flips)
    np.testing.assert_allclose(
        np.asarray(got), _np_augment(images, offsets, flips, 2), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(got[1]), _np_normalize(images[1], _MEAN, _STD), rtol=1e-5, atol=1e-5
    )
    # Top-left offset 0 shows two rows and columns of zero padding, normalised to -mean/std.
    np.testing.assert_allclose(
        np.asarray(got[0, :2, :2]), np.broadcast_to(-np.array(_MEAN) / _STD, (2, 2, 3)), rtol=1e-5
    )


def test_augmentation_draws_are_per_image_and_cover_the_range():
    offsets, flips = ip.sample_augmentation(jax.random.key(0), 2000, crop_padding=4, flip=True)
    offsets, flips = np.asarray(offsets), np.asarray(flips)
    for axis in range(2):
        np.testing.assert_array_equal(np.unique(offsets[:, axis]), np.arange(9))
    assert not np.array_equal(offsets[:, 0], offsets[:, 1])
    assert 0.45 < flips.mean() < 0.55


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_augment_any_batch_size_under_jit(batch):
    fn = jax.jit(lambda k, x: ip.augment(k, x, mean=_MEAN, std=_STD, crop_padding=4, flip=True))
    out = fn(jax.random.key(2), _random_images(batch, 32, 32, 3))
    assert out.shape == (batch, 32, 32, 3) and out.dtype == np.float32


def test_normalize_constant_image_by_hand():
    mean, std = (0.5, 0.25, 0.125), (0.5, 0.25, 0.2)
    image = np.full((2, 3, 3, 3), 200, np.uint8)
    got = np.asarray(jax.jit(lambda x: ip.normalize(x, mean, std))(image))
    # (200/255 - m) / s per channel, written out.
    want = [(200 / 255 - 0.5) / 0.5, (200 / 255 - 0.25) / 0.25, (200 / 255 - 0.125) / 0.2]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-6)


def test_augmentation_input_errors():
    with pytest.raises(TypeError, match="uint8"):
        ip.augment(
            jax.random.key(0),
            np.zeros((2, 4, 4, 3), np.float32),
            mean=_MEAN,
            std=_STD,
            crop_padding=1,
            flip=True,
        )
    with pytest.raises(ValueError, match="crop_padding"):
        ip.sample_augmentation(jax.random.key(0), 2, crop_padding=-1, flip=True)


def test_dataset_validation():
    good = _indexed_dataset()
    with pytest.raises(TypeError, match="uint8"):
        ip.Dataset(
            "bad",
            good.train_images.astype(np.float32),
            good.train_labels,
            good.test_images,
            good.test_labels,
            3,
            (0.5,),
            (0.25,),
            0,
            False,
        )
    with pytest.raises(ValueError, match="labels must lie in"):
        ip.Dataset(
            "bad",
            good.train_images,
            good.train_labels + 5,
            good.test_images,
            good.test_labels,
            3,
            (0.5,),
            (0.25,),
            0,
            False,
        )
    with pytest.raises(ValueError, match="need 1 entries"):
        ip.Dataset(
            "bad",
            good.train_images,
            good.train_labels,
            good.test_images,
            good.test_labels,
            3,
            _MEAN,
            _STD,
            0,
            False,
        )


# --- TFDS download and preparation (the README's CIFAR step), without network or TensorFlow -------


class _ReachedTheNetwork(Exception):
    pass


def test_tfds_cifar10_download_path_gets_as_far_as_the_network(tmp_path, monkeypatch):
    """``tfds.data_source('cifar10', download=True)`` (the README's former step): everything up
    to the download itself imports and runs with the declared dependencies (it used to stop at
    ``No module named 'importlib_resources'``)."""
    import tensorflow_datasets as tfds

    urls = []

    def download_and_extract(self, url_or_urls):
        urls.append(url_or_urls)
        raise _ReachedTheNetwork()

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                        download_and_extract)
    with pytest.raises(_ReachedTheNetwork):
        tfds.data_source("cifar10", data_dir=str(tmp_path), download=True)
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]


def _fake_cifar10_archive(root, rng, n_train=2, n_test=3):
    """The extracted ``cifar-10-binary.tar.gz`` layout: 1 label byte + 3072 CHW bytes a record."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    records = {}
    for name, n in [(f"data_batch_{i}.bin", n_train) for i in range(1, 6)] + [
            ("test_batch.bin", n_test)]:
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        np.concatenate([labels[:, None], images.reshape(n, -1)], 1).tofile(folder / name)
        records[name] = (labels, images.transpose(0, 2, 3, 1))
    (folder / "batches.meta.txt").write_text(
        "\n".join("airplane automobile bird cat deer dog frog horse ship truck".split()) + "\n")
    return records


def _pairs(images, labels):
    """Examples as a sorted list of (label, pixel bytes): TFDS shuffles when it prepares."""
    return sorted(zip(np.asarray(labels).tolist(), (im.tobytes() for im in images)))


@pytest.fixture(name="tensorflow_roles")
def _tensorflow_roles(monkeypatch):
    """TFDS's CIFAR preparation with TensorFlow's two roles in it played without TensorFlow (it
    is no test dependency: it is huge). The builder opens the extracted files with
    ``tf.io.gfile.GFile`` (here ``open``) and the image feature encodes PNG with
    ``tf.image.encode_png`` (here PIL, lossless like it). Everything else is TFDS's own code: the
    download manager's bookkeeping, the splits written as array_record, the dataset info, and
    ``data_source``'s reads and PNG decoding. The library's check for TensorFlow is told yes."""
    import importlib.util
    import io
    import types

    from tensorflow_datasets.core.features import image_feature
    from tensorflow_datasets.image_classification import cifar as tfds_cifar

    def encode_png(self, array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="png")
        return buffer.getvalue()

    gfile = types.SimpleNamespace(GFile=open)
    monkeypatch.setattr(tfds_cifar, "tf", types.SimpleNamespace(io=types.SimpleNamespace(
        gfile=gfile)))
    monkeypatch.setattr(image_feature._ImageEncoder, "_encode_image", encode_png)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        real_find_spec("numpy") if name == "tensorflow" else real_find_spec(name, *a)))
    return real_find_spec  # to put back


def _spy_on_tfds(monkeypatch, extracted):
    """Records every ``tfds.data_source`` call (then runs it) and every download (answered with
    the ``extracted`` folder, as ``download_and_extract`` returns the extracted archive)."""
    import tensorflow_datasets as tfds

    calls = {"data_source": [], "download": []}
    real_data_source = tfds.data_source

    def data_source(*args, **kwargs):
        calls["data_source"].append((args, kwargs))
        return real_data_source(*args, **kwargs)

    def download_and_extract(self, url):
        calls["download"].append(url)
        return str(extracted)

    monkeypatch.setattr(tfds, "data_source", data_source)
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                        download_and_extract)
    return calls


def test_cifar10_download_prepares_array_record_and_reads_the_archive_back(
        tmp_path, monkeypatch, tensorflow_roles):
    """``load_dataset('cifar10', download=True)`` end to end, the network replaced by a small
    archive in CIFAR's own binary format: the library asks TFDS for a download prepared as
    array_record, TFDS writes array_record (its default, tfrecord, would be refused by
    ``data_source``), and the pixels and labels that come back are the archive's, train and test
    apart. Then the prepared directory is read without download, and with download but no
    TensorFlow (prepared data needs none)."""
    import importlib.util

    archive = _fake_cifar10_archive(tmp_path / "extracted", np.random.default_rng(0))
    calls = _spy_on_tfds(monkeypatch, tmp_path / "extracted")
    tfds_dir = tmp_path / "tfds"
    data = ip.load_dataset("cifar10", tfds_dir, download=True)

    assert calls["download"] == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
    assert calls["data_source"] == [(("cifar10",), {
        "split": ["train", "test"], "data_dir": str(tfds_dir), "download": True,
        "download_and_prepare_kwargs": {"file_format": "array_record"}})]
    written = [p.name for p in (tfds_dir / "cifar10").rglob("cifar10-*")]
    assert written and all(".array_record-" in name for name in written), written
    train = [archive[f"data_batch_{i}.bin"] for i in range(1, 6)]
    want_train = _pairs(np.concatenate([im for _, im in train]),
                        np.concatenate([lab for lab, _ in train]))
    test_labels, test_images = archive["test_batch.bin"]
    assert data.num_train == 10 and data.num_test == 3
    assert data.train_images.dtype == np.uint8 and data.train_labels.dtype == np.int32
    assert _pairs(data.train_images, data.train_labels) == want_train
    assert _pairs(data.test_images, data.test_labels) == _pairs(test_images, test_labels)
    assert data.mean == (0.4914, 0.4822, 0.4465) and data.crop_padding == 4 and data.flip

    # Prepared: read without download, then with download where TensorFlow is missing.
    again = ip.load_dataset("cifar10", tfds_dir, download=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        None if name == "tensorflow" else tensorflow_roles(name, *a)))
    third = ip.load_dataset("cifar10", tfds_dir, download=True)
    np.testing.assert_array_equal(third.train_images, data.train_images)
    assert calls["download"] == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
    assert calls["data_source"][1][1]["download"] is False
    assert calls["data_source"][1][1]["download_and_prepare_kwargs"] is None
    for a, b in [(again.train_images, data.train_images), (again.train_labels, data.train_labels),
                 (again.test_images, data.test_images), (again.test_labels, data.test_labels)]:
        np.testing.assert_array_equal(a, b)  # the same order: TFDS shuffled once, when preparing


def test_cifar10_prepared_in_another_file_format_says_so(tmp_path, monkeypatch, tensorflow_roles):
    """A CIFAR-10 directory TFDS prepared in its default format (tfrecord: no random access) is
    found, and the message says so and what to do, not that the data is missing. The directory
    is a real preparation whose dataset info is then set to tfrecord, as TFDS records it."""
    import json

    _fake_cifar10_archive(tmp_path / "extracted", np.random.default_rng(1))
    _spy_on_tfds(monkeypatch, tmp_path / "extracted")
    tfds_dir = tmp_path / "tfds"
    ip.load_dataset("cifar10", tfds_dir, download=True)
    (info_path,) = (tfds_dir / "cifar10").glob("*/dataset_info.json")
    info = json.loads(info_path.read_text())
    assert info["fileFormat"] == "array_record"
    info_path.write_text(json.dumps(dict(info, fileFormat="tfrecord")))
    with pytest.raises(FileNotFoundError, match=(
            f"cifar10 is prepared at {re.escape(str(info_path.parent))} but not in a "
            r"random-access format \(tfds.data_source needs array_record\)")):
        ip.load_dataset("cifar10", tfds_dir, download=False)


def test_cifar_download_without_tensorflow_says_what_to_install(tmp_path, monkeypatch):
    """No TensorFlow and no prepared data: refused before anything is downloaded, with what to
    install."""
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorflow" else real_find_spec(name, *a))
    calls = _spy_on_tfds(monkeypatch, tmp_path / "nowhere")
    with pytest.raises(ImportError, match=r"needs TensorFlow.*pip install -e '\.\[download\]'"):
        ip.load_dataset("cifar10", tmp_path / "tfds", download=True)
    assert calls == {"data_source": [], "download": []}
    assert not (tmp_path / "tfds" / "downloads").exists()  # refused before downloading
