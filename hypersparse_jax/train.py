"""``hypersparse-train``: the ART protocol end to end (warm-up -> ART -> masked fine-tuning).

    hypersparse-train                                   # preset: bundled digits, 90 % sparsity
    hypersparse-train --dataset cifar10 --data-dir ~/tensorflow_datasets --sparsity 0.98
    hypersparse-train --dataset pysource                # byte-level transformer LM, stdlib code

Defaults for CIFAR-10/100 and TinyImageNet are the reference's (ResNet-32, batch 64, SGD lr 0.1,
momentum 0.9, weight decay 1e-4, 60 warm-up epochs, λ_init 5e-6, η 1.05, window b = 1,
160 fine-tune epochs with lr × 0.1 at 80 and 120). With no arguments it runs a small preset on
scikit-learn's bundled digits (no download).

``--dataset pysource`` trains a byte-level decoder-only transformer (``--model transformer``,
``--layers --d-model --heads --context``) on the Python standard library's source code
(:mod:`hypersparse_jax.text`), with AdamW (``--optimizer adamw``; ``--momentum`` is Adam's β1).
An epoch there is ``--steps-per-epoch`` batches of random training windows. Prunable: the
attention and MLP kernels (``--prune-embeddings`` adds the token embedding). Accuracy means
next-byte accuracy; ``summary.json`` adds ``test_bits_per_byte`` and
``dense_test_bits_per_byte`` (the dense model at the end of warm-up). There is no augmentation
for text, so ``--pruned-eval augmented`` and ``clean`` both measure the pruned copy on the same
fixed training windows (:data:`hypersparse_jax.text.PRUNED_EVAL_WINDOWS` at evenly spaced
offsets of the train split).

Run the same command with the same ``--outdir`` again to resume a stopped or killed run from
its latest checkpoint; it ends exactly as an uninterrupted run would (the data order and the
random augmentation depend only on ``(seed, epoch, step)``). ``--outdir`` receives
``config.json``, ``metrics.jsonl``, ``summary.json``, ``checkpoints/{latest,best,init}``
(``best_val`` too with ``--val-fraction``), ``model_sparse.npz`` and, with ``--plot``,
``curves.png``.

Decisions follow the authors' code by default: the ART window rule of their ``ART`` class
(``--art-rule reference``), the pruned copy's accuracy measured on the training data as the
training loader serves it, i.e. augmented (``--pruned-eval augmented``), HyperSparse's 0.6585.

Which accuracy is reported. The reference reports the best test accuracy over the fine-tune
epochs, i.e. it selects the epoch on the test set; ``summary.json`` keeps that figure as
``best_test_accuracy`` (comparable with the paper's tables only). The headline
``test_accuracy`` does not look at the test set to choose: it is the test accuracy of the
fine-tune epoch with the best validation accuracy when ``--val-fraction`` holds part of the
training data out (``selection: "best_val"``), else of the final epoch (``selection: "final"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import signal
import sys
import threading
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from hypersparse_jax import transform as art_lib
from hypersparse_jax import checkpointing, input_pipeline, masking, models, sparse_export
from hypersparse_jax import distributed, host_memory, init_source, run_dir, sharding
from hypersparse_jax import text as text_lib
from hypersparse_jax.controller import RULES, ARTController

PHASES = ("warmup", "art", "finetune")
PRUNED_EVALS = ("augmented", "clean")
OPTIMIZERS = ("sgd", "adamw")
ADAM_B2 = 0.99
TRANSFORMER_KEYS = ("layers", "d_model", "heads", "context")
DATASETS = input_pipeline.DATASET_NAMES + text_lib.TEXT_DATASETS
# fold_in tag of the pruned-evaluation augmentation keys (epoch keys use tags 1..epochs)
_PRUNED_EVAL_TAG = 2**31 - 1


class TrainingDiverged(RuntimeError):
  """The loss or the parameters became non-finite; the last good checkpoint is kept."""

# Reference defaults (CIFAR / TinyImageNet) and the bundled-digits preset.
REFERENCE_DEFAULTS = dict(
    model="resnet", depth=32, batch_norm=True, sparsity=0.9, penalty="hypersparse",
    lambda_init=5e-6, eta=1.05, window=1, warmup_epochs=60, epochs=160, max_art_epochs=300,
    batch_size=64, lr=0.1, lr_decay=0.1, lr_steps=(80, 120), weight_decay=1e-4, momentum=0.9,
    eval_batch_size=500, layers=None, d_model=None, heads=None, context=None, optimizer="sgd",
    prune_embeddings=False, steps_per_epoch=None, eval_windows=None)
DIGITS_PRESET = dict(
    REFERENCE_DEFAULTS, model="mlp", depth=None, lambda_init=2e-4, eta=1.25, warmup_epochs=10,
    epochs=20, max_art_epochs=40, lr=0.05, lr_steps=(10, 15), eval_batch_size=450)
# Byte-level transformer on the stdlib's source: sized for < 15 min on 2 CPU cores.
PYSOURCE_PRESET = dict(
    REFERENCE_DEFAULTS, model="transformer", depth=None, layers=2, d_model=128, heads=4,
    context=128, optimizer="adamw", lr=3e-3, momentum=0.9, weight_decay=0.01, batch_size=32,
    steps_per_epoch=100, eval_windows=256, eval_batch_size=128, lambda_init=2e-3, eta=2.0,
    warmup_epochs=6, epochs=4, max_art_epochs=6, lr_steps=(2, 3))
PRESETS = {"digits": DIGITS_PRESET, "pysource": PYSOURCE_PRESET}


@dataclasses.dataclass
class TrainConfig:
  """Everything that defines a run (saved as ``config.json``; a resume must match it)."""
  dataset: str = "digits"
  data_dir: Optional[str] = None
  download: bool = False
  model: str = "mlp"
  depth: Optional[int] = None
  batch_norm: bool = True
  sparsity: float = 0.9
  penalty: str = "hypersparse"
  lambda_init: float = 2e-4
  eta: float = 1.25
  window: int = 1
  warmup_epochs: int = 10
  epochs: int = 20
  max_art_epochs: int = 40
  batch_size: int = 64
  eval_batch_size: int = 450
  lr: float = 0.05
  lr_decay: float = 0.1
  lr_steps: tuple = (10, 15)
  weight_decay: float = 1e-4
  momentum: float = 0.9
  seed: int = 0
  init_from: Optional[str] = None
  val_fraction: float = 0.0        # held out of the training data for selection (0: none)
  art_rule: str = "reference"      # ARTController rule: 'reference' or 'best_mean'
  pruned_eval: str = "augmented"   # pruned copy measured on 'augmented' or 'clean' train data
  # --model transformer / --dataset pysource only (None elsewhere)
  layers: Optional[int] = None
  d_model: Optional[int] = None
  heads: Optional[int] = None
  context: Optional[int] = None
  optimizer: str = "sgd"           # 'sgd' (momentum) or 'adamw' (momentum = β1)
  prune_embeddings: bool = False   # transformer: also prune the token embedding
  steps_per_epoch: Optional[int] = None  # text: batches per epoch (images: the data's size)
  eval_windows: Optional[int] = None     # text: cap on validation / test windows

  @property
  def is_text(self) -> bool:
    return self.dataset in text_lib.TEXT_DATASETS

  def _validate_text(self):
    """The options of ``--dataset pysource`` / ``--model transformer``."""
    if self.is_text != (self.model == "transformer"):
      raise ValueError(f"--model transformer goes with --dataset pysource (a language model "
                       f"needs text, and text needs it), got --model {self.model} with "
                       f"--dataset {self.dataset}")
    text_only = TRANSFORMER_KEYS + ("steps_per_epoch", "eval_windows")
    if not self.is_text:
      for name in text_only:
        if getattr(self, name) is not None:
          raise ValueError(f"--{name.replace('_', '-')} is for --dataset pysource / --model "
                           f"transformer, got {getattr(self, name)} with --dataset {self.dataset}")
      if self.prune_embeddings:
        raise ValueError("--prune-embeddings is for --model transformer")
      return
    for name in text_only:
      value = getattr(self, name)
      if name == "eval_windows" and value is None:
        continue
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    if self.d_model % self.heads:
      raise ValueError(f"--d-model ({self.d_model}) must be divisible by --heads ({self.heads})")
    if self.val_fraction:
      raise ValueError(f"--val-fraction is not used by --dataset {self.dataset} (it has its own "
                       f"validation split), got {self.val_fraction}")
    if self.init_from:
      raise ValueError("--init-from is not supported with --dataset pysource yet")

  def validate(self):
    """Raises ValueError (one line naming the option, the value and what is allowed) for any
    option that would fail or diverge later, so that nothing fails after epoch 0 for a reason
    known at epoch 0."""
    masking.check_sparsity(self.sparsity)
    if self.dataset not in DATASETS:
      raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {list(DATASETS)}")
    if self.penalty not in ("hypersparse", "l1", "l2"):
      raise ValueError(f"unknown penalty {self.penalty!r}; choose hypersparse, l1 or l2")
    if self.model not in models.MODEL_NAMES:
      raise ValueError(f"unknown model {self.model!r}; choose one of {list(models.MODEL_NAMES)}")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, "
                       f"got {self.optimizer!r}")
    self._validate_text()
    if self.model in ("mlp", "cnn", "transformer") and self.depth is not None:
      raise ValueError(f"--depth is not used by --model {self.model} (its depth is fixed), "
                       f"got {self.depth}; leave --depth out")
    if self.model == "resnet" and not self.batch_norm:
      raise ValueError("--no-batch-norm is not supported by --model resnet (the CIFAR ResNet "
                       "always uses BatchNorm); use --model vgg or cnn")
    for name in ("batch_size", "eval_batch_size", "max_art_epochs", "epochs"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
    for name in ("warmup_epochs", "window", "seed"):
      if getattr(self, name) < 0:
        raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
    for name in ("lr", "lambda_init", "eta", "lr_decay", "weight_decay", "momentum"):
      if not math.isfinite(getattr(self, name)):
        raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got "
                         f"{getattr(self, name)}")
    for name in ("lr", "lambda_init", "eta", "lr_decay"):
      if not getattr(self, name) > 0:
        raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
    if not 0 <= self.momentum < 1:
      raise ValueError(f"--momentum must be in [0, 1), got {self.momentum}")
    if self.weight_decay < 0:
      raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
    steps = list(self.lr_steps)
    if any(b <= a for a, b in zip(steps, steps[1:])):
      raise ValueError(f"--lr-steps must be strictly increasing, got {' '.join(map(str, steps))}")
    if steps and not (steps[0] >= 0 and steps[-1] < self.epochs):
      raise ValueError(f"--lr-steps must lie in [0, --epochs) = [0, {self.epochs}) (fine-tune "
                       f"epochs), got {' '.join(map(str, steps))}")
    if not 0 <= self.val_fraction < 1:
      raise ValueError(f"--val-fraction must lie in [0, 1), got {self.val_fraction}")
    if self.art_rule not in RULES:
      raise ValueError(f"--art-rule must be one of {', '.join(RULES)}, got {self.art_rule!r}")
    if self.pruned_eval not in PRUNED_EVALS:
      raise ValueError(f"--pruned-eval must be one of {', '.join(PRUNED_EVALS)}, "
                       f"got {self.pruned_eval!r}")
    overflow = art_lib.lambda_overflow_epoch(self.lambda_init, self.eta)
    if overflow is not None and overflow < self.max_art_epochs:
      raise ValueError(
          f"--lambda-init {self.lambda_init} with --eta {self.eta} exceeds float32 (3.4e38) at "
          f"regularisation epoch {overflow}, within --max-art-epochs {self.max_art_epochs}; "
          f"lower --eta or --max-art-epochs")


def check_devices(devices: Optional[int], shard_params: bool) -> None:
  """Raises ValueError for ``--devices`` / ``--shard-params`` that this machine cannot honour."""
  available = len(jax.local_devices())
  if devices is not None and not 1 <= devices <= available:
    raise ValueError(f"--devices must be in [1, {available}] (local devices here), got {devices}")
  used = jax.device_count() if devices is None else devices  # all processes' devices
  if shard_params and used < 2:
    raise ValueError(f"--shard-params needs more than one device, but this run uses {used} "
                     "(see --devices); leave --shard-params out")


# Options that do not change a run's result: not compared on resume (config.json keeps the
# values of the run that created it). ``--no-progress``, ``--plot``, ``--devices``,
# ``--shard-params`` and ``--no-retain-host-memory`` are not in config.json at all.
RESUME_FREE_KEYS = frozenset({"download"})
# Keys that config.json files of version 0.1 lack, with the value that version behaved as (a
# missing key is accepted only if the resumed run asks for exactly that value): it had no
# validation split, only the best-window-mean rule, and measured the pruned copy on the clean
# (un-augmented) training images.
LEGACY_DEFAULTS = {"val_fraction": 0.0, "art_rule": "best_mean", "pruned_eval": "clean",
                   # options added with the transformer (0.1 knew image models only)
                   "layers": None, "d_model": None, "heads": None, "context": None,
                   "optimizer": "sgd", "prune_embeddings": False, "steps_per_epoch": None,
                   "eval_windows": None}


def _normalized_path(path):
  return None if path is None else os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def resume_differences(saved: dict, requested: dict) -> dict:
  """``{key: (saved, requested)}`` of the result-changing options that differ.

  Paths are compared normalised (``/p`` = ``/p/`` = ``/q/../p``); ``data_dir`` is ignored for
  the bundled digits; ``--lr-steps`` at or past ``--epochs`` never fire and are dropped; a key
  that an older config.json lacks counts as its :data:`LEGACY_DEFAULTS` value, else it differs.
  """
  def normalized(config):
    config = dict(config)
    for key in ("data_dir", "init_from"):
      if key in config:
        config[key] = _normalized_path(config[key])
    if config.get("dataset") == "digits":
      config.pop("data_dir", None)
    if "lr_steps" in config and isinstance(config.get("epochs"), int):
      config["lr_steps"] = [s for s in config["lr_steps"] if s < config["epochs"]]
    return config

  missing = object()
  saved_n, requested_n = normalized(saved), normalized(requested)
  diff = {}
  for key in sorted(set(saved_n) | set(requested_n)):
    if key in RESUME_FREE_KEYS or key == "data_dir" and requested.get("dataset") == "digits":
      continue
    old = saved_n.get(key, LEGACY_DEFAULTS.get(key, missing))
    new = requested_n.get(key, missing)
    if old != new:
      if key not in saved and key in LEGACY_DEFAULTS:
        shown = f"not recorded: {LEGACY_DEFAULTS[key]!r} in the version that wrote it"
      else:
        shown = "<missing>" if old is missing else saved.get(key, old)
      diff[key] = (shown, "<missing>" if new is missing else requested.get(key))
  return diff


def make_optimizer(cfg: TrainConfig, learning_rate) -> optax.GradientTransformation:
  """The optimiser after ``art()`` / ``fixed_mask()`` in the chain: SGD with momentum after
  coupled weight decay (the reference's), or AdamW (β1 = ``cfg.momentum``, β2 = 0.99,
  decoupled weight decay ``cfg.weight_decay``) for ``--optimizer adamw``."""
  if cfg.optimizer == "adamw":
    return optax.adamw(learning_rate, b1=cfg.momentum, b2=ADAM_B2,
                       weight_decay=cfg.weight_decay)
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(learning_rate, momentum=cfg.momentum))


# ------------------------------------------------------------------------------------------------
# Steps (pure, jit-compiled)
# ------------------------------------------------------------------------------------------------


def _variables(params, batch_stats):
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_train_step(model, tx, dataset: input_pipeline.Dataset, *, state_shardings=None):
  """``(state, batch, key) -> (state, metrics)``; ``state`` is ``{params, batch_stats, opt_state}``.

  The step follows the shardings of its inputs (see :mod:`hypersparse_jax.sharding`);
  ``state_shardings`` (a pytree of shardings like ``state``) pins the new state's placement.
  """
  augment = functools.partial(input_pipeline.augment, mean=dataset.mean, std=dataset.std,
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


def make_eval_step(model, dataset: input_pipeline.Dataset, *, augmented: bool = False):
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
      draw = lambda j: input_pipeline.sample_augmentation(  # noqa: E731
          jax.random.fold_in(key, j), 1, crop_padding=dataset.crop_padding, flip=dataset.flip)
      offsets, flips = jax.vmap(draw)(index)
      images = input_pipeline.apply_augmentation(
          batch["image"], offsets[:, 0], flips[:, 0], mean=dataset.mean, std=dataset.std,
          crop_padding=dataset.crop_padding)
    else:
      images = input_pipeline.normalize(batch["image"], dataset.mean, dataset.std)
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
  for i, batch in enumerate(input_pipeline.eval_batches(images, labels, batch_size, rows=rows)):
    batch = batch if place is None else place(batch)
    if key is None:
      pending.append(eval_step(params, batch_stats, batch))
    else:
      pending.append(eval_step(params, batch_stats, batch, key, jnp.int32(i * batch_size)))
  for count in jax.device_get(pending):  # one sync at the end, not one per batch
    correct += int(count)
  return correct / len(labels)


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def _atomic_write(path: str, text: str):
  run_dir.write_text_atomic(path, text)


class MetricsLog:
  """``metrics.jsonl``: one record per epoch, appended and fsynced; truncated on resume.

  ``write=False`` (every process but process 0 of a multi-process run) touches no file.
  """

  def __init__(self, path: str, start_epoch: int, *, write: bool = True):
    self.path, self.write = path, write
    if not write:
      return
    kept = []
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            break  # a line cut by a crash: everything after it is redone
          if record.get("epoch", start_epoch) < start_epoch:
            kept.append(line if line.endswith("\n") else line + "\n")
    _atomic_write(path, "".join(kept))

  def append(self, record: dict):
    if not self.write:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())


def near_zero_fraction(params, sparsity: float, rel: float = 1e-3, *, where=None):
  """Fraction of prunable weights with ``|w| < rel · t`` (``t``: the threshold at ``sparsity``).

  During ART no weight is exactly zero yet; this shows how far the regulariser has pushed the
  weights below the pruning boundary towards zero (it approaches ``sparsity``).
  """
  t = masking.magnitude_threshold(params, sparsity, where=where)
  leaves = masking.prunable_leaves(params, where)
  small = sum(jnp.sum(jnp.abs(x.astype(jnp.float32)) < rel * t) for _, x in leaves)
  return small / masking.num_prunable(leaves)


def _is_terminal(stream) -> bool:
  """Progress bars only on a terminal: in a log file their redraws are noise."""
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


@jax.jit
def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _to_host(tree):
  return distributed.to_host(tree)  # a collective when leaves are sharded over processes


@functools.partial(jax.jit, static_argnames="where")
def _count_zeros(params, where=None):
  return sum(jnp.sum(x == 0) for _, x in masking.prunable_leaves(params, where))


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


# Run state kept in the checkpoint metadata beside the arrays (defaults: a fresh run).
_EXTRA_DEFAULTS = {
    "best_test_accuracy": None, "best_test_epoch": None, "best_val_accuracy": None,
    "best_val_epoch": None, "test_at_best_val": None, "final_test_accuracy": None,
    "final_val_accuracy": None, "final_epoch": None, "art_epochs": 0, "lambda_final": 0.0,
    "finished": False, "art_best_epoch": None, "stop_reason": None, "ft_start": None,
    "dense_test_accuracy": None, "dense_test_bits_per_byte": None,
    "test_bits_at_best_val": None, "final_test_bits_per_byte": None}


class Trainer:
  """One ART run: owns the model, data, steps, controller and checkpoints of ``outdir``.

  ``on_epoch(record)``, if given, is called after every epoch's checkpoint is saved, with that
  epoch's ``metrics.jsonl`` record; an exception it raises (e.g. ``optuna.TrialPruned``) leaves
  :meth:`run` and the run stays resumable from that checkpoint.
  """

  def __init__(self, config: TrainConfig, outdir: str, *, progress: bool = True,
               log=print, devices: Optional[int] = None, shard_params: bool = False,
               on_epoch=None):
    config.validate()
    # Several processes: process 0 speaks and writes files; the others compute alike, silently.
    self.primary = distributed.is_primary()
    log = log if self.primary else (lambda *_: None)
    self.cfg, self.outdir, self.progress, self.log = config, outdir, progress and self.primary, log
    self.epoch = None  # the epoch being trained (for the message of an interrupted run)
    self.on_epoch = on_epoch
    # devices: None = all local devices, 1 = no mesh (plain single-device arrays).
    self.mesh = None
    if jax.process_count() > 1 and devices is not None:
      raise ValueError(f"--devices {devices} is for single-process runs; with several processes "
                       "every process uses all its local devices (leave --devices out)")
    if devices is None and jax.device_count() > 1 or devices is not None and devices > 1:
      self.mesh = sharding.make_mesh(devices)
      sharding.check_batch_size(config.batch_size, self.mesh, "--batch-size")
    elif devices is not None and devices < 1:
      raise ValueError(f"--devices must be >= 1, got {devices}")
    self.fsdp = bool(shard_params) and self.mesh is not None
    n = 1 if self.mesh is None else sharding.num_shards(self.mesh)
    self.eval_batch_size = -(-config.eval_batch_size // n) * n  # padding only: same accuracy
    # prunable leaves: the library default (kernels), or with the transformer's embedding
    self.where = models.transformer_where(config.prune_embeddings)
    self.bits_per_byte = {}  # text: the latest evaluation's bits per byte, by split
    if config.is_text:
      self._init_text_data(config)
    else:
      # several processes: each reads only the records of its own rows (same batches)
      self.dataset = input_pipeline.load_dataset(config.dataset, config.data_dir,
                                                 config.download, lazy=jax.process_count() > 1)
      if config.val_fraction > 0:
        self.dataset = input_pipeline.with_validation_split(self.dataset, config.val_fraction,
                                                            seed=config.seed)
      self.model = models.create_model(
          config.model, num_classes=self.dataset.num_classes, depth=config.depth,
          batch_norm=config.batch_norm)
      self.steps_per_epoch = input_pipeline.steps_per_epoch(self.dataset.num_train,
                                                            config.batch_size)
      example = jnp.zeros((1,) + self.dataset.image_shape, jnp.float32)
    self.key = jax.random.PRNGKey(config.seed)
    if config.is_text:
      example = jnp.zeros((1, config.context), jnp.int32)
    variables = jax.jit(functools.partial(self.model.init, train=False))(
        jax.random.fold_in(self.key, 0), example)
    self.params = variables["params"]
    self.batch_stats = variables.get("batch_stats", {})
    if config.init_from:
      self.params, self.batch_stats = self._load_init(config.init_from)
    masking.prunable_leaves(self.params, self.where)
    self.num_weights = masking.num_prunable(masking.prunable_leaves(self.params, self.where))
    self.art_tx = optax.chain(
        art_lib.art(config.sparsity, config.lambda_init, config.eta,
                    steps_per_epoch=self.steps_per_epoch, warmup_epochs=config.warmup_epochs,
                    penalty=config.penalty, where=self.where),
        make_optimizer(config, config.lr))
    if config.is_text:
      self.eval_step = self.pruned_eval_step = text_lib.make_eval_step(self.model)
    else:
      self.eval_step = make_eval_step(self.model, self.dataset)
      self.pruned_eval_step = make_eval_step(self.model, self.dataset,
                                             augmented=config.pruned_eval == "augmented")
    where = self.where
    self.mask_fn = jax.jit(lambda p: masking.magnitude_mask(p, config.sparsity, where=where))
    # one program, not one per leaf: eager ops on arrays of several processes compile each
    self.prune_fn = jax.jit(lambda p: masking.apply_mask(p, masking.magnitude_mask(
        p, config.sparsity, where=where)))
    self.near_zero_fn = jax.jit(lambda p: near_zero_fraction(p, config.sparsity, where=where))
    self.ckpt = checkpointing.RunCheckpoints(os.path.join(outdir, "checkpoints"))
    self.params, self.batch_stats = self.place(self.params), self.place(self.batch_stats)

  def _init_text_data(self, cfg):
    """``--dataset pysource``: the corpus, its fixed windows and the transformer."""
    self.dataset = text_lib.load_pysource(cfg.data_dir, context=cfg.context,
                                          max_eval_windows=cfg.eval_windows)
    # per-epoch monitoring on --eval-windows windows; the headline figures on every window
    self.text_windows = {"val": self.dataset.eval_windows("val"),
                         "test": self.dataset.eval_windows("test"),
                         "pruned": self.dataset.pruned_eval_windows(),
                         "test_full": text_lib.fixed_windows(self.dataset.test, cfg.context)}
    self.model = models.create_model(
        cfg.model, num_classes=text_lib.VOCAB_SIZE,
        transformer={k: getattr(cfg, k) for k in TRANSFORMER_KEYS})
    self.steps_per_epoch = cfg.steps_per_epoch

  def _text_eval(self, split, params):
    result = text_lib.evaluate(self.eval_step, params, self.text_windows[split],
                               self.eval_batch_size, self.place_batch,
                               rows=self.rows(self.eval_batch_size))
    self.bits_per_byte[split] = result["bits_per_byte"]
    return result["accuracy"]

  # ----- placement on the mesh (identity without one) -----

  def shardings(self, tree):
    if self.mesh is None:
      return None
    return sharding.state_shardings(tree, self.mesh, fsdp=self.fsdp)

  def place(self, tree):
    """Replicates ``tree`` over the mesh, or shards it FSDP-style with ``--shard-params``."""
    return tree if self.mesh is None else sharding.put(tree, self.shardings(tree))

  def place_batch(self, batch):
    """Places a batch (this process's rows of it, see :meth:`rows`) on the mesh."""
    return batch if self.mesh is None else sharding.shard_batch(batch, self.mesh)

  def rows(self, global_size):
    """This process's rows of a global batch of ``global_size`` (all rows with one process)."""
    if self.mesh is None:
      return None
    return sharding.process_rows(self.mesh, global_size)

  def sparsity(self, params) -> float:
    """:func:`masking.sparsity`, computed where the parameters lie (any sharding)."""
    return int(_count_zeros(params, where=self.where)) / self.num_weights

  def _restore_target(self, meta):
    """The template of ``meta`` as ShapeDtypeStructs with this run's shardings (any mesh)."""
    template = self._template(meta)
    if self.mesh is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      return sharding.abstract(template, jax.tree.map(lambda _: device, template))
    return sharding.abstract(template, self.shardings(template))

  def _make_step(self, tx, params):
    state = {"params": params, "batch_stats": self.batch_stats,
             "opt_state": jax.eval_shape(tx.init, params)}  # shapes fix the shardings
    if self.cfg.is_text:
      return text_lib.make_train_step(self.model, tx, state_shardings=self.shardings(state))
    return make_train_step(self.model, tx, self.dataset, state_shardings=self.shardings(state))

  # ----- pieces -----

  def _load_init(self, path):
    source = init_source.identify(path)
    if source.format == "torch":  # a PyTorch checkpoint of the reference code
      from hypersparse_jax import torch_import
      variables = torch_import.load_torch_checkpoint(path, self.model)
    else:
      ckpt = checkpointing.RunCheckpoints(source.directory, create=False)
      kind = source.kind or ("best" if ckpt.steps("best") else "latest")
      step = source.step if source.step is not None else (ckpt.steps(kind) or [None])[-1]
      if step is None or step not in ckpt.steps(kind):
        raise FileNotFoundError(f"--init-from {path!r} holds no readable {kind} checkpoint")
      if kind != "latest":  # best and init hold {params, batch_stats}; latest the whole state
        restored = ckpt.restore_state(kind, step, {"params": self.params,
                                                   "batch_stats": self.batch_stats})
      else:
        restored = ckpt.restore_state(kind, step,
                                      self._template(ckpt.restore_meta(kind, step)))["train"]
      variables = {"params": restored["params"], "batch_stats": restored["batch_stats"]}
    return variables["params"], variables.get("batch_stats", {})

  def finetune_tx(self, mask):
    cfg = self.cfg
    boundaries = {int(s) * self.steps_per_epoch: cfg.lr_decay for s in cfg.lr_steps}
    schedule = optax.piecewise_constant_schedule(cfg.lr, boundaries)
    return optax.chain(art_lib.fixed_mask(mask), make_optimizer(cfg, schedule))

  def _template(self, meta):
    """The pytree a checkpoint with ``meta`` restores into."""
    params, stats = self.params, self.batch_stats
    if meta["phase"] == "finetune":
      mask = jax.tree.map(lambda x: jnp.ones(x.shape, bool), params)
      opt_state = self.finetune_tx(mask).init(params)
    else:
      opt_state = self.art_tx.init(params)
    payload = {"params": params, "batch_stats": stats}
    controller = {name: payload for name in meta.get("payloads", [])}
    return {"train": {"params": params, "batch_stats": stats, "opt_state": opt_state},
            "controller": controller}

  def _save(self, phase, epoch, state, controller, extra):
    meta_c, payloads = controller.state_dict() if controller is not None else (None, {})
    meta = dict(extra, phase=phase, epoch=epoch, controller=meta_c, payloads=sorted(payloads))
    self.ckpt.save("latest", epoch, {"train": state, "controller": payloads}, meta)
    self.epoch = epoch + 1  # where a resume starts now

  def _train_epoch(self, train_step, state, epoch, desc):
    from tqdm.auto import tqdm
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    rows = self.rows(self.cfg.batch_size)
    if self.cfg.is_text:
      source = text_lib.train_batches(self.dataset, self.cfg.batch_size, self.steps_per_epoch,
                                      seed=self.cfg.seed, epoch=epoch, rows=rows)
    else:
      source = input_pipeline.train_batches(self.dataset, self.cfg.batch_size,
                                            seed=self.cfg.seed, epoch=epoch, rows=rows)
    batches = input_pipeline.prefetch(
        source, transfer=None if self.mesh is None else self.place_batch)
    epoch_key = jax.random.fold_in(self.key, epoch + 1)
    bar = tqdm(batches, total=self.steps_per_epoch, desc=desc, leave=False,
               disable=not (self.progress and _is_terminal(sys.stderr)), dynamic_ncols=True)
    pending = []
    for i, batch in enumerate(bar):
      if checkpointing.interrupt_pending():  # Ctrl-C whose KeyboardInterrupt was swallowed
        raise KeyboardInterrupt
      state, metrics = train_step(state, batch, jax.random.fold_in(epoch_key, i))
      pending.append(metrics)
      if len(pending) >= 20 or i == self.steps_per_epoch - 1:  # sync rarely: no host stall
        for m in jax.device_get(pending):
          for k in totals:
            totals[k] += float(m[k])
        pending = []
        bar.set_postfix(loss=f"{totals['loss_sum'] / max(totals['count'], 1):.4f}",
                        acc=f"{totals['correct'] / max(totals['count'], 1):.4f}")
    bar.close()
    count = max(totals["count"], 1.0)
    return state, totals["loss_sum"] / count, totals["correct"] / count

  def _check_finite(self, state, loss, epoch, phase):
    """Raises :class:`TrainingDiverged` (before anything of this epoch is saved) if the epoch's
    loss or the new parameters / batch statistics are not finite."""
    finite = bool(_all_finite({"params": state["params"], "batch_stats": state["batch_stats"]}))
    if finite and math.isfinite(loss):
      return
    cfg = self.cfg
    what = "the loss" if not math.isfinite(loss) else "the parameters"
    if phase == "art":
      lam = float(state["opt_state"][0].lambda_)
      cause = (f"lambda {lam:.3g} (lower --lambda-init {cfg.lambda_init:g} or --eta "
               f"{cfg.eta:g}) or the learning rate (--lr {cfg.lr:g})")
    else:
      cause = f"the learning rate (lower --lr {cfg.lr:g}; --momentum {cfg.momentum:g})"
    kept = self.ckpt.steps("latest")
    raise TrainingDiverged(
        f"training diverged at epoch {epoch} ({phase}): {what} became non-finite (loss "
        f"{loss:.4g}); likely cause: {cause}. Nothing of epoch {epoch} was saved; the last good "
        "checkpoint is " + (f"epoch {kept[-1]}" if kept else "the initial weights") + " in "
        f"{self.outdir}/checkpoints; start a new --outdir with smaller values")

  def _test_accuracy(self, params, batch_stats):
    if self.cfg.is_text:
      return self._text_eval("test", params)
    return evaluate(self.eval_step, params, batch_stats, self.dataset.test_images,
                    self.dataset.test_labels, self.eval_batch_size, self.place_batch,
                    rows=self.rows(self.eval_batch_size))

  def _val_accuracy(self, params, batch_stats):
    if self.cfg.is_text:
      return self._text_eval("val", params)
    if self.dataset.val_labels is None:
      return None
    return evaluate(self.eval_step, params, batch_stats, self.dataset.val_images,
                    self.dataset.val_labels, self.eval_batch_size, self.place_batch,
                    rows=self.rows(self.eval_batch_size))

  def _pruned_train_accuracy(self, params, batch_stats, epoch):
    """The pruned copy's accuracy on the training data, eval mode; augmented as the training
    loader serves it (a fresh augmentation per epoch, a function of ``(seed, epoch)``), or on
    the clean images with ``pruned_eval='clean'``. Text: next-byte accuracy on the fixed
    training windows of :meth:`hypersparse_jax.text.TextData.pruned_eval_windows` (no
    augmentation: both settings measure the same)."""
    if self.cfg.is_text:
      return self._text_eval("pruned", params)
    key = None
    if self.cfg.pruned_eval == "augmented":
      key = jax.random.fold_in(jax.random.fold_in(self.key, _PRUNED_EVAL_TAG), epoch)
    return evaluate(self.pruned_eval_step, params, batch_stats, self.dataset.train_images,
                    self.dataset.train_labels, self.eval_batch_size, self.place_batch, key,
                    rows=self.rows(self.eval_batch_size))

  # ----- the protocol -----

  def run(self) -> dict:
    cfg = self.cfg
    os.makedirs(self.outdir, exist_ok=True)
    summary_path = os.path.join(self.outdir, "summary.json")
    resumed = self.ckpt.restore_latest("latest", self._restore_target)
    for step, _ in self.ckpt.skipped:
      self.log(f"checkpoint step {step} is unreadable (details in {self.ckpt.error_log}); "
               f"using step {resumed[0]}")
    if resumed is None:
      self.ckpt.save("init", 0, {"params": self.params, "batch_stats": self.batch_stats},
                     {"what": "initial weights"})
      phase, epoch = ("warmup" if cfg.warmup_epochs > 0 else "art"), 0
      state = self.place({"params": self.params, "batch_stats": self.batch_stats,
                          "opt_state": self.art_tx.init(self.params)})
      controller = ARTController(cfg.window, cfg.max_art_epochs, cfg.art_rule)
      extra = dict(_EXTRA_DEFAULTS)
    else:
      step, meta, restored = resumed
      if meta.get("finished") and os.path.exists(summary_path):
        self.log(f"run in {self.outdir} already finished (summary.json): nothing to do")
        with open(summary_path) as f:
          return json.load(f)
      phase, epoch = meta["phase"], meta["epoch"] + 1
      state = restored["train"]
      controller = (ARTController.from_state_dict(meta["controller"], restored["controller"])
                    if meta["controller"] is not None else None)
      if controller is not None and controller.rule != cfg.art_rule:
        raise ValueError(f"{self.outdir} was checkpointed with the {controller.rule!r} window rule "
                         f"(hypersparse-jax 0.1 knew only that one); resume it with --art-rule "
                         f"{controller.rule} or start a new --outdir")
      extra = {k: meta.get(k, v) for k, v in _EXTRA_DEFAULTS.items()}
      self.log(f"resuming {self.outdir} at epoch {epoch} ({phase}) from checkpoint {step}")
    metrics_log = MetricsLog(os.path.join(self.outdir, "metrics.jsonl"), epoch,
                             write=self.primary)

    art_step = self._make_step(self.art_tx, self.params)
    ft_step, ft_start = None, extra["ft_start"]
    if phase == "finetune":
      ft_step = self._make_step(self.finetune_tx(state["opt_state"][0].mask), state["params"])
    total_epochs_hint = cfg.warmup_epochs + cfg.epochs
    while True:
      start = time.time()
      self.epoch = epoch
      record = {"epoch": epoch, "phase": phase}
      if phase in ("warmup", "art"):
        state, loss, train_acc = self._train_epoch(art_step, state, epoch,
                                                   f"{phase} {epoch}")
        self._check_finite(state, loss, epoch, phase)
        lam = float(state["opt_state"][0].lambda_)
        test_acc = self._test_accuracy(state["params"], state["batch_stats"])
        record.update(phase_epoch=epoch if phase == "warmup" else epoch - cfg.warmup_epochs,
                      **{"lambda": lam}, lr=cfg.lr, train_loss=loss, train_accuracy=train_acc,
                      test_accuracy=test_acc,
                      val_accuracy=self._val_accuracy(state["params"], state["batch_stats"]),
                      pruned_train_accuracy=None, window_mean=None, best_window_mean=None,
                      **self._bits_record())
        next_phase = phase
        if epoch + 1 >= cfg.warmup_epochs and phase == "warmup":
          next_phase = "art"
          # the dense model at the end of warm-up: the reference point of the pruned result
          extra["dense_test_accuracy"] = test_acc
          if cfg.is_text:  # on the whole test split, not the monitoring windows
            extra["dense_test_accuracy"] = self._text_eval("test_full", state["params"])
            extra["dense_test_bits_per_byte"] = self.bits_per_byte["test_full"]
        if phase == "art":
          pruned = self.prune_fn(state["params"])
          pruned_acc = self._pruned_train_accuracy(pruned, state["batch_stats"], epoch)
          payload = _to_host({"params": state["params"], "batch_stats": state["batch_stats"]})
          decision = controller.update(epoch, pruned_acc, train_acc, payload)
          # every process decides alone, from global figures: check that they agree
          distributed.check_same([epoch, pruned_acc, train_acc, decision.stop,
                                  decision.best_epoch], f"the ART decision of epoch {epoch}")
          extra["art_epochs"] = controller.epochs_seen
          extra["lambda_final"] = lam
          record.update(pruned_train_accuracy=pruned_acc, window_mean=decision.window_mean,
                        best_window_mean=decision.best_mean)
          if decision.stop:
            extra["stop_reason"], extra["art_best_epoch"] = decision.reason, decision.best_epoch
            next_phase = "finetune"
        record["sparsity"] = self.sparsity(state["params"])
        if phase == "art":  # exact zeros appear only at fine-tuning: show ART's progress
          record["near_zero"] = float(self.near_zero_fn(state["params"]))
        record["time"] = time.time() - start
        metrics_log.append(record)
        self._log_epoch(record)
        if next_phase == "finetune":
          self.log(decision.message)  # after the line of the epoch it refers to
          best = controller.best.payload
          params = self.place(jax.tree.map(jnp.asarray, best["params"]))
          mask = self.mask_fn(params)
          params = jax.jit(masking.apply_mask)(params, mask)
          tx = self.finetune_tx(mask)
          state = self.place({"params": params,
                              "batch_stats": jax.tree.map(jnp.asarray, best["batch_stats"]),
                              "opt_state": tx.init(params)})
          ft_step = self._make_step(tx, params)
          ft_start = epoch + 1
          report = masking.sparsity_report(*_to_host((params, mask)), where=self.where)
          self.log(str(report))
          controller = None
        extra["ft_start"] = ft_start
        self._save(next_phase, epoch, state, controller, extra)
        if checkpointing.interrupt_pending():
          raise KeyboardInterrupt
        if self.on_epoch is not None:
          self.on_epoch(record)
        phase = next_phase
      else:
        ft_epoch = epoch - ft_start
        if ft_epoch >= cfg.epochs:
          break
        state, loss, train_acc = self._train_epoch(ft_step, state, epoch, f"finetune {ft_epoch}")
        self._check_finite(state, loss, epoch, phase)
        test_acc = self._test_accuracy(state["params"], state["batch_stats"])
        val_acc = self._val_accuracy(state["params"], state["batch_stats"])
        lr = cfg.lr * cfg.lr_decay ** sum(ft_epoch >= s for s in cfg.lr_steps)
        record.update(phase_epoch=ft_epoch, **{"lambda": 0.0}, lr=lr, train_loss=loss,
                      train_accuracy=train_acc, pruned_train_accuracy=None, test_accuracy=test_acc,
                      val_accuracy=val_acc, window_mean=None, best_window_mean=None,
                      sparsity=self.sparsity(state["params"]),
                      **self._bits_record(), time=time.time() - start)
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        # the reference's convention: the fine-tune epoch with the best test accuracy
        if extra["best_test_accuracy"] is None or test_acc > extra["best_test_accuracy"]:
          extra["best_test_accuracy"], extra["best_test_epoch"] = test_acc, epoch
          self.ckpt.save("best", epoch, variables, {"test_accuracy": test_acc, "epoch": epoch})
        # ours: the epoch with the best validation accuracy (test accuracy only reported)
        if val_acc is not None and (extra["best_val_accuracy"] is None
                                    or val_acc > extra["best_val_accuracy"]):
          extra.update(best_val_accuracy=val_acc, best_val_epoch=epoch,
                       test_at_best_val=test_acc,
                       test_bits_at_best_val=record.get("test_bits_per_byte"))
          self.ckpt.save("best_val", epoch, variables,
                         {"val_accuracy": val_acc, "test_accuracy": test_acc, "epoch": epoch})
        extra["final_test_accuracy"], extra["final_val_accuracy"] = test_acc, val_acc
        extra["final_test_bits_per_byte"] = record.get("test_bits_per_byte")
        extra["final_epoch"] = epoch
        metrics_log.append(record)
        self._log_epoch(record)
        if ft_epoch + 1 >= cfg.epochs:
          extra["finished"] = True
        self._save("finetune", epoch, state, None, extra)
        if self.on_epoch is not None:
          self.on_epoch(record)
        if extra["finished"]:
          break
      epoch += 1
      if epoch > total_epochs_hint + cfg.max_art_epochs + 1:
        raise RuntimeError("internal error: epoch counter ran past every phase")
    return self._finish(state, extra)

  def _finish(self, state, extra):
    cfg = self.cfg
    params, stats, mask = _to_host((state["params"], state["batch_stats"],
                                    state["opt_state"][0].mask))
    variables = {"params": params, "batch_stats": stats} if stats else {"params": params}
    export = dict.fromkeys(("dense_bytes", "sparse_bytes", "compression_ratio"))
    if self.primary:  # the others return process 0's summary (below)
      export = sparse_export.export_sparse(variables, mask,
                                           os.path.join(self.outdir, "model_sparse.npz"))
    report = masking.sparsity_report(params, where=self.where)
    by_val = extra["best_val_epoch"] is not None
    summary = {
        "dataset": cfg.dataset, "model": cfg.model, "depth": cfg.depth,
        "penalty": cfg.penalty, "seed": cfg.seed,
        "sparsity_target": cfg.sparsity, "sparsity_achieved": report.sparsity,
        # the headline: chosen without looking at the test set
        "test_accuracy": extra["test_at_best_val"] if by_val else extra["final_test_accuracy"],
        "selection": "best_val" if by_val else "final",
        "selected_epoch": extra["best_val_epoch"] if by_val else extra["final_epoch"],
        "val_accuracy": extra["best_val_accuracy"] if by_val else extra["final_val_accuracy"],
        "best_val_accuracy": extra["best_val_accuracy"],
        # the reference's convention (best fine-tune epoch on the test set): its tables' figure
        "best_test_accuracy": extra["best_test_accuracy"],
        "best_test_epoch": extra["best_test_epoch"],
        "final_test_accuracy": extra["final_test_accuracy"],
        "val_fraction": cfg.val_fraction, "num_train": self.dataset.num_train,
        "num_val": self.dataset.num_val, "num_test": self.dataset.num_test,
        "art_rule": cfg.art_rule, "pruned_eval": cfg.pruned_eval,
        "art_epochs": extra["art_epochs"],
        "art_best_epoch": extra["art_best_epoch"], "stop_reason": extra["stop_reason"],
        "lambda_final": extra["lambda_final"], "num_weights": report.total,
        "num_nonzero_weights": report.kept, "dense_bytes": export["dense_bytes"],
        "sparse_bytes": export["sparse_bytes"], "compression_ratio": export["compression_ratio"],
        "dense_test_accuracy": extra["dense_test_accuracy"],
    }
    if cfg.is_text:
      summary.update(self._text_summary(params, extra))
    summary = distributed.allgather_json(summary)[0]  # process 0's
    if self.primary:
      _atomic_write(os.path.join(self.outdir, "summary.json"),
                    json.dumps(summary, indent=2) + "\n")
    self.log(str(report))
    self.log("summary: " + json.dumps({k: summary[k] for k in (
        "test_accuracy", "selection", "best_test_accuracy", "sparsity_achieved", "art_epochs",
        "compression_ratio") + (("test_bits_per_byte", "dense_test_bits_per_byte")
                                if cfg.is_text else ())}))
    return summary

  def _bits_record(self):
    """Text: the bits per byte of this epoch's evaluations (``{}`` for images)."""
    if not self.cfg.is_text:
      return {}
    return {f"{split}_bits_per_byte": self.bits_per_byte.get(split)
            for split in ("test", "val")}

  def _text_summary(self, params, extra):
    """The final model on the whole test split: the headline, no selection (the per-epoch
    figures in metrics.jsonl, and val_accuracy here, are on the --eval-windows windows)."""
    cfg = self.cfg
    test_acc = self._text_eval("test_full", params)
    return {
        "test_accuracy": test_acc, "test_bits_per_byte": self.bits_per_byte["test_full"],
        "val_accuracy": extra["final_val_accuracy"],
        "selection": "final", "selected_epoch": extra["final_epoch"],
        "monitor_final_test_bits_per_byte": extra["final_test_bits_per_byte"],
        "dense_test_bits_per_byte": extra["dense_test_bits_per_byte"],
        "accuracy_is": "next-byte accuracy",
        "transformer": {k: getattr(cfg, k) for k in TRANSFORMER_KEYS},
        "optimizer": cfg.optimizer, "prune_embeddings": cfg.prune_embeddings,
        "steps_per_epoch": self.steps_per_epoch,
        "train_windows_per_epoch": self.steps_per_epoch * cfg.batch_size,
        "test_bytes_scored": int(self.text_windows["test_full"].shape[0] * cfg.context),
        "val_bytes_scored": int(self.text_windows["val"].shape[0] * cfg.context),
        "monitor_windows": int(self.text_windows["test"].shape[0]),
        "pruned_eval_windows": int(self.text_windows["pruned"].shape[0]),
        "corpus": self.dataset.info,
    }

  def _log_epoch(self, r):
    pruned = r.get("pruned_train_accuracy")
    self.log(f"epoch {r['epoch']:3d} {r['phase']:<8} lambda {r['lambda']:.3g} "
             f"loss {r['train_loss']:.4f} train {r['train_accuracy']:.4f} "
             + (f"pruned {pruned:.4f} " if pruned is not None else "")
             + f"test {r['test_accuracy']:.4f} "
             + (f"bits/byte {r['test_bits_per_byte']:.4f} "
                if r.get("test_bits_per_byte") is not None else "")
             + f"sparsity {r['sparsity']:.4f} "
             + (f"near-zero {r['near_zero']:.4f} " if r.get("near_zero") is not None else "")
             + f"({r['time']:.1f}s)")


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  """The ``hypersparse-train`` argument parser (unset options are None: presets fill them)."""
  p = argparse.ArgumentParser(
      prog="hypersparse-train",
      description="Adaptive Regularized Training with HyperSparse (warm-up -> ART -> masked "
                  "fine-tuning). Unset options take the dataset's preset: the reference's "
                  "defaults for cifar10/cifar100/tinyimagenet, a small fast preset for digits.",
  )
  ref = REFERENCE_DEFAULTS
  p.add_argument("--dataset", default="digits", choices=DATASETS)
  p.add_argument("--data-dir", default=None, help="TFDS data dir (CIFAR), TinyImageNet folder, "
                 "or pysource's folder of *.py files (default: this Python's standard library)")
  p.add_argument("--download", action="store_true",
                 help="let TFDS download and prepare CIFAR if missing (needs TensorFlow: pip "
                      "install 'hypersparse-jax[download]')")
  p.add_argument("--model", default=None, choices=models.MODEL_NAMES,
                 help=f"reference: {ref['model']}; digits: mlp")
  p.add_argument("--depth", type=int, default=None, help="ResNet 6n+2 or VGG 11/13/16/19 "
                 f"(reference: {ref['depth']})")
  p.add_argument("--no-batch-norm", dest="batch_norm", action="store_false", default=None,
                 help="VGG/CNN without BatchNorm")
  p.add_argument("--sparsity", type=float, default=None, help=f"prune rate κ in [0, 1) "
                 f"(default {ref['sparsity']})")
  p.add_argument("--penalty", default=None, choices=("hypersparse", "l1", "l2"))
  p.add_argument("--lambda-init", type=float, default=None,
                 help=f"reference: {ref['lambda_init']}; digits: {DIGITS_PRESET['lambda_init']}")
  p.add_argument("--eta", type=float, default=None,
                 help=f"λ growth per epoch (reference: {ref['eta']}; digits: {DIGITS_PRESET['eta']})")
  p.add_argument("--window", type=int, default=None, help="b: window of 2b+1 epochs (reference 1)")
  p.add_argument("--warmup-epochs", type=int, default=None,
                 help=f"reference: {ref['warmup_epochs']}; digits: {DIGITS_PRESET['warmup_epochs']}")
  p.add_argument("--epochs", type=int, default=None, help="fine-tune epochs "
                 f"(reference: {ref['epochs']}; digits: {DIGITS_PRESET['epochs']})")
  p.add_argument("--max-art-epochs", type=int, default=None,
                 help="cap on regularisation epochs (the reference has none)")
  p.add_argument("--batch-size", type=int, default=None, help=f"reference: {ref['batch_size']}")
  p.add_argument("--eval-batch-size", type=int, default=None)
  p.add_argument("--lr", type=float, default=None, help=f"reference: {ref['lr']}")
  p.add_argument("--lr-decay", type=float, default=None, help=f"reference: {ref['lr_decay']}")
  p.add_argument("--lr-steps", type=int, nargs="*", default=None,
                 help=f"fine-tune epochs where lr *= lr-decay (reference: {list(ref['lr_steps'])})")
  p.add_argument("--weight-decay", type=float, default=None, help=f"reference: {ref['weight_decay']}")
  p.add_argument("--momentum", type=float, default=None, help=f"reference: {ref['momentum']}")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--val-fraction", type=float, default=0.0,
                 help="hold this fraction of the training data out (seeded) and report the test "
                      "accuracy of the fine-tune epoch with the best validation accuracy "
                      "(default 0: all training data, as the reference; the final epoch is "
                      "reported)")
  p.add_argument("--art-rule", default="reference", choices=RULES,
                 help="ART window rule: 'reference' (the authors' code: the window mean must "
                      "beat the remembered entry's own pruned accuracy) or 'best_mean' (beat the "
                      "best window mean so far)")
  p.add_argument("--pruned-eval", default="augmented", choices=PRUNED_EVALS,
                 help="data for the pruned copy's accuracy in ART: 'augmented' training batches "
                      "as the reference's training loader serves them (default) or 'clean' images")
  tr = PYSOURCE_PRESET
  p.add_argument("--layers", type=int, default=None,
                 help=f"transformer blocks (pysource: {tr['layers']})")
  p.add_argument("--d-model", type=int, default=None,
                 help=f"transformer width (pysource: {tr['d_model']})")
  p.add_argument("--heads", type=int, default=None,
                 help=f"attention heads, dividing --d-model (pysource: {tr['heads']})")
  p.add_argument("--context", type=int, default=None,
                 help=f"bytes the transformer reads (pysource: {tr['context']})")
  p.add_argument("--prune-embeddings", action="store_true", default=None,
                 help="transformer: also prune the token embedding (= the output layer); by "
                      "default only the attention and MLP kernels are prunable")
  p.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                 help="sgd (momentum; the reference's and the image presets') or adamw "
                      "(--momentum is its beta1; pysource's default)")
  p.add_argument("--steps-per-epoch", type=int, default=None,
                 help=f"pysource: batches of random windows per epoch ({tr['steps_per_epoch']})")
  p.add_argument("--eval-windows", type=int, default=None,
                 help="pysource: evaluate validation / test on at most this many evenly spaced "
                      f"fixed windows ({tr['eval_windows']}; 0: all)")
  p.add_argument("--outdir", default=None, help="run directory, one run at a time (default "
                 "runs/<dataset>-<model><depth>-<penalty>-<sparsity>); the same command on it "
                 "again resumes")
  p.add_argument("--init-from", default=None,
                 help="start from a hypersparse-jax run dir, its checkpoints/ or checkpoints/best "
                      "(or .../best/STEP), or a reference PyTorch .pth(.tar)")
  p.add_argument("--devices", type=int, default=None,
                 help="devices for data-parallel training (default: all local devices; 1: no "
                      "mesh); --batch-size must divide by it")
  p.add_argument("--shard-params", action="store_true",
                 help="FSDP: also shard large parameters and optimiser state over the devices")
  g = p.add_argument_group(
      "several processes (hosts)",
      "Start the same command, with the same --outdir on a shared file system, once per process "
      "(host); each process feeds its own part of every global batch, process 0 writes the "
      "files. See the README's launch recipes.")
  g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                 help="process 0's host and a free port, the same for every process")
  g.add_argument("--num-processes", type=int, default=None, help="number of processes N")
  g.add_argument("--process-id", type=int, default=None, help="this process, in [0, N)")
  g.add_argument("--distributed", action="store_true",
                 help="let JAX detect the three options above (SLURM, Open MPI, TPU pods)")
  g.add_argument("--heartbeat-timeout", type=int, default=distributed.HEARTBEAT_TIMEOUT_S,
                 help="seconds after which a silent process counts as dead and the others stop "
                      f"(default {distributed.HEARTBEAT_TIMEOUT_S})")
  p.add_argument("--no-progress", dest="progress", action="store_false",
                 help="no progress bars")
  p.add_argument("--plot", action="store_true", help="draw curves.png at the end")
  p.add_argument("--no-retain-host-memory", dest="retain_host_memory", action="store_false",
                 help="let glibc return freed memory to the OS (default: keep it, which saves "
                      "XLA:CPU's per-step page faults; see hypersparse_jax.host_memory)")
  return p


