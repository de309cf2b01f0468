"""Input pipeline: datasets in memory or read on demand, deterministic batching, augmentation.

Data only (no model or training code), one module per concept:

* :mod:`~hypersparse_jax.data.dataset`: :class:`Dataset` (uint8 NHWC images, int32 labels, the
  normalisation constants and augmentation settings) and :func:`with_validation_split`;
* :mod:`~hypersparse_jax.data.loading`: :func:`load_dataset` by name, over the sources
  :mod:`~hypersparse_jax.data.digits` (bundled, no download), :mod:`~hypersparse_jax.data.cifar`
  (TFDS ``data_source``), :mod:`~hypersparse_jax.data.tinyimagenet` (an image folder) and
  :mod:`~hypersparse_jax.data.mnist` (MNIST / Fashion-MNIST IDX files);
* :mod:`~hypersparse_jax.data.records`: :class:`RecordArray`, a split read on demand
  (``load_dataset(..., lazy=True)``), so each process reads only its own rows;
* :mod:`~hypersparse_jax.data.batching`: epoch orders, padded batches, prefetch;
* :mod:`~hypersparse_jax.data.augmentation`: random crop, flip and normalisation as pure JAX,
  meant to run inside the jitted step;
* :mod:`~hypersparse_jax.data.pysource`: the byte-level text corpus (the standard library's
  Python source) for the language-model task.

Typical use::

    ds = load_dataset('cifar10', data_dir='~/tensorflow_datasets')
    for batch in prefetch(train_batches(ds, 64, seed=0, epoch=e)):
        images = augment(key, batch['image'], mean=ds.mean, std=ds.std,
                         crop_padding=ds.crop_padding, flip=ds.flip)   # inside the jitted step
"""

from hypersparse_jax.data.augmentation import (apply_augmentation, augment, normalize,
                                               sample_augmentation)
from hypersparse_jax.data.batching import (epoch_permutation, eval_batches, prefetch,
                                           steps_per_epoch, train_batches)
from hypersparse_jax.data.dataset import Dataset, with_validation_split
from hypersparse_jax.data.loading import DATASET_NAMES, NORMALIZATION, SOURCES, load_dataset
from hypersparse_jax.data.records import RecordArray

__all__ = [
    "DATASET_NAMES",
    "NORMALIZATION",
    "SOURCES",
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
