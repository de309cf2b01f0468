"""The ART controller: when to stop regularising, and which pruned model to keep (host side).

After every regularisation epoch the training loop magnitude-prunes a copy of the model to the
target sparsity, measures its accuracy on the training data as the training loader serves it
(augmented, eval mode) and calls :meth:`ARTController.update`. The controller keeps a window of
the last ``2·b+1`` epochs and one *remembered* entry (epoch, pruned accuracy, payload, and the
window mean it was remembered with). With the reference's rule (``rule='reference'``, the
default; GreenAutoML4FAS/HyperSparse ``utils/art.py``, ``ART.forward_epoch``)::

    if window_mean > remembered.pruned_accuracy:        # strictly; 0 before any entry
        remembered = middle entry, remembered.window_mean = window_mean
    stop = remembered.window_mean > dense_train_accuracy  # every epoch, after the update

The middle entry is the one at position ``min(len − 1, b)`` from the oldest (while the window
is still filling, that is not the newest one). Note the bar: the window mean is compared with
the remembered entry's *own* pruned accuracy, not with the best window mean so far. With a
spike in a middle entry, its own accuracy lies above its window mean, and a later, flatter
window whose mean beats the previous best mean may still not replace it (and vice versa).

``rule='best_mean'`` compares with the best window mean so far instead (the wording of earlier
versions of this library and of its design notes). It stops at another epoch or keeps another
entry than the reference in 6 % of uniformly random accuracy sequences and 12 % of noisy
rising ones (b = 1; ``benchmarks/controller_rules.py``, ``benchmarks/results/controller_rules.json``).

The reference loops forever if the stop rule never fires; here ``max_epochs`` caps the
regularisation epochs and the decision says why it stopped. :meth:`state_dict` /
:meth:`from_state_dict` save and restore everything, so a resumed run decides exactly as an
uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any, List, NamedTuple, Optional

RULES = ("reference", "best_mean")


class WindowEntry(NamedTuple):
  epoch: int
  pruned_accuracy: float
  payload: Any  # e.g. the model's variables at that epoch; opaque to the controller
  window_mean: Optional[float] = None  # set on the remembered entry: the mean it won with


class ARTDecision(NamedTuple):
  """What :meth:`ARTController.update` decided after one regularisation epoch."""
  stop: bool                 # leave the regularisation phase now
  reason: Optional[str]      # 'converged', 'max_epochs' or None
  improved: bool             # a new entry was remembered this epoch
  window_mean: float         # mean pruned accuracy of the current window
  best_mean: float           # window mean stored with the remembered entry (the stop rule's)
  best_epoch: Optional[int]  # epoch of the remembered entry
  message: str
  best_pruned_accuracy: Optional[float] = None  # the remembered entry's own pruned accuracy


class ARTController:
  """Stop rule and best-model window of ART.

  Args:
    window: ``b``; the window holds the last ``2·b + 1`` epochs (reference: 1).
    max_epochs: cap on regularisation epochs (None: no cap, as the reference; not advised).
    rule: ``'reference'`` (default): a window replaces the remembered entry when its mean
      beats that entry's own pruned accuracy, as in the authors' code; ``'best_mean'``: when
      its mean beats the best window mean so far.
  """

  def __init__(self, window: int = 1, max_epochs: Optional[int] = None,
               rule: str = "reference"):
    if int(window) != window or window < 0:
      raise ValueError(f"window (b) must be an integer >= 0, got {window!r}")
    if max_epochs is not None and (int(max_epochs) != max_epochs or max_epochs < 1):
      raise ValueError(f"max_epochs must be a positive integer or None, got {max_epochs!r}")
    if rule not in RULES:
      raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    self.b = int(window)
    self.max_epochs = None if max_epochs is None else int(max_epochs)
    self.rule = rule
    self.entries: List[WindowEntry] = []
    self.best: Optional[WindowEntry] = None
    self.epochs_seen = 0
    self.stopped: Optional[str] = None

  @property
  def window_size(self) -> int:
    return 2 * self.b + 1

  @property
  def best_mean(self) -> float:
    """Window mean stored with the remembered entry (``-inf`` before there is one)."""
    return -math.inf if self.best is None else self.best.window_mean

  def _bar(self) -> float:
    """What the current window mean must strictly exceed to replace the remembered entry."""
    if self.rule == "reference":
      return 0.0 if self.best is None else self.best.pruned_accuracy
    return self.best_mean

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
      >>> ctl.update(0, 0.50, 0.90, "model@0").stop   # mean 0.50 > 0: remember epoch 0
      False
      >>> d = ctl.update(1, 0.70, 0.90, "model@1")  # mean 0.60 > 0.50 (epoch 0's accuracy)
      >>> d.best_epoch, round(d.best_mean, 2), d.best_pruned_accuracy
      (1, 0.6, 0.7)
      >>> d = ctl.update(2, 0.99, 0.70, "model@2")  # mean 0.73 > 0.70 (epoch 1's): middle = 1
      >>> d.stop, d.reason, d.best_epoch, round(d.best_mean, 2), ctl.best.payload
      (True, 'converged', 1, 0.73, 'model@1')
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
    improved = mean > self._bar()
    if improved:
      middle = self.entries[min(len(self.entries) - 1, self.b)]
      self.best = middle._replace(window_mean=mean)
    reason, message = None, ""
    if self.best_mean > dense_accuracy:
      reason = "converged"
      message = (f"window mean of pruned accuracy {self.best_mean:.4f} (epoch {self.best.epoch}) "
                 f"exceeds the dense training accuracy {dense_accuracy:.4f}: regularisation done")
    elif self.max_epochs is not None and self.epochs_seen >= self.max_epochs:
      reason = "max_epochs"
      if self.best is None:  # no window ever beat 0: keep the current middle entry
        middle = self.entries[min(len(self.entries) - 1, self.b)]
        self.best = middle._replace(window_mean=mean)
      message = (f"stop rule not met after {self.epochs_seen} regularisation epochs "
                 f"(--max-art-epochs {self.max_epochs}); fine-tuning the remembered pruned model "
                 f"(epoch {self.best.epoch}, window mean {self.best_mean:.4f}, dense training "
                 f"accuracy {dense_accuracy:.4f}). Raise the cap, lambda_init or eta to converge")
    self.stopped = reason
    return ARTDecision(reason is not None, reason, improved, mean, self.best_mean,
                       None if self.best is None else self.best.epoch, message,
                       None if self.best is None else self.best.pruned_accuracy)

  # ----- persistence --------------------------------------------------------------------------

  def state_dict(self):
    """``(meta, payloads)``: JSON-able metadata and ``{name: payload}`` to save with orbax."""
    meta = {
        "b": self.b, "max_epochs": self.max_epochs, "rule": self.rule,
        "epochs_seen": self.epochs_seen,
        "best": None if self.best is None else [self.best.epoch, self.best.pruned_accuracy,
                                                self.best.window_mean],
        "entries": [[e.epoch, e.pruned_accuracy] for e in self.entries],
        "stopped": self.stopped,
    }
    payloads = {f"window_{i}": e.payload for i, e in enumerate(self.entries)}
    if self.best is not None:
      payloads["best"] = self.best.payload
    return meta, payloads

  @classmethod
  def from_state_dict(cls, meta, payloads) -> "ARTController":
    """Rebuilds a controller saved with :meth:`state_dict`.

    State saved before the ``rule`` option existed (hypersparse-jax 0.1) was made with the
    ``'best_mean'`` rule and is restored with it.
    """
    rule = meta.get("rule", "best_mean")
    ctl = cls(meta["b"], meta["max_epochs"], rule)
    ctl.epochs_seen = int(meta["epochs_seen"])
    ctl.entries = [WindowEntry(int(ep), float(acc), payloads.get(f"window_{i}"))
                   for i, (ep, acc) in enumerate(meta["entries"])]
    best = meta["best"]
    if best is not None:
      mean = best[2] if len(best) > 2 else meta["best_mean"]  # 0.1 kept the mean apart
      ctl.best = WindowEntry(int(best[0]), float(best[1]), payloads.get("best"), float(mean))
    ctl.stopped = meta["stopped"]
    return ctl
