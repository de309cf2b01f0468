"""Sparsity study: ART + HyperSparse against ART + L1 / L2, one-shot and gradual magnitude pruning.

    python benchmarks/study.py                      # bundled digits, 5 sparsities x 3 seeds
    python benchmarks/study.py --quick --out /tmp/s # one seed, two sparsities, a few epochs
    python benchmarks/study.py --data-dir ~/tensorflow_datasets   # CIFAR-10 (reference protocol)
    python benchmarks/study.py --dataset pysource   # byte-level transformer on stdlib code

Each dataset writes to its own folder unless ``--out`` says otherwise:
``benchmarks/results/study`` (digits), ``benchmarks/results/study_cifar10``,
``benchmarks/results/study_pysource``.

On ``pysource`` (a small byte-level transformer, AdamW; see ``PYSOURCE_STUDY``) the methods are
ART + HyperSparse, ART + L1, one-shot, GMP and dense at 90 / 95 / 98 % with 2 seeds, and the
figure is test bits per byte of the final model on the whole test split (lower is better),
with next-byte accuracy beside it.

Methods, per target sparsity κ and seed (all share the initial weights of the seed):

* ``art_hypersparse``, ``art_l1``, ``art_l2``: the full ART protocol of :class:`hypersparse_jax.train.Trainer`
  (warm-up, regularisation until the stop rule or the cap, masked fine-tuning), ``penalty=``.
* ``oneshot``: the dense baseline's trained model, globally magnitude-pruned to κ in one shot
  (:func:`magnitude_mask`), then the same masked fine-tuning as ART (fresh momentum, same lr
  schedule, same number of epochs).
* ``gmp``: gradual magnitude pruning (Zhu & Gupta 2017): after the same dense warm-up, the
  sparsity follows ``s_t = κ (1 − (1 − t/T)^3)`` over ``T`` = as many epochs as ART + HyperSparse
  regularised for this seed and κ; the global magnitude mask is recomputed every
  ``--gmp-every`` steps (default: every epoch) at ``s_t`` (rounded down to 0.01) and applied after every step; then the same masked
  fine-tuning. Its total epoch count therefore equals ART + HyperSparse's.
* ``dense``: dense training for warm-up + fine-tune epochs (lr decayed at the fine-tune
  milestones, counted from the end of warm-up). Independent of κ.

Accuracy is test accuracy of the final fine-tune epoch: the headline, chosen without looking
at the test set. The best over the fine-tune epochs (the paper's and the reference's convention,
which selects the epoch on the test set and so reads optimistic) is reported beside it. Written to ``--out``: ``study.json`` (settings, every run, mean ± std per cell),
``study.md`` (table) and ``study.png`` (accuracy vs sparsity).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ART_METHODS = ("art_hypersparse", "art_l1", "art_l2")
METHODS = ART_METHODS + ("oneshot", "gmp", "dense")
TEXT_ART_METHODS = ("art_hypersparse", "art_l1")
LABELS = {"art_hypersparse": "ART + HyperSparse", "art_l1": "ART + L1", "art_l2": "ART + L2",
          "oneshot": "one-shot magnitude + FT", "gmp": "gradual magnitude (GMP)",
          "dense": "dense baseline"}
SPARSITIES = (0.9, 0.95, 0.98, 0.99, 0.995)
# what a channel-pruned run records of its summary.json (benchmarks/study_channels.py)
CHANNEL_SIZES = ("params_dense", "params_slim", "flops_dense", "flops_slim",
                 "channel_sparsity_achieved", "channels_kept", "slim_model")
SEEDS = (0, 1, 2)

# Digits settings of the study: the digits preset of config.py with fewer epochs, so the whole
# study (5 sparsities x 6 methods x 3 seeds) fits in about an hour on 2 CPU cores.
DIGITS_STUDY = dict(warmup_epochs=8, epochs=12, lr_steps=(6, 9), max_art_epochs=30)
DIGITS_QUICK = dict(warmup_epochs=2, epochs=2, lr_steps=(1,), max_art_epochs=3)
QUICK_SPARSITIES = (0.9, 0.98)
# pysource: a smaller transformer and fewer, shorter epochs than the CLI preset, so that
# 3 sparsities x 2 seeds x 5 methods fit in about an hour on 2 CPU cores.
PYSOURCE_SPARSITIES = (0.9, 0.95, 0.98)
PYSOURCE_SEEDS = (0, 1)
PYSOURCE_STUDY = dict(layers=2, d_model=64, heads=4, context=64, batch_size=32,
                      steps_per_epoch=100, warmup_epochs=5, epochs=4, lr_steps=(2, 3),
                      max_art_epochs=6, eval_windows=256)
PYSOURCE_QUICK = dict(layers=1, d_model=32, heads=2, context=32, batch_size=16,
                      steps_per_epoch=10, warmup_epochs=1, epochs=1, lr_steps=(),
                      max_art_epochs=2, eval_windows=32)


# Fashion-MNIST: the CLI preset's schedule (LeNet-300-100, clean images, 5 warm-up epochs, ART
# until the stop rule or 25 epochs, 6 fine-tune epochs): ~1 min a run on 2 CPU cores.
FASHION_STUDY = dict(warmup_epochs=5, epochs=6, lr_steps=(3, 5), max_art_epochs=25)
# A LeNet-5 epoch costs 56.7 s against LeNet-300-100's 2.05 s on 2 loaded cores
# (results/epoch_times.json), so its study runs a shortened
# schedule: 3 warm-up epochs, λ starting 2.5x higher and growing 1.5x an epoch (ART at most 12
# epochs), 3 fine-tune epochs (lr x 0.1 after 2). ~6 epochs of dense training.
FASHION_STUDY_LENET5 = dict(warmup_epochs=3, epochs=3, lr_steps=(2,), max_art_epochs=12,
                            lambda_init=5e-5, eta=1.5)
# the convolutional models that take it on Fashion-MNIST / MNIST (a VGG there is a narrow one,
# --width 0.25 in the channel study: 1.3x LeNet-5 a step; the full VGG-11 ~40x by multiply-adds)
CONV_MODELS = ("lenet5", "vgg", "resnet")


def art_methods(args):
  return TEXT_ART_METHODS if args.dataset == "pysource" else ART_METHODS


def methods(args_or_dataset):
  dataset = getattr(args_or_dataset, "dataset", args_or_dataset)
  arts = TEXT_ART_METHODS if dataset == "pysource" else ART_METHODS
  return arts + ("oneshot", "gmp", "dense")


def make_config(args, sparsity, penalty, seed):
  from hypersparse_jax import config
  preset = dict(config.PRESETS.get(args.dataset, config.REFERENCE_DEFAULTS))
  if args.dataset == "digits":
    preset.update(DIGITS_QUICK if args.quick else DIGITS_STUDY)
  if args.dataset == "pysource":
    preset.update(PYSOURCE_QUICK if args.quick else PYSOURCE_STUDY)
  if args.dataset in ("fashion_mnist", "mnist"):
    preset.update(DIGITS_QUICK if args.quick else
                  FASHION_STUDY_LENET5 if args.model in CONV_MODELS else FASHION_STUDY)
  if args.augment is not None:
    preset["augment"] = args.augment
  for name in ("model", "depth", "warmup_epochs", "epochs", "max_art_epochs", "lambda_init",
               "eta", "lr_steps", "width"):
    if getattr(args, name, None) is not None:
      preset[name] = getattr(args, name)
  if args.model in ("mlp", "cnn") and args.depth is None:
    preset["depth"] = None
  preset["lr_steps"] = tuple(s for s in preset["lr_steps"] if s < preset["epochs"])
  preset.update(sparsity=sparsity, penalty=penalty)
  for name in ("distribution", "nm", "structure"):  # study_patterns.py, study_channels.py
    if getattr(args, name, None) is not None:
      preset[name] = getattr(args, name)
  fields = {f.name for f in dataclasses.fields(config.TrainConfig)}
  values = {k: v for k, v in preset.items() if k in fields}
  return config.TrainConfig(dataset=args.dataset, data_dir=args.data_dir, seed=seed, **values)


# ------------------------------------------------------------------------------------------------
# Baselines, built from library pieces
# ------------------------------------------------------------------------------------------------


class Baselines:
  """Dense training, one-shot pruning + fine-tuning and GMP for one configuration (per process)."""

  def __init__(self, cfg):
    import jax
    import jax.numpy as jnp
    import optax
    from hypersparse_jax import data, masking, models, train, transform
    from hypersparse_jax.config import TRANSFORMER_KEYS
    from hypersparse_jax.tasks import image as image_task
    from hypersparse_jax.tasks import language_model
    self.jax, self.jnp, self.optax = jax, jnp, optax
    self.masking, self.image_task, self.data = masking, image_task, data
    from hypersparse_jax.data import pysource
    self.pysource, self.lm = pysource, language_model
    self.cfg, self.text = cfg, (pysource if cfg.is_text else None)
    if cfg.is_text:
      self.dataset = pysource.load_pysource(cfg.data_dir, context=cfg.context,
                                        max_eval_windows=cfg.eval_windows)
      self.model = models.create_model(
          cfg.model, num_classes=pysource.VOCAB_SIZE,
          transformer={k: getattr(cfg, k) for k in TRANSFORMER_KEYS})
      self.spe = cfg.steps_per_epoch
      self.eval_step = language_model.make_eval_step(self.model)
      make_step = lambda model, tx, _: language_model.make_train_step(model, tx)  # noqa: E731
      example = jnp.zeros((1, cfg.context), jnp.int32)
    else:
      self.dataset = data.load_dataset(cfg.dataset, cfg.data_dir)
      if not cfg.augment:  # as the image task trains: the clean images
        self.dataset = dataclasses.replace(self.dataset, crop_padding=0, flip=False)
      self.model = models.create_model(cfg.model, num_classes=self.dataset.num_classes,
                                       depth=cfg.depth, batch_norm=cfg.batch_norm,
                                       width=cfg.width)
      self.spe = data.steps_per_epoch(self.dataset.num_train, cfg.batch_size)
      self.eval_step = image_task.make_eval_step(self.model, self.dataset)
      make_step = image_task.make_train_step
      example = jnp.zeros((1,) + self.dataset.image_shape, jnp.float32)
    spe, W = self.spe, cfg.warmup_epochs
    # Dense: constant lr for the warm-up, then the fine-tune decays (so the dense run's state
    # after W epochs is exactly ART's warm-up state, and GMP can start from it).
    dense_sched = optax.piecewise_constant_schedule(
        cfg.lr, {(W + s) * spe: cfg.lr_decay for s in cfg.lr_steps})
    self.dense_tx = train.make_optimizer(cfg, dense_sched)
    self.dense_step = make_step(self.model, self.dense_tx, self.dataset)
    self.ramp_tx = train.make_optimizer(cfg, cfg.lr)
    self.ramp_step = make_step(self.model, self.ramp_tx, self.dataset)
    # Masked fine-tuning exactly as ART's (Trainer.finetune_tx): the mask lives in the optimiser
    # state, so one compiled step serves every mask.
    self.ft_tx = lambda mask: optax.chain(
        transform.fixed_mask(mask), train.make_optimizer(cfg, optax.piecewise_constant_schedule(
            cfg.lr, {s * spe: cfg.lr_decay for s in cfg.lr_steps})))
    init = jax.jit(functools.partial(self.model.init, train=False))
    self.key = jax.random.PRNGKey(cfg.seed)  # as Trainer: same initial weights as ART
    variables = init(jax.random.fold_in(self.key, 0), example)
    self.init_params = variables["params"]
    self.init_stats = variables.get("batch_stats", {})
    ones = jax.tree.map(lambda x: jnp.ones(x.shape, bool), self.init_params)
    self.ft_step = make_step(self.model, self.ft_tx(ones), self.dataset)
    self.apply_mask = jax.jit(masking.apply_mask)

  def initial_state(self, tx):
    """A training state at the initial weights, with ``tx``'s state: copies, since the train
    step donates its state's buffers and the initial weights serve every run of this object
    (a cell that trains its dense model and then network slimming's model, for one)."""
    fresh = lambda tree: self.jax.tree.map(self.jnp.copy, tree)  # noqa: E731
    params = fresh(self.init_params)
    return {"params": params, "batch_stats": fresh(self.init_stats), "opt_state": tx.init(params)}

  def test_accuracy(self, state):
    if self.text is not None:  # per-epoch monitoring windows (as Trainer's metrics.jsonl)
      return self.lm.evaluate(self.eval_step, state["params"], self.dataset.eval_windows("test"),
                                self.cfg.eval_batch_size)["accuracy"]
    return self.image_task.evaluate(self.eval_step, state["params"], state["batch_stats"],
                               self.dataset.test_images, self.dataset.test_labels,
                               self.cfg.eval_batch_size)

  def run_epoch(self, step, state, epoch, after_step=None):
    cfg, jax = self.cfg, self.jax
    epoch_key = jax.random.fold_in(self.key, epoch + 1)
    if self.text is not None:
      batches = self.pysource.train_batches(self.dataset, cfg.batch_size, self.spe, seed=cfg.seed,
                                        epoch=epoch)
    else:
      batches = self.data.train_batches(self.dataset, cfg.batch_size, seed=cfg.seed, epoch=epoch)
    for i, batch in enumerate(batches):
      state, _ = step(state, batch, jax.random.fold_in(epoch_key, i))
      if after_step is not None:
        state = after_step(state, i)
    return state

  def dense(self):
    """Dense baseline (warm-up + fine-tune epochs); returns the result, the warm-up state and
    the final state."""
    cfg, jax = self.cfg, self.jax
    start = time.time()
    state = self.initial_state(self.dense_tx)
    warm, accs = None, []
    for epoch in range(cfg.warmup_epochs + cfg.epochs):
      if epoch == cfg.warmup_epochs:
        warm = jax.tree.map(lambda x: x.copy(), state)
      state = self.run_epoch(self.dense_step, state, epoch)
      if epoch >= cfg.warmup_epochs or cfg.epochs == 0:
        accs.append(self.test_accuracy(state))
    if warm is None:
      warm = jax.tree.map(lambda x: x.copy(), state)
    result = dict(best_test_accuracy=max(accs), final_test_accuracy=accs[-1],
                  sparsity=self.masking.sparsity(state["params"]), art_epochs=None,
                  epochs=cfg.warmup_epochs + cfg.epochs, **self.text_final(state),
                  time=time.time() - start)
    return result, warm, state

  def text_final(self, state):
    """pysource: the final model on the whole test split, as ``summary.json`` of an ART run."""
    if self.text is None:
      return {}
    r = self.lm.evaluate(self.eval_step, state["params"],
                           self.pysource.fixed_windows(self.dataset.test, self.cfg.context),
                           self.cfg.eval_batch_size)
    return {"test_bits_per_byte": r["bits_per_byte"], "test_accuracy": r["accuracy"]}

  def finetune(self, params, batch_stats, mask, first_epoch):
    """ART's masked fine-tuning from ``apply_mask(params, mask)``; returns (state, accuracies)."""
    params = self.apply_mask(params, mask)
    state = {"params": params, "batch_stats": batch_stats,
             "opt_state": self.ft_tx(mask).init(params)}
    accs = []
    for e in range(self.cfg.epochs):
      state = self.run_epoch(self.ft_step, state, first_epoch + e)
      accs.append(self.test_accuracy(state))
    if not accs:
      accs.append(self.test_accuracy(state))
    return state, accs

  def _result(self, state, accs, start, ramp_epochs, epochs):
    return dict(best_test_accuracy=max(accs), final_test_accuracy=accs[-1],
                sparsity=self.masking.sparsity(state["params"]), art_epochs=ramp_epochs,
                epochs=epochs, **self.text_final(state), time=time.time() - start)

  def mask_at(self, params, sparsity):
    """The configuration's pattern at ``sparsity``: the global magnitude mask (the paper's), a
    per-layer budget (``cfg.distribution``), or for ``cfg.nm = N:M`` the mask that keeps
    ``M − floor(sparsity·M)`` of every ``M`` (at least N; GMP's ramp passes through these)."""
    cfg = self.cfg
    if cfg.nm is not None:
      from hypersparse_jax import budgets
      n, m = cfg.nm_pair
      keep = max(n, m - int(np.floor(sparsity * m + 1e-9)))
      if keep >= m:
        return self.jax.tree.map(lambda x: self.jnp.ones(x.shape, bool), params)
      return budgets.nm_mask(params, keep, m)
    return self.masking.magnitude_mask(params, sparsity, distribution=cfg.distribution)

  def oneshot(self, dense_state, sparsity):
    """Prune the trained dense model to ``sparsity`` in one shot, then fine-tune."""
    start = time.time()
    mask = self.mask_at(dense_state["params"], sparsity)
    first = self.cfg.warmup_epochs + self.cfg.epochs
    state, accs = self.finetune(dense_state["params"], dense_state["batch_stats"], mask, first)
    return self._result(state, accs, start, 0, first + self.cfg.epochs)

  def gmp(self, warm_state, sparsity, ramp_epochs, every, with_state=False):
    """Gradual magnitude pruning (Zhu & Gupta 2017) from the warm-up state, then fine-tuning
    (the pattern of :meth:`mask_at`); ``with_state``: ``(result, final state)``."""
    cfg, jax = self.cfg, self.jax
    start = time.time()
    state = jax.tree.map(lambda x: x.copy(), warm_state)
    state["opt_state"] = self.ramp_tx.init(state["params"])  # constant lr while pruning
    total = max(1, ramp_epochs * self.spe)
    holder = {"mask": None, "t": 0}

    def after_step(st, _):
      holder["t"] += 1
      t = holder["t"]
      if holder["mask"] is None or t % every == 0 or t == total:
        s_t = sparsity * (1.0 - (1.0 - min(t, total) / total) ** 3)
        # On a 0.01 grid (rounded down; exactly κ at the end): magnitude_mask compiles once
        # per distinct sparsity (it is slow to compile), and the grid bounds that number.
        s_t = sparsity if t >= total else min(sparsity, np.floor(s_t * 100) / 100)
        holder["mask"] = self.mask_at(st["params"], float(s_t))
      st["params"] = self.apply_mask(st["params"], holder["mask"])
      return st

    for e in range(ramp_epochs):
      state = self.run_epoch(self.ramp_step, state, cfg.warmup_epochs + e, after_step)
    mask = self.mask_at(state["params"], sparsity)  # exactly κ at the end
    first = cfg.warmup_epochs + ramp_epochs
    state, accs = self.finetune(state["params"], state["batch_stats"], mask, first)
    result = self._result(state, accs, start, ramp_epochs, first + cfg.epochs)
    return (result, state) if with_state else result


# ------------------------------------------------------------------------------------------------
# Tasks (run in worker processes)
# ------------------------------------------------------------------------------------------------


def exit_with_parent(poll_seconds=1.0):
  """In a worker process: a daemon thread that ends the process when its parent is gone (a
  study killed by SIGTERM or SIGKILL leaves no orphaned worker computing on; the finished
  methods are in ``.partial/`` already)."""
  import threading
  parent = os.getppid()

  def watch():
    while True:
      time.sleep(poll_seconds)
      if os.getppid() != parent:
        os._exit(1)
  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _worker_init(cache_dir):
  exit_with_parent()
  import jax
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _art_run(args, sparsity, penalty, seed):
  from hypersparse_jax import train
  cfg = make_config(args, sparsity, penalty, seed)
  root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
  outdir = tempfile.mkdtemp(prefix="hs-study-", dir=root)
  start = time.time()
  try:
    summary = train.Trainer(cfg, outdir, progress=False, log=lambda *_: None).run()
  finally:
    shutil.rmtree(outdir, ignore_errors=True)
  extra = {k: summary[k] for k in CHANNEL_SIZES if k in summary}
  if cfg.is_text:
    extra = {k: summary[k] for k in ("test_bits_per_byte", "test_accuracy",
                                     "dense_test_bits_per_byte")}
  return dict(best_test_accuracy=summary["best_test_accuracy"],
              final_test_accuracy=summary["final_test_accuracy"],
              sparsity=summary["sparsity_achieved"], art_epochs=summary["art_epochs"],
              stop_reason=summary["stop_reason"], **extra, time=time.time() - start)


class Partial:
  """The finished methods of a cell not yet in ``study.json`` (``<out>/.partial/``, small JSON
  committed with the results, so that a fresh checkout resumes too): a study stopped in the
  middle of a cell redoes only its unfinished methods. The file also records the settings'
  key, and a file of other settings is ignored."""

  def __init__(self, args, name, key):
    self.path = os.path.join(args.out, ".partial", f"{name}.json")
    self.key, self.results = key, {}
    try:
      with open(self.path) as f:
        saved = json.load(f)
      if same_settings(saved.get("key"), key):
        self.results = saved["results"]
    except (OSError, ValueError, KeyError):
      pass

  def run(self, method, fn):
    if method not in self.results:
      self.results[method] = fn()
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      tmp = f"{self.path}.{os.getpid()}.tmp"
      with open(tmp, "w") as f:
        json.dump({"key": self.key, "results": self.results}, f)
      os.replace(tmp, self.path)
    return self.results[method]

  @staticmethod
  def drop(out, name):
    """Remove the file of cell ``name`` once its runs are in ``study.json``: the main process
    does it after writing, not the worker, so that a study stopped in between (or a failed
    sibling cell) loses nothing."""
    try:
      os.remove(os.path.join(out, ".partial", f"{name}.json"))
    except OSError:
      pass


def finished(futures, failures):
  """The results of ``futures`` as they finish. A failed one is told in one line and appended
  to ``failures``; the others are still yielded, so that one cell's crash does not lose the
  cells that run beside it (its own finished methods stay in ``.partial/``)."""
  for fut in concurrent.futures.as_completed(futures):
    try:
      yield fut.result()
    except Exception as e:  # noqa: BLE001 -- told, counted and turned into the exit status
      failures.append(e)
      print(f"a cell failed ({type(e).__name__}: {e}); the others go on, and a rerun redoes only "
            "its unfinished methods", file=sys.stderr, flush=True)


def partial_name(sparsity, seed):
  """The ``.partial/`` name of the cell (κ, seed) of this study."""
  return f"k{sparsity:g}_s{seed}"


def same_settings(old, new, free=()):
  """Whether settings recorded earlier (``old``: a dict, or its JSON text) equal ``new``
  apart from the keys ``free``. An option that ``old`` lacks counts as its
  :data:`hypersparse_jax.config.LEGACY_DEFAULTS` value (what the code that wrote it did), as a
  resumed run's ``config.json`` does: adding an option keeps earlier results valid."""
  from hypersparse_jax.config import LEGACY_DEFAULTS
  try:
    old, new = (json.loads(x) if isinstance(x, str) else json.loads(json.dumps(x, default=str))
                for x in (old, new))
  except ValueError:  # an unreadable record: not the same settings
    return False
  if not isinstance(old, dict) or not isinstance(new, dict):
    return False
  missing = object()
  return all(old.get(k, LEGACY_DEFAULTS.get(k, missing)) == new.get(k, LEGACY_DEFAULTS.get(
      k, missing)) for k in set(old) | set(new) if k not in free)


def settings_key(cfg):
  """The options that define a cell's runs apart from its κ, pattern and seed (text)."""
  return json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                     if k not in ("sparsity", "seed")}, sort_keys=True, default=str)


