"""Input pipeline: datasets in memory or read on demand, deterministic batching, augmentation.

Data only (no model or training code). Datasets are held on the host as uint8 NHWC arrays with
int32 labels, or (``load_dataset(..., lazy=True)``) as :class:`RecordArray` s that read only the
records a batch needs. Batches are padded to a fixed size with a boolean ``mask`` so a jit-compiled
step compiles once. Augmentation (random crop with zero padding, horizontal flip, per-channel
normalisation, as in the HyperSparse reference's torchvision pipeline) is a pure JAX function meant
to run inside the jitted step on the accelerator.

Typical use::

    ds = load_dataset('cifar10', data_dir='~/tensorflow_datasets')
    for batch in prefetch(train_batches(ds, 64, seed=0, epoch=e)):
        images = augment(key, batch['image'], mean=ds.mean, std=ds.std,
                         crop_padding=ds.crop_padding, flip=ds.flip)   # inside the jitted step
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import importlib.util
import os
import pathlib
import queue
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "RecordArray",
    "load_dataset",
    "with_validation_split",
    "steps_per_epoch",
    "epoch_permutation",
    "train_batches",
    "eval_batches",
    "prefetch",
    "sample_augmentation",
    "apply_augmentation",
    "augment",
    "normalize",
]

DATASET_NAMES = ("digits", "cifar10", "cifar100", "tinyimagenet")

# Per-channel normalisation constants in [0, 1] units, taken from the HyperSparse reference
# implementation (GreenAutoML4FAS/HyperSparse, utils/dataloader.py, `*Constants` dataclasses).
# Note the reference's CIFAR-100 and TinyImageNet values differ slightly from other commonly
# quoted ones; we follow the reference so results are comparable.
_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2023, 0.1994, 0.2010)
_CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
_CIFAR100_STD = (0.2675, 0.2565, 0.2761)
_TINYIMAGENET_MEAN = (0.48024578664982126, 0.44807218089384643, 0.3975477478649648)
_TINYIMAGENET_STD = (0.2769864069088257, 0.26906448510256, 0.282081906210584)

# The reference pads by 4 px for every dataset (torchvision RandomCrop(size, padding=4)).
_REFERENCE_CROP_PADDING = 4
_DIGITS_TEST_FRACTION = 0.25
_DIGITS_SPLIT_SEED = 0
_TINYIMAGENET_SIZE = 64
_TINYIMAGENET_CACHE = "hypersparse_jax_cache.npz"
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_TFDS_READ_CHUNK = 1024


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An image-classification dataset: held in host memory, or read on demand.

    Attributes:
      name: dataset name, e.g. ``'cifar10'``.
      train_images: uint8 array ``(N_train, H, W, C)`` (a NumPy array, or a ``RecordArray``
        that reads only the rows asked for; likewise every image and label field).
      train_labels: int32 array ``(N_train,)`` with values in ``[0, num_classes)``.
      test_images: uint8 array ``(N_test, H, W, C)``.
      test_labels: int32 array ``(N_test,)``.
      num_classes: number of classes.
      mean: per-channel mean in [0, 1] units (length C), for ``(x / 255 - mean) / std``.
      std: per-channel standard deviation in [0, 1] units (length C), all positive.
      crop_padding: zero padding in pixels for the random crop (0 disables cropping).
      flip: whether training augmentation flips horizontally with probability 0.5.
      val_images: uint8 ``(N_val, H, W, C)`` held out of the training data, or None (see
        :func:`with_validation_split`).
      val_labels: int32 ``(N_val,)``, or None.

    Raises:
      TypeError: on wrong dtypes.
      ValueError: on inconsistent shapes, out-of-range labels or bad constants.
    """

    name: str
    train_images: np.ndarray | RecordArray
    train_labels: np.ndarray | RecordArray
    test_images: np.ndarray | RecordArray
    test_labels: np.ndarray | RecordArray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool
    val_images: np.ndarray | RecordArray | None = None
    val_labels: np.ndarray | RecordArray | None = None

    def __post_init__(self):
        if (self.val_images is None) != (self.val_labels is None):
            raise ValueError(f"{self.name}: give both val_images and val_labels, or neither")
        for split in ("train", "test") + (("val",) if self.val_labels is not None else ()):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if (not isinstance(images, (np.ndarray, RecordArray)) or images.dtype != np.uint8
                    or images.ndim != 4):
                raise TypeError(
                    f"{self.name}: {split}_images must be a uint8 numpy array or RecordArray "
                    f'(N, H, W, C), got {type(images).__name__} {getattr(images, "dtype", None)} '
                    f'{getattr(images, "shape", None)}'
                )
            if (not isinstance(labels, (np.ndarray, RecordArray)) or labels.dtype != np.int32
                    or labels.ndim != 1):
                raise TypeError(
                    f"{self.name}: {split}_labels must be an int32 numpy array or RecordArray "
                    f'(N,), got {type(labels).__name__} {getattr(labels, "dtype", None)} '
                    f'{getattr(labels, "shape", None)}'
                )
            if len(images) != len(labels):
                raise ValueError(
                    f"{self.name}: {len(images)} {split} images but {len(labels)} labels"
                )
            # (labels read lazily are checked as they are read)
            if (isinstance(labels, np.ndarray) and len(labels)
                    and (labels.min() < 0 or labels.max() >= self.num_classes)):
                raise ValueError(
                    f"{self.name}: {split} labels must lie in [0, {self.num_classes}), "
                    f"got range [{labels.min()}, {labels.max()}]"
                )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"{self.name}: train images {self.train_images.shape[1:]} and test images "
                f"{self.test_images.shape[1:]} differ in shape"
            )
        channels = self.train_images.shape[-1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"{self.name}: mean {self.mean} and std {self.std} need {channels} entries"
            )
        if min(self.std) <= 0:
            raise ValueError(f"{self.name}: std must be positive, got {self.std}")
        if not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ValueError(
                f"{self.name}: crop_padding must be an int >= 0, got {self.crop_padding!r}"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return tuple(self.train_images.shape[1:])

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return len(self.train_labels)

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return len(self.test_labels)

    @property
    def num_val(self) -> int:
        """Number of validation examples (0 without a validation split)."""
        return 0 if self.val_labels is None else len(self.val_labels)


# ----------------------------------------------------------------------------------------------
# Loading


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    *,
    cache: bool = True,
    lazy: bool = False,
) -> Dataset:
    """Loads a dataset into host memory, or (``lazy``) opens it for reading records on demand.

    * ``'digits'``: scikit-learn's bundled handwritten digits (1,797 8x8 grey images, values 0..16
      rescaled to uint8 0..255, shape (8, 8, 1)), split 75/25 stratified with a fixed seed; no
      download, ``data_dir`` ignored. Mean/std are computed from its train split. Crop padding 1,
      no flip (digits are not mirror-invariant).
    * ``'cifar10'`` / ``'cifar100'``: read with ``tfds.data_source`` (ArrayRecord format) from
      ``data_dir`` (TFDS's default directory if None), splits 'train' and 'test'.
    * ``'tinyimagenet'``: ``data_dir`` is a folder in the standard layout (``wnids.txt``,
      ``train/<wnid>/images/*.JPEG``, ``val/images/*`` and ``val/val_annotations.txt``); the val split
      is the test split. Labels index the sorted wnids (as torchvision's ImageFolder in the
      reference). Decoded arrays are cached in ``<data_dir>/hypersparse_jax_cache.npz`` when
      ``cache`` is true and the folder is writable; the cache is keyed on the file list, sizes and
      modification times.

    With ``lazy=True``, CIFAR's splits and TinyImageNet's images are :class:`RecordArray` s:
    nothing but the file list (TinyImageNet) is read when loading, and a batch reads (decodes)
    only the records of its rows, so each process of a multi-process run reads only the records
    of its own rows (``train_batches(..., rows=...)``). The batches are the same as eagerly loaded
    ones. Mean and std are the reference's fixed constants for these datasets, so no pass over
    the data is needed; the TinyImageNet cache is neither read nor written; CIFAR labels are
    range-checked as they are read. The digits set is always held in memory.

    Args:
      name: one of ``DATASET_NAMES``.
      data_dir: TFDS data directory (CIFAR) or the dataset folder (TinyImageNet).
      download: allow TFDS to download and prepare CIFAR data. Ignored for digits; TinyImageNet
        cannot be downloaded by this library.
      cache: TinyImageNet only: read/write the decoded-array cache (eager loading only).
      lazy: read records on demand instead of loading them (CIFAR, TinyImageNet).

    Returns:
      A ``Dataset``.

    Raises:
      ValueError: unknown name, or malformed TinyImageNet folder contents.
      FileNotFoundError: CIFAR data not prepared in ``data_dir`` with ``download=False``, or a missing
        TinyImageNet folder, file or image.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f'Unknown dataset {name!r}; allowed: {", ".join(DATASET_NAMES)}')
    if name == "digits":
        return _load_digits()
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, data_dir, download, lazy=lazy)
    if data_dir is None:
        raise ValueError(
            "tinyimagenet needs data_dir: a folder with wnids.txt, train/ and val/ "
            "(automatic download is not supported)"
        )
    return _load_tinyimagenet(pathlib.Path(data_dir).expanduser(), cache=cache, lazy=lazy)


def with_validation_split(dataset: Dataset, fraction: float, *, seed: int) -> Dataset:
    """Holds ``round(fraction · N_train)`` training examples out as a validation split.

    Which examples is a function of ``seed`` only (a seeded permutation; the chosen examples keep
    their original order in both parts), so every run and every process with the same seed gets
    the same split. The validation split is evaluated like the test split (no augmentation);
    the remaining examples are the training data.

    Args:
      dataset: a dataset without a validation split.
      fraction: in ``(0, 1)``; the split must leave at least one example on each side.
      seed: non-negative seed.

    Returns:
      A new ``Dataset`` with fewer training examples and ``val_images``/``val_labels`` set.

    Raises:
      ValueError: on a fraction outside ``(0, 1)``, an empty side, a negative seed, or a dataset
        that already has a validation split.
    """
    if dataset.val_labels is not None:
        raise ValueError(f"{dataset.name} already has a validation split")
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise ValueError(f"validation fraction must lie in (0, 1), got {fraction!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    n = dataset.num_train
    num_val = int(round(fraction * n))
    if not 0 < num_val < n:
        raise ValueError(f"validation fraction {fraction} of {n} training examples leaves "
                         f"{num_val} for validation and {n - num_val} for training; both need >= 1")
    # a tag keeps this permutation apart from the epoch orders of the same seed
    chosen = np.random.default_rng([int(seed), 0x5EED_FA1]).permutation(n)[:num_val]
    is_val = np.zeros(n, bool)
    is_val[chosen] = True

    def rows(array, which):  # lazy arrays: an index mapping, nothing read
        return array.subset(which) if isinstance(array, RecordArray) else array[which]

    return dataclasses.replace(
        dataset,
        train_images=rows(dataset.train_images, ~is_val),
        train_labels=rows(dataset.train_labels, ~is_val),
        val_images=rows(dataset.train_images, is_val),
        val_labels=rows(dataset.train_labels, is_val),
    )


def _load_digits() -> Dataset:
    from sklearn import datasets as sk_datasets
    from sklearn import model_selection

    digits = sk_datasets.load_digits()
    # Values are integers 0..16; rescale to the 0..255 range every other dataset uses.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    train_x, test_x, train_y, test_y = model_selection.train_test_split(
        images,
        labels,
        test_size=_DIGITS_TEST_FRACTION,
        random_state=_DIGITS_SPLIT_SEED,
        stratify=labels,
    )
    scaled = train_x.astype(np.float64) / 255.0
    mean = tuple(float(v) for v in scaled.mean(axis=(0, 1, 2)))
    std = tuple(float(v) for v in scaled.std(axis=(0, 1, 2)))
    return Dataset(
        "digits",
        np.ascontiguousarray(train_x),
        train_y,
        np.ascontiguousarray(test_x),
        test_y,
        num_classes=10,
        mean=mean,
        std=std,
        crop_padding=1,
        flip=False,
    )


def _load_cifar(name: str, data_dir, download: bool, *, lazy: bool = False) -> Dataset:
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
                "installed: pip install 'hypersparse-jax[download]' (or prepare it once where "
                "TensorFlow is installed, then use data_dir=<that TFDS directory>)"
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
        crop_padding=_REFERENCE_CROP_PADDING,
        flip=True,
    )


def _list_images(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
    )


def _decode_image(path: pathlib.Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8)  # grey and CMYK files exist
    if array.shape != (_TINYIMAGENET_SIZE, _TINYIMAGENET_SIZE, 3):
        raise ValueError(
            f"{path}: expected a {_TINYIMAGENET_SIZE}x{_TINYIMAGENET_SIZE} image, "
            f"got shape {array.shape}"
        )
    return array


def _decode_pool() -> concurrent.futures.ThreadPoolExecutor:
    # PIL releases the GIL while decoding, so threads give a real speed-up.
    return concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                                 thread_name_prefix="hypersparse-decode")


def _decode_all(paths: Sequence[pathlib.Path],
                pool: concurrent.futures.ThreadPoolExecutor | None = None) -> np.ndarray:
    """The images of ``paths`` as uint8 ``(len, 64, 64, 3)``, decoded on ``pool`` (or on a pool
    of its own, closed afterwards) when there is more than one."""
    if len(paths) > 1 and pool is None:
        with _decode_pool() as own:
            return _decode_all(paths, own)
    out = np.empty((len(paths), _TINYIMAGENET_SIZE, _TINYIMAGENET_SIZE, 3), np.uint8)
    decoded = pool.map(_decode_image, paths) if len(paths) > 1 else map(_decode_image, paths)
    for i, array in enumerate(decoded):
        out[i] = array
    return out


def _load_tinyimagenet(root: pathlib.Path, *, cache: bool, lazy: bool = False) -> Dataset:
    if not root.is_dir():
        raise FileNotFoundError(
            f"TinyImageNet folder {root} does not exist (expected wnids.txt, "
            "train/ and val/ inside; automatic download is not supported)"
        )
    wnids_path = root / "wnids.txt"
    if not wnids_path.is_file():
        raise FileNotFoundError(f"{wnids_path} not found: {root} is not a TinyImageNet folder")
    wnids = [line.strip() for line in wnids_path.read_text().splitlines() if line.strip()]
    if not wnids:
        raise ValueError(f"{wnids_path} lists no class ids")
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{wnids_path} lists a class id more than once")
    class_index = {wnid: i for i, wnid in enumerate(sorted(wnids))}

    train_paths, train_labels = [], []
    for wnid in sorted(wnids):
        folder = root / "train" / wnid / "images"
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found (class {wnid} is listed in {wnids_path})")
        files = _list_images(folder)
        train_paths += files
        train_labels += [class_index[wnid]] * len(files)
    if not train_paths:
        raise ValueError(f'No training images found under {root / "train"}')

    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise FileNotFoundError(f"{annotations} not found")
    test_paths, test_labels = [], []
    for line_number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(
                f'{annotations}:{line_number}: expected "<file>\\t<wnid>...", got {line!r}'
            )
        file_name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in class_index:
            raise ValueError(
                f"{annotations}:{line_number}: class id {wnid!r} is not in {wnids_path}"
            )
        path = root / "val" / "images" / file_name
        if not path.is_file():
            raise FileNotFoundError(f"{path} (named in {annotations}:{line_number}) not found")
        test_paths.append(path)
        test_labels.append(class_index[wnid])
    if not test_paths:
        raise ValueError(f"{annotations} names no validation images")

    train_labels = np.asarray(train_labels, np.int32)
    test_labels = np.asarray(test_labels, np.int32)
    if lazy:
        arrays = {f"{split}_images": RecordArray(
            _FolderSource("tinyimagenet", paths, labels, len(wnids)), "image")
            for split, paths, labels in (("train", train_paths, train_labels),
                                         ("test", test_paths, test_labels))}
    else:
        fingerprint = _fingerprint(root, sorted(wnids), train_paths + test_paths,
                                   train_labels.tolist() + test_labels.tolist())
        cache_path = root / _TINYIMAGENET_CACHE
        arrays = _read_cache(cache_path, fingerprint) if cache else None
        if arrays is None:
            arrays = {"train_images": _decode_all(train_paths),
                      "test_images": _decode_all(test_paths)}
            if cache:
                _write_cache(cache_path, fingerprint, arrays)
    return Dataset(
        "tinyimagenet",
        arrays["train_images"],
        train_labels,
        arrays["test_images"],
        test_labels,
        num_classes=len(wnids),
        mean=_TINYIMAGENET_MEAN,
        std=_TINYIMAGENET_STD,
        crop_padding=_REFERENCE_CROP_PADDING,
        flip=True,
    )


def _fingerprint(
    root: pathlib.Path, wnids: list[str], paths: list[pathlib.Path], labels: list[int]
) -> str:
    """Hash of file names, sizes, mtimes and labels: a changed folder invalidates the cache."""
    digest = hashlib.sha256("\n".join(wnids).encode())
    for path, label in zip(paths, labels):
        stat = path.stat()
        digest.update(
            f"{path.relative_to(root)}\t{stat.st_size}\t{stat.st_mtime_ns}\t{label}\n".encode()
        )
    return digest.hexdigest()


def _read_cache(path: pathlib.Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["fingerprint"]) != fingerprint:
                return None
            return {"train_images": data["train_images"], "test_images": data["test_images"]}
    except (OSError, KeyError, ValueError) as err:
        warnings.warn(f"Ignoring unreadable cache {path}: {err}")
        return None


def _write_cache(path: pathlib.Path, fingerprint: str, arrays: dict[str, np.ndarray]) -> None:
    tmp_name = None
    try:
        # Write beside the target, then rename: readers never see a half-written file.
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False
        ) as tmp:
            tmp_name = tmp.name
            np.savez(tmp, fingerprint=np.asarray(fingerprint), **arrays)
        os.replace(tmp_name, path)
    except OSError as err:
        warnings.warn(f"Could not write cache {path}: {err}")
        if tmp_name is not None and os.path.exists(tmp_name):
            os.remove(tmp_name)


# ----------------------------------------------------------------------------------------------
# Lazy records: read on demand from a random-access source


class _RecordSource:
    """A random-access source of ``{'image', 'label'}`` records, read a batch of keys at a time.

    Subclasses implement ``_read(keys)`` for sorted, unique keys. ``fetch`` keeps the last read
    (one batch): the images and the labels of a batch are asked for one after the other, and the
    second ask reads nothing. ``records_read`` counts the records read from the source.
    """

    def __init__(self, name: str, num_records: int, image_shape: tuple[int, ...],
                 num_classes: int | None):
        self.name, self.num_records, self.image_shape = name, num_records, tuple(image_shape)
        self.num_classes = num_classes
        self.records_read = 0
        self._lock = threading.Lock()
        self._last: tuple[np.ndarray, dict[str, np.ndarray]] | None = None

    def _read(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def fetch(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        """``{'image': uint8 (K, H, W, C), 'label': int32 (K,)}`` for the int keys, any order."""
        keys = np.asarray(keys, np.int64)
        unique, inverse = np.unique(keys, return_inverse=True)
        with self._lock:
            if self._last is not None and np.array_equal(self._last[0], unique):
                fields = self._last[1]
            else:
                fields = self._read(unique)
                self.records_read += len(unique)
                self._last = (unique, fields)
        return {k: v[inverse.reshape(-1)] for k, v in fields.items()}

    def _check_labels(self, keys: np.ndarray, labels: np.ndarray) -> None:
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{self.name}: record {int(keys[i])} has label {int(labels[i])}, "
                             f"outside [0, {self.num_classes})")


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
        for start in range(0, len(keys), _TFDS_READ_CHUNK):
            chunk = [int(k) for k in keys[start : start + _TFDS_READ_CHUNK]]
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


class _FolderSource(_RecordSource):
    """Image files decoded on demand (the labels come from the folder layout, in memory)."""

    def __init__(self, name: str, paths: Sequence[pathlib.Path], labels: np.ndarray,
                 num_classes: int):
        super().__init__(name, len(paths), (_TINYIMAGENET_SIZE, _TINYIMAGENET_SIZE, 3),
                         num_classes)
        self.paths, self.labels = list(paths), labels
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _read(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        if len(keys) > 1 and self._pool is None:  # kept for every later batch
            self._pool = _decode_pool()
        images = _decode_all([self.paths[k] for k in keys], self._pool)
        return {"image": images, "label": self.labels[keys]}


class RecordArray:
    """One field (``'image'`` or ``'label'``) of a random-access record source, as an array.

    It has ``shape``, ``dtype``, ``ndim`` and ``len`` like the NumPy array it stands for, and
    indexing it (an int, a slice, an integer or a boolean array) returns a NumPy array read from
    the source: only those records are read (a TFDS ``data_source`` split, or image files
    decoded on demand). ``np.asarray`` reads every record. :meth:`subset` selects rows without
    reading anything (how :func:`with_validation_split` splits a lazy dataset). Made by
    ``load_dataset(..., lazy=True)``.
    """

    def __init__(self, source: _RecordSource, field: str, index: np.ndarray | None = None):
        if field not in ("image", "label"):
            raise ValueError(f"field must be 'image' or 'label', got {field!r}")
        self.source, self.field = source, field
        self.index = np.arange(source.num_records) if index is None else np.asarray(index)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.field == "image" else np.int32)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index),) + (self.source.image_shape if self.field == "image" else ())

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return (f"RecordArray({self.source.name} {self.field}, shape={self.shape}, "
                f"dtype={self.dtype})")

    def subset(self, rows) -> RecordArray:
        """The rows ``rows`` (integer or boolean array, slice) as a new ``RecordArray``; reads
        nothing."""
        return RecordArray(self.source, self.field, self.index[rows])

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, tuple):
            raise IndexError(f"{self!r} is indexed by rows only, got {rows!r}")
        keys = self.index[rows]
        values = self.source.fetch(np.atleast_1d(keys))[self.field]
        return values[0] if np.ndim(keys) == 0 else values

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        step = _TFDS_READ_CHUNK
        for start in range(0, len(self), step):
            out[start : start + step] = self[start : start + step]
        return out if dtype is None else out.astype(dtype)


def _take_rows(array, indices: np.ndarray) -> np.ndarray:
    """``array[indices]`` along axis 0: a gather for NumPy, a read of those records for lazy."""
    if isinstance(array, RecordArray):
        return array[indices]
    return np.take(array, indices, axis=0)


# ----------------------------------------------------------------------------------------------
# Batching


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Number of batches covering ``num_examples`` once: ``ceil(num_examples / batch_size)``.

    Args:
      num_examples: examples per epoch, >= 0.
      batch_size: examples per batch, >= 1.

    Returns:
      The step count (the last batch may be partial and padded).

    Raises:
      ValueError: on a negative ``num_examples`` or a ``batch_size`` below 1.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return -(-num_examples // batch_size)


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
    """The training order of one epoch, a function of ``(seed, epoch)`` only.

    Args:
      num_examples: size of the training set.
      seed: non-negative run seed.
      epoch: non-negative epoch index.

    Returns:
      An int64 permutation of ``range(num_examples)``.

    Raises:
      ValueError: on a negative seed or epoch.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    # SeedSequence mixes both numbers, so nearby (seed, epoch) pairs give unrelated orders.
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)


