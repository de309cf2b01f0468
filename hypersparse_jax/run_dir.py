"""A run directory of ``hypersparse-train``: one owner at a time, files with the user's umask.

:class:`RunDirLock` is an OS file lock (``fcntl.flock`` on ``OUTDIR/.lock``) held for a run's
whole life. The kernel releases it when the process ends, however it ends (SIGKILL included),
so a lock left by a killed run is stale and the next run takes it over; a second run started
while the first is alive is refused at once, with the holder's PID (written into the lock file).

:func:`write_text_atomic` writes a file through a temporary file and a rename (a crash never
leaves half a file) with the permissions a plain ``open(path, 'w')`` would give
(``0o666 & ~umask``), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile

LOCK_NAME = ".lock"


class RunDirBusy(RuntimeError):
  """Another live process owns the run directory."""


def check_outdir(path: str, option: str = "--outdir") -> None:
  """Raises NotADirectoryError (one line, user terms) if ``path`` or a parent is a file."""
  current = os.path.abspath(os.path.expanduser(path))
  while True:
    if os.path.exists(current) and not os.path.isdir(current):
      what = "is a file" if current == os.path.abspath(os.path.expanduser(path)) else (
          f"lies under {current}, which is a file")
      raise NotADirectoryError(f"{option} {path!r} {what}, not a directory; pass a directory "
                               "(it is created if missing)")
    parent = os.path.dirname(current)
    if parent == current:
      return
    current = parent


def default_file_mode() -> int:
  """``0o666 & ~umask``: the mode of a file made by a plain ``open(path, 'w')``."""
  mask = os.umask(0o022)  # reading the umask means setting it; restored at once
  os.umask(mask)
  return 0o666 & ~mask


def write_text_atomic(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically, with the permissions of a plain ``open``."""
  write_bytes_atomic(path, text.encode())


def first_line(error: BaseException) -> str:
  """The first line of ``error``'s message, or its type name when the message is empty: what
  the CLIs put in their one-line errors."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def write_bytes_atomic(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    os.fchmod(fd, default_file_mode())
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class RunDirLock:
  """Exclusive ownership of a run directory for this process (see the module docstring).

  ``acquire()`` creates the directory if needed; ``release()`` unlocks and, if this lock created
  the directory and nothing but the lock file is in it (the run failed before writing anything),
  removes it again so that a refused command leaves no trace. Usable as a context manager.
  """

  def __init__(self, outdir: str):
    self.outdir = outdir
    self.path = os.path.join(outdir, LOCK_NAME)
    self._fd = None
    self._created = False

  def acquire(self) -> "RunDirLock":
    check_outdir(self.outdir)
    self._created = not os.path.isdir(self.outdir)
    os.makedirs(self.outdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      raise RunDirBusy(f"{self.outdir} is in use by another run (PID {holder}); wait for it to "
                       "end, or pass another --outdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:  # only a fresh directory that a failed start left empty
      if self._created and os.listdir(self.outdir) == [LOCK_NAME]:
        os.remove(self.path)
        os.rmdir(self.outdir)
    except OSError:
      pass  # best effort: an empty left-over directory does no harm
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