def cell_task(args, sparsity, seed):
  """All methods for one (sparsity, seed): ART x 3 penalties, then one-shot and GMP."""
  cfg = make_config(args, sparsity, "hypersparse", seed)
  partial = Partial(args, partial_name(sparsity, seed), settings_key(cfg))
  results = {}
  for method in art_methods(args):
    results[method] = partial.run(method, lambda m=method: _art_run(
        args, sparsity, m[len("art_"):], seed))
    _log(args, f"  kappa={sparsity} seed={seed} {method}: {_fmt(results[method])}")
  base = Baselines(cfg)
  _, warm, final = dense_states(args, base, seed)
  results["oneshot"] = partial.run("oneshot", lambda: base.oneshot(final, sparsity))
  _log(args, f"  kappa={sparsity} seed={seed} oneshot: {_fmt(results['oneshot'])}")
  ramp = max(1, int(results["art_hypersparse"]["art_epochs"]))
  results["gmp"] = partial.run("gmp", lambda: base.gmp(warm, sparsity, ramp,
                                                       args.gmp_every or base.spe))
  _log(args, f"  kappa={sparsity} seed={seed} gmp: {_fmt(results['gmp'])}")
  return sparsity, seed, results


def cached_states(path, key, names, compute):
  """``compute()`` → ``(result, *states)``, kept in ``path``: a pickle of ``key`` (the
  settings' JSON text), ``result`` and the states (host arrays) under ``names``. A file of other
  settings, or none, is computed and replaced atomically. Workers that need the same state at
  once do not all compute it: the first holds ``<path>.lock`` (``flock``, released by the OS if
  it dies) while it computes, the others wait for it and read its file."""
  import fcntl
  import pickle
  import jax
  import jax.numpy as jnp

  def read():
    try:
      with open(path, "rb") as f:
        cached = pickle.load(f)
      if same_settings(cached["key"], key):
        return (cached["result"],) + tuple(jax.tree.map(jnp.asarray, cached[n]) for n in names)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError):
      pass
    return None

  found = read()
  if found is not None:
    return found
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(f"{path}.lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    found = read()  # computed by another worker while this one waited
    if found is not None:
      return found
    result, *states = compute()
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
      pickle.dump({"key": key, "result": result,
                   **{n: jax.device_get(st) for n, st in zip(names, states)}}, f)
    os.replace(tmp, path)
  return (result, *states)


def cell_key(cfg, **extra):
  """The settings a per-seed state depends on (not κ or the pattern), as JSON text."""
  key = {k: v for k, v in dataclasses.asdict(cfg).items()
         if k not in ("sparsity", "penalty", "distribution", "nm", "structure")}
  key.update(extra)
  return json.dumps(key, sort_keys=True, default=str)


def dense_states(args, base, seed):
  """``base.dense()`` of this seed, trained once per study: its result and its warm-up and
  final states are kept in ``<out>/.dense_cache/`` (not committed) for the seed's other cells
  (the dense run does not depend on κ). A cache from other settings is ignored."""
  # a study that reuses another's runs (study_patterns.py) shares its folder's cache too
  folder = getattr(args, "dense_cache", None) or os.path.join(args.out, ".dense_cache")
  return cached_states(os.path.join(folder, f"seed{seed}.pkl"), cell_key(base.cfg),
                       ("warm", "final"), base.dense)


def dense_task(args, seed):
  base = Baselines(make_config(args, 0.9, "hypersparse", seed))
  result, _, _ = dense_states(args, base, seed)
  _log(args, f"  seed={seed} dense: {_fmt(result)}")
  return seed, result


def _fmt(r):
  bits = f"bits/byte {r['test_bits_per_byte']:.4f} " if "test_bits_per_byte" in r else ""
  return (f"{bits}final {r['final_test_accuracy']:.4f} best {r['best_test_accuracy']:.4f} "
          f"sparsity {r['sparsity']:.5f} art_epochs {r['art_epochs']} ({r['time']:.1f}s)")


def _log(args, msg):
  print(msg, flush=True)


# ------------------------------------------------------------------------------------------------
# Aggregation and outputs
# ------------------------------------------------------------------------------------------------


def _stats(values):
  values = [v for v in values if v is not None]
  if not values:
    return None
  a = np.asarray(values, np.float64)
  return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
          "n": len(a)}


