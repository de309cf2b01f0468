"""What ``--init-from`` names: a hypersparse-jax run or checkpoint folder, or a PyTorch file.

:func:`identify` looks at the path (folder layout, or a file's first bytes) before anything is
loaded, so that a wrong path gets one line saying what it is instead of a loader's traceback.

Accepted folders, from the top down: a run directory (``OUTDIR``, holding ``checkpoints/``),
its ``checkpoints/`` folder, one kind of checkpoint (``checkpoints/best``, ``latest`` or
``init``: its newest step), or one step (``checkpoints/best/33``). From a run or ``checkpoints/``
folder the ``best`` checkpoint is taken (the fine-tuned model), else ``latest``.
Accepted files: PyTorch checkpoints, either zip-based (``torch.save``'s format since 1.6) or a
legacy pickle.
"""

from __future__ import annotations

import os
import zipfile
from typing import NamedTuple, Optional

KINDS = ("best", "latest", "init")


class InitSource(NamedTuple):
  format: str                      # 'orbax' or 'torch'
  directory: Optional[str] = None  # orbax: the checkpoints folder (holding best/latest/init)
  kind: Optional[str] = None       # orbax: 'best', 'latest' or 'init' (None: best, else latest)
  step: Optional[int] = None       # orbax: the step (None: the newest)


def _steps(folder):
  try:
    return [n for n in os.listdir(folder) if n.isdigit() and os.path.isdir(os.path.join(folder, n))]
  except OSError:
    return []


def _describe_file(path: str) -> str:
  """What a file that is no PyTorch checkpoint looks like, in a few words."""
  size = os.path.getsize(path)
  if size == 0:
    return "an empty file (0 bytes)"
  with open(path, "rb") as f:
    head = f.read(4096)
  if head.startswith(b"PK"):
    try:
      with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    except zipfile.BadZipFile:
      return "a damaged zip archive"
    if names and all(n.endswith((".npy", ".json")) for n in names):
      return "a NumPy .npz archive (e.g. model_sparse.npz, which only load_sparse reads)"
    return "a zip archive without PyTorch's data.pkl"
  if b"\x00" not in head:
    try:
      head.decode("utf-8")
      return "a text file"
    except UnicodeDecodeError:
      pass
  return "a binary file of unknown format"


def _is_torch_file(path: str) -> bool:
  with open(path, "rb") as f:
    head = f.read(4)
  if head.startswith(b"PK"):
    try:
      with zipfile.ZipFile(path) as archive:
        return any(n == "data.pkl" or n.endswith("/data.pkl") for n in archive.namelist())
    except zipfile.BadZipFile:
      return False
  # Legacy torch.save: a pickle (protocol 2+ starts with 0x80, then the protocol number).
  return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def identify(path: str, option: str = "--init-from") -> InitSource:
  """Classifies ``path``; raises FileNotFoundError / ValueError with one line otherwise."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{option} {path!r} does not exist")
  if os.path.isfile(path):
    if _is_torch_file(path):
      return InitSource("torch")
    raise ValueError(f"{option} {path!r} is {_describe_file(path)}, not a checkpoint; pass a "
                     "hypersparse-jax run or checkpoint folder, or a PyTorch .pth/.pth.tar file")
  path = os.path.abspath(path)
  name, parent = os.path.basename(path), os.path.dirname(path)
  if name.isdigit() and os.path.basename(parent) in KINDS:  # checkpoints/best/33
    return InitSource("orbax", os.path.dirname(parent), os.path.basename(parent), int(name))
  if name in KINDS and _steps(path):  # checkpoints/best
    return InitSource("orbax", parent, name)
  directory = os.path.join(path, "checkpoints") if os.path.isdir(
      os.path.join(path, "checkpoints")) else path
  if any(_steps(os.path.join(directory, k)) for k in ("best", "latest")):
    return InitSource("orbax", directory)
  raise FileNotFoundError(f"{option} {path!r} holds no hypersparse-jax checkpoint (expected a run "
                          "folder, its checkpoints/ folder, checkpoints/best or one step of it)")
