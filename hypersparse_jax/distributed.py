"""Several processes (hosts) on one run: ``jax.distributed`` start-up, agreement, dead peers.

``hypersparse-train --coordinator-address HOST:PORT --num-processes N --process-id I`` (or
``--distributed`` where JAX detects these itself: SLURM, Open MPI, TPU pods) runs one process of
an N-process job. :func:`initialize` starts JAX's multi-controller runtime with short
heartbeat and shutdown timeouts; on CPU it selects gloo collectives.

Dead peers. When a process dies, JAX's coordination service notices (at once when the
coordinator, process 0, dies; after ``heartbeat_timeout`` seconds of silence otherwise) and
terminates every other process from C++ (an abort with a stack trace), which Python cannot
intercept: a survivor would otherwise wait on a collective forever, so this is the mechanism,
not a failure of it. :func:`supervise` therefore runs the training process as a child, passes
its output through, holds back the runtime's own log lines, and turns such an abort into one
line (``hypersparse-train: error: ...``) and exit status 1. The child dies with the supervisor
(``PR_SET_PDEATHSIG`` on Linux), so killing the process a user started kills the work too.

Agreement. Before anything is written, every process shares its configuration and any start-up
error with every other (:func:`allgather_json`, a ``process_allgather`` of JSON bytes), and
:func:`check_agreement` refuses the run on every process, naming the differing options, when one
was started with other options than process 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from typing import Any, Optional, Sequence

import jax
import numpy as np

HEARTBEAT_TIMEOUT_S = 20   # a silent peer is declared dead after this long
SHUTDOWN_TIMEOUT_S = 30    # at exit, how long a process waits for its peers
INIT_TIMEOUT_S = 300       # how long the processes wait for each other at start-up

WORKER_ENV = "HYPERSPARSE_DISTRIBUTED_WORKER"
# The coordination service's fatal message, and the runtime's log lines around it (glog format,
# stack frames) that the supervisor holds back.
_FATAL = "detected fatal errors"
_RUNTIME_LINE = re.compile(r"^([EWIF]\d{4} \d\d:\d\d:\d\d|\*\*\* |\s+@\s+0x|terminate called|"
                           r"  what\(\)|RPC: /|\d+$|The tasks have crashed|\[Gloo\] )")


def check_options(coordinator_address: Optional[str], num_processes: Optional[int],
                  process_id: Optional[int], auto: bool) -> bool:
  """Whether the options ask for a multi-process run; ValueError (naming the option and the
  value) for an incomplete or contradictory set."""
  given = {"--coordinator-address": coordinator_address, "--num-processes": num_processes,
           "--process-id": process_id}
  named = [k for k, v in given.items() if v is not None]
  if auto and named:
    raise ValueError(f"--distributed lets JAX detect the cluster (SLURM, Open MPI, TPU pod); "
                     f"do not combine it with {', '.join(named)}")
  if auto:
    return True
  if not named:
    return False
  if len(named) != 3:
    missing = [k for k in given if k not in named]
    raise ValueError(f"{', '.join(named)} also needs {', '.join(missing)} (every process gets "
                     "the same --coordinator-address and --num-processes, and its own "
                     "--process-id)")
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"--coordinator-address must be HOST:PORT (e.g. host0:1234), got "
                     f"{coordinator_address!r}")
  if num_processes < 1:
    raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process-id must lie in [0, {num_processes - 1}] for --num-processes "
                     f"{num_processes}, got {process_id}")
  return True


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *,
               heartbeat_timeout: int = HEARTBEAT_TIMEOUT_S) -> None:
  """``jax.distributed.initialize`` with this module's timeouts; gloo collectives on CPU.

  With no arguments JAX detects the cluster (SLURM, Open MPI, TPU pods). Call it before any
  other JAX computation.
  """
  # Only the CPU client reads it: harmless on GPU and TPU, needed for CPU collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=INIT_TIMEOUT_S,
                             heartbeat_timeout_seconds=int(heartbeat_timeout),
                             shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)


def is_primary() -> bool:
  """Whether this is process 0, the one that writes files and logs."""
  return jax.process_index() == 0


def to_host(tree: Any) -> Any:
  """NumPy copies of a pytree of arrays, whatever their sharding.

  A leaf sharded over several processes is gathered with ``process_allgather`` (a collective:
  every process must call this at the same point); local and fully replicated leaves are read
  directly.
  """
  from jax.experimental import multihost_utils

  def one(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(one, tree)


def allgather_json(obj: Any) -> list:
  """``[obj of process 0, obj of process 1, ...]``: every process's JSON-able ``obj``."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(data)] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(row[:n])) for row, n in zip(rows, sizes)]


