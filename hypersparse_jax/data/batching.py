"""Deterministic batching: epoch orders, padded batches, this process's rows, prefetch.

Batches are padded to a fixed size with a boolean ``mask`` so a jit-compiled step compiles once;
the order of an epoch depends only on ``(seed, epoch)``, so a resumed run sees the batches an
uninterrupted one would.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from hypersparse_jax.data.dataset import Dataset
from hypersparse_jax.data.records import _take_rows


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
