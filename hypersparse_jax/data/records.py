"""Lazy records: dataset splits read on demand from a random-access source.

A :class:`RecordArray` stands for one field (images or labels) of a split as an array; indexing
it reads only the records asked for, so each process of a multi-process run reads only the
records of its own rows. The sources that make them (a TFDS ``data_source`` split, image files
decoded on demand) live beside their loaders in :mod:`hypersparse_jax.data.cifar` and
:mod:`hypersparse_jax.data.tinyimagenet`.
"""

from __future__ import annotations

import threading

import numpy as np

# Records read per call when a whole split is materialised (and per batched TFDS read).
READ_CHUNK = 1024


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
        step = READ_CHUNK
        for start in range(0, len(self), step):
            out[start : start + step] = self[start : start + step]
        return out if dtype is None else out.astype(dtype)


def _take_rows(array, indices: np.ndarray) -> np.ndarray:
    """``array[indices]`` along axis 0: a gather for NumPy, a read of those records for lazy."""
    if isinstance(array, RecordArray):
        return array[indices]
    return np.take(array, indices, axis=0)