def check_agreement(views: Sequence[dict]) -> None:
  """Raises ValueError unless no process reported an ``error`` and every ``config`` equals
  process 0's. ``views``: from :func:`allgather_json` of ``{"config": ..., "error": ...}``."""
  for i, view in enumerate(views):
    if view.get("error"):
      where = "" if len(views) == 1 else f"process {i}: "
      raise ValueError(where + view["error"])
  reference = views[0]["config"]
  for i, view in enumerate(views[1:], start=1):
    config = view["config"]
    diff = [f"{k}={config.get(k)!r} (process 0: {reference.get(k)!r})"
            for k in sorted(set(config) | set(reference)) if config.get(k) != reference.get(k)]
    if diff:
      raise ValueError(f"process {i} was started with another configuration than process 0: "
                       f"{', '.join(diff)}; start every process with the same options")


def check_same(value: Any, what: str) -> None:
  """Raises RuntimeError if the JSON-able ``value`` differs between processes (a guard on
  decisions that every process must take alike, e.g. the ART controller's)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  text = json.dumps(value, sort_keys=True)
  # a digest of fixed size: one compiled gather serves every call
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
  digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1, digest.size)
  if (digests != digests[0]).any():
    raise RuntimeError(f"processes disagree on {what}: process {jax.process_index()} has "
                       f"{text}; see the other processes' messages for theirs")


# ------------------------------------------------------------------------------------------------
# The supervisor
# ------------------------------------------------------------------------------------------------


def _die_with_parent():  # pragma: no cover - runs in the child between fork and exec
  try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass  # not Linux: the child outlives a SIGKILLed supervisor


def _lost_peers_reason(held: Sequence[str]) -> str:
  text = "".join(held)
  match = re.search(r"tasks are unhealthy[^\n]*\n((?:\d+\n)+)", text)
  if match:
    ids = ", ".join(match.group(1).split())
    return f"process {ids} stopped sending heartbeats"
  return "the coordinator (process 0) became unreachable"


def supervise(argv: Sequence[str], prog: str, process: str) -> int:
  """Runs ``main(argv)`` of :mod:`hypersparse_jax.cli` in a child process (see the module
  docstring) and returns its exit status; a dead peer becomes one line and status 1."""
  code = ("import sys; from hypersparse_jax.console import run; "
          f"sys.exit(run({prog!r}, 'cli', sys.argv[1:]))")
  child = subprocess.Popen([sys.executable, "-c", code, *argv],
                           env=dict(os.environ, **{WORKER_ENV: "1"}), stderr=subprocess.PIPE,
                           preexec_fn=_die_with_parent if sys.platform == "linux" else None)
  forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  held, fatal = [], False
  try:
    for raw in child.stderr:
      line = raw.decode(errors="replace")
      fatal = fatal or _FATAL in line
      if _RUNTIME_LINE.match(line) or fatal:
        held.append(line)
      else:
        sys.stderr.write(line)
        sys.stderr.flush()
    status = child.wait()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    if child.poll() is None:
      child.kill()
      child.wait()
  if fatal:
    print(f"{prog}: error: {process} lost its peers: {_lost_peers_reason(held)}; run every "
          "process again with the same command to resume from the last checkpoint",
          file=sys.stderr)
    return 1
  if status != 0:
    sys.stderr.writelines(line for line in held if not line.startswith("[Gloo] "))
  return status if status >= 0 else 128 - status
