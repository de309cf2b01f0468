"""Byte-level language-model data: the Python standard library's source code (``pysource``).

Data only (the model is :class:`hypersparse_jax.models.TransformerLM`, the steps and metrics
:mod:`hypersparse_jax.tasks.language_model`, the protocol :class:`hypersparse_jax.train.Trainer`).

**Corpus.** Every ``*.py`` file under the running interpreter's standard library
(``sysconfig.get_paths()['stdlib']``; ``site-packages`` and ``dist-packages`` left out), read as
bytes (vocabulary 256): about 1,800 files and 31 MB on CPython 3.11, no download. Another
folder can be given instead (``root``; the tests use a small generated one).

**Split.** By file, deterministically: a file goes to *test* when ``u < 0.05``, to *validation*
when ``0.05 <= u < 0.10``, else to *train*, where ``u`` is the first 8 bytes of
``sha256(relative posix path)`` read as a big-endian integer divided by 2**64. About 90/5/5 % of
the files and, as files differ in size, roughly that of the bytes. Each split is the
concatenation of its files in sorted path order, joined as they are (no separator; source
files normally end with a newline). :attr:`TextData.info` (written to ``summary.json``) records the Python version, the
file and byte counts and a SHA-256 of each split's bytes, since the corpus differs between
Python versions.

**Samples.** Training batches are ``batch_size`` windows of ``context + 1`` bytes at random
offsets of the train split; the offsets of epoch ``e`` are a function of ``(seed, e)`` only, so
a resumed run sees exactly the windows of an uninterrupted one (as the image data's epoch
permutation). Validation and test use fixed, non-overlapping windows of ``context + 1`` bytes
(window ``k`` starts at byte ``k·(context + 1)``; the bytes after the last whole window are not
used), optionally an evenly spaced subset of them (``max_windows``). The model reads the first
``context`` bytes of a window and predicts each next byte, so a window scores ``context`` bytes.
Everything is held in memory as uint8.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import platform
import sysconfig
import warnings
from collections.abc import Iterator
from typing import Optional

import numpy as np

__all__ = [
  "TEXT_DATASETS",
  "VOCAB_SIZE",
  "PRUNED_EVAL_WINDOWS",
  "TextData",
  "split_of",
  "stdlib_root",
  "load_pysource",
  "fixed_windows",
  "window_offsets",
  "train_batches",
  "window_batches",
]

TEXT_DATASETS = ("pysource",)
VOCAB_SIZE = 256
SPLITS = ("train", "val", "test")
TEST_FRACTION = 0.05
VAL_FRACTION = 0.05
# Fixed training windows on which ART measures the pruned copy's next-byte accuracy.
PRUNED_EVAL_WINDOWS = 256
_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")
# SeedSequence tag of the training-window offsets (keeps them apart from other draws of a seed)
_WINDOW_TAG = 0x7E47


@dataclasses.dataclass(frozen=True, eq=False)
class TextData:
  """A byte corpus split into train / validation / test streams (uint8, in host memory).

  Attributes:
    name: dataset name (``'pysource'``).
    train, val, test: 1-D uint8 arrays, the concatenated files of each split.
    context: bytes the model reads; windows hold ``context + 1`` bytes.
    max_eval_windows: cap on the validation / test windows (evenly spaced subset), or None.
    info: provenance (root, Python version, per-split file and byte counts and SHA-256).
  """

  name: str
  train: np.ndarray
  val: np.ndarray
  test: np.ndarray
  context: int
  max_eval_windows: Optional[int] = None
  info: dict = dataclasses.field(default_factory=dict)

  num_classes = VOCAB_SIZE

  def __post_init__(self):
    if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 1:
      raise ValueError(f"context must be a positive integer, got {self.context!r}")
    if self.max_eval_windows is not None and self.max_eval_windows < 1:
      raise ValueError(f"max_eval_windows must be >= 1 or None, got {self.max_eval_windows!r}")
    for split in SPLITS:
      stream = getattr(self, split)
      if not isinstance(stream, np.ndarray) or stream.dtype != np.uint8 or stream.ndim != 1:
        raise TypeError(f"{self.name}: {split} must be a 1-D uint8 numpy array, got "
                        f"{type(stream).__name__} {getattr(stream, 'dtype', None)} "
                        f"{getattr(stream, 'shape', None)}")
      if len(stream) < self.context + 1:
        raise ValueError(
            f"{self.name}: the {split} split has {len(stream)} bytes, fewer than one window of "
            f"context + 1 = {self.context + 1}; use a smaller --context or a larger corpus")

  @property
  def window(self) -> int:
    return self.context + 1

  def eval_windows(self, split: str) -> np.ndarray:
    """The fixed validation or test windows, uint8 ``(N, context + 1)``."""
    if split not in ("val", "test"):
      raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    return fixed_windows(getattr(self, split), self.context, self.max_eval_windows)

  def pruned_eval_windows(self) -> np.ndarray:
    """:data:`PRUNED_EVAL_WINDOWS` training windows at evenly spaced offsets
    ``round(k · (len(train) − context − 1) / (W − 1))``, ``k = 0 … W − 1`` (fewer distinct
    ones on a tiny corpus): ART's fixed subset for the pruned-versus-dense comparison."""
    last = len(self.train) - self.window
    offsets = np.unique(np.round(np.linspace(0, last, PRUNED_EVAL_WINDOWS)).astype(np.int64))
    return self.train[offsets[:, None] + np.arange(self.window)]

  @property
  def num_train(self) -> int:
    """Non-overlapping windows the train split holds (training draws random ones)."""
    return len(self.train) // self.window

  @property
  def num_val(self) -> int:
    """Non-overlapping windows of the validation split (all of them)."""
    return len(self.val) // self.window

  @property
  def num_test(self) -> int:
    """Non-overlapping windows of the test split (all of them)."""
    return len(self.test) // self.window


