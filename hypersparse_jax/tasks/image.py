"""Image classification: the paper's task (CIFAR-10/100, TinyImageNet, the bundled digits).

The training step augments on the device (random crop with zero padding, flip, per-channel
normalisation: :mod:`hypersparse_jax.data.augmentation`) and minimises the mean cross-entropy of
the batch's valid rows. ART's pruned copy is measured on the training data as the training
loader serves it, i.e. augmented (``pruned_eval='augmented'``, the reference's way), or on the
clean training images (``'clean'``). With ``augment=False`` (``--no-augment``) training sees the
clean images (no crop, no flip), so the pruned copy is measured on them under either setting.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from hypersparse_jax import data, models, sharding
from hypersparse_jax.tasks.base import Task

# fold_in tag of the pruned-evaluation augmentation keys (epoch keys use tags 1..epochs)
PRUNED_EVAL_TAG = 2**31 - 1


def _variables(params, batch_stats):
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_train_step(model, tx, dataset: data.Dataset, *, state_shardings=None):
  """``(state, batch, key) -> (state, metrics)``; ``state`` is ``{params, batch_stats, opt_state}``.

  The step follows the shardings of its inputs (see :mod:`hypersparse_jax.sharding`);
  ``state_shardings`` (a pytree of shardings like ``state``) pins the new state's placement.
  """
  augment = functools.partial(data.augment, mean=dataset.mean, std=dataset.std,
                              crop_padding=dataset.crop_padding, flip=dataset.flip)

  def step(state, batch, key):
    images = augment(key, batch["image"])
    labels, weights = batch["label"], batch["mask"].astype(jnp.float32)

    def loss_fn(params):
      if state["batch_stats"]:
        logits, updated = model.apply(_variables(params, state["batch_stats"]), images,
                                      train=True, mutable=["batch_stats"])
        new_stats = updated["batch_stats"]
      else:
        logits, new_stats = model.apply({"params": params}, images, train=True), {}
      losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
      loss = jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
      return loss, (logits, new_stats, losses)

    (_, (logits, new_stats, losses)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    metrics = {"loss_sum": jnp.sum(losses * weights), "correct": jnp.sum(correct * weights),
               "count": jnp.sum(weights)}
    new_state = {"params": params, "batch_stats": new_stats, "opt_state": opt_state}
    return sharding.constrain(new_state, state_shardings), metrics

  return jax.jit(step, donate_argnums=0)


def make_eval_step(model, dataset: data.Dataset, *, augmented: bool = False):
  """``(params, batch_stats, batch[, key]) -> number of correct predictions`` (eval mode).

  With ``augmented=True`` the step takes a PRNG key and the index of the batch's first example,
  and applies the training augmentation (random crop, flip) before the eval-mode forward pass:
  what the reference measures when it runs its test function over the training loader. Example
  ``j`` draws its crop and flip from ``fold_in(key, j)``, so the result does not depend on the
  batch size (nor on the number of devices, which pads it).
  """

  def step(params, batch_stats, batch, key=None, start=None):
    if augmented:
      index = start + jnp.arange(batch["image"].shape[0], dtype=jnp.int32)
      draw = lambda j: data.sample_augmentation(  # noqa: E731
          jax.random.fold_in(key, j), 1, crop_padding=dataset.crop_padding, flip=dataset.flip)
      offsets, flips = jax.vmap(draw)(index)
      images = data.apply_augmentation(
          batch["image"], offsets[:, 0], flips[:, 0], mean=dataset.mean, std=dataset.std,
          crop_padding=dataset.crop_padding)
    else:
      images = data.normalize(batch["image"], dataset.mean, dataset.std)
    logits = model.apply(_variables(params, batch_stats), images, train=False)
    correct = (jnp.argmax(logits, -1) == batch["label"]) & batch["mask"]
    return jnp.sum(correct.astype(jnp.int32))

  return jax.jit(step)


def evaluate(eval_step, params, batch_stats, images, labels, batch_size, place=None,
             key=None, rows=None) -> float:
  """Accuracy over ``images``; ``place`` (e.g. a ``shard_batch`` partial) places each batch.

  ``key``: for an augmented ``eval_step`` (example ``j`` is augmented with ``fold_in(key, j)``).
  ``rows``: this process's rows of every batch in a multi-process run (``place`` then builds the
  global batch from every process's part; the counts are global).
  """
  correct = 0
  pending = []
  for i, batch in enumerate(data.eval_batches(images, labels, batch_size, rows=rows)):
    batch = batch if place is None else place(batch)
    if key is None:
      pending.append(eval_step(params, batch_stats, batch))
    else:
      pending.append(eval_step(params, batch_stats, batch, key, jnp.int32(i * batch_size)))
  for count in jax.device_get(pending):  # one sync at the end, not one per batch
    correct += int(count)
  return correct / len(labels)


class ImageClassification(Task):
  """An image dataset of :mod:`hypersparse_jax.data` and an image model of
  :mod:`hypersparse_jax.models` (``--model mlp/cnn/resnet/vgg``)."""

  def __init__(self, config, placement: sharding.Placement, eval_batch_size: int):
    super().__init__(config, placement, eval_batch_size)
    # several processes: each reads only the records of its own rows (same batches)
    dataset = data.load_dataset(config.dataset, config.data_dir, config.download,
                                lazy=jax.process_count() > 1)
    if not config.augment:
      dataset = dataclasses.replace(dataset, crop_padding=0, flip=False)
    if config.val_fraction > 0:
      dataset = data.with_validation_split(dataset, config.val_fraction, seed=config.seed)
    self.data = dataset
    self.model = models.create_model(config.model, num_classes=dataset.num_classes,
                                     depth=config.depth, batch_norm=config.batch_norm,
                                     width=config.width)
    self.steps_per_epoch = data.steps_per_epoch(dataset.num_train, config.batch_size)
    self.example_input = jnp.zeros((1,) + dataset.image_shape, jnp.float32)
    self.eval_step = make_eval_step(self.model, dataset)
    # without augmentation the training loader serves the clean images: measure on those
    self._pruned_augmented = config.pruned_eval == "augmented" and config.augment
    self.pruned_eval_step = make_eval_step(self.model, dataset, augmented=self._pruned_augmented)
    self._pruned_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), PRUNED_EVAL_TAG)

  def train_batches(self, epoch, rows):
    return data.train_batches(self.data, self.cfg.batch_size, seed=self.cfg.seed, epoch=epoch,
                              rows=rows)

  def make_train_step(self, tx, *, state_shardings=None):
    return make_train_step(self.model, tx, self.data, state_shardings=state_shardings)

  def _accuracy(self, step, params, batch_stats, images, labels, key=None) -> float:
    return evaluate(step, params, batch_stats, images, labels, self.eval_batch_size,
                    self.placement.place_batch, key, rows=self.placement.rows(self.eval_batch_size))

  def test_accuracy(self, params, batch_stats):
    return self._accuracy(self.eval_step, params, batch_stats, self.data.test_images,
                          self.data.test_labels)

  def val_accuracy(self, params, batch_stats) -> Optional[float]:
    if self.data.val_labels is None:
      return None
    return self._accuracy(self.eval_step, params, batch_stats, self.data.val_images,
                          self.data.val_labels)

  def pruned_train_accuracy(self, params, batch_stats, epoch):
    """Augmented as the training loader serves it (a fresh augmentation per epoch, a function
    of ``(seed, epoch)``), or on the clean images with ``pruned_eval='clean'`` or
    ``augment=False``."""
    key = None
    if self._pruned_augmented:
      key = jax.random.fold_in(self._pruned_key, epoch)
    return self._accuracy(self.pruned_eval_step, params, batch_stats, self.data.train_images,
                          self.data.train_labels, key)

  def summary(self, params, extra):
    """What a deployed model's input needs (``hypersparse-export`` writes it into the ONNX
    metadata): uint8 NHWC images, ``(image * scale - mean) / std`` per channel."""
    del params, extra
    return {"preprocessing": {"layout": "NHWC", "dtype": "uint8", "scale": 1 / 255,
                              "mean": [float(v) for v in self.data.mean],
                              "std": [float(v) for v in self.data.std],
                              "input_shape": list(self.data.image_shape)}}