def aggregate(runs, sparsities):
  cells = []
  for method in METHODS:
    targets = [0.0] if method == "dense" else sparsities
    for s in targets:
      rs = [r for r in runs if r["method"] == method and (method == "dense" or r["target"] == s)]
      if not rs:
        continue
      cells.append({"method": method, "target": s, "seeds": [r["seed"] for r in rs],
                    **{k: _stats([r.get(k) for r in rs]) for k in
                       ("best_test_accuracy", "final_test_accuracy", "sparsity", "art_epochs",
                        "time", "test_bits_per_byte", "test_accuracy")}})
  return cells


def seeds_per_cell(report):
  """How many seeds the report's non-dense cells hold: '3', or '1–2' while they differ (a study
  still running), 'no' before any cell."""
  ns = sorted({c["final_test_accuracy"]["n"] for c in report["cells"]
               if c["method"] != "dense" and c.get("final_test_accuracy")})
  return (f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]}") if ns else "no"


def _pm(stat, scale=100.0, digits=2):
  if stat is None:
    return "–"
  return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def write_text_markdown(path, report):
  """pysource: test bits per byte (whole test split, final model) and next-byte accuracy."""
  s = report["settings"]
  lines = [f"# Sparsity study on {s['dataset']} (byte-level transformer: {s['layers']} layers, "
           f"d_model {s['d_model']}, {s['heads']} heads, context {s['context']})", "",
           f"Seeds {s['seeds']}; {s['optimizer']} lr {s['lr']}, batch {s['batch_size']}, "
           f"{s['steps_per_epoch']} steps per epoch; warm-up {s['warmup_epochs']} epochs, ART "
           f"regularisation at most {s['max_art_epochs']} epochs (λ_init {s['lambda_init']}, "
           f"η {s['eta']}), fine-tune {s['epochs']} epochs (lr × {s['lr_decay']} at "
           f"{s['lr_steps']}). GMP: cubic schedule over as many epochs as ART + HyperSparse "
           f"regularised. Figures: the final model on the whole test split (no selection), "
           f"mean ± std over seeds; bits per byte, lower is better. Total wall time "
           f"{report['wall_time']:.0f} s.", "",
           "| method | target κ | test bits/byte | next-byte accuracy (%) | achieved sparsity | "
           "ART / ramp epochs | time (s) |", "|---|---|---|---|---|---|---|"]
  for c in report["cells"]:
    lines.append(
        f"| {LABELS[c['method']]} | {c['target'] * 100:g} % | {_pm(c['test_bits_per_byte'], 1, 3)}"
        f" | {_pm(c['test_accuracy'])} | {_pm(c['sparsity'], 100, 3)} | "
        f"{_pm(c['art_epochs'], 1, 1)} | {_pm(c['time'], 1, 1)} |")
  lines += _pivot(report, s["methods"], "Test bits per byte",
                  lambda c: _pm(c["test_bits_per_byte"], 1, 3))
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def write_markdown(path, report):
  if report["settings"]["dataset"] == "pysource":
    return write_text_markdown(path, report)
  s = report["settings"]
  lines = [f"# Sparsity study on {s['dataset']} ({s['model']})", "",
           f"Seeds {s['seeds']}; warm-up {s['warmup_epochs']} epochs, ART regularisation at "
           f"most {s['max_art_epochs']} epochs (λ_init {s['lambda_init']}, η {s['eta']}), "
           f"fine-tune {s['epochs']} epochs (lr {s['lr']} × {s['lr_decay']} at {s['lr_steps']}), "
           f"batch {s['batch_size']}, weight decay {s['weight_decay']}. GMP: cubic schedule over as "
           f"many epochs as ART + HyperSparse regularised, mask every {s['gmp_every']} steps. "
           f"Test accuracy in %, mean ± std over seeds: of the final fine-tune epoch (no "
           f"selection on the test set) and, for comparison with the paper only, the best over "
           f"the fine-tune epochs (selected on the test set, as the reference does). Total wall "
           f"time {report['wall_time']:.0f} s.", "",
           "| method | target κ | final test acc | best-epoch test acc (reference's convention) | "
           "achieved sparsity | ART / ramp epochs | time (s) |",
           "|---|---|---|---|---|---|---|"]
  for c in report["cells"]:
    lines.append(
        f"| {LABELS[c['method']]} | {c['target'] * 100:g} % | {_pm(c['final_test_accuracy'])} | "
        f"{_pm(c['best_test_accuracy'])} | {_pm(c['sparsity'], 100, 3)} | "
        f"{_pm(c['art_epochs'], 1, 1)} | {_pm(c['time'], 1, 1)} |")
  # Compact pivot: final accuracy per method (rows) and sparsity (columns).
  lines += _pivot(report, METHODS, "Final fine-tune test accuracy (%)",
                  lambda c: _pm(c["final_test_accuracy"]))
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def _pivot(report, methods, title, cell):
  """Markdown lines of a methods (rows) x sparsities (columns) table of ``cell(stats)``."""
  sps = report["settings"]["sparsities"]
  lines = ["", f"{title}, mean ± std:", "",
           "| method | " + " | ".join(f"{x * 100:g} %" for x in sps) + " |",
           "|---|" + "---|" * len(sps)]
  by = {(c["method"], c["target"]): c for c in report["cells"]}
  for m in methods:
    if m == "dense":
      c = by.get(("dense", 0.0))
      row = [cell(c) if c else "–"] * len(sps)
    else:
      row = [cell(by[(m, x)]) if (m, x) in by else "–" for x in sps]
    lines.append(f"| {LABELS[m]} | " + " | ".join(row) + " |")
  return lines


