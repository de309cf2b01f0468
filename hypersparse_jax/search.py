"""``hypersparse-search``: hyper-parameter search for ART with optuna, on a validation split.

    hypersparse-search                                    # 12 trials on the digits preset
    hypersparse-search --trials 30 --dataset cifar10 --data-dir ~/tensorflow_datasets
    hypersparse-search --storage postgresql://user@host/db --study-name cifar   # many workers

Every ``hypersparse-train`` option is accepted and fixes that setting for all trials; the
others are searched (TPE sampler) over the default space below, scaled to the dataset's preset,
or over ``--space FILE.json``. Each trial is an ordinary run directory
``OUTDIR/trials/trial-NNNN`` (resumable like any run); its value is its best fine-tune
*validation* accuracy (``--val-fraction``, default 0.1, held out of the training data by seed;
``--dataset pysource``: next-byte accuracy on its own validation split's windows); its test
accuracy is only recorded (user attribute ``test_accuracy``).

``--trials N`` is the study's total of finished (complete + pruned) trials: re-running the same
command runs only the missing ones, and a search ends only when the study has N (it waits for
other workers' running trials). A trial cut short is run again with the same parameters,
resuming its run directory from its last checkpoint: one interrupted by Ctrl-C (the search ends
with one line and exit code 130), one whose worker on this host is no longer alive (seen at
once, by its pid), and one of another host whose ``--heartbeat`` went silent. Outputs in ``OUTDIR``: ``study.db`` (default storage), ``best.json``,
``trials.csv``, ``search.png`` (optimisation history and parameter importances).

Space file: a JSON object ``{name: spec}`` where ``spec`` is ``{"low": a, "high": b}`` (float;
add ``"log": true`` for a log scale, ``"type": "int"`` for integers) or ``{"choices": [...]}``;
names are the searchable settings in ``SEARCHABLE``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import os
import signal
import socket
import sys
import time
import traceback
from typing import Any, Optional, Sequence

from hypersparse_jax import cli, console, train
from hypersparse_jax.config import TrainConfig
from hypersparse_jax.data import pysource
from hypersparse_jax.run_dir import first_line, write_text_atomic

__all__ = ["SEARCHABLE", "default_space", "load_space", "main"]

_EXTRA_HINT = "pip install -e '.[search]' (in the repository's clone)"
_DEFAULT_VAL_FRACTION = 0.1  # of the training images; text tasks have their own split

# name -> kind: settings a space may search (TrainConfig fields; lr_step_1/2 are the two lr steps)
SEARCHABLE = {
    "lambda_init": "float", "eta": "float", "lr": "float", "lr_decay": "float",
    "lr_step_1": "int", "lr_step_2": "int", "momentum": "float", "warmup_epochs": "int",
    "weight_decay": "float", "window": "int", "sparsity": "float", "batch_size": "int",
    "max_art_epochs": "int", "epochs": "int", "penalty": "categorical",
}
# train options a user fixes that remove these names from the space
_FIXES = {"lr_steps": ("lr_step_1", "lr_step_2")}


class SpaceError(ValueError):
  """A search-space file or entry that cannot be used."""


def default_space(base: TrainConfig) -> dict:
  """The reference's searched settings, ranges around the dataset preset ``base``.

  ``lambda_init`` log-uniform over [preset / 10, preset × 10]; ``eta`` over
  [1 + (preset − 1) / 4, 1 + 2 (preset − 1)]; ``lr`` log over [preset / 5, preset × 2];
  ``lr_decay`` [0.05, 0.5]; the two lr steps (integers) over [0.3, 0.6] and [0.6, 0.95] of the
  fine-tune epochs (below ``epochs``; left out when ``epochs`` leaves no room for two different
  steps), step 2 drawn above step 1; ``momentum`` [0.8, 0.95]; ``warmup_epochs`` (integer) [preset / 2,
  1.5 × preset]; ``weight_decay`` log [1e-5, 1e-3]; ``window`` (integer) [1, 10].
  """
  e = base.epochs
  # lr steps are fine-tune epochs in [0, e), and two equal steps are refused by the trainer:
  # step 2 is drawn above step 1 (see _suggest), so the ranges need room for two values.
  step1 = (max(1, round(0.3 * e)), max(1, round(0.6 * e)))
  step2 = (step1[1], min(e - 1, max(step1[1], round(0.95 * e))))
  steps = {}
  if step2[1] > step1[0]:
    steps = {"lr_step_1": {"type": "int", "low": step1[0], "high": step1[1]},
             "lr_step_2": {"type": "int", "low": step2[0], "high": step2[1]}}
  return {
      "lambda_init": {"low": base.lambda_init / 10, "high": base.lambda_init * 10, "log": True},
      "eta": {"low": 1 + (base.eta - 1) / 4, "high": 1 + 2 * (base.eta - 1)},
      "lr": {"low": base.lr / 5, "high": base.lr * 2, "log": True},
      "lr_decay": {"low": 0.05, "high": 0.5},
      **steps,
      "momentum": {"low": 0.8, "high": 0.95},
      "warmup_epochs": {"type": "int", "low": max(1, base.warmup_epochs // 2),
                        "high": max(1, round(1.5 * base.warmup_epochs))},
      "weight_decay": {"low": 1e-5, "high": 1e-3, "log": True},
      "window": {"type": "int", "low": 1, "high": 10},
  }


def _check_spec(name: str, spec: Any) -> dict:
  if name not in SEARCHABLE:
    raise SpaceError(f"unknown key {name!r} in the search space; searchable: "
                     f"{', '.join(sorted(SEARCHABLE))}")
  if not isinstance(spec, dict):
    raise SpaceError(f"space entry {name!r} must be an object like {{\"low\": 0.1, \"high\": 1}} "
                     f"or {{\"choices\": [...]}}, got {spec!r}")
  unknown = set(spec) - {"low", "high", "log", "type", "choices"}
  if unknown:
    raise SpaceError(f"space entry {name!r}: unknown field(s) {sorted(unknown)}")
  if "choices" in spec:
    if not isinstance(spec["choices"], list) or not spec["choices"]:
      raise SpaceError(f"space entry {name!r}: empty or non-list choices {spec['choices']!r}")
    return {"choices": list(spec["choices"])}
  kind = spec.get("type", "int" if SEARCHABLE[name] == "int" else "float")
  if kind not in ("int", "float"):
    raise SpaceError(f"space entry {name!r}: type must be 'int' or 'float', got {kind!r}")
  if SEARCHABLE[name] == "categorical":
    raise SpaceError(f"space entry {name!r} needs choices, e.g. {{\"choices\": [\"hypersparse\", "
                     "\"l1\"]}}")
  for bound in ("low", "high"):
    value = spec.get(bound)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise SpaceError(f"space entry {name!r}: {bound} must be a finite number, got {value!r}")
  low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
  if kind == "int":
    low, high = math.ceil(low), math.floor(high)
  if low > high:
    raise SpaceError(f"space entry {name!r}: empty range [{spec['low']}, {spec['high']}]")
  if log and low <= 0:
    raise SpaceError(f"space entry {name!r}: a log range needs low > 0, got {spec['low']}")
  return {"type": kind, "low": low, "high": high, "log": log}


def load_space(path: Optional[str], base: TrainConfig, fixed: Sequence[str]) -> dict:
  """The checked space: ``path``'s JSON (or the default), less the settings the user fixed."""
  if path is None:
    raw = default_space(base)
  else:
    try:
      with open(path) as f:
        raw = json.load(f)
    except FileNotFoundError:
      raise SpaceError(f"--space {path!r} does not exist") from None
    except json.JSONDecodeError as e:
      raise SpaceError(f"--space {path!r} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or not raw:
      raise SpaceError(f"--space {path!r} must hold a non-empty JSON object {{name: spec}}")
  space = {name: _check_spec(name, spec) for name, spec in raw.items()}
  removed = set()
  for name in fixed:
    removed.update(_FIXES.get(name, (name,)))
  space = {k: v for k, v in space.items() if k not in removed}
  if not space:
    raise SpaceError("nothing left to search: every setting of the space is fixed by an option")
  _lr_step_bounds(space, base.lr_steps)
  return space


def _lr_step_bounds(space: dict, base_steps: Sequence[int]) -> dict:
  """``{name: (low, high)}`` of the searched lr steps so that every draw is strictly increasing.

  Step 2 is drawn after step 1, from above it; a step searched alone keeps clear of the other
  step of ``base_steps`` (the preset's or ``--lr-steps``), which it joins (trial_config sorts).
  Raises SpaceError when the ranges leave no valid pair.
  """
  searched = [k for k in ("lr_step_1", "lr_step_2") if k in space and "choices" not in space[k]]
  bounds = {k: (space[k]["low"], space[k]["high"]) for k in searched}
  if len(searched) == 2:
    (low1, high1), (low2, high2) = bounds["lr_step_1"], bounds["lr_step_2"]
    if not high2 > low1:
      raise SpaceError(f"space entries lr_step_1 [{low1}, {high1}] and lr_step_2 [{low2}, "
                       f"{high2}] leave no pair with step 2 > step 1; lr_step_2's high must "
                       "exceed lr_step_1's low")
    bounds["lr_step_1"] = (low1, min(high1, high2 - 1))
  elif len(searched) == 1 and len(base_steps) >= 2:
    name = searched[0]
    other = int(base_steps[1] if name == "lr_step_1" else base_steps[0])
    low, high = bounds[name]
    if name == "lr_step_1":
      bounds[name] = (low, min(high, other - 1))
    else:
      bounds[name] = (max(low, other + 1), high)
    if bounds[name][0] > bounds[name][1]:
      raise SpaceError(f"space entry {name} [{low}, {high}] has no value apart from the other "
                       f"lr step {other} (--lr-steps / the preset); widen it")
  return bounds


def _suggest(trial, space: dict, base_steps: Sequence[int] = ()) -> dict:
  """One trial's settings; lr steps only strictly increasing (see :func:`_lr_step_bounds`)."""
  steps = _lr_step_bounds(space, base_steps)
  params = {}
  for name, spec in space.items():
    if "choices" in spec:
      params[name] = trial.suggest_categorical(name, spec["choices"])
    elif spec["type"] == "int":
      low, high = steps.get(name, (spec["low"], spec["high"]))
      if name == "lr_step_2" and "lr_step_1" in steps:
        if "lr_step_1" not in params:  # draw step 1 first, whatever the space's key order
          params["lr_step_1"] = trial.suggest_int("lr_step_1", *steps["lr_step_1"],
                                                  log=space["lr_step_1"]["log"])
        low = max(low, params["lr_step_1"] + 1)
      if name in params:
        continue
      params[name] = trial.suggest_int(name, low, high, log=spec["log"])
    else:
      params[name] = trial.suggest_float(name, spec["low"], spec["high"], log=spec["log"])
  return {name: params[name] for name in space}


class _LowestDraw:
  """A stand-in trial that draws each setting's lowest value (first choice): the start-up check
  that the space's settings are accepted by the trainer."""

  def suggest_int(self, name, low, high, log=False):
    return low

  suggest_float = suggest_int

  def suggest_categorical(self, name, choices):
    return choices[0]


def trial_config(base: TrainConfig, params: dict) -> TrainConfig:
  """``base`` with a trial's parameters (``lr_step_1/2`` become the sorted ``lr_steps``)."""
  values = {k: v for k, v in params.items() if k not in ("lr_step_1", "lr_step_2")}
  steps = list(base.lr_steps)
  for i, key in enumerate(("lr_step_1", "lr_step_2")):
    if key in params:
      while len(steps) <= i:
        steps.append(steps[-1] if steps else base.epochs)
      steps[i] = int(params[key])
  values["lr_steps"] = tuple(sorted(steps))
  return dataclasses.replace(base, **values)


# ------------------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------------------


class _BudgetReached(Exception):
  """Raised in a trial that another worker's trials made surplus (fails it, nothing trained)."""


def _finished(study, optuna) -> int:
  states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
  return len(study.get_trials(deepcopy=False, states=states))


def _run_dir(outdir: str, trial, optuna) -> tuple:
  """``(run_dir, number of the first attempt or None)``: a retried trial (its first attempt was
  interrupted or killed) resumes the first attempt's run directory."""
  frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
  number = frozen.system_attrs.get("failed_trial")  # optuna's retry callbacks' key too
  return (os.path.join(outdir, "trials", f"trial-{trial.number if number is None else number:04d}"),
          number)


_MAX_KILLED_RETRIES = 3  # a trial whose process dies again and again is not retried for ever


def _retry(study, frozen, why: str, optuna) -> bool:
  """Queues ``frozen`` (an attempt that ended FAIL because it was interrupted or its worker
  died) to run again: same parameters, same run directory (resumed from its checkpoint).

  Written like optuna's ``RetryHeartbeatStaleTrialCallback`` (system attributes
  ``failed_trial``, the first attempt's number, and ``retry_history``), so retries by either
  agree; ``why`` ('interrupted', 'worker gone', 'heartbeat stale') goes in the user attribute
  ``retry_reason``. An interrupted attempt is always retried (the user chose to stop it); one
  whose worker died, at most ``_MAX_KILLED_RETRIES`` times. Returns whether it was queued.
  """
  system_attrs = {"failed_trial": frozen.number, **frozen.system_attrs}
  history = list(system_attrs.get("retry_history", [])) + [frozen.number]
  system_attrs["retry_history"] = history
  if why != "interrupted" and len(history) > _MAX_KILLED_RETRIES:
    return False
  user_attrs = {"retry_reason": why, "retry_of": frozen.number}
  if "run_dir" in frozen.user_attrs:
    user_attrs["run_dir"] = frozen.user_attrs["run_dir"]
  study.add_trial(optuna.trial.create_trial(
      state=optuna.trial.TrialState.WAITING, params=frozen.params,
      distributions=frozen.distributions, user_attrs=user_attrs, system_attrs=system_attrs))
  return True


def _heartbeat_retry(optuna):
  """The storage's callback for trials whose heartbeat went stale: :func:`_retry`."""
  base = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
          or optuna.storages.RetryFailedTrialCallback)

  class Retry(base):
    def __call__(self, study, trial):
      _retry(study, trial, "heartbeat stale", optuna)

  return Retry()


