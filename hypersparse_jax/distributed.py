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

Start-up. Process 0 checks the coordinator's port before starting the coordinator
(:func:`check_coordinator_port`); the coordinator waits ``startup_timeout`` seconds for every
process to register, then reports the missing ones to those that came, and the supervisor turns
that report (or a process's own deadline, or the coordinator's refusal of a process id beyond
its count) into one line (:func:`_startup_failure`). Right after start-up the processes compare
their ``--num-processes`` through the coordinator's key-value store
(:func:`_check_num_processes`).

Agreement. Before anything is written, every process shares its configuration and any start-up
error with every other (:func:`allgather_json`, a ``process_allgather`` of JSON bytes), and
:func:`check_agreement` refuses the run on every process, naming the differing options, when one
was started with other options than process 0.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from typing import Any, Optional, Sequence

import jax
import numpy as np

HEARTBEAT_TIMEOUT_S = 20   # a silent peer is declared dead after this long
SHUTDOWN_TIMEOUT_S = 30    # at exit, how long a process waits for its peers
STARTUP_TIMEOUT_S = 120    # how long the processes wait for each other at start-up
# A process's own start-up deadline exceeds the coordinator's by this much, so that when some
# process never arrives, the coordinator's message (naming it) reaches the others first.
_CLIENT_STARTUP_SLACK_S = 10

WORKER_ENV = "HYPERSPARSE_DISTRIBUTED_WORKER"
# The coordination service's fatal message, and the runtime's log lines around it (glog format,
# stack frames) that the supervisor holds back.
_FATAL = "detected fatal errors"
_RUNTIME_LINE = re.compile(r"^([EWIF]\d{4} \d\d:\d\d:\d\d|\*\*\* |\s+@\s+0x|terminate called|"
                           r"  what\(\)|RPC: /|\d+$|The tasks have crashed|\[Gloo\] |"
                           r"Additional GRPC error information)")
# The lines that continue one of the runtime's multi-line messages (the start-up barrier's
# report, gRPC's error details), held when they follow a held line.
_CONTINUATION = re.compile(r"^(# of tasks|The first task|Some timed out|\s*\[type\.googleapis|"
                           r"Original error:|\s*:[A-Z_]+:Error received|\s*$)")


def _is_runtime_line(line: str, after_runtime_line: bool) -> bool:
  """Whether the supervisor holds back ``line`` of the child's stderr as the runtime's (glog
  lines, stack frames, gRPC's details, and the lines that continue them)."""
  return bool(_RUNTIME_LINE.match(line)
              or (after_runtime_line and _CONTINUATION.match(line)))


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


class CoordinatorPortInUse(ValueError):
  """Process 0 cannot serve the coordinator on the port of ``--coordinator-address``."""


def check_coordinator_port(coordinator_address: str) -> None:
  """Raises :class:`CoordinatorPortInUse` unless process 0 can listen on the port of
  ``HOST:PORT``.

  The coordinator listens on every interface (``[::]:PORT``, JAX's default), so the test binds
  there as gRPC does (``SO_REUSEADDR``: a closed connection's TIME_WAIT does not count). Why:
  when the port is taken, jaxlib's ``get_distributed_runtime_service`` crashes with a
  segmentation fault in about half the attempts (JAX 0.10.2) instead of raising.
  """
  port = int(coordinator_address.rpartition(":")[2])
  bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS")  # JAX's override of the bind address
  host = bind.rpartition(":")[0].strip("[]") if bind else "::"
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  try:
    sock = socket.socket(family, socket.SOCK_STREAM)
  except OSError:  # no IPv6 on this host: gRPC then listens on 0.0.0.0
    family, host = socket.AF_INET, "0.0.0.0"
    sock = socket.socket(family, socket.SOCK_STREAM)
  with sock:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and host == "::":
      sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
      sock.bind((host, port))
      sock.listen(1)
    except OSError as e:
      raise CoordinatorPortInUse(
          f"process 0 cannot serve the coordinator on port {port} of --coordinator-address "
          f"{coordinator_address}: {e.strerror or e} (another program, or an earlier run, "
          "holds it); start every process with another free port") from None


