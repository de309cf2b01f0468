"""The console commands' entry points: Ctrl-C at any moment is one line and exit status 130.

``hypersparse-train``, ``hypersparse-search``, ``hypersparse-export`` and ``hypersparse-plot``
start here (``python -c "from hypersparse_jax.console import train; train()" ARGS`` is the
same; ``python -m hypersparse_jax.cli`` imports JAX before this guard). This module imports
nothing heavy: the command's own module (and with it JAX, Flax, optax) is imported inside the
guard, so a Ctrl-C during those seconds of start-up is one line too, not a traceback of whatever
import it interrupted. ("Any moment" starts when the interpreter runs this module: a SIGINT in
the interpreter's own first milliseconds, while it imports ``site``, is Python's to report.)

An interrupted command ends with ``os._exit(130)`` once its stdout and stderr are flushed,
skipping the interpreter's finalisation. Why: JAX compiles asynchronously on its CPU client's
thread pool. A Ctrl-C while the main thread waits for a compilation leaves that compilation
running; at a normal exit, Python's final garbage collection then destroys the client
(``jax::PyClient`` -> ``xla::ifrt::PjRtClient::~PjRtClient``, which joins the pool) while the
compile thread still uses it (``PjRtCompiler::CompileAndLoad`` -> ``MakeShardings`` ->
``SingleDeviceSharding::Create``): a segmentation fault (exit 139) after the "interrupted" line,
seen with gdb in 3 of 6 runs interrupted during start-up on a loaded 2-core machine. Nothing is
lost by skipping finalisation: checkpoints are written synchronously and Ctrl-C is deferred while
one is written, ``metrics.jsonl`` is fsynced, and the commands release their run-directory locks
and print their message before returning 130.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from typing import Callable, Optional, Sequence

INTERRUPTED = 130

_INTERRUPT = threading.Event()


def on_sigint(signum, frame):
  """The commands' SIGINT handler: raises KeyboardInterrupt as Python's default does, and
  remembers it. A KeyboardInterrupt raised while Python runs a garbage-collection callback (JAX
  registers one) is reported as unraisable and swallowed, so Ctrl-C could be lost; the commands
  therefore also check :func:`interrupt_pending` (the training loop at every step and epoch)."""
  _INTERRUPT.set()
  raise KeyboardInterrupt


def interrupt_pending() -> bool:
  """Whether :func:`on_sigint` has seen Ctrl-C since :func:`clear_interrupt`."""
  return _INTERRUPT.is_set()


def clear_interrupt() -> None:
  _INTERRUPT.clear()


def install_sigint_handler():
  """Installs :func:`on_sigint` (main thread only) and returns the previous handler, or None
  when nothing was installed. A Ctrl-C already remembered is kept when :func:`on_sigint` was
  installed before (by :func:`run`, during start-up); otherwise the flag starts clear."""
  if threading.current_thread() is not threading.main_thread():
    return None
  previous = signal.getsignal(signal.SIGINT)
  if previous is not on_sigint:
    clear_interrupt()
  signal.signal(signal.SIGINT, on_sigint)
  return previous


def _quiet_interrupts(hook):
  """An ``sys.unraisablehook`` that drops the KeyboardInterrupts :func:`on_sigint` raised in a
  callback (they are remembered, and acted on) and passes everything else to ``hook``."""
  def quiet(unraisable):
    if unraisable.exc_type is KeyboardInterrupt and interrupt_pending():
      return
    hook(unraisable)
  return quiet


def _flush() -> None:
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass


def _exit_interrupted(line: Optional[str] = None) -> None:
  if line is not None:
    print(line, file=sys.stderr)
  _flush()
  os._exit(INTERRUPTED)  # see the module doc: no finalisation under a running compilation


def run(prog: str, module: str, argv: Optional[Sequence[str]] = None) -> int:
  """Imports ``hypersparse_jax.<module>`` and returns its ``main(argv)``; Ctrl-C during the
  import, an exit status 130 from ``main`` or a KeyboardInterrupt it lets escape end the process
  with one line and status 130 (this function does not return then: see the module doc)."""
  # During the imports (seconds: JAX, Flax, optax...) Ctrl-C ends the process at once: nothing
  # has been written and no JAX client exists, and a KeyboardInterrupt raised inside the imports
  # would surface as another library's error and traceback (NumPy turns it into an ImportError
  # and prints it). Also when a shell without job control started us with SIGINT ignored: the
  # commands always honoured an explicit kill -INT.
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, lambda *_: _exit_interrupted(
        f"{prog}: interrupted; it had not started: nothing was written"))
  sys.unraisablehook = _quiet_interrupts(sys.unraisablehook)
  main: Callable[..., int] = importlib.import_module(f"hypersparse_jax.{module}").main
  clear_interrupt()
  install_sigint_handler()
  try:
    code = main(argv)
  except KeyboardInterrupt:  # where main() lets one escape (it reports its own otherwise)
    _exit_interrupted(f"{prog}: interrupted; run the same command to resume")
  if code == INTERRUPTED:
    _exit_interrupted()
  return code


def train() -> None:
  """``hypersparse-train`` (:mod:`hypersparse_jax.cli`)."""
  sys.exit(run("hypersparse-train", "cli"))


def search() -> None:
  """``hypersparse-search`` (:mod:`hypersparse_jax.search`)."""
  sys.exit(run("hypersparse-search", "search"))


def export() -> None:
  """``hypersparse-export`` (:mod:`hypersparse_jax.onnx_export`)."""
  sys.exit(run("hypersparse-export", "onnx_export"))


def plot() -> None:
  """``hypersparse-plot`` (:mod:`hypersparse_jax.plotting`)."""
  sys.exit(run("hypersparse-plot", "plotting"))