_WORKER = f"{socket.gethostname()}:{os.getpid()}"


def _process_gone(pid: int, since: float) -> bool:
  """Whether no process ``pid`` of this host could have been running since ``since`` (a Unix
  time): none exists, it is a zombie, or it started later (the pid was reused)."""
  if pid == os.getpid():
    return True  # asked only outside a trial: an earlier process that had our pid
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    pass  # exists, another user's
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/stat") as f:
      boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
    started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return fields[0] in ("Z", "X") or started > since + 2  # btime is whole seconds
  except (OSError, ValueError, IndexError, StopIteration):
    return False  # no /proc: alive as far as we can tell


def _dead_local_worker(trial) -> Optional[str]:
  """The ``host:pid`` of a RUNNING trial's worker if it is this host's and has died, else
  None (other hosts' trials wait for their heartbeat to go stale)."""
  worker = trial.user_attrs.get("worker", "")
  host, _, pid = worker.rpartition(":")
  if host != socket.gethostname() or not pid.isdigit() or trial.datetime_start is None:
    return None
  return worker if _process_gone(int(pid), trial.datetime_start.timestamp()) else None


def _recover_dead_trials(study, optuna, log) -> None:
  """Fails and retries (:func:`_retry`) the RUNNING trials whose worker, on this host, is no
  longer alive: a search killed mid-trial and rerun at once resumes that trial now instead of
  counting it as running (its heartbeat is not stale yet)."""
  for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
    worker = _dead_local_worker(t)
    if worker is None:
      continue
    try:
      study._storage.set_trial_user_attr(t._trial_id, "failed_because", f"worker {worker} gone")
      if not study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL):
        continue
    except optuna.exceptions.UpdateFinishedTrialError:
      continue  # another worker got there first
    if _retry(study, t, "worker gone", optuna):
      log(f"trial {t.number}: its worker {worker} is gone (killed?); queued again to resume "
          f"{t.user_attrs.get('run_dir', 'its run directory')}")
    else:
      log(f"trial {t.number}: its worker {worker} is gone; not retried (its run directory "
          f"died {_MAX_KILLED_RETRIES} times)")