@contextlib.contextmanager
def _coordinator_register_timeout(seconds: int):
  """Makes ``jax.distributed.initialize`` start the coordinator with a cluster-registration
  timeout of ``seconds``: when processes are missing at start-up, the coordinator then ends
  every process that arrived with a message naming the missing ones and the count it expects
  ("# of tasks that reached the barrier: 1/2 ... timed out task names: 1"). JAX 0.10 passes no
  such timeout (jaxlib's default is an hour), and a process's own start-up deadline says only
  ``DEADLINE_EXCEEDED``. Nothing changes where jaxlib lacks the argument."""
  from jax._src import distributed as jax_distributed
  lib = jax_distributed._jax
  start = getattr(lib, "get_distributed_runtime_service", None)
  if start is None or "cluster_register_timeout" not in (start.__doc__ or ""):
    yield
    return
  setattr(lib, "get_distributed_runtime_service",
          functools.partial(start, cluster_register_timeout=int(seconds)))
  try:
    yield
  finally:
    setattr(lib, "get_distributed_runtime_service", start)


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *,
               heartbeat_timeout: int = HEARTBEAT_TIMEOUT_S,
               startup_timeout: int = STARTUP_TIMEOUT_S) -> None:
  """``jax.distributed.initialize`` with this module's timeouts; gloo collectives on CPU.

  With no arguments JAX detects the cluster (SLURM, Open MPI, TPU pods). Call it before any
  other JAX computation. Process 0 first checks that it can serve the coordinator's port
  (:func:`check_coordinator_port`). The processes wait ``startup_timeout`` seconds for each
  other; then the coordinator ends them all, naming the processes that never arrived (see
  :func:`supervise`, which turns that into one line).
  """
  if coordinator_address is not None and process_id == 0:
    check_coordinator_port(coordinator_address)
  # Only the CPU client reads it: harmless on GPU and TPU, needed for CPU collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  with _coordinator_register_timeout(startup_timeout):
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=int(startup_timeout)
                               + _CLIENT_STARTUP_SLACK_S,
                               heartbeat_timeout_seconds=int(heartbeat_timeout),
                               shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
  if num_processes is not None:
    _check_num_processes(num_processes, process_id, startup_timeout)


def _check_num_processes(num_processes: int, process_id: int, timeout: int) -> None:
  """Raises ValueError, naming both counts, when this process's ``num_processes`` differs from
  process 0's (every process checks against process 0, which checks every process).

  The coordinator runs with process 0's count: a process started with a larger one but an id
  below it joins without complaint (a smaller one, or an id beyond it, fails the start-up: see
  :func:`_startup_failure`). Exchanged through the coordinator's key-value store, before any
  computation; ``timeout`` bounds the wait for a peer's entry."""
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  key = "hypersparse_jax/num_processes/{}".format
  client.key_value_set(key(process_id), str(num_processes))
  peers = range(1, num_processes) if process_id == 0 else [0]
  for peer in peers:
    theirs = int(client.blocking_key_value_get(key(peer), int(timeout) * 1000))
    if theirs != num_processes:
      counts = {process_id: num_processes, peer: theirs}
      first, second = sorted(counts, reverse=True)
      raise ValueError(f"process {first} was started with --num-processes {counts[first]}, "
                       f"process {second} with --num-processes {counts[second]}; start every "
                       "process with the same --num-processes")


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


def _ids(ids: Sequence[int]) -> str:
  return ("process " if len(ids) == 1 else "processes ") + ", ".join(map(str, ids))