def write_plot(path, report):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sps = report["settings"]["sparsities"]
  key, scale = "final_test_accuracy", 100
  if report["settings"]["dataset"] == "pysource":
    key, scale = "test_bits_per_byte", 1
  fig, ax = plt.subplots(figsize=(7, 4.5))
  by = {(c["method"], c["target"]): c for c in report["cells"]}
  xs = np.arange(len(sps))
  for m in report["settings"]["methods"]:
    if m == "dense":
      c = by.get(("dense", 0.0))
      if c:
        mu, sd = c[key]["mean"] * scale, c[key]["std"] * scale
        ax.axhline(mu, color="k", ls="--", lw=1, label=LABELS[m])
        ax.axhspan(mu - sd, mu + sd, color="k", alpha=0.08)
      continue
    pts = [(i, by[(m, x)][key]) for i, x in enumerate(sps) if (m, x) in by]
    if pts:
      ax.errorbar([p[0] for p in pts], [p[1]["mean"] * scale for p in pts],
                  yerr=[p[1]["std"] * scale for p in pts], marker="o", capsize=3, label=LABELS[m])
  ax.set_xticks(xs, [f"{x * 100:g}" for x in sps])
  ax.set_xlabel("sparsity κ (%)")
  ax.set_ylabel("test bits per byte (lower is better)" if scale == 1
                else "final fine-tune test accuracy (%)")
  ax.set_title(f"{report['settings']['dataset']} / {report['settings']['model']}: "
               f"{seeds_per_cell(report)} seed(s) per point, mean ± std"
               + ("" if report.get("complete", True) else " (incomplete)"))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def find_main_study(args, settings, free):
  """``(folder, report)`` of this script's results with ``settings`` (apart from the keys
  ``free``), for the pattern and channel studies, which take runs from it: ``args.reuse`` if set
  ('': none), else the main study's folder for the dataset, model, depth and width, or, for the
  dataset's preset model, the dataset's folder (``--dataset fashion_mnist`` without
  ``--model``); ``(None, None)`` (and a line saying so) if none of them holds a study of these
  settings."""
  if getattr(args, "reuse", None) is not None:
    candidates = [args.reuse] if args.reuse else []
  else:
    candidates = [default_out(args.dataset, args.model, args.depth, args.width),
                  default_out(args.dataset)]
  for folder in dict.fromkeys(candidates):
    try:
      with open(os.path.join(folder, "study.json")) as f:
        main = json.load(f)
    except (OSError, ValueError):
      continue
    if same_settings(main.get("settings", {}), settings, free=free):
      return folder, main
  if candidates:
    print(f"no study of the same settings in {', '.join(candidates)}: nothing reused",
          flush=True)
  return None, None


