"""Orbax checkpoints of a training run: latest (every epoch), best, best_val and initial weights.

Each checkpoint is an orbax step directory holding two items: ``state`` (a pytree of arrays:
parameters, batch statistics, optimiser state, controller payloads) and ``meta`` (JSON: phase,
epoch, controller decisions, counters). Orbax writes a step into a temporary directory and
renames it when complete, so a run killed while saving (SIGKILL included) never leaves a
half-written checkpoint that could be taken for a good one: the previous step is restored.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored (corrupt, or from another model)."""


class _Managers(dict):
  """``{kind: CheckpointManager}``, each made (and its folder created) on first use."""

  def __init__(self, directory: str, keep: dict):
    super().__init__()
    self.directory, self.keep = directory, keep

  def __missing__(self, kind):
    if kind not in self.keep:
      raise ValueError(f"unknown checkpoint kind {kind!r}; allowed: {sorted(self.keep)}")
    options = ocp.CheckpointManagerOptions(max_to_keep=self.keep[kind], create=True,
                                           enable_async_checkpointing=False)
    self[kind] = ocp.CheckpointManager(os.path.join(self.directory, kind), options=options)
    return self[kind]


class RunCheckpoints:
  """Checkpoint managers of one run directory: ``latest``, ``best`` (the reference's: best
  test accuracy), ``best_val`` (best validation accuracy) and ``init``.

  Args:
    directory: the run's checkpoint folder (created if missing).
    keep: how many ``latest`` steps to keep (>= 2 keeps a fallback if the newest is damaged).
  """

  KINDS = ("latest", "best", "best_val", "init")

  def __init__(self, directory: str | os.PathLike, keep: int = 2):
    self.directory = os.path.abspath(os.fspath(directory))
    self._managers = _Managers(self.directory, {"latest": keep, "best": 1, "best_val": 1,
                                                "init": 1})

  def save(self, kind: str, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` (pytree) and ``meta`` (JSON-able dict) as ``kind`` at ``step``.

    A step that already exists (written by a run killed before its next ``latest`` checkpoint,
    then redone after the resume) is replaced.
    """
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
          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e

  def restore_latest(self, kind: str, target_for_meta: Callable[[dict], Any]):
    """Newest restorable ``(step, meta, state)`` of ``kind``, falling back to older steps.

    ``target_for_meta(meta)`` returns the target pytree that the state must be restored into
    (its structure depends on the phase recorded in ``meta``). Returns None if there is none.
    """
    errors = []
    for step in reversed(self.steps(kind)):
      try:
        meta = self.restore_meta(kind, step)
        return step, meta, self.restore_state(kind, step, target_for_meta(meta))
      except CheckpointError as e:
        errors.append(str(e))
    if errors:
      raise CheckpointError("no restorable checkpoint: " + " | ".join(errors))
    return None

  def close(self):
    for mngr in self._managers.values():
      mngr.close()
