"""The ART protocol loop: warm-up -> ART (with its controller) -> masked fine-tuning.

:class:`Trainer` runs one run directory end to end for any task of :mod:`hypersparse_jax.tasks`
(it never asks which: the task provides the model, the batches, the jitted steps and the
accuracies). The command line (``hypersparse-train``) is :mod:`hypersparse_jax.cli`; the
configuration :mod:`hypersparse_jax.config`.

Run the same configuration with the same ``outdir`` again to resume a stopped or killed run from
its latest checkpoint; it ends exactly as an uninterrupted run would (the data order and the
random augmentation depend only on ``(seed, epoch, step)``). ``outdir`` receives
``metrics.jsonl``, ``summary.json``, ``checkpoints/{latest,best,init}`` (``best_val`` too with
a validation split) and ``model_sparse.npz`` (the command line adds ``config.json`` and, with
``--plot``, ``curves.png``).

Decisions follow the authors' code by default: the ART window rule of their ``ART`` class
(``art_rule='reference'``), the pruned copy's accuracy measured on the training data as the
training loader serves it, i.e. augmented (``pruned_eval='augmented'``), HyperSparse's 0.6585.

Which accuracy is reported. The reference reports the best test accuracy over the fine-tune
epochs, i.e. it selects the epoch on the test set; ``summary.json`` keeps that figure as
``best_test_accuracy`` (comparable with the paper's tables only). The headline
``test_accuracy`` does not look at the test set to choose: it is the test accuracy of the
fine-tune epoch with the best validation accuracy when ``--val-fraction`` holds part of the
training data out (``selection: "best_val"``), else of the final epoch (``selection: "final"``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from hypersparse_jax import transform as art_lib
from hypersparse_jax import budgets, channels, checkpointing, data, masking, models, sparse_export
from hypersparse_jax import distributed, init_source, run_dir, sharding, tasks
from hypersparse_jax.config import TrainConfig
from hypersparse_jax.controller import ARTController

PHASES = ("warmup", "art", "finetune")
ADAM_B2 = 0.99


class TrainingDiverged(RuntimeError):
  """The loss or the parameters became non-finite; the last good checkpoint is kept."""


def make_optimizer(cfg: TrainConfig, learning_rate) -> optax.GradientTransformation:
  """The optimiser after ``art()`` / ``fixed_mask()`` in the chain: SGD with momentum after
  coupled weight decay (the reference's), or AdamW (β1 = ``cfg.momentum``, β2 = 0.99,
  decoupled weight decay ``cfg.weight_decay``) for ``--optimizer adamw``."""
  if cfg.optimizer == "adamw":
    return optax.adamw(learning_rate, b1=cfg.momentum, b2=ADAM_B2,
                       weight_decay=cfg.weight_decay)
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(learning_rate, momentum=cfg.momentum))



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
    run_dir.write_text_atomic(path, "".join(kept))

  def append(self, record: dict):
    if not self.write:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())


def near_zero_fraction(params, sparsity: float, rel: float = 1e-3, *, where=None,
                       distribution: str = "global", nm=None):
  """Fraction of prunable weights with ``|w| < rel · t`` (``t``: the threshold at ``sparsity``).

  During ART no weight is exactly zero yet; this shows how far the regulariser has pushed the
  weights below the pruning boundary towards zero (it approaches ``sparsity``). Under a
  per-layer budget or an N:M pattern: the weights the pattern's mask removes that are below
  ``rel`` times the largest weight it removes in their layer.
  """
  if distribution != "global" or nm is not None:
    mask = budgets.pattern_mask(params, sparsity, where=where, distribution=distribution, nm=nm)
    leaves = masking.prunable_leaves(params, where)
    flat_mask = {tuple(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    small = 0
    for p, x in leaves:
      a, removed = jnp.abs(x.astype(jnp.float32)), ~flat_mask[tuple(p)]
      t = jnp.max(jnp.where(removed, a, 0.0))
      small = small + jnp.sum(removed & (a < rel * t))
    return small / masking.num_prunable(leaves)
  t = masking.magnitude_threshold(params, sparsity, where=where)
  leaves = masking.prunable_leaves(params, where)
  small = sum(jnp.sum(jnp.abs(x.astype(jnp.float32)) < rel * t) for _, x in leaves)
  return small / masking.num_prunable(leaves)


def removed_channel_share(params, sparsity: float, *, distribution: str = "global"):
  """Share of the prunable channels' total magnitude that the channels the mask would remove
  still carry: ``Σ_removed m̃_c / Σ m̃_c`` (:func:`near_zero_fraction`'s counterpart for
  ``structure='channel'``).

  The magnitudes and the removed set are :func:`channels.channel_mask`'s defaults (each
  channel's L2 norm, or its BatchNorm scale ``|γ|``, divided by its layer's mean; the global
  threshold or ``distribution='uniform'``'s per-layer count). At the start of ART it is
  near the removed fraction (BatchNorm scales start equal); it falls towards 0 as the
  regulariser empties the channels it will prune. (Group HyperSparse shrinks them without
  driving them to ~0 as it does single weights: a count below ``10⁻³·t`` stays 0.)
  """
  mags = channels.channel_magnitudes(params)
  keeps, _ = channels._keep(mags, sparsity, distribution)
  removed = sum(jnp.sum(jnp.where(k, 0.0, m)) for k, m in zip(keeps, mags))
  total = sum(jnp.sum(m) for m in mags)
  return removed / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)


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
  """One ART run of any task: owns the optimiser, the controller, the placement on devices and
  the checkpoints and files of ``outdir``; the task (:func:`hypersparse_jax.tasks.create_task`)
  owns the data, the model, the batches, the jitted steps and the accuracies.

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
    mesh = None
    if jax.process_count() > 1 and devices is not None:
      raise ValueError(f"--devices {devices} is for single-process runs; with several processes "
                       "every process uses all its local devices (leave --devices out)")
    if devices is None and jax.device_count() > 1 or devices is not None and devices > 1:
      mesh = sharding.make_mesh(devices)
      sharding.check_batch_size(config.batch_size, mesh, "--batch-size")
    elif devices is not None and devices < 1:
      raise ValueError(f"--devices must be >= 1, got {devices}")
    self.placement = sharding.Placement(mesh, fsdp=shard_params)
    n = self.placement.num_shards
    self.eval_batch_size = -(-config.eval_batch_size // n) * n  # padding only: same accuracy
    # prunable leaves: the library default (kernels), or with the transformer's embedding
    self.where = models.transformer_where(config.prune_embeddings)
    self.task = tasks.create_task(config, self.placement, self.eval_batch_size)
    self.model, self.steps_per_epoch = self.task.model, self.task.steps_per_epoch
    self.key = jax.random.PRNGKey(config.seed)
    variables = jax.jit(functools.partial(self.model.init, train=False))(
        jax.random.fold_in(self.key, 0), self.task.example_input)
    self.params = variables["params"]
    self.batch_stats = variables.get("batch_stats", {})
    if config.init_from:
      self.params, self.batch_stats = self._load_init(config.init_from)
    masking.prunable_leaves(self.params, self.where)
    self.num_weights = masking.num_prunable(masking.prunable_leaves(self.params, self.where))
    self.art_tx = optax.chain(
        art_lib.art(config.sparsity, config.lambda_init, config.eta,
                    steps_per_epoch=self.steps_per_epoch, warmup_epochs=config.warmup_epochs,
                    penalty=config.penalty, where=self.where,
                    distribution=config.distribution, nm=config.nm_pair,
                    structure=config.structure),
        make_optimizer(config, config.lr))
    where = self.where
    # the pattern's mask: global (the paper's), per-layer budgets or N:M (hypersparse_jax.budgets)
    self.pattern = dict(distribution=config.distribution, nm=config.nm_pair)
    mask_of = functools.partial(budgets.pattern_mask, sparsity=config.sparsity, where=where,
                                **self.pattern)
    if config.structure == "channel":  # whole channels (hypersparse_jax.channels)
      mask_of = functools.partial(channels.channel_mask, sparsity=config.sparsity,
                                  distribution=config.distribution)
    self.mask_fn = jax.jit(lambda p: mask_of(p))
    # one program, not one per leaf: eager ops on arrays of several processes compile each
    self.prune_fn = jax.jit(lambda p: masking.apply_mask(p, mask_of(p)))
    # ART's progress, recorded per ART epoch under this key (no weight is zero before fine-tuning)
    self.art_progress_key = "near_zero"
    self.art_progress_fn = jax.jit(lambda p: near_zero_fraction(p, config.sparsity,
                                                                where=where, **self.pattern))
    if config.structure == "channel":  # the magnitude the channels to be removed still carry
      self.art_progress_key = "removed_channel_share"
      self.art_progress_fn = jax.jit(lambda p: removed_channel_share(
          p, config.sparsity, distribution=config.distribution))
    self.ckpt = checkpointing.RunCheckpoints(os.path.join(outdir, "checkpoints"))
    self.params, self.batch_stats = self.placement.place(self.params), self.placement.place(self.batch_stats)

  @property
  def dataset(self):
    """The task's data (an image :class:`~hypersparse_jax.data.Dataset`, or the text corpus)."""
    return self.task.data

  def sparsity(self, params) -> float:
    """:func:`masking.sparsity`, computed where the parameters lie (any sharding)."""
    return int(_count_zeros(params, where=self.where)) / self.num_weights

  def _restore_target(self, meta):
    """The template of ``meta`` as ShapeDtypeStructs with this run's shardings (any mesh)."""
    template = self._template(meta)
    if self.placement.mesh is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      return sharding.abstract(template, jax.tree.map(lambda _: device, template))
    return sharding.abstract(template, self.placement.shardings(template))

  def _make_step(self, tx, params):
    state = {"params": params, "batch_stats": self.batch_stats,
             "opt_state": jax.eval_shape(tx.init, params)}  # shapes fix the shardings
    return self.task.make_train_step(tx, state_shardings=self.placement.shardings(state))

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
    rows = self.placement.rows(self.cfg.batch_size)
    batches = data.prefetch(self.task.train_batches(epoch, rows),
                            transfer=None if self.placement.mesh is None else self.placement.place_batch)
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
    return self.task.test_accuracy(params, batch_stats)

  def _val_accuracy(self, params, batch_stats):
    return self.task.val_accuracy(params, batch_stats)

  def _pruned_train_accuracy(self, params, batch_stats, epoch):
    """The pruned copy's accuracy on the training data, eval mode (see the task's
    :meth:`~hypersparse_jax.tasks.base.Task.pruned_train_accuracy`)."""
    return self.task.pruned_train_accuracy(params, batch_stats, epoch)

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
      state = self.placement.place({"params": self.params, "batch_stats": self.batch_stats,
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
                      **self.task.epoch_metrics())
        next_phase = phase
        if epoch + 1 >= cfg.warmup_epochs and phase == "warmup":
          next_phase = "art"
          # the dense model at the end of warm-up: the reference point of the pruned result
          extra.update(self.task.dense_reference(state["params"], state["batch_stats"],
                                                 test_acc))
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
          record[self.art_progress_key] = float(self.art_progress_fn(state["params"]))
        record["time"] = time.time() - start
        metrics_log.append(record)
        self._log_epoch(record)
        if next_phase == "finetune":
          self.log(decision.message)  # after the line of the epoch it refers to
          best = controller.best.payload
          params = self.placement.place(jax.tree.map(jnp.asarray, best["params"]))
          mask = self.mask_fn(params)
          params = jax.jit(masking.apply_mask)(params, mask)
          tx = self.finetune_tx(mask)
          state = self.placement.place({"params": params,
                              "batch_stats": jax.tree.map(jnp.asarray, best["batch_stats"]),
                              "opt_state": tx.init(params)})
          ft_step = self._make_step(tx, params)
          ft_start = epoch + 1
          self.log(self._report(*_to_host((params, mask)))[1])
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
                      **self.task.epoch_metrics(), time=time.time() - start)
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
    report, text, pattern = self._report(params)
    by_val = extra["best_val_epoch"] is not None
    summary = {
        "dataset": cfg.dataset, "model": cfg.model, "depth": cfg.depth,
        "penalty": cfg.penalty, "seed": cfg.seed,
        # a channel run's budget is on channels (channel_sparsity_target), not on weights
        "sparsity_target": None if cfg.structure == "channel" else cfg.sparsity,
        "sparsity_achieved": report.sparsity,
        "distribution": cfg.distribution, "nm": cfg.nm,
        "layer_sparsity": report.as_dict()["layers"], "pattern": pattern,
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
    if cfg.structure == "channel":
      summary.update(self._channel_summary(params, stats))
    summary.update(self.task.summary(params, extra))
    summary = distributed.allgather_json(summary)[0]  # process 0's
    if self.primary:
      run_dir.write_text_atomic(os.path.join(self.outdir, "summary.json"),
                    json.dumps(summary, indent=2) + "\n")
    self.log(text)
    self.log("summary: " + json.dumps({k: summary[k] for k in (
        "test_accuracy", "selection", "best_test_accuracy", "sparsity_achieved", "art_epochs",
        "compression_ratio") + self.task.summary_log_keys}))
    return summary

  def _report(self, params, mask=None):
    """``(sparsity report, its text, the pattern to record)`` of ``params`` (under ``mask``).

    A channel run's budget is on channels: its table counts the zero weights without per-layer
    weight targets (a uniform channel budget is not a uniform weight budget), and a line below
    it counts the channels the mask removes."""
    cfg = self.cfg
    if cfg.structure != "channel":
      report = masking.sparsity_report(params, mask, where=self.where, sparsity=cfg.sparsity,
                                       **self.pattern)
      return report, str(report), report.pattern
    report = masking.sparsity_report(params, mask, where=self.where)
    groups = channels.channel_groups(params)
    if mask is None:  # the removed channels are exactly zero (as slim_summary reads them)
      mask = jax.tree.map(lambda x: x != 0, params)
    kept = sum(len(i) for i in channels._kept_indices(mask, groups))
    total = sum(int(channels._get(params, g.producer)["kernel"].shape[-1]) for g in groups)
    rule = ("floor(sparsity x channels) per layer" if cfg.distribution == "uniform" else
            "one threshold over the layers' normalised magnitudes")
    line = (f"channels removed {total - kept:,} of {total:,} ({(total - kept) / total:.2%}; "
            f"target {cfg.sparsity:.2%}, {cfg.distribution}: {rule})")
    pattern = {"kind": "channel", "distribution": cfg.distribution,
               "sparsity": float(cfg.sparsity), "channels_removed": total - kept,
               "channels_total": total}
    return report, f"{report}\n{line}", pattern

  def _channel_summary(self, params, stats):
    """Channels removed, and the slimmed model's parameters and FLOPs against the dense one's
    (:func:`channels.slim_summary`; one image's forward pass)."""
    variables = {"params": params, "batch_stats": stats} if stats else {"params": params}
    shape = (1,) + tuple(self.task.example_input.shape[1:])
    return {"structure": "channel", "channel_sparsity_target": self.cfg.sparsity,
            **channels.slim_summary(self.model, variables, shape)}

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
             + (f"removed share {r['removed_channel_share']:.4f} "
                if r.get("removed_channel_share") is not None else "")
             + f"({r['time']:.1f}s)")
