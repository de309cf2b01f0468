"""scikit-learn's bundled handwritten digits (1,797 8x8 grey images): no download."""

from __future__ import annotations

import numpy as np

from hypersparse_jax.data.dataset import Dataset

_DIGITS_TEST_FRACTION = 0.25
_DIGITS_SPLIT_SEED = 0


def load_digits() -> Dataset:
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
