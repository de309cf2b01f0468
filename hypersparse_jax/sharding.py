"""Multi-device training on JAX's own sharding (``jax.sharding`` + plain ``jax.jit``).

One 1-D device mesh with the axis ``'data'``:

* **data parallelism**: every batch is split along its leading axis over ``'data'``
  (:func:`shard_batch`); parameters and optimiser state are replicated (:func:`replicate`).
* **FSDP** (fully sharded data parallelism): in addition, every large parameter (and every
  optimiser-state leaf that mirrors one: same shape, so same rule) is split along its largest
  axis whose size divides by the device count (:func:`shard_params`); small or indivisible
  leaves and scalars stay replicated. XLA gathers the shards where a layer needs them.

Nothing else changes: the train step is an ordinary ``jax.jit`` function and its computation
follows the shardings of its inputs (GSPMD). Every reduction in the library is a plain ``jnp``
reduction over whole arrays, so under ``jit`` over sharded arrays it is computed over the whole
model and the whole global batch: the global magnitude threshold, the HyperSparse sums ``A`` and
``T``, BatchNorm batch statistics, the loss mean. Results equal the single-device ones up to
float summation order (the threshold, a selection, is bit-exact); ``tests/test_sharding.py``
checks this on 8 forced host devices.

Single host, several accelerators::

    mesh = make_mesh()                      # all local devices
    state = shard_params(state, mesh)       # or replicate(state, mesh)
    for batch in batches:                   # global batch, leading axis divisible by mesh.size
      state, metrics = train_step(state, shard_batch(batch, mesh), key)

or from the command line ``hypersparse-train --devices 8 [--shard-params] ...``.

Several hosts (GPU hosts or a TPU pod slice). Start the same program on every host; first thing,
each calls ``jax.distributed.initialize()`` (on TPU pods and under SLURM / Open MPI it needs no
arguments; otherwise pass ``coordinator_address="host0:1234", num_processes=N,
process_id=i``). Then ``make_mesh()`` spans all global devices (``jax.devices()``), and each
host feeds only its own slice of the global batch: ``shard_batch(local_batch, mesh)`` with
``local_batch`` the rows :func:`process_rows` names (``global_batch[process_rows(mesh, B)]``)
builds the global array with ``jax.make_array_from_process_local_data``; a host's batches never
hold the other hosts' rows. Parameters are placed with :func:`replicate` / :func:`shard_params`
on every host with identical values (same seed). Reading values back to the host (``jax.device_get``,
``np.asarray``) needs fully addressable or fully replicated arrays: FSDP-sharded leaves are
gathered with ``jax.experimental.multihost_utils.process_allgather``
(:func:`hypersparse_jax.distributed.to_host`). Checkpoints: orbax writes and restores sharded
arrays collectively (every host calls save and restore).

From the command line, every process runs ``hypersparse-train --coordinator-address HOST:PORT
--num-processes N --process-id I ...`` (or ``--distributed`` under SLURM / Open MPI / on a TPU
pod) with the same options and ``--outdir`` on a shared file system; see
:mod:`hypersparse_jax.distributed` and the README's launch recipes.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
MIN_SHARD_SIZE = 2 ** 10  # leaves with fewer elements are replicated by shard_params


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D mesh with axis ``'data'``.

  Single process: over the first ``num_devices`` local devices (default: all). Several
  processes (after ``jax.distributed.initialize()``): over all global devices; ``num_devices``
  must then be None or the global device count.

  Raises:
    ValueError: ``num_devices`` < 1 or more than there are devices.
  """
  if jax.process_count() > 1:
    devices = jax.devices()
    if num_devices is not None and num_devices != len(devices):
      raise ValueError(f"with {jax.process_count()} processes the mesh spans all "
                       f"{len(devices)} global devices; num_devices={num_devices} is not allowed")
  else:
    devices = jax.local_devices()
    if num_devices is not None:
      if isinstance(num_devices, bool) or int(num_devices) != num_devices or num_devices < 1:
        raise ValueError(f"num_devices must be a positive integer, got {num_devices!r}")
      if num_devices > len(devices):
        raise ValueError(
            f"num_devices={num_devices} but only {len(devices)} {devices[0].platform} device(s) "
            "are available (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N "
            "before JAX starts to simulate N devices)")
      devices = devices[:int(num_devices)]
  return Mesh(np.asarray(devices), (AXIS,))


