"""ONNX export of (pruned) Flax models: ``export_onnx`` and the ``hypersparse-export`` command.

    hypersparse-export RUN_DIR OUT.onnx            # the run's selected fine-tuned model
    hypersparse-export RUN_DIR OUT.onnx --final    # the last fine-tune epoch instead

The model is traced in eval mode (BatchNorm with its running statistics) and converted by
jax2onnx; the variables become the graph's initializers, so pruned weights are stored as exact
zeros. With ``sparse_initializers=True`` every weight tensor whose ONNX ``SparseTensorProto``
(values + int64 flat indices) is smaller than its dense form is stored that way; onnxruntime
expands such initializers to dense tensors when it loads the model.

Two things on our side kept jax2onnx 0.17 from exporting the project's models, both handled
here or in the models:

* **Stale shape annotations.** jax2onnx converts an NHWC convolution to an NCHW ``Conv``
  between transposes, then removes transpose pairs, but it leaves the ``value_info`` shape
  annotations of the tensors in between in NHWC order. A ResNet's residual ``Add`` then joins
  two tensors whose annotations disagree and onnxruntime refuses the graph ("Incompatible
  dimensions" at an ``Add``); the computation itself is right. The export drops the
  intermediate annotations and lets ONNX shape inference recompute them (strict mode), then
  runs ``onnx.checker``.
* **Max-pool plug-in.** jax2onnx replaces ``flax.linen.max_pool`` while tracing with a function
  whose ``window_shape`` is keyword-only; the models pass it by keyword.

The CPU-specialised convolution of :mod:`hypersparse_jax.conv` (a ``custom_vjp`` that is a patch
matrix product for tiny outputs) is switched off while tracing
(:func:`hypersparse_jax.conv.plain_convolutions`), so each convolution is one ONNX ``Conv``.

By default the file is checked with onnxruntime (an independent runtime) at batch sizes 1 and 3
before it is written: logits within ``1e-4`` of the largest absolute logit of the Flax model.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["OnnxExportError", "export_onnx", "main"]

_EXTRA_HINT = "pip install 'hypersparse-jax[onnx]'"
_INPUT_NAME = "images"
_OUTPUT_NAME = "logits"
_BATCH_DIM = "batch"
_VERIFY_BATCHES = (1, 3)
_VERIFY_RTOL = 1e-4  # of the largest absolute logit
_INDEX_BYTES = 8  # ONNX sparse tensor indices are int64

# One image's (H, W, C) per dataset: what hypersparse-export builds the input from.
DATASET_IMAGE_SHAPES = {"digits": (8, 8, 1), "cifar10": (32, 32, 3),
                        "cifar100": (32, 32, 3), "tinyimagenet": (64, 64, 3)}


class OnnxExportError(ValueError):
  """The model cannot be exported, or the exported file does not reproduce the model."""


def _import_onnx_stack():
  """(jax2onnx.to_onnx, onnx, onnxruntime or None), with a clear message if the extra is missing."""
  try:
    import onnx
    from jax2onnx import to_onnx
  except ImportError as e:
    raise ImportError(f"ONNX export needs jax2onnx and onnx ({e}); install them with: "
                      f"{_EXTRA_HINT}") from e
  try:
    import onnxruntime
  except ImportError:
    onnxruntime = None
  return to_onnx, onnx, onnxruntime


def _check_input_shape(input_shape) -> tuple:
  if not isinstance(input_shape, (tuple, list)) or len(input_shape) < 2:
    raise ValueError("input_shape must be a tuple (batch, *image_shape) with the batch None "
                     f"(dynamic) or a positive int, e.g. (None, 32, 32, 3); got {input_shape!r}")
  dims = tuple(input_shape)
  for i, d in enumerate(dims):
    if d is None and i == 0:
      continue
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
      raise ValueError(f"input_shape {input_shape!r}: dimension {i} must be a positive int"
                       + (" or None" if i == 0 else "") + f", got {d!r}")
  return (None if dims[0] is None else int(dims[0]),) + tuple(int(d) for d in dims[1:])


def _eval_fn(model, variables):
  """``x -> logits`` in eval mode: ``train=False`` / ``deterministic=True`` if the model takes it."""
  try:
    params = inspect.signature(model.__call__).parameters
  except (TypeError, ValueError):
    params = {}
  kwargs = {}
  if "train" in params:
    kwargs["train"] = False
  elif "deterministic" in params:
    kwargs["deterministic"] = True
  return lambda x: model.apply(variables, x, **kwargs)


def _to_float32(variables):
  import jax
  import jax.numpy as jnp
  return jax.tree.map(
      lambda v: np.asarray(v, np.float32) if jnp.issubdtype(jnp.result_type(v), jnp.floating)
      else np.asarray(v), variables)


def _sparsify_initializers(model_proto, onnx) -> int:
  """Moves initializers whose sparse form is smaller into ``graph.sparse_initializer``."""
  from onnx import numpy_helper
  graph = model_proto.graph
  keep, moved = [], 0
  for init in graph.initializer:
    array = numpy_helper.to_array(init)
    if array.dtype.kind != "f" or array.ndim < 2:
      keep.append(init)
      continue
    flat = array.reshape(-1)
    nonzero = np.flatnonzero(flat)
    if nonzero.size * (array.itemsize + _INDEX_BYTES) >= flat.size * array.itemsize:
      keep.append(init)
      continue
    values = numpy_helper.from_array(flat[nonzero], name=init.name)
    indices = numpy_helper.from_array(nonzero.astype(np.int64), name=init.name + "_indices")
    graph.sparse_initializer.append(
        onnx.helper.make_sparse_tensor(values, indices, list(array.shape)))
    moved += 1
  del graph.initializer[:]
  graph.initializer.extend(keep)
  return moved


def _verify(model_bytes, fn, image_shape, batches, onnxruntime) -> float:
  """Largest |ONNX − Flax| logit difference over random batches, relative to max |Flax logit|."""
  session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
  worst = 0.0
  rng = np.random.default_rng(0)
  for batch in batches:
    x = rng.standard_normal((batch,) + image_shape).astype(np.float32)
    expected = np.asarray(fn(x), np.float32)
    (got,) = session.run([_OUTPUT_NAME], {_INPUT_NAME: x})
    if got.shape != expected.shape:
      raise OnnxExportError(f"the ONNX graph returns shape {got.shape} for a batch of {batch}, "
                            f"the Flax model {expected.shape}")
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    worst = max(worst, float(np.max(np.abs(got - expected))) / scale)
  return worst


def export_onnx(model, variables: Mapping[str, Any], path: str | os.PathLike, *,
                input_shape: Sequence[Optional[int]], sparse_initializers: bool = False,
                verify: bool = True, metadata: Optional[Mapping[str, Any]] = None,
                opset: int = 23) -> dict:
  """Writes ``model`` with ``variables`` as an ONNX file, in eval mode.

  Args:
    model: a Flax Linen module (the project's ``CIFARResNet``, ``VGG`` ± BatchNorm,
      ``DigitsMLP``, ``DigitsCNN``; other modules where jax2onnx supports their operations).
      Called as ``model.apply(variables, x, train=False)`` (``deterministic=True`` for modules
      that take that instead, nothing for modules that take neither).
    variables: ``{'params': ..., 'batch_stats': ...}`` (``batch_stats`` only with BatchNorm).
      Floating-point leaves are exported as float32.
    path: the ``.onnx`` file to write (replaced atomically; its folder must exist).
    input_shape: ``(batch, H, W, C)``: the batch ``None`` for a dynamic batch size (ONNX
      dimension ``"batch"``) or a fixed positive int; e.g. ``(None, 32, 32, 3)``.
    sparse_initializers: store each weight tensor whose ``SparseTensorProto`` (float values +
      int64 flat indices, so below one third density for float32) is smaller as an ONNX
      ``sparse_initializer``.
    verify: run the written graph with onnxruntime on random inputs (batch sizes 1 and 3 for
      a dynamic batch) and raise if a logit differs from the Flax model's by more than
      ``1e-4 × max |logit|``.
    metadata: extra ``metadata_props`` (values converted with ``str``).
    opset: ONNX opset.

  Returns:
    ``{'path', 'bytes', 'initializers', 'sparse_initializers', 'weights', 'zero_weights',
    'max_rel_error'}``: ``weights`` / ``zero_weights`` count the entries (and exact zeros) of
    the float initializers with two or more dimensions (dense and sparse); ``max_rel_error``
    is the onnxruntime check's figure (None without ``verify``).

  Raises:
    ImportError: jax2onnx / onnx (or onnxruntime for ``verify``) missing; the message names
      ``pip install 'hypersparse-jax[onnx]'``.
    ValueError: bad ``input_shape`` or ``variables``.
    OnnxExportError: jax2onnx cannot convert an operation of the model, or onnxruntime's result
      does not match the model.
  """
  to_onnx, onnx, onnxruntime = _import_onnx_stack()
  if verify and onnxruntime is None:
    raise ImportError(f"verify=True needs onnxruntime; install it with: {_EXTRA_HINT} "
                      "(or pass verify=False)")
  import jax
  from hypersparse_jax import conv

  shape = _check_input_shape(input_shape)
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("variables must be a mapping with a 'params' entry (and 'batch_stats' "
                     f"for models with BatchNorm), got {type(variables).__name__}"
                     + (f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else ""))
  fn = _eval_fn(model, _to_float32(dict(variables)))
  name = type(model).__name__
  batch = _BATCH_DIM if shape[0] is None else shape[0]
  try:
    with conv.plain_convolutions():
      jax.eval_shape(fn, jax.ShapeDtypeStruct((1,) + shape[1:], np.float32))
  except Exception as e:
    raise ValueError(f"{name} cannot be applied to variables of this structure and inputs of "
                     f"shape {shape}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                     ) from e
  try:
    with conv.plain_convolutions():
      proto = to_onnx(fn, [(batch,) + shape[1:]], model_name=name, opset=opset,
                      input_names=[_INPUT_NAME], output_names=[_OUTPUT_NAME])
  except Exception as e:
    import jax2onnx
    version = getattr(jax2onnx, "__version__", "")
    raise OnnxExportError(
        f"jax2onnx {version} cannot export {name}: {type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''} (ONNX export supports the operations "
        "jax2onnx converts: convolutions, dense layers, BatchNorm, pooling, elementwise ops)"
    ) from e
  if len(proto.graph.output) != 1:
    raise OnnxExportError(f"{name} returns {len(proto.graph.output)} arrays; ONNX export "
                          "expects a model that returns one array of logits")
  # jax2onnx leaves NHWC shape annotations on tensors its layout pass turned NCHW (see the
  # module doc): drop them and let shape inference recompute every intermediate shape.
  del proto.graph.value_info[:]
  try:
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
  except Exception as e:
    raise OnnxExportError(f"the ONNX graph of {name} is inconsistent: {e}") from e
  props = {"producer": "hypersparse-jax", "input": f"{_INPUT_NAME}: float32 NHWC {shape}",
           **{str(k): str(v) for k, v in (metadata or {}).items()}}
  onnx.helper.set_model_props(proto, props)
  onnx.checker.check_model(proto, full_check=True)
  moved = 0
  if sparse_initializers:
    # After the full check: ONNX shape inference types a sparse initializer as sparse_tensor,
    # which no dense operator accepts; runtimes expand it to a dense tensor when loading.
    moved = _sparsify_initializers(proto, onnx)
    onnx.checker.check_model(proto)
  data = proto.SerializeToString()
  error = None
  if verify:
    batches = _VERIFY_BATCHES if shape[0] is None else (shape[0],)
    with conv.plain_convolutions():
      error = _verify(data, fn, shape[1:], batches, onnxruntime)
    if not error <= _VERIFY_RTOL:
      raise OnnxExportError(f"onnxruntime's logits for the exported {name} differ from the "
                            f"Flax model's by {error:.3g} × max |logit| (allowed "
                            f"{_VERIFY_RTOL:g}); nothing written")
  _atomic_write_bytes(os.fspath(path), data)
  weights = zeros = 0
  from onnx import numpy_helper
  for init in proto.graph.initializer:
    array = numpy_helper.to_array(init)
    if array.dtype.kind == "f" and array.ndim >= 2:
      weights, zeros = weights + array.size, zeros + int(np.sum(array == 0))
  for sparse in proto.graph.sparse_initializer:
    size = int(np.prod(sparse.dims))
    nonzero = int(np.count_nonzero(numpy_helper.to_array(sparse.values)))
    weights, zeros = weights + size, zeros + size - nonzero
  return {"path": os.fspath(path), "bytes": len(data),
          "initializers": len(proto.graph.initializer) + moved, "sparse_initializers": moved,
          "weights": weights, "zero_weights": zeros, "max_rel_error": error}


def _atomic_write_bytes(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"cannot write {path}: folder {directory} does not exist")
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".onnx")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