def _give_up(trial, reason: str, error: Exception, params: dict, log, optuna):
  """Ends a trial whose sampled settings cannot be trained (``reason``: 'diverged' or
  'infeasible') as *pruned*, with the one-line cause in the user attribute ``reason``: it
  counts towards ``--trials`` (so a space full of bad settings cannot loop for ever), carries
  no value, and the search goes on."""
  message = first_line(error)
  trial.set_user_attr(reason, message)
  log(f"trial {trial.number}: {reason}: {message} {params}")
  raise optuna.TrialPruned(f"{reason}: {message}")


def make_objective(base, space, outdir, n_trials, *, progress=False, log=print,
                   current=None):
  """The optuna objective: one trial is one ``train.Trainer`` run in ``OUTDIR/trials/``.

  Every trial's end is logged (complete, pruned, diverged / infeasible, resumed). ``current``,
  a dict, receives the running trial's ``trial``, ``run_dir`` and ``trainer`` (what an
  interrupted search reports).
  """
  import optuna
  current = {} if current is None else current

  def objective(trial):
    trial.set_user_attr("worker", _WORKER)  # first: who runs it (see _dead_local_worker)
    current.clear()
    current["trial"] = trial
    # Exact total with several workers: a trial whose start would exceed it yields to the
    # running trials with smaller numbers (it fails, marked 'surplus', nothing trained).
    running = [t for t in trial.study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if t.number < trial.number]
    if _finished(trial.study, optuna) + len(running) >= n_trials:
      trial.set_user_attr("surplus", True)
      trial.study.stop()
      raise _BudgetReached()
    params = _suggest(trial, space, base.lr_steps)
    cfg = trial_config(base, params)
    run_dir, first = _run_dir(outdir, trial, optuna)
    current["run_dir"] = os.path.relpath(run_dir, outdir)
    trial.set_user_attr("run_dir", current["run_dir"])
    if first is not None:
      why = trial.user_attrs.get("retry_reason", "failed")
      log(f"trial {trial.number}: resumes trial {first} ({why}) in {current['run_dir']}")
    os.makedirs(run_dir, exist_ok=True)
    config = dataclasses.asdict(cfg)
    config["lr_steps"] = list(cfg.lr_steps)
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(config_path):
      write_text_atomic(config_path, json.dumps(config, indent=2) + "\n")

    def on_epoch(record):
      if record["phase"] != "finetune" or record.get("val_accuracy") is None:
        return
      trial.report(record["val_accuracy"], record["phase_epoch"])
      if trial.should_prune():
        trial.set_user_attr("pruned_at_finetune_epoch", record["phase_epoch"])
        log(f"trial {trial.number}: pruned at fine-tune epoch {record['phase_epoch']} "
            f"(val {record['val_accuracy']:.4f}) {params}")
        raise optuna.TrialPruned()

    def trainer_log(*parts):  # the trainer is quiet in a search, but for where it resumes
      text = " ".join(map(str, parts))
      if text.startswith("resuming "):
        log(f"trial {trial.number}: {text}")

    start = time.time()
    try:
      trainer = train.Trainer(cfg, run_dir, progress=progress, on_epoch=on_epoch,
                              log=trainer_log)
    except ValueError as e:  # a sampled combination the trainer refuses (e.g. λ overflow)
      _give_up(trial, "infeasible", e, params, log, optuna)
    current["trainer"] = trainer
    try:
      summary = trainer.run()
    except train.TrainingDiverged as e:
      _give_up(trial, "diverged", e, params, log, optuna)
    finally:
      trainer.ckpt.close()
      trial.set_user_attr("seconds", round(time.time() - start, 2))
    for key in ("test_accuracy", "best_test_accuracy", "sparsity_achieved", "art_epochs",
                "selected_epoch"):
      trial.set_user_attr(key, summary.get(key))
    value = summary["best_val_accuracy"]
    log(f"trial {trial.number}: complete: val {value:.4f} test {summary['test_accuracy']:.4f} "
        f"({time.time() - start:.0f}s) {params}")
    current.clear()
    return value

  def interruptible(trial):
    try:
      return objective(trial)
    except KeyboardInterrupt:
      trial.set_user_attr("interrupted", True)  # still RUNNING: optuna fails it next
      raise

  return interruptible


