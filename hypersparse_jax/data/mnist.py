"""MNIST and Fashion-MNIST from their four original IDX files (gzip-compressed or not).

A folder holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each as is or with ``.gz`` (the
compressed name is tried first). Fashion-MNIST's default folder is where Debian's
``dataset-fashion-mnist`` package puts it (``apt-get install dataset-fashion-mnist``);
MNIST has no default folder. Nothing is downloaded.

IDX layout (big-endian): a 4-byte magic number (2051 for images: unsigned bytes, 3 dimensions;
2049 for labels: unsigned bytes, 1 dimension), one 4-byte size per dimension, then the bytes.
Every check (magic, 28x28 images, the header's count against the file size, labels in 0..9,
as many labels as images) fails with one line naming the file.

Normalisation, over every pixel of the training split in [0, 1] units (population std):
Fashion-MNIST mean 0.2860405969887955, std 0.35302424451492254 (computed from Debian's
``train-images-idx3-ubyte.gz``, 60,000 images; fixed here, as CIFAR's constants are, and
rechecked against the file by ``tests/test_mnist.py``). MNIST's are computed from the training
split it loads (the commonly quoted values are 0.1307 and 0.3081).

Augmentation: random crop with 4-pixel zero padding (as the reference does for CIFAR); Fashion-
MNIST adds the horizontal flip (clothes are mirror-symmetric), MNIST does not (a mirrored digit
is another glyph; the bundled digits set leaves it out for the same reason).
"""

from __future__ import annotations

import gzip
import os
import pathlib
import zlib

import numpy as np

from hypersparse_jax.data.dataset import REFERENCE_CROP_PADDING, Dataset

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
IMAGE_SIDE = 28
NUM_CLASSES = 10
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEFAULT_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist", "mnist": None}
FASHION_MNIST_MEAN = (0.2860405969887955,)
FASHION_MNIST_STD = (0.35302424451492254,)
MNIST_NAMES = tuple(DEFAULT_DIRS)


def _read_file(folder: pathlib.Path, stem: str) -> tuple[str, bytes]:
    """``(path, bytes)`` of ``stem.gz`` (decompressed) or ``stem`` in ``folder``."""
    for name in (stem + ".gz", stem):
        path = folder / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".gz"):
                with gzip.open(path, "rb") as f:
                    return str(path), f.read()
            return str(path), path.read_bytes()
        except (OSError, EOFError, zlib.error) as err:  # damaged or truncated gzip stream
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{path}: unreadable ({reason})") from None
    raise FileNotFoundError(f"{folder}: neither {stem}.gz nor {stem} found")


def _header(path: str, raw: bytes, magic: int, ndim: int) -> tuple[int, ...]:
    """The dimension sizes of an IDX file, after checking its magic number."""
    if len(raw) < 4 * (1 + ndim):
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX header of "
                         f"{4 * (1 + ndim)} bytes")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        what = "images (unsigned bytes, 3 dimensions)" if magic == IMAGES_MAGIC else \
            "labels (unsigned bytes, 1 dimension)"
        raise ValueError(f"{path}: magic number {found} (0x{found:08x}), expected {magic} "
                         f"(0x{magic:08x}) for IDX {what}")
    dims = tuple(int.from_bytes(raw[4 * (1 + i):4 * (2 + i)], "big") for i in range(ndim))
    expected = 4 * (1 + ndim) + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        shape = "x".join(map(str, dims))
        raise ValueError(f"{path}: header says {shape} bytes of data ({expected} bytes in all) "
                         f"but the file holds {len(raw)} bytes")
    return dims


def read_idx_images(folder: pathlib.Path, stem: str) -> tuple[str, np.ndarray]:
    """``(path, uint8 (N, 28, 28, 1))`` from the IDX image file ``stem[.gz]`` in ``folder``."""
    path, raw = _read_file(folder, stem)
    count, rows, cols = _header(path, raw, IMAGES_MAGIC, 3)
    if (rows, cols) != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(f"{path}: images are {rows}x{cols}, expected "
                         f"{IMAGE_SIDE}x{IMAGE_SIDE}")
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(count, rows, cols, 1)
    return path, images.copy()  # writable, and the bytes object can go


def read_idx_labels(folder: pathlib.Path, stem: str) -> tuple[str, np.ndarray]:
    """``(path, int32 (N,))`` from the IDX label file ``stem[.gz]`` in ``folder``."""
    path, raw = _read_file(folder, stem)
    _header(path, raw, LABELS_MAGIC, 1)
    labels = np.frombuffer(raw, np.uint8, offset=8)
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        raise ValueError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}, found "
                         f"{labels[bad[0]]} at index {bad[0]} ({bad.size} such labels)")
    return path, labels.astype(np.int32)


def _split(folder: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_stem, labels_stem = FILES[split]
    images_path, images = read_idx_images(folder, images_stem)
    labels_path, labels = read_idx_labels(folder, labels_stem)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                         f"{len(labels)} labels")
    return images, labels


def load_mnist(name: str, data_dir: str | os.PathLike | None) -> Dataset:
    """Loads ``'fashion_mnist'`` or ``'mnist'`` from the four IDX files in ``data_dir``.

    Args:
      name: ``'fashion_mnist'`` or ``'mnist'``.
      data_dir: the folder; None means ``DEFAULT_DIRS[name]`` (Fashion-MNIST: Debian's
        ``/usr/share/datasets/fashion-mnist``; MNIST has none).

    Returns:
      A ``Dataset`` of uint8 ``(N, 28, 28, 1)`` images and int32 labels, 10 classes, with the
      normalisation and augmentation of the module docstring.

    Raises:
      FileNotFoundError: a missing folder or file (one line saying how to get it).
      ValueError: an unknown name, no folder for MNIST, or a malformed file (one line naming it).
    """
    if name not in DEFAULT_DIRS:
        raise ValueError(f"unknown IDX dataset {name!r}; allowed: {', '.join(MNIST_NAMES)}")
    if data_dir is None:
        data_dir = DEFAULT_DIRS[name]
    if data_dir is None:
        raise ValueError(f"{name} needs data_dir=<a folder with {', '.join(FILES['train'])}, "
                         f"{', '.join(FILES['test'])} (each may end in .gz)>; it has no default "
                         "folder and is not downloaded")
    folder = pathlib.Path(data_dir).expanduser()
    if not folder.is_dir():
        hint = ("install Debian's package (apt-get install dataset-fashion-mnist) or pass "
                if name == "fashion_mnist" else "pass ")
        raise FileNotFoundError(f"{name}: folder {folder} does not exist; {hint}data_dir=<a "
                                "folder holding the four IDX files>")
    train_images, train_labels = _split(folder, "train")
    test_images, test_labels = _split(folder, "test")
    if name == "fashion_mnist":
        mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    else:
        scaled = train_images.astype(np.float64) / 255.0
        mean, std = (float(scaled.mean()),), (float(scaled.std()),)
    return Dataset(name, train_images, train_labels, test_images, test_labels,
                   num_classes=NUM_CLASSES, mean=mean, std=std,
                   crop_padding=REFERENCE_CROP_PADDING, flip=name == "fashion_mnist")
