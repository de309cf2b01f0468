"""The task interface: what the ART training loop needs from a task, and nothing more.

The loop (:class:`hypersparse_jax.train.Trainer`) owns the protocol (warm-up, ART with its
controller, masked fine-tuning), the optimiser, checkpoints and files. A task owns its data,
its model, its batches, its jitted train and evaluation steps and what its accuracy means; the
loop never asks which task it trains. Adding a task adds a module and an entry of
:data:`hypersparse_jax.tasks.TASKS`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import Any, Optional

from hypersparse_jax import sharding


class Task(abc.ABC):
  """One kind of training problem, bound to a run's configuration and device placement.

  Attributes set by subclasses:
    model: the Flax module.
    data: the loaded data (``num_train``, ``num_val``, ``num_test`` for the summary).
    steps_per_epoch: optimiser steps of one training epoch.
    example_input: one input of batch 1 (``model.init``'s example).
  """

  model: Any
  data: Any
  steps_per_epoch: int
  example_input: Any
  # summary.json keys this task adds to the final one-line summary of the console
  summary_log_keys: tuple = ()

  def __init__(self, config, placement: sharding.Placement, eval_batch_size: int):
    self.cfg, self.placement, self.eval_batch_size = config, placement, eval_batch_size

  @abc.abstractmethod
  def train_batches(self, epoch: int, rows: Optional[slice]) -> Iterator[dict]:
    """The host batches of training epoch ``epoch`` (a function of ``(seed, epoch)`` only);
    ``rows``: this process's rows of every batch."""

  @abc.abstractmethod
  def make_train_step(self, tx, *, state_shardings=None):
    """The jitted ``(state, batch, key) -> (state, metrics)`` with ``tx``; ``metrics`` holds
    the sums ``loss_sum``, ``correct`` and ``count``."""

  @abc.abstractmethod
  def test_accuracy(self, params, batch_stats) -> float:
    """Accuracy on the test data (the per-epoch monitoring figure)."""

  @abc.abstractmethod
  def val_accuracy(self, params, batch_stats) -> Optional[float]:
    """Accuracy on the validation data, or None when there is none."""

  @abc.abstractmethod
  def pruned_train_accuracy(self, params, batch_stats, epoch: int) -> float:
    """ART's measurement of the pruned copy (``params`` already pruned) at ``epoch``: its
    accuracy on the training data, eval mode."""

  def epoch_metrics(self) -> dict:
    """Extra fields of this epoch's ``metrics.jsonl`` record (after the evaluations)."""
    return {}

  def dense_reference(self, params, batch_stats, test_accuracy: float) -> dict:
    """The dense model at the end of warm-up, the reference point of the pruned result:
    ``{'dense_test_accuracy': ...}`` and any task-specific companions."""
    del params, batch_stats
    return {"dense_test_accuracy": test_accuracy}

  def summary(self, params, extra: dict) -> dict:
    """Fields of ``summary.json`` this task adds or overrides (``extra``: the run's state)."""
    del params, extra
    return {}