def _write_outputs(study, outdir: str, optuna) -> Optional[dict]:
  complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
  rows = study.get_trials(deepcopy=False)
  names = sorted({k for t in rows for k in t.params})
  attrs = sorted({k for t in rows for k in t.user_attrs})
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(["number", "state", "value", "seconds_wall"] + [f"params_{n}" for n in names]
                  + [f"user_attrs_{a}" for a in attrs])
  for t in rows:
    wall = ((t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start else "")
    writer.writerow([t.number, t.state.name, "" if t.value is None else t.value, wall]
                    + [t.params.get(n, "") for n in names]
                    + [t.user_attrs.get(a, "") for a in attrs])
  result = None
  if complete:  # best.json before trials.csv: whoever finds trials.csv current finds it too
    best = study.best_trial
    result = {"params": best.params, "value": best.value,
              "test_accuracy": best.user_attrs.get("test_accuracy"), "trial": best.number,
              "run_dir": best.user_attrs.get("run_dir"), "study_name": study.study_name,
              "finished_trials": _finished(study, optuna),
              "pruned_trials": sum(t.state == optuna.trial.TrialState.PRUNED for t in rows)}
    write_text_atomic(os.path.join(outdir, "best.json"), json.dumps(result, indent=2) + "\n")
  write_text_atomic(os.path.join(outdir, "trials.csv"), buffer.getvalue())
  if result is not None:
    _plot(study, os.path.join(outdir, "search.png"), len(complete))
  return result


def _plot(study, path: str, num_complete: int) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  import warnings
  from optuna.visualization import matplotlib as ovm

  images = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
    makers = [ovm.plot_optimization_history]
    if num_complete >= 2 and study.best_trial.params:
      makers.append(ovm.plot_param_importances)
    for make in makers:
      try:
        ax = make(study)
      except (ValueError, RuntimeError):  # e.g. importances of a constant objective
        continue
      fig = ax.figure
      fig.set_size_inches(7, 4.5)
      fig.tight_layout()
      fig.canvas.draw()
      images.append(np.asarray(fig.canvas.buffer_rgba()))
      plt.close(fig)
  fig, axes = plt.subplots(1, len(images), figsize=(7 * len(images), 4.5), squeeze=False)
  for ax, image in zip(axes[0], images):
    ax.imshow(image)
    ax.axis("off")
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  """``hypersparse-train``'s options (each fixes a setting) plus the search's own."""
  p = argparse.ArgumentParser(
      prog="hypersparse-search", parents=[cli.build_parser()], conflict_handler="resolve",
      description="Hyper-parameter search for ART + HyperSparse with optuna (TPE). Every "
                  "hypersparse-train option fixes that setting for all trials; the rest is "
                  "searched. The objective is the best fine-tune validation accuracy.")
  p.add_argument("--val-fraction", type=float, default=None,
                 help="part of the training data held out for the objective (default 0.1; "
                      "--dataset pysource has its own validation split and takes none)")
  p.add_argument("--outdir", default=None,
                 help="study folder: study.db, trials/, best.json, trials.csv, search.png "
                      "(default runs/search-<dataset>-<model>)")
  p.add_argument("--trials", type=int, default=12,
                 help="total finished (complete + pruned) trials of the study (default 12)")
  p.add_argument("--space", default=None, help="search-space JSON file (default: see README)")
  p.add_argument("--storage", default=None,
                 help="optuna RDB URL shared by workers (default sqlite:///OUTDIR/study.db)")
  p.add_argument("--study-name", default="hypersparse")
  p.add_argument("--pruner", default="hyperband", choices=("median", "hyperband", "none"),
                 help="stop hopeless trials on their per-epoch validation accuracy "
                      "(default hyperband: see the README's measurement)")
  p.add_argument("--sampler-seed", type=int, default=None, help="TPE sampler seed")
  p.add_argument("--heartbeat", type=int, default=30,
                 help="seconds between a running trial's heartbeats; a trial silent for twice "
                      "as long (its process was killed) is failed and retried (0: off)")
  p.add_argument("--plot", action="store_true", help=argparse.SUPPRESS)
  return p


def _given(argv: Sequence[str], parser: argparse.ArgumentParser) -> set:
  """Destinations of the train options the user wrote on the command line."""
  own = {"val_fraction", "outdir", "trials", "space", "storage", "study_name", "pruner",
         "sampler_seed", "heartbeat", "progress", "plot", "retain_host_memory", "devices",
         "shard_params", "data_dir", "download", "dataset", "seed", "init_from"}
  flags = {}
  for action in parser._actions:
    for s in action.option_strings:
      flags[s] = action.dest
  given = set()
  for arg in argv:
    dest = flags.get(arg.split("=", 1)[0])
    if dest is not None and dest not in own:
      given.add(dest)
  return given


def _storage(url: str, heartbeat: int, optuna):
  kwargs = {}
  if heartbeat > 0:
    kwargs.update(heartbeat_interval=heartbeat, grace_period=2 * heartbeat)
    key = ("heartbeat_stale_trial_callback"  # optuna >= 4.9
           if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
           else "failed_trial_callback")
    kwargs[key] = _heartbeat_retry(optuna)
  # Workers started together on a new database race to create its schema: the loser sees
  # "table ... already exists", "UNIQUE constraint failed: alembic_version..." or a locked
  # database (all seen with two processes on one new SQLite file); the schema is complete once
  # the winner commits: try again.
  for attempt in range(10):
    try:
      return optuna.storages.RDBStorage(url, engine_kwargs=None, **kwargs)
    except Exception as e:  # sqlalchemy's OperationalError / IntegrityError, by backend
      if not any(m in str(e) for m in _CREATION_RACE) or attempt == 9:
        raise
      time.sleep(0.2 * (attempt + 1))


_CREATION_RACE = ("already exists", "UNIQUE constraint failed", "database is locked")


def _pruner(name: str, cfg: TrainConfig, optuna):
  if name == "median":
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, cfg.epochs // 4))
  if name == "hyperband":
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, cfg.epochs),
                                          reduction_factor=3)
  return optuna.pruners.NopPruner()


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs ``hypersparse-search``; returns the exit code (2 with a one-line error on bad input,
  1 when a trial failed or no trial completed, 130 when interrupted: one line, and the same
  command resumes the interrupted trial)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args = parser.parse_args(argv)
  # the trainer's handler: Ctrl-C never cuts a checkpoint save, nor is it lost in a callback
  previous_sigint = console.install_sigint_handler()
  study, current = None, {}
  try:
    if console.interrupt_pending():  # a Ctrl-C of start-up that a callback swallowed
      raise KeyboardInterrupt
    setup = _setup(argv, parser, args)
    if isinstance(setup, int):
      return setup
    study, base, space, outdir, optuna = setup
    code = _search(study, args, base, space, outdir, current, optuna)
    if code is None:
      return 0 if _report(study, args, outdir, optuna) else 1
    return code
  except KeyboardInterrupt:
    line = ("hypersparse-search: interrupted before the search started" if study is None
            else _interrupted(study, current, optuna))
    print(line, file=sys.stderr, flush=True)
    return 130
  finally:
    if previous_sigint is not None:
      signal.signal(signal.SIGINT, previous_sigint)


