"""``hypersparse-train``: the command line of the ART protocol (warm-up -> ART -> masked
fine-tuning): the parser, the presets' application, option and resume checks, ``main``.

    hypersparse-train                                   # preset: bundled digits, 90 % sparsity
    hypersparse-train --dataset cifar10 --data-dir ~/tensorflow_datasets --sparsity 0.98
    hypersparse-train --dataset pysource                # byte-level transformer LM, stdlib code

Defaults for CIFAR-10/100 and TinyImageNet are the reference's (ResNet-32, batch 64, SGD lr 0.1,
momentum 0.9, weight decay 1e-4, 60 warm-up epochs, λ_init 5e-6, η 1.05, window b = 1,
160 fine-tune epochs with lr × 0.1 at 80 and 120). With no arguments it runs a small preset on
scikit-learn's bundled digits (no download); presets: :mod:`hypersparse_jax.config`.

``--dataset pysource`` trains a byte-level decoder-only transformer (``--model transformer``,
``--layers --d-model --heads --context``) on the Python standard library's source code
(:mod:`hypersparse_jax.data.pysource`, :mod:`hypersparse_jax.tasks.language_model`), with AdamW
(``--optimizer adamw``; ``--momentum`` is Adam's β1). An epoch there is ``--steps-per-epoch``
batches of random training windows. Prunable: the attention and MLP kernels
(``--prune-embeddings`` adds the token embedding). Accuracy means next-byte accuracy;
``summary.json`` adds ``test_bits_per_byte`` and ``dense_test_bits_per_byte`` (the dense model at
the end of warm-up).

Run the same command with the same ``--outdir`` again to resume a stopped or killed run from
its latest checkpoint (:mod:`hypersparse_jax.train`). ``--outdir`` receives ``config.json``,
``metrics.jsonl``, ``summary.json``, ``checkpoints/{latest,best,init}`` (``best_val`` too with
``--val-fraction``), ``model_sparse.npz`` and, with ``--plot``, ``curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
from typing import Optional, Sequence

import jax

from hypersparse_jax import checkpointing, console, distributed, host_memory, models, run_dir
from hypersparse_jax.config import (DATASETS, DIGITS_PRESET, OPTIMIZERS, PRESETS, PRUNED_EVALS,
                                    PYSOURCE_PRESET, REFERENCE_DEFAULTS, TrainConfig,
                                    _normalized_path, check_devices, resume_differences)
from hypersparse_jax.controller import RULES
from hypersparse_jax.train import Trainer, TrainingDiverged


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
                      "install -e '.[download]' in the repository's clone)")
  p.add_argument("--model", default=None, choices=models.MODEL_NAMES,
                 help=f"reference: {ref['model']}; digits: mlp; lenet300 / lenet5: for 28x28 "
                      "(fashion_mnist, mnist)")
  p.add_argument("--depth", type=int, default=None, help="ResNet 6n+2 or VGG 11/13/16/19 "
                 f"(reference: {ref['depth']})")
  p.add_argument("--width", type=float, default=None, metavar="MULTIPLIER",
                 help="image models: multiply every hidden width (channels, units) by this, "
                      "e.g. 0.25 for a quarter-width VGG (default 1: the published model)")
  p.add_argument("--no-batch-norm", dest="batch_norm", action="store_false", default=None,
                 help="VGG/CNN without BatchNorm")
  p.add_argument("--sparsity", type=float, default=None, help=f"prune rate κ in [0, 1) "
                 f"(default {ref['sparsity']})")
  p.add_argument("--penalty", default=None, choices=("hypersparse", "l1", "l2"))
  p.add_argument("--distribution", default=None, choices=("global", "uniform", "erk"),
                 help="where the sparsity goes: one global magnitude threshold (the paper's, "
                      "default), the same sparsity in every layer, or ERK per-layer budgets "
                      "(with --structure channel: global or uniform)")
  p.add_argument("--structure", default=None, choices=("weight", "channel"),
                 help="prune single weights (default) or whole channels (convolution filters, "
                      "dense units): --sparsity is then the fraction of prunable channels "
                      "removed, and hypersparse-export --slim writes the smaller model")
  p.add_argument("--nm", default=None, metavar="N:M",
                 help="an N:M pattern, e.g. 2:4 (N of every M consecutive input weights kept; "
                      "--sparsity becomes 1 - N/M)")
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
  p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                 help="image datasets: random crop and flip while training (the reference's; "
                      "default except for fashion_mnist/mnist's LeNet-300-100 preset); "
                      "--no-augment trains on the clean images, and ART's pruned copy is then "
                      "measured on them too")
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
  g.add_argument("--startup-timeout", type=int, default=distributed.STARTUP_TIMEOUT_S,
                 help="seconds the processes wait for each other at start-up; then every "
                      "process stops, naming the processes that never arrived (default "
                      f"{distributed.STARTUP_TIMEOUT_S})")
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
  if args.model is not None and args.depth is None and args.model in models.FIXED_DEPTH_MODELS:
    values["depth"] = None
  if args.model == "vgg" and args.depth is None:
    values["depth"] = 19
  if args.nm is not None and args.sparsity is None:  # the pattern fixes the sparsity
    from hypersparse_jax import budgets
    n, m = budgets.parse_nm(args.nm)
    values["sparsity"] = 1 - n / m
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
      "runs", f"{cfg.dataset}-{cfg.model}{cfg.depth or ''}-{cfg.penalty}-"
      + (f"nm{cfg.nm.replace(':', '-')}" if cfg.nm else f"{cfg.sparsity:g}")
      + ("" if cfg.distribution == "global" else f"-{cfg.distribution}")
      + ("-channel" if cfg.structure == "channel" else "")
      + ("" if cfg.width == 1 else f"-w{cfg.width:g}"))


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
    for option in ("heartbeat_timeout", "startup_timeout"):
      if several and getattr(args, option) < 1:
        raise ValueError(f"--{option.replace('_', '-')} must be >= 1 (seconds), got "
                         f"{getattr(args, option)}")
  except ValueError as e:
    print(f"hypersparse-train: error: {e}", file=sys.stderr)
    return 2
  if several and not os.environ.get(distributed.WORKER_ENV):
    who = "this process" if args.process_id is None else f"process {args.process_id}"
    return distributed.supervise(argv, "hypersparse-train", who,
                                 coordinator_address=args.coordinator_address,
                                 num_processes=args.num_processes,
                                 startup_timeout=args.startup_timeout)
  if args.retain_host_memory:
    host_memory.retain_freed_memory(warn=False)  # before JAX's first computation
  lock, trainer = None, None
  previous_sigint = console.install_sigint_handler()
  try:
    if console.interrupt_pending():  # a Ctrl-C of start-up that a callback swallowed
      raise KeyboardInterrupt
    if several:
      distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                             heartbeat_timeout=args.heartbeat_timeout,
                             startup_timeout=args.startup_timeout)
    cfg, outdir, config, lock = _start(args, several)
    trainer = Trainer(cfg, outdir, progress=args.progress, devices=args.devices,
                      shard_params=args.shard_params)
    config_path = os.path.join(outdir, "config.json")
    if distributed.is_primary() and not os.path.exists(config_path):
      run_dir.write_text_atomic(config_path, json.dumps(config, indent=2) + "\n")
    trainer.run()
    if args.plot and distributed.is_primary():
      from hypersparse_jax import plotting
      print(f"curves: {plotting.plot_run(outdir)}")
    if distributed.is_primary():
      print(f"outputs: {os.path.abspath(outdir)} (summary.json, metrics.jsonl, model_sparse.npz, "
            f"checkpoints/; curves: hypersparse-plot {outdir}; ONNX: hypersparse-export "
            f"{outdir} --out model.onnx)")
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
    # args.process_id, not jax.process_index(): after a failed initialize, starting the backend
    # to ask can crash
    who = args.process_id if args.process_id is not None else jax.process_index()
    print(f"hypersparse-train: error: process {who}: {first}; if another "
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
  console.train()
