"""CIFAR-10 / CIFAR-100 read with TFDS's ``data_source`` (ArrayRecord; no TensorFlow needed)."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import numpy as np

from hypersparse_jax.data.dataset import REFERENCE_CROP_PADDING, Dataset
from hypersparse_jax.data.records import READ_CHUNK, RecordArray, _RecordSource

# Per-channel normalisation constants in [0, 1] units, taken from the HyperSparse reference
# implementation (GreenAutoML4FAS/HyperSparse, utils/dataloader.py, `*Constants` dataclasses).
# Note the reference's CIFAR-100 and TinyImageNet values differ slightly from other commonly
# quoted ones; we follow the reference so results are comparable.
_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2023, 0.1994, 0.2010)
_CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
_CIFAR100_STD = (0.2675, 0.2565, 0.2761)


def load_cifar(name: str, data_dir, download: bool, *, lazy: bool = False) -> Dataset:
    import tensorflow_datasets as tfds

    if data_dir is not None:
        data_dir = os.fspath(pathlib.Path(data_dir).expanduser())
    if download and importlib.util.find_spec("tensorflow") is None:
        # TFDS's CIFAR builder reads the downloaded files with tf.io.gfile: say so before the
        # download, not after it.
        try:
            prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
        except Exception:
            prepared = False
        if not prepared:
            raise ImportError(
                f"downloading and preparing {name} with TFDS needs TensorFlow, which is not "
                "installed: pip install -e '.[download]' in the repository's clone (or prepare "
                "it once where TensorFlow is installed, then use data_dir=<that TFDS directory>)"
            )
    try:
        # Explicit split names: with split=None TFDS needs the split metadata, which mocks lack.
        # A download must be prepared as array_record: TFDS's default (tfrecord) is written
        # fine and then refused by data_source, which needs random access.
        train_source, test_source = tfds.data_source(
            name, split=["train", "test"], data_dir=data_dir, download=download,
            download_and_prepare_kwargs={"file_format": "array_record"} if download else None,
        )
    except Exception as err:
        if download:
            raise
        # TFDS reports missing data as an unsupported (default TFRECORD) file format; say what to do.
        where = data_dir
        prepared = False
        try:
            builder = tfds.builder(name, data_dir=data_dir)
            where, prepared = builder.data_dir, builder.is_prepared()
        except Exception:
            pass
        if prepared and not isinstance(err, NotImplementedError):
            raise  # the data is there and readable: a genuine error, not missing data
        if prepared:
            raise FileNotFoundError(
                f"{name} is prepared at {where} but not in a random-access format "
                f"(tfds.data_source needs array_record); re-prepare it with "
                f"file_format='array_record' or allow download. TFDS said: {err}"
            ) from err
        raise FileNotFoundError(
            f"No prepared {name} data found at {where or 'the TFDS default data_dir'} "
            f"(data_dir={data_dir!r}); pass --data-dir to an existing TFDS data directory holding "
            f"{name} in array_record format, or allow download (download=True)"
        ) from err

    num_classes = 10 if name == "cifar10" else 100
    splits = []
    for source in (train_source, test_source):
        records = _TfdsSource(name, source, num_classes)
        if lazy:
            splits += [RecordArray(records, "image"), RecordArray(records, "label")]
        else:
            everything = records._read(np.arange(records.num_records))  # in chunks
            splits += [everything["image"], everything["label"]]
    train_images, train_labels, test_images, test_labels = splits
    mean, std = (
        (_CIFAR10_MEAN, _CIFAR10_STD) if name == "cifar10" else (_CIFAR100_MEAN, _CIFAR100_STD)
    )
    return Dataset(
        name,
        train_images,
        train_labels,
        test_images,
        test_labels,
        num_classes=num_classes,
        mean=mean,
        std=std,
        crop_padding=REFERENCE_CROP_PADDING,
        flip=True,
    )


class _TfdsSource(_RecordSource):
    """A TFDS ``data_source`` split (ArrayRecord): records are read and decoded on demand."""

    def __init__(self, name: str, source, num_classes: int):
        if len(source) == 0:
            raise ValueError(f"{source!r} is empty")
        try:
            shape = tuple(source.dataset_info.features["image"].shape)
        except (AttributeError, KeyError, TypeError):
            shape = ()
        if len(shape) != 3 or not all(isinstance(d, int) for d in shape):
            shape = np.shape(source[0]["image"])  # shape not in the metadata: read one record
        super().__init__(name, len(source), shape, num_classes)
        self.source = source
        self._batched = hasattr(source, "__getitems__")

    def _read(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        images = np.empty((len(keys),) + self.image_shape, np.uint8)
        labels = np.empty((len(keys),), np.int32)
        for start in range(0, len(keys), READ_CHUNK):
            chunk = [int(k) for k in keys[start : start + READ_CHUNK]]
            examples = None
            if self._batched:
                try:
                    # One batched read per chunk is much faster than per-record reads on
                    # ArrayRecord.
                    examples = self.source.__getitems__(chunk)
                except (TypeError, NotImplementedError, AttributeError):
                    # Some sources (e.g. TFDS 4.9's test mock) have no working batched read.
                    self._batched = False
            if examples is None:
                examples = [self.source[k] for k in chunk]
            images[start : start + len(chunk)] = np.stack(
                [np.asarray(ex["image"]) for ex in examples])
            labels[start : start + len(chunk)] = [int(ex["label"]) for ex in examples]
        self._check_labels(keys, labels)
        return {"image": images, "label": labels}