class _QuietFailures(logging.Filter):
  """Drops optuna's "Trial N failed ..." warnings (a traceback each, ~50 lines for Ctrl-C): the
  search prints its own line for every trial's end."""

  def filter(self, record):
    return " failed with " not in record.getMessage()


def _setup(argv, parser, args):
  """``(study, base config, space, outdir, optuna)``, or the exit code 2 after a one-line error."""
  try:
    try:
      import warnings
      import optuna
      warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    except ImportError as e:
      raise ImportError(f"hypersparse-search needs optuna ({e}); install it with: "
                        f"{_EXTRA_HINT}") from e
    if args.trials < 1:
      raise ValueError(f"--trials must be >= 1 (the study's total of finished trials), got "
                       f"{args.trials}")
    if args.heartbeat < 0:
      raise ValueError(f"--heartbeat must be >= 0 seconds, got {args.heartbeat}")
    text = args.dataset in pysource.TEXT_DATASETS
    if text and args.val_fraction:
      raise ValueError(f"--val-fraction is not used by --dataset {args.dataset}: the objective "
                       f"is on its own validation split, got {args.val_fraction}")
    if args.val_fraction is None:
      args.val_fraction = 0.0 if text else _DEFAULT_VAL_FRACTION
    base = cli.config_from_args(args)
    base.validate()
    if not (text or base.val_fraction > 0):
      raise ValueError("--val-fraction must be > 0: the search's objective is the validation "
                       "accuracy, never the test set")
    if base.epochs < 1:
      raise ValueError("--epochs must be >= 1: trials are compared on fine-tune validation "
                       "accuracy")
    space = load_space(args.space, base, _given(argv, parser))
    trial_config(base, _suggest(_LowestDraw(), space, base.lr_steps)).validate()
    outdir = args.outdir or os.path.join("runs", f"search-{base.dataset}-{base.model}"
                                         f"{base.depth or ''}")
    if args.storage is None:
      os.makedirs(outdir, exist_ok=True)
      url = "sqlite:///" + os.path.abspath(os.path.join(outdir, "study.db"))
    else:
      url = args.storage
    try:
      optuna.logging.set_verbosity(optuna.logging.WARNING)
      logging.getLogger("optuna.study._optimize").addFilter(_QuietFailures())
      storage = _storage(url, args.heartbeat, optuna)
    except Exception as e:
      raise ValueError(f"cannot open storage {url!r}: "
                       f"{first_line(e)}") from None
    sampler = optuna.samplers.TPESampler(seed=args.sampler_seed)
    study = optuna.create_study(storage=storage, study_name=args.study_name,
                                direction="maximize", sampler=sampler,
                                pruner=_pruner(args.pruner, base, optuna), load_if_exists=True)
  except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
    print(f"hypersparse-search: error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  os.makedirs(outdir, exist_ok=True)
  return study, base, space, outdir, optuna


def _search(study, args, base, space, outdir, current, optuna) -> Optional[int]:
  """Runs trials until the study has ``--trials`` finished ones; None when it has, else the exit
  code of an error. Trials left RUNNING by a dead worker of this host are retried at once; live
  trials of other workers are waited for (a stale heartbeat retries them), so the search never
  ends short of ``--trials``."""
  before = _finished(study, optuna)
  if before >= args.trials:
    print(f"study {args.study_name!r} already has {before} finished trials (--trials "
          f"{args.trials}): nothing to do")
    return None
  if args.retain_host_memory:
    from hypersparse_jax import host_memory
    host_memory.retain_freed_memory(warn=False)
  states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
  objective = make_objective(base, space, outdir, args.trials, progress=args.progress,
                             current=current)
  waiting_for = None
  while True:
    _recover_dead_trials(study, optuna, print)
    finished = _finished(study, optuna)
    if finished >= args.trials:
      return None
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    queued = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    if queued or finished + len(running) < args.trials:
      try:
        study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(args.trials, states)],
                       catch=(_BudgetReached,), gc_after_trial=True)
      except Exception as e:  # a bug or the environment (disk full, ...), not a bad trial
        log_path = os.path.join(outdir, "errors.log")
        with open(log_path, "a") as f:
          f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {_WORKER}\n"
                  + traceback.format_exc() + "\n")
        _write_outputs(study, outdir, optuna)
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"hypersparse-search: error: a trial failed: {type(e).__name__}: {first} "
              f"(traceback in {log_path}); the failed trial does not count towards --trials: "
              "the same command continues the search", file=sys.stderr)
        return 1
      continue
    # What is missing runs in other live workers: wait for them to finish (or go stale).
    others = sorted(f"{t.number} ({t.user_attrs.get('worker', 'unknown worker')})"
                    for t in running)
    if args.heartbeat == 0:
      print(f"hypersparse-search: error: the study has {finished} of --trials {args.trials} "
            f"finished; trial(s) {', '.join(others)} are RUNNING elsewhere and, with "
            "--heartbeat 0, cannot be told from dead ones: rerun once they ended",
            file=sys.stderr)
      return 1
    if waiting_for != others:
      print(f"{finished} of {args.trials} trials finished; waiting for trial(s) "
            f"{', '.join(others)} of other workers (a worker silent for {2 * args.heartbeat} s "
            "is taken for dead and its trial rerun here)", flush=True)
      waiting_for = others
    time.sleep(min(2.0, args.heartbeat))
    optuna.storages.fail_stale_trials(study)


