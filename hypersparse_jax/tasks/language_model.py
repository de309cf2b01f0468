"""Byte-level language modelling: a decoder-only transformer on the ``pysource`` corpus.

Data: :mod:`hypersparse_jax.data.pysource`; model: :class:`hypersparse_jax.models.TransformerLM`
(``--layers --d-model --heads --context``). An epoch is ``--steps-per-epoch`` batches of random
training windows. Prunable: the attention and MLP kernels (``--prune-embeddings`` adds the token
embedding). Per-epoch monitoring is on ``--eval-windows`` fixed windows; the headline figures on
every test window.

**Metrics.** Next-byte accuracy and bits per byte, ``mean(−log2 p(next byte))`` over the scored
bytes. There is no augmentation for text: the training windows are used as they are, so ART's
"pruned copy measured on the training data as the loader serves it" (``pruned_eval='augmented'``)
and on clean data (``'clean'``) are the same measurement: next-byte accuracy on
:data:`hypersparse_jax.data.pysource.PRUNED_EVAL_WINDOWS` fixed training windows at evenly spaced offsets of the train split
(:meth:`hypersparse_jax.data.pysource.TextData.pruned_eval_windows`).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hypersparse_jax import models, sharding
from hypersparse_jax.config import TRANSFORMER_KEYS
from hypersparse_jax.data import pysource
from hypersparse_jax.tasks.base import Task


def _next_byte_terms(model, params, tokens, mask, train):
  """Per-window sums of cross-entropy (nats) and correct predictions, and the per-window
  weight (``mask``); the model reads ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``."""
  inputs, targets = tokens[:, :-1].astype(jnp.int32), tokens[:, 1:].astype(jnp.int32)
  logits = model.apply({"params": params}, inputs, train=train).astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  weights = mask.astype(jnp.float32)
  return jnp.sum(nll, -1) * weights, jnp.sum(correct, -1) * weights, weights


def make_train_step(model, tx, *, state_shardings=None):
  """``(state, batch, key) -> (state, metrics)`` for next-byte prediction; the metrics are sums
  over the batch's scored bytes (``count``): ``loss_sum`` (nats) and ``correct``. The key is
  unused (no dropout, no augmentation); it keeps the image step's signature."""

  def step(state, batch, key):
    del key
    tokens, mask = batch["tokens"], batch["mask"]
    per_window = tokens.shape[1] - 1

    def loss_fn(params):
      nll, correct, weights = _next_byte_terms(model, params, tokens, mask, True)
      count = jnp.maximum(jnp.sum(weights), 1.0) * per_window
      return jnp.sum(nll) / count, (nll, correct, weights)

    (_, (nll, correct, weights)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss_sum": jnp.sum(nll), "correct": jnp.sum(correct),
               "count": jnp.sum(weights) * per_window}
    new_state = {"params": params, "batch_stats": state["batch_stats"], "opt_state": opt_state}
    return sharding.constrain(new_state, state_shardings), metrics

  return jax.jit(step, donate_argnums=0)


def make_eval_step(model):
  """``(params, batch_stats, batch) -> (correct, nll_sum)`` summed over the batch's scored bytes
  (nats); padding windows (``mask=False``) count nothing."""

  def step(params, batch_stats, batch):
    del batch_stats
    nll, correct, _ = _next_byte_terms(model, params, batch["tokens"], batch["mask"], False)
    return jnp.sum(correct), jnp.sum(nll)

  return jax.jit(step)


def evaluate(eval_step, params, windows: np.ndarray, batch_size: int, place=None,
             rows: slice | None = None) -> dict:
  """``{'accuracy', 'bits_per_byte', 'bytes'}`` of next-byte prediction over fixed ``windows``
  (uint8 ``(N, context + 1)``); ``place`` places each batch (e.g. on a mesh); ``rows``: this
  process's rows of every batch in a multi-process run (the sums are global)."""
  pending = []
  for batch in pysource.window_batches(windows, batch_size, rows):
    pending.append(eval_step(params, None, batch if place is None else place(batch)))
  correct = nll = 0.0
  for c, n in jax.device_get(pending):  # one sync at the end
    correct, nll = correct + float(c), nll + float(n)
  scored = windows.shape[0] * (windows.shape[1] - 1)
  return {"accuracy": correct / scored, "bits_per_byte": nll / scored / math.log(2),
          "bytes": scored}