def split_of(relative_path: str) -> str:
  """``'train'``, ``'val'`` or ``'test'`` for a file's relative posix path (see module doc)."""
  u = int.from_bytes(hashlib.sha256(relative_path.encode("utf-8")).digest()[:8], "big") / 2**64
  if u < TEST_FRACTION:
    return "test"
  if u < TEST_FRACTION + VAL_FRACTION:
    return "val"
  return "train"


def stdlib_root() -> pathlib.Path:
  """The running interpreter's standard-library folder."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: pathlib.Path) -> list[str]:
  """Relative posix paths of the ``*.py`` files under ``root`` (no symlinked folders, no
  site-packages), sorted."""
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS]
    for name in files:
      if name.endswith(".py"):
        found.append((pathlib.Path(folder) / name).relative_to(root).as_posix())
  return sorted(found)


def _looks_like_text(data: bytes) -> bool:
  """UTF-8 without NUL bytes: what a source file is (binary files named *.py are not)."""
  if b"\x00" in data:
    return False
  try:
    data.decode("utf-8")
  except UnicodeDecodeError:
    return False
  return True


def load_pysource(root: str | os.PathLike | None = None, *, context: int,
                  max_eval_windows: Optional[int] = None) -> TextData:
  """Reads and splits the ``*.py`` files under ``root`` (default: :func:`stdlib_root`).

  Args:
    root: folder to read; None for the running interpreter's standard library.
    context: bytes the model reads (windows hold ``context + 1``).
    max_eval_windows: evaluate validation / test on at most this many evenly spaced windows.

  Returns:
    A :class:`TextData`.

  Raises:
    FileNotFoundError: ``root`` is not a folder.
    ValueError: no ``*.py`` file, or a split too small for one window.
  """
  root = stdlib_root() if root is None else pathlib.Path(root).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f"pysource: {root} is not a folder (data_dir must hold *.py files)")
  files = _source_files(root)
  if not files:
    raise ValueError(f"pysource: no *.py file under {root}")
  parts = {split: [] for split in SPLITS}
  not_text = []
  for rel in files:
    data = (root / rel).read_bytes()
    parts[split_of(rel)].append(data)
    if not _looks_like_text(data):
      not_text.append(rel)
  if not_text:
    warnings.warn(f"pysource: {len(not_text)} of {len(files)} *.py files under {root} are not "
                  f"UTF-8 text (e.g. {not_text[0]}); the model trains on their bytes as they are",
                  stacklevel=2)
  streams, info = {}, {"root": str(root), "python_version": platform.python_version(),
                       "split_rule": "sha256(relative path)[:8] / 2**64: < 0.05 test, "
                                     "< 0.10 val, else train", "splits": {}}
  for split in SPLITS:
    data = b"".join(parts[split])
    streams[split] = np.frombuffer(data, np.uint8).copy()
    info["splits"][split] = {"files": len(parts[split]), "bytes": len(data),
                             "sha256": hashlib.sha256(data).hexdigest()}
  info["files"] = len(files)
  info["files_not_text"] = len(not_text)
  info["bytes"] = sum(len(streams[s]) for s in SPLITS)
  return TextData("pysource", streams["train"], streams["val"], streams["test"], context,
                  max_eval_windows, info)


def fixed_windows(stream: np.ndarray, context: int, max_windows: Optional[int] = None):
  """Non-overlapping windows ``stream[k·(context+1) : (k+1)·(context+1)]`` as uint8
  ``(N, context + 1)``; with ``max_windows``, ``max_windows`` of them evenly spaced
  (indices ``round(linspace(0, N − 1, max_windows))``)."""
  window = context + 1
  n = len(stream) // window
  windows = stream[:n * window].reshape(n, window)
  if max_windows is not None and max_windows < n:
    windows = windows[np.round(np.linspace(0, n - 1, max_windows)).astype(np.int64)]
  return windows


def window_offsets(num_bytes: int, window: int, batch_size: int, steps: int, *, seed: int,
                   epoch: int) -> np.ndarray:
  """int64 ``(steps, batch_size)`` start offsets of an epoch's training windows, uniform in
  ``[0, num_bytes − window]``, a function of ``(seed, epoch)`` only."""
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
  rng = np.random.default_rng([int(seed), int(epoch), _WINDOW_TAG])
  return rng.integers(0, num_bytes - window + 1, size=(steps, batch_size), dtype=np.int64)


def train_batches(data: TextData, batch_size: int, steps: int, *, seed: int, epoch: int,
                  start_step: int = 0, rows: slice | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Yields ``steps`` training batches ``{'tokens': uint8 (B, context+1), 'mask': bool (B,)}``
  of random windows (see :func:`window_offsets`), from ``start_step`` on. ``rows``: only these
  rows of every batch (this process's part of the global batch in a multi-process run, see
  ``sharding.process_rows``); the other windows are never gathered."""
  if not 0 <= start_step <= steps:
    raise ValueError(f"start_step must lie in [0, {steps}], got {start_step}")
  offsets = window_offsets(len(data.train), data.window, batch_size, steps, seed=seed,
                           epoch=epoch)
  span = np.arange(data.window)
  mask = np.ones(batch_size, bool)
  if rows is not None:
    offsets, mask = offsets[:, rows], mask[rows]
  for step in range(start_step, steps):
    yield {"tokens": data.train[offsets[step][:, None] + span], "mask": mask}


def window_batches(windows: np.ndarray, batch_size: int, rows: slice | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
  """Fixed windows in order, in batches padded to ``batch_size`` (``mask=False`` padding);
  ``rows`` as in :func:`train_batches`."""
  n = len(windows)
  for start in range(0, n, batch_size):
    index = np.arange(start, start + batch_size) % n
    mask = np.zeros(batch_size, bool)
    mask[:min(batch_size, n - start)] = True
    if rows is not None:
      index, mask = index[rows], mask[rows]
    yield {"tokens": windows[index], "mask": mask}