def num_shards(mesh: Mesh) -> int:
  """Number of devices along ``'data'``."""
  return int(mesh.shape[AXIS])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over ``'data'``, other axes whole."""
  return NamedSharding(mesh, P(AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """A sharding that keeps a full copy of an array on every device of ``mesh``."""
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
  """Raises ValueError unless ``batch_size`` splits evenly over the mesh's devices."""
  n = num_shards(mesh)
  if batch_size % n:
    raise ValueError(f"{what} {batch_size} is not divisible by the number of devices {n}: "
                     f"use a multiple of {n} (e.g. {max(n, batch_size - batch_size % n)}) or "
                     "fewer devices")


def shard_batch(batch: Any, mesh: Mesh, *, process_local: Optional[bool] = None) -> Any:
  """Places a batch pytree with its leading axis split over ``'data'``.

  Args:
    batch: pytree of arrays with a common leading (batch) axis.
    mesh: from :func:`make_mesh`.
    process_local: whether ``batch`` is this process's slice of the global batch (built with
      ``jax.make_array_from_process_local_data``; global size = local size × process count)
      rather than the whole global batch. Default: True iff the mesh spans several processes.

  Raises:
    ValueError: if the (global) batch size is not divisible by the number of devices, or the
      leaves disagree on the batch size.
  """
  leaves = jax.tree.leaves(batch)
  if not leaves:
    return batch
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(f"every batch leaf needs the same leading (batch) axis, got sizes {sizes}")
  size = sizes.pop()
  sharding = batch_sharding(mesh)
  if process_local is None:
    process_local = mesh.is_multi_process
  if not process_local:
    check_batch_size(size, mesh)
    return jax.device_put(batch, sharding)
  processes = len({d.process_index for d in mesh.devices.flat})
  check_batch_size(size * processes, mesh, "global batch size")
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(
          sharding, np.asarray(x), (size * processes,) + np.shape(x)[1:]), batch)


def process_rows(mesh: Mesh, global_size: int) -> slice:
  """The rows of a ``global_size`` batch that this process's devices hold under
  :func:`batch_sharding` (all rows for a single-process mesh): what :func:`shard_batch` expects
  as this process's part of the global batch.

  Raises:
    ValueError: ``global_size`` not divisible by the number of devices, or this process's
      rows not contiguous (a mesh whose devices do not come grouped by process).
  """
  check_batch_size(global_size, mesh, "global batch size")
  if not mesh.is_multi_process:
    return slice(0, global_size)
  spans = sorted((s[0].start or 0, s[0].stop if s[0].stop is not None else global_size)
                 for s in batch_sharding(mesh).addressable_devices_indices_map(
                     (global_size,)).values())
  if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
    raise ValueError(f"process {jax.process_index()} holds rows {spans} of the batch, not one "
                     "contiguous block: build the mesh with make_mesh()")
  return slice(spans[0][0], spans[-1][1])


def _leaf_spec(shape, n: int, min_size: int) -> P:
  """FSDP rule: split the largest axis divisible by ``n`` (last one on ties) of a large leaf."""
  if n <= 1 or len(shape) == 0 or math.prod(shape) < min_size:
    return P()
  axes = [i for i, d in enumerate(shape) if d % n == 0 and d >= n]
  if not axes:
    return P()
  axis = max(axes, key=lambda i: (shape[i], i))
  return P(*([None] * axis + [AXIS]))


def param_shardings(tree: Any, mesh: Mesh, *, min_size: int = MIN_SHARD_SIZE) -> Any:
  """The :func:`shard_params` shardings of ``tree`` (arrays or ``ShapeDtypeStruct`` leaves)."""
  n = num_shards(mesh)
  return jax.tree.map(lambda x: NamedSharding(mesh, _leaf_spec(np.shape(x), n, min_size)), tree)


