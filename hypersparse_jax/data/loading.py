"""``load_dataset``: the image datasets by name (one module per source, registered here).

A source is a function ``(name, data_dir, download, *, cache, lazy) -> Dataset``; adding a
dataset adds a module and one entry of :data:`SOURCES`, and touches no training code.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable

from hypersparse_jax.data import cifar, digits, mnist, tinyimagenet
from hypersparse_jax.data.dataset import Dataset


def _digits(name, data_dir, download, *, cache, lazy):
    del name, data_dir, download, cache, lazy  # bundled, always in memory
    return digits.load_digits()


def _cifar(name, data_dir, download, *, cache, lazy):
    del cache
    return cifar.load_cifar(name, data_dir, download, lazy=lazy)


def _tinyimagenet(name, data_dir, download, *, cache, lazy):
    del name, download
    if data_dir is None:
        raise ValueError(
            "tinyimagenet needs data_dir: a folder with wnids.txt, train/ and val/ "
            "(automatic download is not supported)"
        )
    return tinyimagenet.load_tinyimagenet(pathlib.Path(data_dir).expanduser(), cache=cache,
                                          lazy=lazy)


def _mnist(name, data_dir, download, *, cache, lazy):
    del download, cache, lazy  # never downloaded; small enough to hold in memory
    return mnist.load_mnist(name, data_dir)


# name -> loader; the order is the command line's.
SOURCES: dict[str, Callable[..., Dataset]] = {
    "digits": _digits,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "tinyimagenet": _tinyimagenet,
    "fashion_mnist": _mnist,
    "mnist": _mnist,
}
DATASET_NAMES = tuple(SOURCES)
# Datasets whose normalisation is a fixed constant (the reference's), ``name -> (mean, std)``
# in [0, 1] units; the others compute theirs from the training split when loaded.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": (cifar._CIFAR10_MEAN, cifar._CIFAR10_STD),
    "cifar100": (cifar._CIFAR100_MEAN, cifar._CIFAR100_STD),
    "tinyimagenet": (tinyimagenet._TINYIMAGENET_MEAN, tinyimagenet._TINYIMAGENET_STD),
}


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
    * ``'fashion_mnist'`` / ``'mnist'``: the four original IDX files (``.gz`` or not) in
      ``data_dir`` (Fashion-MNIST's default: Debian's ``/usr/share/datasets/fashion-mnist``,
      ``apt-get install dataset-fashion-mnist``; MNIST needs ``data_dir``); 28x28x1 images,
      crop padding 4, flip for Fashion-MNIST only (:mod:`hypersparse_jax.data.mnist`).

    With ``lazy=True``, CIFAR's splits and TinyImageNet's images are :class:`RecordArray` s:
    nothing but the file list (TinyImageNet) is read when loading, and a batch reads (decodes)
    only the records of its rows, so each process of a multi-process run reads only the records
    of its own rows (``train_batches(..., rows=...)``). The batches are the same as eagerly loaded
    ones. Mean and std are the reference's fixed constants for these datasets, so no pass over
    the data is needed; the TinyImageNet cache is neither read nor written; CIFAR labels are
    range-checked as they are read. The digits set and the IDX datasets are always held in memory.

    Args:
      name: one of ``DATASET_NAMES``.
      data_dir: TFDS data directory (CIFAR) or the dataset folder (TinyImageNet, IDX files).
      download: allow TFDS to download and prepare CIFAR data. Ignored for digits; TinyImageNet
        and the IDX datasets cannot be downloaded by this library.
      cache: TinyImageNet only: read/write the decoded-array cache (eager loading only).
      lazy: read records on demand instead of loading them (CIFAR, TinyImageNet).

    Returns:
      A ``Dataset``.

    Raises:
      ValueError: unknown name, malformed TinyImageNet folder contents or IDX files, MNIST
        without ``data_dir``.
      FileNotFoundError: CIFAR data not prepared in ``data_dir`` with ``download=False``, or a missing
        TinyImageNet or IDX folder, file or image.
    """
    if name not in SOURCES:
        raise ValueError(f'Unknown dataset {name!r}; allowed: {", ".join(DATASET_NAMES)}')
    return SOURCES[name](name, data_dir, download, cache=cache, lazy=lazy)