class LanguageModelling(Task):
  """Next-byte prediction on a byte corpus (``--dataset pysource``, ``--model transformer``)."""

  summary_log_keys = ("test_bits_per_byte", "dense_test_bits_per_byte")

  def __init__(self, config, placement: sharding.Placement, eval_batch_size: int):
    super().__init__(config, placement, eval_batch_size)
    self.data = pysource.load_pysource(config.data_dir, context=config.context,
                                       max_eval_windows=config.eval_windows)
    # per-epoch monitoring on --eval-windows windows; the headline figures on every window
    self.windows = {"val": self.data.eval_windows("val"),
                    "test": self.data.eval_windows("test"),
                    "pruned": self.data.pruned_eval_windows(),
                    "test_full": pysource.fixed_windows(self.data.test, config.context)}
    self.model = models.create_model(
        config.model, num_classes=pysource.VOCAB_SIZE,
        transformer={k: getattr(config, k) for k in TRANSFORMER_KEYS})
    self.steps_per_epoch = config.steps_per_epoch
    self.example_input = jnp.zeros((1, config.context), jnp.int32)
    self.eval_step = make_eval_step(self.model)
    self.bits_per_byte = {}  # the latest evaluation's bits per byte, by split

  def _evaluate(self, split, params) -> float:
    result = evaluate(self.eval_step, params, self.windows[split], self.eval_batch_size,
                      self.placement.place_batch, rows=self.placement.rows(self.eval_batch_size))
    self.bits_per_byte[split] = result["bits_per_byte"]
    return result["accuracy"]

  def train_batches(self, epoch, rows):
    return pysource.train_batches(self.data, self.cfg.batch_size, self.steps_per_epoch,
                                  seed=self.cfg.seed, epoch=epoch, rows=rows)

  def make_train_step(self, tx, *, state_shardings=None):
    return make_train_step(self.model, tx, state_shardings=state_shardings)

  def test_accuracy(self, params, batch_stats):
    return self._evaluate("test", params)

  def val_accuracy(self, params, batch_stats) -> Optional[float]:
    return self._evaluate("val", params)

  def pruned_train_accuracy(self, params, batch_stats, epoch):
    """Next-byte accuracy on the fixed training windows of
    :meth:`hypersparse_jax.data.pysource.TextData.pruned_eval_windows` (no augmentation: both
    ``pruned_eval`` settings measure the same)."""
    return self._evaluate("pruned", params)

  def epoch_metrics(self) -> dict:
    return {f"{split}_bits_per_byte": self.bits_per_byte.get(split) for split in ("test", "val")}

  def dense_reference(self, params, batch_stats, test_accuracy):
    """On the whole test split, not the monitoring windows."""
    accuracy = self._evaluate("test_full", params)
    return {"dense_test_accuracy": accuracy,
            "dense_test_bits_per_byte": self.bits_per_byte["test_full"]}

  def summary(self, params, extra):
    """The final model on the whole test split: the headline, no selection (the per-epoch
    figures in metrics.jsonl, best_test_accuracy and val_accuracy here, are on the
    --eval-windows windows; ``figures_on`` says which is which)."""
    cfg = self.cfg
    test_acc = self._evaluate("test_full", params)
    return {
        "test_accuracy": test_acc, "test_bits_per_byte": self.bits_per_byte["test_full"],
        # the final model on the whole test split, as test_accuracy; the per-epoch figures
        # (best_test_accuracy, val_accuracy) are on the monitoring windows
        "final_test_accuracy": test_acc,
        "monitor_final_test_accuracy": extra["final_test_accuracy"],
        "figures_on": {"test_accuracy": "whole test split, final model",
                       "final_test_accuracy": "whole test split, final model",
                       "monitor_final_test_accuracy": "monitoring windows, final epoch",
                       "best_test_accuracy": "monitoring windows, best fine-tune epoch",
                       "val_accuracy": "validation monitoring windows, final epoch"},
        "val_accuracy": extra["final_val_accuracy"],
        "selection": "final", "selected_epoch": extra["final_epoch"],
        "monitor_final_test_bits_per_byte": extra["final_test_bits_per_byte"],
        "dense_test_bits_per_byte": extra["dense_test_bits_per_byte"],
        "accuracy_is": "next-byte accuracy",
        "transformer": {k: getattr(cfg, k) for k in TRANSFORMER_KEYS},
        "optimizer": cfg.optimizer, "prune_embeddings": cfg.prune_embeddings,
        "steps_per_epoch": self.steps_per_epoch,
        "train_windows_per_epoch": self.steps_per_epoch * cfg.batch_size,
        "test_bytes_scored": int(self.windows["test_full"].shape[0] * cfg.context),
        "val_bytes_scored": int(self.windows["val"].shape[0] * cfg.context),
        "monitor_windows": int(self.windows["test"].shape[0]),
        "pruned_eval_windows": int(self.windows["pruned"].shape[0]),
        "corpus": self.data.info,
    }