def _padded_batch(
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    num_valid: int,
    rows: slice | None = None,
) -> dict[str, np.ndarray]:
    mask = np.zeros(len(indices), bool)
    mask[:num_valid] = True
    if rows is not None:  # only this process's part: the other rows are never read
        indices, mask = indices[rows], mask[rows]
    return {
        "image": _take_rows(images, indices),
        "label": _take_rows(labels, indices).astype(np.int32, copy=False),
        "mask": mask,
    }


def train_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_step: int = 0,
    rows: slice | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields one epoch of shuffled training batches, from ``start_step`` on.

    The order depends only on ``(seed, epoch)`` (see ``epoch_permutation``), so a run resumed at
    step k of an epoch sees exactly the batches it would have seen. Every example appears once per
    epoch. The last batch is padded to ``batch_size`` with ``mask=False`` entries that repeat the
    epoch's first examples: real images (rather than zeros) keep train-mode batch-norm statistics
    representative, while the mask keeps them out of the loss.

    Args:
      dataset: the dataset; its training split is used (read lazily: only the records of
        ``rows`` of each batch are read).
      batch_size: examples per batch, >= 1.
      seed: non-negative run seed.
      epoch: non-negative epoch index.
      start_step: first step to yield, in ``[0, steps_per_epoch]``.
      rows: only these rows of every batch (this process's part of the global batch in a
        multi-process run, see ``sharding.process_rows``); default: all.

    Yields:
      ``{'image': uint8 (B, H, W, C), 'label': int32 (B,), 'mask': bool (B,)}``.

    Raises:
      ValueError: on a bad batch size, seed, epoch or start step (raised when iteration starts).
    """
    steps = steps_per_epoch(dataset.num_train, batch_size)
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step must lie in [0, {steps}], got {start_step}")
    order = epoch_permutation(dataset.num_train, seed=seed, epoch=epoch)
    n = len(order)
    for step in range(start_step, steps):
        start = step * batch_size
        positions = np.arange(start, start + batch_size) % n
        yield _padded_batch(
            dataset.train_images,
            dataset.train_labels,
            order[positions],
            min(batch_size, n - start),
            rows,
        )


def eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, *, rows: slice | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Yields the examples in order, in batches padded to ``batch_size`` (``mask=False`` padding).

    Args:
      images: uint8 ``(N, H, W, C)``, a NumPy array or a :class:`RecordArray` (then only the
        records of ``rows`` are read).
      labels: integer ``(N,)``, likewise.
      batch_size: examples per batch, >= 1.
      rows: only these rows of every batch (as in ``train_batches``); default: all.

    Yields:
      ``{'image': uint8 (B, H, W, C), 'label': int32 (B,), 'mask': bool (B,)}``.

    Raises:
      ValueError: on mismatched lengths or a bad batch size.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    n = len(labels)
    for step in range(steps_per_epoch(n, batch_size)):
        start = step * batch_size
        indices = np.arange(start, start + batch_size) % n
        yield _padded_batch(images, labels, indices, min(batch_size, n - start), rows)


def prefetch(
    iterable: Iterable[Any], buffer_size: int = 2, *, transfer: Callable[[Any], Any] | None = None
) -> Iterator[Any]:
    """Runs an iterator in a background thread, ``buffer_size`` items ahead of the consumer.

    Host-side batch assembly (and, with ``transfer=jax.device_put``, the host-to-device copy) then
    overlaps the device step. Exceptions raised by the producer are re-raised in the consumer;
    leaving the loop early stops the thread.

    Args:
      iterable: the items, e.g. ``train_batches(...)``.
      buffer_size: items held ready, >= 1.
      transfer: optional function applied to each item in the background thread.

    Yields:
      The items of ``iterable`` (transformed by ``transfer``), in order.

    Raises:
      ValueError: on ``buffer_size < 1``.
    """
    if buffer_size < 1:
        raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
    items: queue.Queue = queue.Queue(maxsize=buffer_size)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterable:
                if not put(transfer(item) if transfer is not None else item):
                    return
            put((done, None))
        except BaseException as err:
            put((done, err))

    thread = threading.Thread(target=produce, daemon=True, name="hypersparse-prefetch")
    thread.start()
    try:
        while True:
            item = items.get()
            if isinstance(item, tuple) and len(item) == 2 and item[0] is done:
                if item[1] is not None:
                    raise item[1]
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


# ----------------------------------------------------------------------------------------------
# Augmentation (pure JAX; jit-able)


def sample_augmentation(
    rng: jax.Array, batch_size: int, *, crop_padding: int, flip: bool
) -> tuple[jax.Array, jax.Array]:
    """Draws the random crop offsets and flip decisions that ``augment`` uses for ``rng``.

    Args:
      rng: a PRNG key.
      batch_size: number of images (static).
      crop_padding: padding in pixels (static, >= 0).
      flip: whether flips are drawn (static); if False, no image is flipped.

    Returns:
      ``(offsets, flips)``: int32 ``(B, 2)`` top/left offsets into the zero-padded image, each in
      ``[0, 2 * crop_padding]``, and bool ``(B,)`` flip decisions (probability 0.5 each).

    Raises:
      ValueError: on a negative ``crop_padding``.
    """
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    crop_key, flip_key = jax.random.split(rng)
    offsets = jax.random.randint(crop_key, (batch_size, 2), 0, 2 * crop_padding + 1, jnp.int32)
    if flip:
        flips = jax.random.bernoulli(flip_key, 0.5, (batch_size,))
    else:
        flips = jnp.zeros((batch_size,), bool)
    return offsets, flips


def apply_augmentation(
    images: jax.Array,
    offsets: jax.Array,
    flips: jax.Array,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    crop_padding: int,
) -> jax.Array:
    """Crops, flips and normalises a batch with given per-image parameters.

    Image i becomes ``pad(images[i], crop_padding, 0)[oy:oy+H, ox:ox+W]`` with
    ``(oy, ox) = offsets[i]``, mirrored left-right if ``flips[i]``, then ``(x / 255 - mean) / std``.
    Padding is applied to the raw uint8 image, so padded pixels normalise to ``-mean / std``
    (as torchvision's ``RandomCrop(padding=p)`` on a PIL image followed by ``Normalize``).

    Args:
      images: uint8 ``(B, H, W, C)``.
      offsets: int ``(B, 2)``, each in ``[0, 2 * crop_padding]``.
      flips: bool ``(B,)``.
      mean: per-channel mean in [0, 1] units.
      std: per-channel std in [0, 1] units.
      crop_padding: padding in pixels (static).

    Returns:
      float32 ``(B, H, W, C)``.

    Raises:
      TypeError: if ``images`` is not a 4-D uint8 array.
    """
    _check_images(images)
    if crop_padding > 0:
        _, height, width, channels = images.shape
        p = crop_padding
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
        crop = lambda image, o: jax.lax.dynamic_slice(
            image, (o[0], o[1], 0), (height, width, channels)
        )
        images = jax.vmap(crop)(padded, offsets)
    images = jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)
    return normalize(images, mean, std)


def augment(
    rng: jax.Array,
    images: jax.Array,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    crop_padding: int,
    flip: bool,
) -> jax.Array:
    """Training augmentation: random crop with zero padding, random flip, normalisation.

    Each image gets independent offsets and flip draws (see ``sample_augmentation`` for the exact
    draws and ``apply_augmentation`` for the arithmetic). Pure: call it inside a jitted step.

    Args:
      rng: a PRNG key.
      images: uint8 ``(B, H, W, C)``, any batch size.
      mean: per-channel mean in [0, 1] units.
      std: per-channel std in [0, 1] units.
      crop_padding: zero padding in pixels (static; 0 disables the crop).
      flip: whether to flip horizontally with probability 0.5 (static).

    Returns:
      float32 ``(B, H, W, C)`` normalised images.

    Raises:
      TypeError: if ``images`` is not a 4-D uint8 array.
      ValueError: on a negative ``crop_padding``.
    """
    _check_images(images)
    offsets, flips = sample_augmentation(rng, images.shape[0], crop_padding=crop_padding, flip=flip)
    return apply_augmentation(images, offsets, flips, mean=mean, std=std, crop_padding=crop_padding)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Per-channel normalisation for evaluation: ``(images / 255 - mean) / std`` in float32.

    Args:
      images: uint8 ``(..., C)``.
      mean: per-channel mean in [0, 1] units (length C).
      std: per-channel std in [0, 1] units (length C).

    Returns:
      float32 array of the same shape.
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (jnp.asarray(images).astype(jnp.float32) / 255.0 - mean) / std


def _check_images(images) -> None:
    if images.ndim != 4 or images.dtype != jnp.uint8:
        raise TypeError(f"images must be uint8 (B, H, W, C), got {images.dtype} {images.shape}")