def borrow_run(run, folder, **fields):
  """A run of this script's ``study.json`` (in ``folder``) in another study's form: without its
  method/target/seed keys, with ``fields`` and ``"from": folder``."""
  return dict({k: v for k, v in run.items() if k not in ("method", "target", "seed")},
              **fields, **{"from": folder})


def default_out(dataset, model=None, depth=None, width=None):
  """Each dataset's study has its own folder (and each ``--model``'s, ``--depth``'s and
  ``--width``'s), so one study never overwrites another's."""
  name = "study" if dataset == "digits" else f"study_{dataset}"
  if model is not None:
    name += f"_{model}{depth or ''}"
  if width not in (None, 1):
    name += f"_w{width:g}"
  return os.path.join("benchmarks", "results", name)


def build_parser():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--out", default=None,
                 help="output folder (default: benchmarks/results/study for digits, "
                 "benchmarks/results/study_<dataset> otherwise)")
  p.add_argument("--data-dir", default=None, help="TFDS data dir: run on CIFAR-10 instead "
                 "(with --dataset pysource: a folder of *.py files instead of the stdlib)")
  p.add_argument("--dataset", default=None,
                 choices=("digits", "cifar10", "pysource", "fashion_mnist", "mnist"),
                 help="default: cifar10 with --data-dir, else digits")
  p.add_argument("--quick", action="store_true", help="one seed, two sparsities, few epochs")
  p.add_argument("--sparsities", type=float, nargs="*", default=None)
  p.add_argument("--seeds", type=int, nargs="*", default=None)
  p.add_argument("--model", default=None)
  p.add_argument("--depth", type=int, default=None)
  p.add_argument("--width", type=float, default=None,
                 help="multiplier of the model's hidden widths (hypersparse-train --width)")
  p.add_argument("--warmup-epochs", type=int, default=None)
  p.add_argument("--epochs", type=int, default=None, help="fine-tune epochs")
  p.add_argument("--max-art-epochs", type=int, default=None)
  p.add_argument("--lambda-init", type=float, default=None)
  p.add_argument("--eta", type=float, default=None, help="λ growth per ART epoch")
  p.add_argument("--lr-steps", type=int, nargs="*", default=None,
                 help="fine-tune epochs after which the lr decays")
  p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                 help="image datasets: random crop / flip (default: the dataset's preset)")
  p.add_argument("--gmp-every", type=int, default=None,
                 help="GMP mask update interval in steps (default: one epoch)")
  p.add_argument("--workers", type=int, default=2, help="worker processes")
  p.add_argument("--jit-cache", default=os.path.join(tempfile.gettempdir(),
                                                     "hypersparse-study-jit-cache"),
                 help="persistent XLA compilation cache ('' to disable)")
  return p