def _startup_failure(held: Sequence[str], process: str, coordinator_address: Optional[str],
                     num_processes: Optional[int], startup_timeout: int):
  """``(message, status)`` for a start-up that the runtime aborted, from its held log lines;
  None when the abort came later (a lost peer). Status 2: processes started with different
  ``--num-processes`` or a taken port; 1: processes that never arrived."""
  text = "".join(held)
  at = f" at {coordinator_address}" if coordinator_address else ""
  if "Failed to add port to server" in text:  # the port was taken after the bind test
    return (f"process 0 cannot serve the coordinator on --coordinator-address "
            f"{coordinator_address}: the port is in use; start every process with another free "
            "port", 2)
  barrier = re.search(r"reached the barrier: (\d+)/(\d+)\.", text)
  if barrier and "tasks_to_register" in text:
    arrived, expected = int(barrier.group(1)), int(barrier.group(2))
    if num_processes is not None and expected != num_processes:
      return (f"{process} was started with --num-processes {num_processes}, but the "
              f"coordinator (process 0){at} was started with --num-processes {expected}; start every "
              "process with the same --num-processes", 2)
    names = re.search(r"timed out task names:\s*\n((?:\d+\n)+)", text)
    missing = sorted({int(i) for i in names.group(1).split()}) if names else []
    others = " (and others)" if arrived + len(missing) < expected else ""
    who = _ids(missing) + others if missing else f"{expected - arrived} of the processes"
    return (f"{who} never arrived: {arrived} of --num-processes {expected} joined the "
            f"coordinator{at} within --startup-timeout {startup_timeout} s; start every "
            "process (with the same --coordinator-address), or wait longer with a larger "
            "--startup-timeout", 1)
  refused = re.search(r"Unexpected task registered with task=(\d+)", text)
  if refused:
    task = int(refused.group(1))
    mine = f" ({process} has {num_processes})" if num_processes is not None else ""
    return (f"the coordinator (process 0){at} refused --process-id {task}: it was started "
            f"with --num-processes {task} or fewer{mine}; start every process with the same "
            "--num-processes", 2)
  if "CoordinationService/RegisterTask" in text:
    # This process's own deadline: it never reached the coordinator, or it did but the
    # coordinator's report of the missing processes did not come first.
    waited = startup_timeout + _CLIENT_STARTUP_SLACK_S
    return (f"{process} did not start within {waited} s (--startup-timeout {startup_timeout} "
            f"s + {_CLIENT_STARTUP_SLACK_S}): the coordinator (process 0){at} did not answer "
            "(is process 0 running, with that address and port?) or not every process "
            "arrived; start every process, or wait longer with a larger --startup-timeout", 1)
  return None


def supervise(argv: Sequence[str], prog: str, process: str, *,
              coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
              startup_timeout: int = STARTUP_TIMEOUT_S) -> int:
  """Runs ``main(argv)`` of :mod:`hypersparse_jax.cli` in a child process (see the module
  docstring) and returns its exit status; a runtime abort becomes one line: a dead peer status
  1, a failed start-up (:func:`_startup_failure`) status 1 or 2. The keyword arguments are the
  child's options, for the messages."""
  code = ("import sys; from hypersparse_jax.console import run; "
          f"sys.exit(run({prog!r}, 'cli', sys.argv[1:]))")
  child = subprocess.Popen([sys.executable, "-c", code, *argv],
                           env=dict(os.environ, **{WORKER_ENV: "1"}), stderr=subprocess.PIPE,
                           preexec_fn=_die_with_parent if sys.platform == "linux" else None)
  forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  held, fatal, holding = [], False, False
  try:
    for raw in child.stderr:
      line = raw.decode(errors="replace")
      fatal = fatal or _FATAL in line
      holding = fatal or _is_runtime_line(line, holding)
      if holding:
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
  startup = (_startup_failure(held, process, coordinator_address, num_processes,
                              startup_timeout) if status != 0 else None)
  if startup is not None:
    print(f"{prog}: error: {startup[0]}", file=sys.stderr)
    return startup[1]
  if fatal:
    print(f"{prog}: error: {process} lost its peers: {_lost_peers_reason(held)}; run every "
          "process again with the same command to resume from the last checkpoint",
          file=sys.stderr)
    return 1
  if status != 0:
    sys.stderr.writelines(line for line in held if not line.startswith("[Gloo] "))
  return status if status >= 0 else 128 - status