def _report(study, args, outdir, optuna) -> bool:
  """Writes the outputs (when trials ran) and prints what happened to the study's trials and
  the best one; False when no trial completed."""
  trials = study.get_trials(deepcopy=False)
  complete = any(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
  if (not os.path.exists(os.path.join(outdir, "trials.csv")) or _outputs_stale(study, outdir)
      or (complete and not os.path.exists(os.path.join(outdir, "best.json")))):
    # the last case: another worker has written trials.csv and not yet best.json
    best = _write_outputs(study, outdir, optuna)
  elif complete:
    with open(os.path.join(outdir, "best.json")) as f:
      best = json.load(f)
  else:
    best = None
  print(_tally(trials, optuna))
  if best is None:
    print("no trial completed (all pruned or failed): no best.json")
    return False
  print(f"best trial {best['trial']}: validation accuracy {best['value']:.4f}, test accuracy "
        f"{best['test_accuracy']:.4f}, params {json.dumps(best['params'])}")
  return True


def _outputs_stale(study, outdir: str) -> bool:
  """Whether trials.csv lists fewer trials than the study (written before some trials ran)."""
  with open(os.path.join(outdir, "trials.csv")) as f:
    rows = sum(1 for line in csv.reader(f)) - 1
  return rows != len(study.get_trials(deepcopy=False))


def _tally(trials, optuna) -> str:
  """One line: the study's trials by what happened to them."""
  S = optuna.trial.TrialState
  complete = sum(t.state == S.COMPLETE for t in trials)
  pruned = [t for t in trials if t.state == S.PRUNED]
  unusable = sum(any(k in t.user_attrs for k in ("diverged", "infeasible")) for t in pruned)
  failed = [t for t in trials if t.state == S.FAIL and not t.user_attrs.get("surplus")]
  resumed = sum("retry_of" in t.user_attrs or "failed_trial" in t.system_attrs
                for t in trials if t.state in (S.COMPLETE, S.PRUNED))
  interrupted = sum(bool(t.user_attrs.get("interrupted")) for t in failed)
  killed = sum("failed_because" in t.user_attrs for t in failed)
  parts = [f"{complete} complete", f"{len(pruned)} pruned"
           + (f" ({unusable} diverged or infeasible)" if unusable else "")]
  parts.append(f"{len(failed)} failed attempts ({interrupted} interrupted, {killed} of dead "
               f"workers, {len(failed) - interrupted - killed} other)")
  parts.append(f"{resumed} finished by resuming a failed attempt")
  return f"trials: {', '.join(parts)}"


def _interrupted(study, current: dict, optuna) -> str:
  """Ctrl-C: queues the interrupted trial to resume (same parameters and run directory) and
  returns the one line to print."""
  trial = current.get("trial")
  if trial is None:
    return "hypersparse-search: interrupted; run the same command to continue the search"
  frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == trial.number), None)
  run_dir = current.get("run_dir", "")
  trainer = current.get("trainer")
  epoch = "" if trainer is None or trainer.epoch is None else f" at epoch {trainer.epoch}"
  if frozen is not None and frozen.state == optuna.trial.TrialState.RUNNING:
    # interrupted in optuna's own code: ended here, as optuna ends a trial its objective left
    try:
      study._storage.set_trial_user_attr(frozen._trial_id, "interrupted", True)
      study._storage.set_trial_state_values(frozen._trial_id, optuna.trial.TrialState.FAIL)
      frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    except optuna.exceptions.UpdateFinishedTrialError:
      pass
  if (frozen is not None and frozen.state == optuna.trial.TrialState.FAIL and run_dir
      and not frozen.user_attrs.get("surplus")):
    _retry(study, frozen, "interrupted", optuna)
    return (f"hypersparse-search: interrupted in trial {trial.number}{epoch} ({run_dir}); run the "
            "same command to resume it from its last checkpoint")
  return "hypersparse-search: interrupted; run the same command to continue the search"


if __name__ == "__main__":
  console.search()