def study_settings(args):
  """``(first cell's config, settings, sparsities, seeds)`` of a study: ``settings`` is what
  ``study.json`` records and what a rerun must match for the finished cells to be kept."""
  text = args.dataset == "pysource"
  sparsities = tuple(args.sparsities or (QUICK_SPARSITIES if args.quick else
                                         PYSOURCE_SPARSITIES if text else SPARSITIES))
  seeds = tuple(args.seeds if args.seeds is not None else (
      (0,) if args.quick else PYSOURCE_SEEDS if text else SEEDS))
  cfg = make_config(args, sparsities[0], "hypersparse", seeds[0])
  from hypersparse_jax import data
  if text:
    spe = cfg.steps_per_epoch
  else:
    spe = data.steps_per_epoch(
        data.load_dataset(cfg.dataset, cfg.data_dir).num_train, cfg.batch_size)
  settings = base_settings(cfg)
  settings.update(lr_steps=list(cfg.lr_steps), sparsities=list(sparsities), seeds=list(seeds),
                  methods=list(methods(args)), quick=args.quick, steps_per_epoch=spe,
                  gmp_every=args.gmp_every or spe, workers=args.workers)
  return cfg, settings, sparsities, seeds


def main(argv=None):
  args = build_parser().parse_args(argv)
  if args.dataset is None:
    args.dataset = "cifar10" if args.data_dir else "digits"
  if args.out is None:
    args.out = default_out(args.dataset, args.model, args.depth, args.width)
  os.makedirs(args.out, exist_ok=True)
  cfg, settings, sparsities, seeds = study_settings(args)
  print(f"study: {json.dumps(settings)}", flush=True)

  start = time.time()
  runs, previous_wall, old_settings = _kept_runs(args.out, settings)
  if old_settings is not None:  # the report covers the earlier seeds/sparsities and these
    settings["seeds"] = sorted(set(old_settings["seeds"]) | set(seeds))
    settings["sparsities"] = sorted(set(old_settings["sparsities"]) | set(sparsities))
  done = {(r["method"], r["target"], r["seed"]) for r in runs}
  arts = methods(args)[:-1]  # every method of a cell but dense
  todo_dense = [seed for seed in seeds if ("dense", 0.0, seed) not in done]
  # seed by seed: an interrupted study leaves whole seeds finished, not every seed half done
  todo_cells = [(s, seed) for seed in seeds for s in sparsities
                if not all((m, s, seed) in done for m in arts)]
  runs = [r for r in runs if r["method"] == "dense" or (r["target"], r["seed"]) not in todo_cells]
  if len(runs):
    print(f"kept {len(runs)} finished runs of {os.path.join(args.out, 'study.json')}; "
          f"{len(todo_dense)} dense runs and {len(todo_cells)} cells to go", flush=True)
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(
      max_workers=max(1, args.workers), mp_context=ctx, initializer=_worker_init,
      initargs=(args.jit_cache,)) as pool:
    futures = [pool.submit(dense_task, args, seed) for seed in todo_dense]
    futures += [pool.submit(cell_task, args, s, seed) for s, seed in todo_cells]
    failures = []
    for out in finished(futures, failures):
      cell = None
      if len(out) == 2:
        seed, r = out
        runs.append(dict(method="dense", target=0.0, seed=seed, **r))
      else:
        s, seed, results = out
        cell = partial_name(s, seed)
        for method, r in results.items():
          runs.append(dict(method=method, target=s, seed=seed, **r))
      report = {"settings": settings, "wall_time": previous_wall + time.time() - start,
                "complete": len(runs) == len(settings["seeds"]) * (
                    1 + (len(methods(args)) - 1) * len(settings["sparsities"])),
                "cells": aggregate(runs, settings["sparsities"]), "runs": runs}
      _write(args.out, report)
      if cell:
        Partial.drop(args.out, cell)
      print(f"[{time.time() - start:.0f}s] {len(runs)} runs done", flush=True)
  print(open(os.path.join(args.out, "study.md")).read())
  return 1 if failures else 0