def config_from_args(args) -> TrainConfig:
  """A :class:`TrainConfig` from parsed arguments over the dataset's preset (see module doc)."""
  preset = PRESETS.get(args.dataset, REFERENCE_DEFAULTS)
  values = dict(preset)
  for name in list(values) + ["penalty"]:
    given = getattr(args, name, None)
    if given is not None:
      values[name] = given
  if args.model is not None and args.depth is None and args.model in ("mlp", "cnn"):
    values["depth"] = None
  if args.model == "vgg" and args.depth is None:
    values["depth"] = 19
  if values.get("eval_windows") == 0:  # 0 on the command line: every window
    values["eval_windows"] = None
  if args.lr_steps is None:  # the preset's steps that fall within --epochs (others never fire)
    values["lr_steps"] = [s for s in values["lr_steps"] if s < values["epochs"]]
  values["lr_steps"] = tuple(values["lr_steps"])
  if args.dataset == "digits":  # bundled: no data folder, no download
    data_dir, download = None, False
  else:
    data_dir, download = _normalized_path(args.data_dir), args.download
  return TrainConfig(dataset=args.dataset, data_dir=data_dir, download=download,
                     seed=args.seed, init_from=_normalized_path(args.init_from),
                     val_fraction=args.val_fraction, art_rule=args.art_rule,
                     pruned_eval=args.pruned_eval, **values)


