"""The ART controller: when to stop regularising, and which pruned model to keep (host side).

After every regularisation epoch the training loop magnitude-prunes a copy of the model to the
target sparsity, measures its accuracy on the training set (eval mode) and calls
:meth:`ARTController.update`. The controller keeps a window of the last ``2·b+1`` epochs; when
the window's mean pruned accuracy beats the best mean so far (strictly), it remembers the
window's middle entry — while the window is still filling, the entry at position
``min(len − 1, b)`` from the oldest. Regularisation stops when that best mean exceeds the dense
model's training accuracy of the current epoch (Glandorf et al. 2023, ART, stop criterion).

The reference loops forever if that never happens; here ``max_epochs`` caps the regularisation
epochs and the decision says why it stopped. :meth:`state_dict` / :meth:`load_state_dict` save
and restore everything, so a resumed run decides exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any, List, NamedTuple, Optional


class WindowEntry(NamedTuple):
  epoch: int
  pruned_accuracy: float
  payload: Any  # e.g. the model's variables at that epoch; opaque to the controller


class ARTDecision(NamedTuple):
  """What :meth:`ARTController.update` decided after one regularisation epoch."""
  stop: bool                 # leave the regularisation phase now
  reason: Optional[str]      # 'converged', 'max_epochs' or None
  improved: bool             # the best window mean improved this epoch
  window_mean: float
  best_mean: float
  best_epoch: Optional[int]
  message: str


class ARTController:
  """Stop rule and best-model window of ART.

  Args:
    window: ``b``; the window holds the last ``2·b + 1`` epochs (reference: 1).
    max_epochs: cap on regularisation epochs (None: no cap, as the reference; not advised).
  """

  def __init__(self, window: int = 1, max_epochs: Optional[int] = None):
    if int(window) != window or window < 0:
      raise ValueError(f"window (b) must be an integer >= 0, got {window!r}")
    if max_epochs is not None and (int(max_epochs) != max_epochs or max_epochs < 1):
      raise ValueError(f"max_epochs must be a positive integer or None, got {max_epochs!r}")
    self.b = int(window)
    self.max_epochs = None if max_epochs is None else int(max_epochs)
    self.entries: List[WindowEntry] = []
    self.best_mean = -math.inf
    self.best: Optional[WindowEntry] = None
    self.epochs_seen = 0
    self.stopped: Optional[str] = None

  @property
  def window_size(self) -> int:
    return 2 * self.b + 1

  def update(self, epoch: int, pruned_accuracy: float, dense_accuracy: float,
             payload: Any = None) -> ARTDecision:
    """Records one regularisation epoch and decides whether to stop.

    Args:
      epoch: the epoch index (any monotone counter; it is remembered with the best entry).
      pruned_accuracy: training accuracy of the magnitude-pruned copy, in [0, 1].
      dense_accuracy: training accuracy of the dense model in this epoch, in [0, 1].
      payload: what to remember if this entry becomes the best (e.g. model variables).

    Example:
      >>> from hypersparse_jax import ARTController
      >>> ctl = ARTController(window=1)
      >>> ctl.update(0, 0.50, 0.90, "model@0").stop
      False
      >>> d = ctl.update(1, 0.70, 0.90, "model@1")  # mean 0.60 > 0.50: middle entry is epoch 1
      >>> d.best_epoch, round(d.best_mean, 2)
      (1, 0.6)
      >>> d = ctl.update(2, 0.99, 0.70, "model@2")  # mean 0.73 > dense 0.70: stop
      >>> d.stop, d.reason, d.best_epoch, ctl.best.payload
      (True, 'converged', 1, 'model@1')
    """
    for name, value in (("pruned_accuracy", pruned_accuracy), ("dense_accuracy", dense_accuracy)):
      if not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    if self.stopped is not None:
      raise RuntimeError(f"the controller already stopped ({self.stopped}); start a new one")
    self.entries.append(WindowEntry(int(epoch), float(pruned_accuracy), payload))
    if len(self.entries) > self.window_size:
      self.entries.pop(0)
    self.epochs_seen += 1
    mean = sum(e.pruned_accuracy for e in self.entries) / len(self.entries)
    improved = mean > self.best_mean
    if improved:
      self.best_mean = mean
      self.best = self.entries[min(len(self.entries) - 1, self.b)]
    reason, message = None, ""
    if self.best_mean > dense_accuracy:
      reason = "converged"
      message = (f"best window mean of pruned accuracy {self.best_mean:.4f} exceeds the dense "
                 f"training accuracy {dense_accuracy:.4f}: regularisation done")
    elif self.max_epochs is not None and self.epochs_seen >= self.max_epochs:
      reason = "max_epochs"
      message = (f"stop rule not met after {self.epochs_seen} regularisation epochs "
                 f"(--max-art-epochs {self.max_epochs}); fine-tuning the best pruned model so far "
                 f"(epoch {self.best.epoch}, window mean {self.best_mean:.4f}, dense training "
                 f"accuracy {dense_accuracy:.4f}). Raise the cap, lambda_init or eta to converge")
    self.stopped = reason
    return ARTDecision(reason is not None, reason, improved, mean, self.best_mean,
                       None if self.best is None else self.best.epoch, message)

  # ----- persistence --------------------------------------------------------------------------

  def state_dict(self):
    """``(meta, payloads)``: JSON-able metadata and ``{name: payload}`` to save with orbax."""
    meta = {
        "b": self.b, "max_epochs": self.max_epochs, "epochs_seen": self.epochs_seen,
        "best_mean": None if self.best_mean == -math.inf else self.best_mean,
        "best": None if self.best is None else [self.best.epoch, self.best.pruned_accuracy],
        "entries": [[e.epoch, e.pruned_accuracy] for e in self.entries],
        "stopped": self.stopped,
    }
    payloads = {f"window_{i}": e.payload for i, e in enumerate(self.entries)}
    if self.best is not None:
      payloads["best"] = self.best.payload
    return meta, payloads

  @classmethod
  def from_state_dict(cls, meta, payloads) -> "ARTController":
    """Rebuilds a controller saved with :meth:`state_dict`."""
    ctl = cls(meta["b"], meta["max_epochs"])
    ctl.epochs_seen = int(meta["epochs_seen"])
    ctl.best_mean = -math.inf if meta["best_mean"] is None else float(meta["best_mean"])
    ctl.entries = [WindowEntry(int(ep), float(acc), payloads.get(f"window_{i}"))
                   for i, (ep, acc) in enumerate(meta["entries"])]
    if meta["best"] is not None:
      ctl.best = WindowEntry(int(meta["best"][0]), float(meta["best"][1]), payloads.get("best"))
    ctl.stopped = meta["stopped"]
    return ctl