def _kept_runs(out, settings, free=("workers", "seeds", "sparsities")):
  """``(runs, wall time, settings)`` of an earlier, interrupted run of the same study in ``out``
  (the finished cells are kept and skipped), or ``([], 0, None)`` when there is none or its
  settings differ (then it is overwritten). Seeds and sparsities may differ: a study can be
  extended (``--seeds 0`` first, ``--seeds 1 2`` later), and the runs of both are kept."""
  path = os.path.join(out, "study.json")
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return [], 0.0, None
  if not same_settings(old.get("settings", {}), settings, free):
    print(f"{path} holds a study with other settings: starting afresh", flush=True)
    return [], 0.0, None
  return list(old.get("runs", [])), float(old.get("wall_time", 0.0)), old["settings"]


def base_settings(cfg):
  """The options every cell of a study shares (κ, penalty, seed and the pattern fields vary
  per cell or belong to the pattern and channel studies)."""
  return {k: v for k, v in dataclasses.asdict(cfg).items()
          if k not in ("sparsity", "penalty", "seed", "init_from", "download",
                       "distribution", "nm", "structure")}


def write_json(out, report):
  """``<out>/study.json``, replaced atomically."""
  tmp = os.path.join(out, ".study.json.tmp")
  with open(tmp, "w") as f:
    json.dump(report, f, indent=1)
  os.replace(tmp, os.path.join(out, "study.json"))


def _write(out, report):
  write_json(out, report)
  write_markdown(os.path.join(out, "study.md"), report)
  write_plot(os.path.join(out, "study.png"), report)


if __name__ == "__main__":
  sys.exit(main())