def default_outdir(cfg: TrainConfig) -> str:
  return os.path.join(
      "runs", f"{cfg.dataset}-{cfg.model}{cfg.depth or ''}-{cfg.penalty}-{cfg.sparsity:g}")


def _check_resumable(outdir: str, config: dict) -> None:
  config_path = os.path.join(outdir, "config.json")
  if not os.path.exists(config_path):
    return
  try:
    with open(config_path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{config_path} is unreadable ({e}); use another --outdir") from None
  diff = resume_differences(saved, config)
  if diff:
    raise ValueError(f"{outdir} holds a run with another configuration {diff} "
                     "(saved, requested); use another --outdir")


# Library messages name Python arguments; the command line names its options.
_CLI_TERMS = ((re.compile(r"\bdata_dir="), "--data-dir "), (re.compile(r"\bdownload=True\b"),
                                                            "--download"))


def _in_cli_terms(message: str) -> str:
  for pattern, option in _CLI_TERMS:
    message = pattern.sub(option, message)
  return message


_START_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, run_dir.RunDirBusy)


def _start(args, several: bool):
  """``(config, outdir, config dict, lock)`` of a run: options checked, run directory locked.

  With several processes, only process 0 takes the run-directory lock (the others work in the
  same directory as its helpers) and checks the directory; then every process learns every
  other's options and errors (:func:`distributed.check_agreement`), so a process started with
  other options than its peers, or a start-up error on any of them, stops them all alike.
  """
  lock, error, config, outdir = None, None, None, None
  try:
    cfg = config_from_args(args)
    cfg.validate()
    check_devices(args.devices, args.shard_params)
    outdir = args.outdir or default_outdir(cfg)
    run_dir.check_outdir(outdir)
    config = dataclasses.asdict(cfg)
    config["lr_steps"] = list(cfg.lr_steps)
    if distributed.is_primary():
      lock = run_dir.RunDirLock(outdir).acquire()
      _check_resumable(outdir, config)
  except _START_ERRORS as e:
    if lock is not None:
      lock.release()
    if not several:
      raise
    error = _in_cli_terms(str(e))
  if several:
    options = dict(config or {}, outdir=_normalized_path(outdir) if outdir else None,
                   shard_params=args.shard_params, num_processes=jax.process_count())
    try:
      distributed.check_agreement(distributed.allgather_json({"config": options,
                                                              "error": error}))
    except ValueError:
      if lock is not None:
        lock.release()
      raise
  return cfg, outdir, config, lock


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs ``hypersparse-train``; returns the exit code (2 with a one-line error on bad input,
  1 when training diverged, 130 when interrupted)."""
  argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
  args = build_parser().parse_args(argv)
  try:
    several = distributed.check_options(args.coordinator_address, args.num_processes,
                                        args.process_id, args.distributed)
    if several and args.heartbeat_timeout < 1:
      raise ValueError(f"--heartbeat-timeout must be >= 1 (seconds), got {args.heartbeat_timeout}")
  except ValueError as e:
    print(f"hypersparse-train: error: {e}", file=sys.stderr)
    return 2
  if several and not os.environ.get(distributed.WORKER_ENV):
    who = "this process" if args.process_id is None else f"process {args.process_id}"
    return distributed.supervise(argv, "hypersparse-train", who)
  if args.retain_host_memory:
    host_memory.retain_freed_memory(warn=False)  # before JAX's first computation
  lock, trainer, previous_sigint = None, None, None
  if threading.current_thread() is threading.main_thread():
    checkpointing.clear_interrupt()
    previous_sigint = signal.signal(signal.SIGINT, checkpointing.on_sigint)
  try:
    if several:
      distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                             heartbeat_timeout=args.heartbeat_timeout)
    cfg, outdir, config, lock = _start(args, several)
    trainer = Trainer(cfg, outdir, progress=args.progress, devices=args.devices,
                      shard_params=args.shard_params)
    config_path = os.path.join(outdir, "config.json")
    if distributed.is_primary() and not os.path.exists(config_path):
      _atomic_write(config_path, json.dumps(config, indent=2) + "\n")
    trainer.run()
    if args.plot and distributed.is_primary():
      from hypersparse_jax import plotting
      print(f"curves: {plotting.plot_run(outdir)}")
    return 0
  except KeyboardInterrupt:
    where = "" if trainer is None or trainer.epoch is None else f" at epoch {trainer.epoch}"
    print(f"hypersparse-train: interrupted{where}; run the same command to resume",
          file=sys.stderr)
    return 130
  except TrainingDiverged as e:
    print(f"hypersparse-train: error: {e}", file=sys.stderr)
    return 1
  except jax.errors.JaxRuntimeError as e:
    if not several:
      raise
    # A collective failed, typically because a peer died: one line, and no exit handshake with
    # peers that will never answer (it would wait SHUTDOWN_TIMEOUT_S, then abort).
    first = run_dir.first_line(e)
    print(f"hypersparse-train: error: process {jax.process_index()}: {first}; if another "
          "process died, run every process again with the same command to resume from the "
          "last checkpoint", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
  except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, run_dir.RunDirBusy,
          checkpointing.CheckpointError, ImportError) as e:
    print(f"hypersparse-train: error: {_in_cli_terms(str(e))}", file=sys.stderr)
    return 2
  finally:
    if lock is not None:
      lock.release()
    if previous_sigint is not None:
      signal.signal(signal.SIGINT, previous_sigint)


if __name__ == "__main__":
  sys.exit(main())