def replicated_shardings(tree: Any, mesh: Mesh) -> Any:
  """:func:`replicated_sharding` for every leaf of ``tree`` (same structure)."""
  return jax.tree.map(lambda _: replicated_sharding(mesh), tree)


def state_shardings(tree: Any, mesh: Mesh, *, fsdp: bool = False,
                    min_size: int = MIN_SHARD_SIZE) -> Any:
  """:func:`param_shardings` (``fsdp``) or :func:`replicated_shardings` of ``tree``."""
  if fsdp:
    return param_shardings(tree, mesh, min_size=min_size)
  return replicated_shardings(tree, mesh)


def put(tree: Any, shardings: Any) -> Any:
  """``jax.device_put(tree, shardings)``, also for process-local leaves onto several processes.

  In a multi-process run, every process holds the same values of a leaf that is still local
  (e.g. freshly initialised parameters); JAX 0.10 refuses to ``device_put`` such a
  ``jax.Array`` onto a mesh that spans processes with one device each ("the input arrays must
  have one shard each"), so those leaves go through host memory first. Leaves that are
  already global arrays are placed as they are.
  """
  if jax.process_count() > 1:
    tree = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array)
                        and x.is_fully_addressable else x, tree)
  return jax.device_put(tree, shardings)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """A full copy of every leaf of ``tree`` on every device of ``mesh``."""
  return put(tree, replicated_shardings(tree, mesh))


def shard_params(tree: Any, mesh: Mesh, *, min_size: int = MIN_SHARD_SIZE) -> Any:
  """FSDP placement of a parameter or optimiser-state pytree.

  Each leaf with at least ``min_size`` elements is split over ``'data'`` along its largest axis
  whose size divides by the device count (the last such axis on ties: a conv kernel's output
  channels); every other leaf (scalars, biases, indivisible shapes) is replicated. The rule
  depends on the shape only, so optimiser-state leaves that mirror parameters (momentum,
  masks) get the same sharding as their parameter.
  """
  return put(tree, param_shardings(tree, mesh, min_size=min_size))


def abstract(tree: Any, shardings: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves carrying ``shardings``: an orbax restore target that
  restores onto the current mesh, whatever the mesh the checkpoint was written on."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x), sharding=s),
      tree, shardings)


def constrain(tree: Any, shardings: Any) -> Any:
  """``jax.lax.with_sharding_constraint`` (inside jit) of a pytree; identity when None."""
  if shardings is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, shardings)


class Placement:
  """Where a run's arrays live: no mesh (one device, plain arrays), or a mesh with replicated
  or FSDP-sharded state. What the training loop and the tasks need of it, with the identity
  everywhere when ``mesh`` is None.

  Args:
    mesh: the device mesh, or None.
    fsdp: shard large parameters and optimiser state (``--shard-params``); needs a mesh.
  """

  def __init__(self, mesh: Optional[Mesh] = None, *, fsdp: bool = False):
    self.mesh, self.fsdp = mesh, bool(fsdp) and mesh is not None

  @property
  def num_shards(self) -> int:
    """Batch shards: 1 without a mesh."""
    return 1 if self.mesh is None else num_shards(self.mesh)

  def shardings(self, tree: Any) -> Any:
    """The state shardings of ``tree`` (None without a mesh)."""
    if self.mesh is None:
      return None
    return state_shardings(tree, self.mesh, fsdp=self.fsdp)

  def place(self, tree: Any) -> Any:
    """Replicates ``tree`` over the mesh, or shards it FSDP-style."""
    return tree if self.mesh is None else put(tree, self.shardings(tree))

  def place_batch(self, batch: Any) -> Any:
    """Places a batch (this process's rows of it, see :meth:`rows`) on the mesh."""
    return batch if self.mesh is None else shard_batch(batch, self.mesh)

  def rows(self, global_size: int) -> Optional[slice]:
    """This process's rows of a global batch of ``global_size`` (None: all rows, no mesh)."""
    if self.mesh is None:
      return None
    return process_rows(self.mesh, global_size)
