"""Keep freed host memory in the process, so that XLA:CPU's per-step buffers cost no page faults.

XLA:CPU allocates a step's temporary buffers afresh at every call (ResNet-32, batch 64: one
0.85 GB arena). glibc's ``malloc`` serves blocks that large with ``mmap`` and returns them
with ``munmap`` when freed, so every step touches ~200,000 new pages: measured on a 2-core
x86-64 machine, 0.7 s of kernel time and ~15 % of the wall time of a 2 s training step.
:func:`retain_freed_memory` tells glibc to serve every block from its main heap and never to
give freed memory back, so the next step reuses the same pages (0 page faults per step).

The price is that the process keeps its peak memory until it exits — what a training process
does anyway. It changes nothing on GPU/TPU buffers, and nothing where the C library is not glibc
(macOS, musl): there it returns ``False``. The ``hypersparse-train`` CLI calls it on start-up
(``--no-retain-host-memory`` turns it off); in your own script call it before JAX's first
computation:

    import hypersparse_jax as hypersparse
    hypersparse.host_memory.retain_freed_memory()

The same effect for any process, set before it starts:
``GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import warnings

# mallopt(3) parameters (glibc <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1


def _glibc():
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # glibc only (musl has mallopt but ignores these parameters)
    return libc
  except (OSError, AttributeError):
    return None


def _jax_backend_started() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # noqa: BLE001  (private API: if it moves, assume not started)
    return False


def retain_freed_memory(*, warn: bool = True) -> bool:
  """Makes glibc keep freed memory for reuse (one heap, no ``mmap``, no trimming below 2 GiB).

  Call it before JAX's first computation: XLA's worker threads take their malloc arena when
  they start, and an arena taken before this call keeps giving large blocks back to the OS.

  Args:
    warn: warn when it is called too late (the JAX backend has already started).

  Returns:
    ``True`` when the settings took effect; ``False`` where the C library is not glibc, or
    when the JAX backend has already started (nothing is changed then).
  """
  libc = _glibc()
  if libc is None:
    return False
  if _jax_backend_started():
    if warn:
      warnings.warn("retain_freed_memory() called after JAX's backend started: XLA's threads "
                    "already hold their malloc arenas; call it before the first JAX "
                    "computation", RuntimeWarning, stacklevel=2)
    return False
  ok = (libc.mallopt(_M_ARENA_MAX, 1) == 1
        and libc.mallopt(_M_MMAP_MAX, 0) == 1
        and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1)
  return bool(ok)
