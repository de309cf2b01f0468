"""Orbax checkpoints of a training run: latest (every epoch), best, best_val and initial weights.

Each checkpoint is an orbax step directory holding two items: ``state`` (a pytree of arrays:
parameters, batch statistics, optimiser state, controller payloads) and ``meta`` (JSON: phase,
epoch, controller decisions, counters). Orbax writes a step into a temporary directory and
renames it when complete, so a run killed while saving (SIGKILL included) never leaves a
half-written checkpoint that could be taken for a good one: the previous step is restored.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from hypersparse_jax.run_dir import first_line


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored (corrupt, or from another model)."""


# The commands' Ctrl-C flag and handler (kept here under their earlier names).
from hypersparse_jax import console as _console  # noqa: E402

_INTERRUPT = _console._INTERRUPT
on_sigint = _console.on_sigint
interrupt_pending = _console.interrupt_pending
clear_interrupt = _console.clear_interrupt


@contextlib.contextmanager
def _interrupt_after():
  """Defers Ctrl-C (SIGINT) to the end of the block: a save is never cut in the middle (orbax's
  worker threads would report the cut with long tracebacks; the checkpoint is then complete)."""
  previous = signal.getsignal(signal.SIGINT)
  if (threading.current_thread() is not threading.main_thread()
      or previous not in (signal.default_int_handler, on_sigint)):
    yield
    return
  received = []
  signal.signal(signal.SIGINT, lambda *_: received.append(True))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
    if received:
      if previous is on_sigint:
        _INTERRUPT.set()
      raise KeyboardInterrupt


@contextlib.contextmanager
def _unraisable_to(stream):
  """Sends "exception ignored" reports (orbax's reader callbacks hitting a closed event loop
  after a failed restore) to ``stream`` for the duration of the block."""
  def hook(unraisable):
    stream.write("".join(traceback.format_exception(
        unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)))

  previous, sys.unraisablehook = sys.unraisablehook, hook
  try:
    yield
  finally:
    sys.unraisablehook = previous


class _Managers(dict):
  """``{kind: CheckpointManager}``, each made (and its folder created) on first use."""

  def __init__(self, directory: str, keep: dict, create: bool = True):
    super().__init__()
    self.directory, self.keep, self.create = directory, keep, create

  def __missing__(self, kind):
    if kind not in self.keep:
      raise ValueError(f"unknown checkpoint kind {kind!r}; allowed: {sorted(self.keep)}")
    options = ocp.CheckpointManagerOptions(max_to_keep=self.keep[kind], create=self.create,
                                           enable_async_checkpointing=False,
                                           read_only=not self.create)
    self[kind] = ocp.CheckpointManager(os.path.join(self.directory, kind), options=options)
    return self[kind]


class RunCheckpoints:
  """Checkpoint managers of one run directory: ``latest``, ``best`` (the reference's: best
  test accuracy), ``best_val`` (best validation accuracy) and ``init``.

  Args:
    directory: the run's checkpoint folder (created if missing).
    keep: how many ``latest`` steps to keep (>= 2 keeps a fallback if the newest is damaged).
    create: False to only read (e.g. ``--init-from`` another run): nothing is created there.
  """

  KINDS = ("latest", "best", "best_val", "init")

  def __init__(self, directory: str | os.PathLike, keep: int = 2, *, create: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    self.error_log = os.path.join(self.directory, "restore-errors.log")
    self.skipped = []  # steps the last restore_latest could not read
    self._managers = _Managers(self.directory, {"latest": keep, "best": 1, "best_val": 1,
                                                "init": 1}, create)

  def save(self, kind: str, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` (pytree) and ``meta`` (JSON-able dict) as ``kind`` at ``step``.

    A step that already exists (written by a run killed before its next ``latest`` checkpoint,
    then redone after the resume) is replaced.
    """
    with _interrupt_after():
      if step in self._managers[kind].all_steps():
        self._managers[kind].delete(step)
      self._managers[kind].save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
      self._managers[kind].wait_until_finished()

  def steps(self, kind: str) -> list:
    if kind in self._managers.keep and kind not in self._managers and not os.path.isdir(
        os.path.join(self.directory, kind)):
      return []  # nothing saved (and no folder created just to look)
    return sorted(self._managers[kind].all_steps())

  def restore_meta(self, kind: str, step: Optional[int] = None) -> Optional[dict]:
    """The JSON metadata of ``kind`` at ``step`` (default: newest), or None if none exists."""
    mngr = self._managers[kind]
    step = mngr.latest_step() if step is None else step
    if step is None:
      return None
    try:
      return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(f"cannot read checkpoint metadata {mngr.directory}/{step}: {e}") from e

  def restore_state(self, kind: str, step: int, target: Any) -> Any:
    """Restores the ``state`` item at ``step`` into the structure/shapes/dtypes of ``target``."""
    mngr = self._managers[kind]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      return mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:
      raise CheckpointError(
          f"checkpoint {mngr.directory}/{step} does not match this model/run or is corrupt: "
          f"{first_line(e)}") from e

  def restore_latest(self, kind: str, target_for_meta: Callable[[dict], Any]):
    """Newest restorable ``(step, meta, state)`` of ``kind``, falling back to older steps.

    ``target_for_meta(meta)`` returns the target pytree that the state must be restored into
    (its structure depends on the phase recorded in ``meta``). Returns None if there is none.
    Steps that could not be read are listed in :attr:`skipped` (``[(step, one-line reason)]``);
    their full errors, with everything orbax and its threads printed meanwhile, go to
    :attr:`error_log` (``restore-errors.log`` in the checkpoint folder) instead of stderr.
    """
    self.skipped = []
    details = []
    try:
      for step in reversed(self.steps(kind)):
        captured = io.StringIO()
        try:
          with contextlib.redirect_stderr(captured), _unraisable_to(captured):
            meta = self.restore_meta(kind, step)
            return step, meta, self.restore_state(kind, step, target_for_meta(meta))
        except CheckpointError as e:
          self.skipped.append((step, str(e).splitlines()[0]))
          details.append(f"--- {kind} step {step}: {e}\n"
                         + "".join(traceback.format_exception(e.__cause__ or e))
                         + captured.getvalue())
    finally:
      if details:
        with open(self.error_log, "a") as f:
          f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} restoring {kind}\n"
                  + "\n".join(details))
    if self.skipped:
      raise CheckpointError(
          f"no readable {kind} checkpoint in {self.directory} (steps "
          f"{', '.join(str(s) for s, _ in self.skipped)} unreadable; details in {self.error_log})")
    return None

  def close(self):
    for mngr in self._managers.values():
      mngr.close()
