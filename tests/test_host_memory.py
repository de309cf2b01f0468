"""host_memory.retain_freed_memory: freed blocks are reused without new page faults."""

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import pytest

from hypersparse_jax import host_memory

# malloc + touch + free a 256 MiB block twice (plain malloc, as XLA's allocator: no huge-page
# advice), printing the page faults of the second time.
_SCRIPT = textwrap.dedent("""
    import ctypes, resource, sys
    from hypersparse_jax import host_memory
    applied = host_memory.retain_freed_memory() if sys.argv[1] == "retain" else None
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 256 * 2**20
    def touch_once():
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
    touch_once()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch_once()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")
_PAGES = 256 * 2**20 // os.sysconf("SC_PAGE_SIZE")


def _second_allocation_faults(mode):
  out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True,
                       check=True, env={**os.environ, "GLIBC_TUNABLES": ""})
  applied, faults = out.stdout.split()
  return applied, int(faults)


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc only (the function returns False)")
def test_freed_block_is_reused_without_page_faults():
  applied, faults = _second_allocation_faults("retain")
  assert applied == "True"
  assert faults < 0.02 * _PAGES, faults  # the freed 256 MiB are reused: (almost) no new pages
  # Control: glibc's default unmaps the freed block, so the same allocation faults every page in.
  applied, faults = _second_allocation_faults("default")
  assert applied == "None"
  assert faults > 0.9 * _PAGES, faults


def test_after_backend_start_warns_and_changes_nothing():
  jnp.ones(3).block_until_ready()  # the backend is running in this process
  with pytest.warns(RuntimeWarning, match="before the first JAX computation"):
    assert host_memory.retain_freed_memory() is False
  assert host_memory.retain_freed_memory(warn=False) is False
