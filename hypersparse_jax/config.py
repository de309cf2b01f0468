"""The configuration of a ``hypersparse-train`` run: :class:`TrainConfig`, the presets, option
validation and the resume check (which saved options a resumed run must match).

Defaults for CIFAR-10/100 and TinyImageNet are the reference's (ResNet-32, batch 64, SGD lr 0.1,
momentum 0.9, weight decay 1e-4, 60 warm-up epochs, λ_init 5e-6, η 1.05, window b = 1,
160 fine-tune epochs with lr × 0.1 at 80 and 120). The bundled digits and ``pysource`` have
small presets of their own (:data:`PRESETS`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import jax

from hypersparse_jax import data, masking, models
from hypersparse_jax import transform as art_lib
from hypersparse_jax.controller import RULES
from hypersparse_jax.data import pysource

PRUNED_EVALS = ("augmented", "clean")
OPTIMIZERS = ("sgd", "adamw")
TRANSFORMER_KEYS = ("layers", "d_model", "heads", "context")
DATASETS = data.DATASET_NAMES + pysource.TEXT_DATASETS

# Reference defaults (CIFAR / TinyImageNet) and the bundled-digits preset.
REFERENCE_DEFAULTS = dict(
    model="resnet", depth=32, batch_norm=True, sparsity=0.9, penalty="hypersparse",
    lambda_init=5e-6, eta=1.05, window=1, warmup_epochs=60, epochs=160, max_art_epochs=300,
    batch_size=64, lr=0.1, lr_decay=0.1, lr_steps=(80, 120), weight_decay=1e-4, momentum=0.9,
    eval_batch_size=500, layers=None, d_model=None, heads=None, context=None, optimizer="sgd",
    prune_embeddings=False, steps_per_epoch=None, eval_windows=None, augment=True,
    distribution="global", nm=None, structure="weight", width=1.0)
DIGITS_PRESET = dict(
    REFERENCE_DEFAULTS, model="mlp", depth=None, lambda_init=2e-4, eta=1.25, warmup_epochs=10,
    epochs=20, max_art_epochs=40, lr=0.05, lr_steps=(10, 15), eval_batch_size=450)
# Byte-level transformer on the stdlib's source: sized for < 15 min on 2 CPU cores.
PYSOURCE_PRESET = dict(
    REFERENCE_DEFAULTS, model="transformer", depth=None, layers=2, d_model=128, heads=4,
    context=128, optimizer="adamw", lr=3e-3, momentum=0.9, weight_decay=0.01, batch_size=32,
    steps_per_epoch=100, eval_windows=256, eval_batch_size=128, lambda_init=2e-3, eta=2.0,
    warmup_epochs=6, epochs=4, max_art_epochs=6, lr_steps=(2, 3))
# Fashion-MNIST (and MNIST): LeNet-300-100, the fastest real model (a few seconds an epoch on 2
# CPU cores, the whole protocol in a few minutes), trained on the clean images: an MLP sees
# pixels, not shapes, and the reference's random crops (4 px of 28) and flips only cost it
# accuracy (benchmarks/results/fashion_preset.json has both); --model lenet5 --augment is the
# convolutional alternative. λ is per step: 469 steps an epoch at batch 128 need a smaller
# λ_init than the digits (21 steps) for the same pull per epoch.
FASHION_MNIST_PRESET = dict(
    REFERENCE_DEFAULTS, model="lenet300", depth=None, sparsity=0.98, augment=False,
    batch_size=128, eval_batch_size=1000, lr=0.05, lambda_init=2e-5, eta=1.3, warmup_epochs=5,
    max_art_epochs=25, epochs=6, lr_steps=(3, 5))
PRESETS = {"digits": DIGITS_PRESET, "pysource": PYSOURCE_PRESET,
           "fashion_mnist": FASHION_MNIST_PRESET, "mnist": FASHION_MNIST_PRESET}


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
  augment: bool = True             # images: random crop / flip while training (False: clean)
  # --model transformer / --dataset pysource only (None elsewhere)
  layers: Optional[int] = None
  d_model: Optional[int] = None
  heads: Optional[int] = None
  context: Optional[int] = None
  optimizer: str = "sgd"           # 'sgd' (momentum) or 'adamw' (momentum = β1)
  prune_embeddings: bool = False   # transformer: also prune the token embedding
  steps_per_epoch: Optional[int] = None  # text: batches per epoch (images: the data's size)
  eval_windows: Optional[int] = None     # text: cap on validation / test windows
  # where the sparsity goes (hypersparse_jax.budgets): 'global' (the paper's), 'uniform', 'erk'
  distribution: str = "global"
  nm: Optional[str] = None         # an N:M pattern, "2:4" (then sparsity = 1 − N/M)
  structure: str = "weight"        # 'weight' or 'channel' (sparsity: fraction of channels)
  width: float = 1.0               # image models: multiplier of the hidden widths (1: published)

  @property
  def nm_pair(self) -> Optional[tuple]:
    """``nm`` as ``(n, m)``, or None."""
    from hypersparse_jax import budgets
    return None if self.nm is None else budgets.parse_nm(self.nm)

  @property
  def is_text(self) -> bool:
    return self.dataset in pysource.TEXT_DATASETS

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
    if not self.augment:
      raise ValueError(f"--no-augment is for the image datasets "
                       f"({', '.join(data.DATASET_NAMES)}); --dataset {self.dataset} has no "
                       "augmentation to turn off")

  def validate(self):
    """Raises ValueError (one line naming the option, the value and what is allowed) for any
    option that would fail or diverge later, so that nothing fails after epoch 0 for a reason
    known at epoch 0."""
    masking.check_sparsity(self.sparsity)
    from hypersparse_jax import budgets
    if self.distribution not in budgets.DISTRIBUTIONS:
      raise ValueError(f"--distribution must be one of {', '.join(budgets.DISTRIBUTIONS)}, got "
                       f"{self.distribution!r}")
    if self.nm is not None:
      n, m = budgets.parse_nm(self.nm)
      if self.distribution != "global":
        raise ValueError(f"--nm {self.nm} fixes every group's sparsity; it does not combine "
                         f"with --distribution {self.distribution}")
      if not math.isclose(self.sparsity, 1 - n / m, rel_tol=0, abs_tol=1e-9):
        raise ValueError(f"--nm {self.nm} prunes 1 - {n}/{m} = {1 - n / m:g} of the weights; "
                         f"got --sparsity {self.sparsity} (leave --sparsity out)")
    if self.structure not in ("weight", "channel"):
      raise ValueError(f"--structure must be weight or channel, got {self.structure!r}")
    if self.structure == "channel":
      if self.nm is not None:
        raise ValueError(f"--structure channel removes whole channels; it does not combine "
                         f"with --nm {self.nm}")
      if self.distribution == "erk":
        raise ValueError("--structure channel takes --distribution global (one threshold over "
                         "all prunable channels) or uniform (the same fraction from every "
                         "layer), not erk (a budget over weight tensors)")
      if self.penalty == "l2":
        raise ValueError("--structure channel takes --penalty hypersparse or l1 (group "
                         "lasso), not l2")
      if self.model == "transformer":
        raise ValueError("--structure channel is for the image models (their channels are "
                         "known); --model transformer prunes weights")
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
    if self.model in models.FIXED_DEPTH_MODELS and self.depth is not None:
      raise ValueError(f"--depth is not used by --model {self.model} (its depth is fixed), "
                       f"got {self.depth}; leave --depth out")
    models.check_width(self.width)
    if self.width != 1 and self.model == "transformer":
      raise ValueError(f"--width {self.width:g} is for the image models; the transformer's width "
                       "is --d-model")
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
                   "eval_windows": None,
                   # --no-augment came with Fashion-MNIST; runs before it always augmented
                   "augment": True,
                   # per-layer budgets and N:M came after; runs before were global
                   "distribution": "global", "nm": None, "structure": "weight",
                   # --width came with the channel study; runs before it were full width
                   "width": 1.0}


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
