"""Lazily read datasets (``load_dataset(..., lazy=True)``): a process reads only the records of
its rows, and the batches equal those of the eagerly loaded dataset.

The data is made here: TFDS's ``mock_data`` for CIFAR (its reads are counted where the mock
serves them, below our reader) and a generated TinyImageNet folder (decoded files counted).
The records each process needs are computed independently: from the eager batches' pixels,
mapped back to the record they came from.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hypersparse_jax import data as ip
from hypersparse_jax.data import cifar, tinyimagenet

# ------------------------------------------------------------------------------------------------
# Helpers

SEED = 5
BATCH = 8
HALVES = [slice(0, 4), slice(4, 8)]  # the rows of 2 processes (sharding.process_rows' layout)


def _assert_same_batches(got, want):
    got, want = list(got), list(want)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            assert g[key].dtype == w[key].dtype, key
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def _all_batches(ds, rows=None, epochs=(0, 1)):
    """Every batch a run would read: train epochs, then val and test in order."""
    out = []
    for epoch in epochs:
        out += list(ip.train_batches(ds, BATCH, seed=SEED, epoch=epoch, rows=rows))
    out += list(ip.eval_batches(ds.val_images, ds.val_labels, BATCH, rows=rows))
    out += list(ip.eval_batches(ds.test_images, ds.test_labels, BATCH, rows=rows))
    return out


@pytest.fixture(name="tfds")
def _tfds():
    import tensorflow_datasets

    return tensorflow_datasets


@pytest.fixture(name="counted_tfds")
def _counted_tfds(tfds, monkeypatch):
    """A mocked cifar10 whose every record read (single or batched) is logged by key."""
    from tensorflow_datasets.testing import mocking

    log = {"records": [], "batched_calls": []}
    real_getitem = mocking._getitem

    def getitem(self, record_key, generator, serialized=False):
        log["records"].append(int(record_key))
        return real_getitem(self, record_key, generator, serialized)

    def getitems(record_keys, generator, serialized=False):  # TFDS 4.9 binds no `self`
        log["batched_calls"].append([int(k) for k in record_keys])
        return [getitem(None, k, generator) for k in record_keys]

    monkeypatch.setattr(mocking, "_getitem", getitem)
    monkeypatch.setattr(mocking, "_getitems", getitems)
    return log


def _key_of_image(tfds, split):
    """Pixels → record key of the mocked split, read straight from TFDS one record at a time."""
    source = tfds.data_source("cifar10", split=split, download=False)
    keys = {}
    for k in range(len(source)):
        keys.setdefault(np.asarray(source[k]["image"]).tobytes(), k)
    assert len(keys) == len(source)  # random mock images: every record is told apart
    return keys


# ------------------------------------------------------------------------------------------------
# CIFAR through a (mocked) TFDS data_source


def test_lazy_cifar_reads_nothing_when_loading_and_gives_the_eager_batches(
        tmp_path, counted_tfds, tfds):
    with tfds.testing.mock_data(num_examples=37):
        eager = ip.with_validation_split(ip.load_dataset("cifar10", data_dir=tmp_path), 0.2,
                                         seed=SEED)
        counted_tfds["records"].clear()
        lazy = ip.load_dataset("cifar10", data_dir=tmp_path, lazy=True)
        assert counted_tfds["records"] == []  # the shape comes from the metadata
        lazy = ip.with_validation_split(lazy, 0.2, seed=SEED)
        assert counted_tfds["records"] == []  # a split is an index mapping
        assert isinstance(lazy.train_images, ip.RecordArray)
        assert (lazy.num_train, lazy.num_val, lazy.num_test) == (30, 7, 37)
        assert lazy.train_images.shape == eager.train_images.shape == (30, 32, 32, 3)
        assert lazy.val_labels.dtype == np.int32 and lazy.image_shape == (32, 32, 3)
        assert (lazy.mean, lazy.std, lazy.crop_padding, lazy.flip) == (
            eager.mean, eager.std, eager.crop_padding, eager.flip)
        for rows in (None, *HALVES):
            _assert_same_batches(_all_batches(lazy, rows), _all_batches(eager, rows))
        for field in ("train_images", "train_labels", "val_images", "test_labels"):
            np.testing.assert_array_equal(np.asarray(getattr(lazy, field)),
                                          getattr(eager, field), err_msg=field)


def test_each_of_two_processes_reads_only_the_records_of_its_rows(
        tmp_path, counted_tfds, tfds):
    with tfds.testing.mock_data(num_examples=40):
        key_of = {"train": _key_of_image(tfds, "train"), "test": _key_of_image(tfds, "test")}
        eager = ip.load_dataset("cifar10", data_dir=tmp_path)
        lazy = ip.load_dataset("cifar10", data_dir=tmp_path, lazy=True)
        reads = []
        for rows in HALVES:
            counted_tfds["records"].clear()
            counted_tfds["batched_calls"].clear()
            batches = list(ip.train_batches(lazy, BATCH, seed=SEED, epoch=2, rows=rows))
            train_calls = list(counted_tfds["batched_calls"])
            batches += list(ip.eval_batches(lazy.test_images, lazy.test_labels, BATCH, rows=rows))
            reads.append(list(counted_tfds["records"]))
            # what this process needs, from the eager batches' pixels: one batched read a batch
            want = [sorted({key_of["train"][img.tobytes()] for img in batch["image"]})
                    for batch in ip.train_batches(eager, BATCH, seed=SEED, epoch=2, rows=rows)]
            assert train_calls == want
            want_test = [key_of["test"][img.tobytes()] for batch in ip.eval_batches(
                eager.test_images, eager.test_labels, BATCH, rows=rows) for img in batch["image"]]
            assert sorted(reads[-1]) == sorted(sum(want, []) + want_test)
            assert len(batches) == 2 * 5
        # 40 train + 40 test records between them, each read once, by one process
        assert len(reads[0]) == len(reads[1]) == 40
        assert sorted(reads[0] + reads[1]) == sorted(2 * list(range(40)))


def test_lazy_labels_are_checked_as_they_are_read():
    class Source:  # a random-access source with one bad label (record 3)
        def __len__(self):
            return 6

        def __getitem__(self, k):
            return {"image": np.full((2, 2, 3), k, np.uint8), "label": 12 if k == 3 else k}

    labels = ip.RecordArray(cifar._TfdsSource("cifar10", Source(), 10), "label")
    np.testing.assert_array_equal(labels[[5, 0, 2]], [5, 0, 2])
    with pytest.raises(ValueError, match=r"^cifar10: record 3 has label 12, outside \[0, 10\)$"):
        labels[2:5]


def test_record_array_indexing_matches_numpy():
    images = np.arange(7 * 2 * 2 * 3, dtype=np.uint8).reshape(7, 2, 2, 3)

    class Source:
        def __len__(self):
            return 7

        def __getitem__(self, k):
            return {"image": images[k], "label": k % 3}

    source = cifar._TfdsSource("cifar10", Source(), 10)
    lazy = ip.RecordArray(source, "image")
    for rows in (3, -1, slice(1, 6, 2), [4, 4, 0], np.array([6, 1]), images[:, 0, 0, 0] % 2 == 0):
        np.testing.assert_array_equal(lazy[rows], images[rows])
    sub = lazy.subset(np.array([5, 2, 6]))
    assert sub.shape == (3, 2, 2, 3) and len(sub) == 3 and sub.ndim == 4
    np.testing.assert_array_equal(sub[[2, 0]], images[[6, 5]])
    np.testing.assert_array_equal(np.asarray(sub), images[[5, 2, 6]])
    with pytest.raises(IndexError, match="rows only"):
        lazy[0, 1]
    before = source.records_read
    lazy[[1, 2]]
    lazy[[2, 1, 1]]  # the same records as the last read (the labels of a batch): not read again
    assert source.records_read == before + 2


# ------------------------------------------------------------------------------------------------
# TinyImageNet from a generated folder

WNIDS = ["n02", "n01", "n03"]


def make_tinyimagenet(root, per_class=6, num_val=9, seed=0):
    rng = np.random.default_rng(seed)
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")

    def write(path, label):
        path.parent.mkdir(parents=True, exist_ok=True)
        # a class-dependent colour, noise on top: an MLP can learn it from few images
        base = np.zeros((64, 64, 3)) + 60 + 60 * np.eye(3)[label]
        noise = rng.normal(0, 40, (64, 64, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, quality=90)

    for label, wnid in enumerate(sorted(WNIDS)):
        for i in range(per_class):
            write(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", label)
    lines = []
    for i in range(num_val):
        wnid = sorted(WNIDS)[i % 3]
        write(root / "val" / "images" / f"val_{i}.JPEG", i % 3)
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_lazy_tinyimagenet_decodes_only_the_files_of_its_rows(tmp_path, monkeypatch):
    root = make_tinyimagenet(tmp_path / "tiny", per_class=7, num_val=10)
    eager = ip.with_validation_split(ip.load_dataset("tinyimagenet", root, cache=False), 0.25,
                                     seed=SEED)
    decoded = []
    real_decode = tinyimagenet._decode_image
    monkeypatch.setattr(tinyimagenet, "_decode_image", lambda path: decoded.append(path) or real_decode(path))
    lazy = ip.with_validation_split(ip.load_dataset("tinyimagenet", root, lazy=True), 0.25,
                                    seed=SEED)
    assert decoded == [] and not (root / "hypersparse_jax_cache.npz").exists()
    np.testing.assert_array_equal(lazy.train_labels, eager.train_labels)  # from the file list
    pixels_to_file = {}
    for path in sorted(root.rglob("*.JPEG")):
        pixels_to_file.setdefault(real_decode(path).tobytes(), []).append(path)
    seen = []
    for rows in HALVES:
        decoded.clear()
        got = list(ip.train_batches(lazy, BATCH, seed=SEED, epoch=1, rows=rows))
        got += list(ip.eval_batches(lazy.test_images, lazy.test_labels, BATCH, rows=rows))
        want = list(ip.train_batches(eager, BATCH, seed=SEED, epoch=1, rows=rows))
        want += list(ip.eval_batches(eager.test_images, eager.test_labels, BATCH, rows=rows))
        _assert_same_batches(got, want)
        # the files decoded: those of this process's rows (independently: by their pixels)
        needed = [f for batch in want for img in np.unique(batch["image"], axis=0)
                  for f in pixels_to_file[img.tobytes()]]
        assert sorted(decoded) == sorted(needed)
        seen.append(set(decoded))
    # 16 train images in 2 full batches, 10 test images: only the padding of the last test batch
    # (test images 0-5 again) has rows of both processes
    assert len(seen[0] & seen[1]) == 2
    _assert_same_batches(_all_batches(lazy), _all_batches(eager))


# ------------------------------------------------------------------------------------------------
# Two real processes on a TinyImageNet folder, read lazily


def test_two_real_processes_train_on_a_lazily_read_tinyimagenet_folder(tmp_path):
    """``hypersparse-train`` as 2 real processes (1 device each) on a generated folder: both
    finish, process 0 writes the summary, and the folder holds no decoded-array cache (eager
    loading writes one: the processes read it lazily). That the batches equal eager loading's is
    shown above; that 2 processes equal 1 process with the same global batch, by
    ``test_multihost``. (One run of 2 processes costs ~80 CPU-seconds here, compilation mostly;
    a 1-process reference run would add ~40 more.)"""
    from test_multihost import Launch, read_json

    root = make_tinyimagenet(tmp_path / "tiny", per_class=24, num_val=24)
    # shorter than test_multihost's runs: ART from the start, one epoch of each phase
    options = ["--dataset", "tinyimagenet", "--data-dir", str(root), "--batch-size", "32",
               "--eval-batch-size", "32", "--val-fraction", "0.25", "--warmup-epochs", "0",
               "--max-art-epochs", "1", "--pruned-eval", "clean"]
    run = Launch(str(tmp_path / "run"), str(tmp_path / "jax_cache"), devices=1, extra=options)
    rcs = run.wait()
    assert rcs == [0, 0], [run.text(i, "err") for i in range(2)]
    assert [run.text(i, "err") for i in range(2)] == ["", ""]
    summary = read_json(tmp_path / "run" / "summary.json")
    assert (summary["num_train"], summary["num_val"], summary["num_test"]) == (54, 18, 24)
    assert summary["art_epochs"] == 1 and abs(summary["sparsity_achieved"] - 0.9) < 1e-5
    assert "summary:" in run.text(0, "out") and "summary" not in run.text(1, "out")
    assert not (root / "hypersparse_jax_cache.npz").exists()
