"""The image-classification dataset container and its validation split."""

from __future__ import annotations

import dataclasses

import numpy as np

from hypersparse_jax.data.records import RecordArray

# The reference pads by 4 px for every dataset (torchvision RandomCrop(size, padding=4)).
REFERENCE_CROP_PADDING = 4


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
