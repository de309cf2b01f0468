"""ONNX export of (pruned) Flax models: ``export_onnx`` and the ``hypersparse-export`` command.

    hypersparse-export RUN_DIR OUT.onnx            # the model of the run's headline
    hypersparse-export RUN_DIR OUT.onnx --final    # the last fine-tune epoch instead
    hypersparse-export RUN_DIR OUT.onnx --checkpoint best-test   # selected on the test set

By default the exported model is the one ``summary.json``'s headline ``test_accuracy``
describes (its ``selection`` and ``selected_epoch``); the reference's best-*test* epoch only on
request. The file's ``metadata_props`` say what a deployment needs: ``preprocessing`` (JSON:
layout NHWC, dtype uint8, scale 1/255, per-channel mean and std: the input is
``(image * scale - mean) / std``), ``input_shape``, ``num_classes``, ``dataset``,
``selected_epoch`` and ``selection``.

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

from hypersparse_jax.run_dir import first_line, write_bytes_atomic

__all__ = ["DATASET_IMAGE_SHAPES", "OnnxExportError", "check_output_path", "export_onnx",
           "load_run_variables", "main", "preprocessing"]

_EXTRA_HINT = "pip install -e '.[onnx]' (in the repository's clone)"
_INPUT_NAME = "images"
_OUTPUT_NAME = "logits"
_BATCH_DIM = "batch"
_VERIFY_BATCHES = (1, 3)
_VERIFY_RTOL = 1e-4  # of the largest absolute logit
_INDEX_BYTES = 8  # ONNX sparse tensor indices are int64

# One image's (H, W, C) per dataset: what hypersparse-export builds the input from.
DATASET_IMAGE_SHAPES = {"digits": (8, 8, 1), "cifar10": (32, 32, 3),
                        "cifar100": (32, 32, 3), "tinyimagenet": (64, 64, 3),
                        "fashion_mnist": (28, 28, 1), "mnist": (28, 28, 1)}


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
      ``pip install -e '.[onnx]'``.
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
                     f"shape {shape}: {first_line(e)}"
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
  """Written whole or not at all, with the user's umask (see :mod:`hypersparse_jax.run_dir`)."""
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"cannot write {path}: folder {directory} does not exist")
  write_bytes_atomic(path, data)


# ------------------------------------------------------------------------------------------------
# hypersparse-export: a run directory's checkpoint as ONNX
# ------------------------------------------------------------------------------------------------


def _checkpoint_manager(directory: str):
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(create=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _restore_untyped(directory: str, step: int):
  """``(state, meta)`` of an orbax step saved by :class:`RunCheckpoints`, as NumPy trees."""
  import orbax.checkpoint as ocp
  from hypersparse_jax import checkpointing
  mngr = _checkpoint_manager(directory)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  except Exception as e:
    raise checkpointing.CheckpointError(
        f"cannot restore checkpoint {directory}/{step}: "
        f"{first_line(e)}") from e
  finally:
    mngr.close()
  return restored["state"], restored["meta"]


def _steps(directory: str) -> list:
  if not os.path.isdir(directory):
    return []
  mngr = _checkpoint_manager(directory)
  try:
    return sorted(mngr.all_steps())
  finally:
    mngr.close()


# --checkpoint choices: what each exports, and why (the ``selection_reason`` of the report)
CHECKPOINTS = ("selected", "final", "best-test")
_REASONS = {
    "best_val": "the fine-tune epoch with the best validation accuracy: the run's headline "
                "(summary.json's selection)",
    "final": "the last fine-tune epoch: the run's headline (summary.json's selection; the run "
             "has no validation split)",
    "final_asked": "the last fine-tune epoch (--checkpoint final)",
    "best_test": "the fine-tune epoch with the best test accuracy: selected on the test set, "
                 "the reference's convention (--checkpoint best-test; its test accuracy is "
                 "not an unbiased estimate)",
}


def _read_json(path: str) -> Optional[dict]:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _selection(run_dir: str, config: dict, summary: Optional[dict], checkpoint: str) -> tuple:
  """``(checkpoint folder, selection, reason)`` for ``--checkpoint``: ``selected`` is what the
  run's headline reports (``summary.json``'s ``selection``; before the run has finished,
  ``best_val`` with a validation split, else the last fine-tune epoch so far)."""
  if checkpoint == "best-test":
    return "best", "best_test", _REASONS["best_test"]
  if checkpoint == "final":
    return "latest", "final", _REASONS["final_asked"]
  if summary is not None and "selection" in summary:
    selection = summary["selection"]
  else:
    selection = "best_val" if (config.get("val_fraction") or 0) > 0 else "final"
  if selection not in ("best_val", "final"):
    raise ValueError(f"{run_dir!r}: summary.json's selection {selection!r} is not one this "
                     "version knows (best_val, final); pass --checkpoint final or best-test")
  return ("best_val" if selection == "best_val" else "latest"), selection, _REASONS[selection]


def load_run_variables(run_dir: str, *, checkpoint: str = "selected", final: bool = False):
  """The model, its eval variables and a description of the checkpoint of a training run.

  ``run_dir`` is a ``hypersparse-train --outdir``. ``checkpoint``:

  * ``'selected'`` (default): the model the run's headline ``test_accuracy`` describes,
    ``summary.json``'s ``selection`` and ``selected_epoch``: checkpoint ``best_val`` (best
    validation accuracy) when the run had ``--val-fraction``, else the last fine-tune epoch
    (``latest``). Before the run finishes: the same rule on the epochs so far.
  * ``'final'``: the last fine-tune epoch (``final=True`` is the same).
  * ``'best-test'``: checkpoint ``best``, the fine-tune epoch with the best *test* accuracy
    (the reference's convention: selected on the test set).

  Returns:
    ``(model, variables, info)`` with ``info = {'checkpoint', 'epoch', 'selection',
    'selection_reason', 'dataset', 'num_classes', ...}``.

  Raises:
    FileNotFoundError: not a run directory, or no such fine-tuned checkpoint yet.
    CheckpointError: the checkpoint cannot be read, does not fit the run's configuration, or
      holds another epoch than ``summary.json`` selected.
    ValueError: an unknown ``checkpoint``.
  """
  import jax
  import jax.numpy as jnp
  from hypersparse_jax import checkpointing, models

  if final:
    checkpoint = "final"
  if checkpoint not in CHECKPOINTS:
    raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
  config_path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{run_dir!r} is not a hypersparse-train run directory (no "
                            "config.json)")
  with open(config_path) as f:
    config = json.load(f)
  summary = _read_json(os.path.join(run_dir, "summary.json"))
  kind, selection, reason = _selection(run_dir, config, summary, checkpoint)
  ckpt_dir = os.path.join(os.path.abspath(run_dir), "checkpoints")
  steps = _steps(os.path.join(ckpt_dir, kind))
  if not steps:
    raise FileNotFoundError(f"{run_dir!r} has no fine-tuned checkpoint in checkpoints/{kind} "
                            f"(for --checkpoint {checkpoint}): the run has not fine-tuned an "
                            "epoch yet")
  state, meta = _restore_untyped(os.path.join(ckpt_dir, kind), steps[-1])
  if kind == "latest":
    if meta.get("phase") != "finetune":
      raise FileNotFoundError(
          f"{run_dir!r} has not reached fine-tuning yet (latest checkpoint: epoch "
          f"{meta.get('epoch')}, phase {meta.get('phase')}): there is no pruned model to export")
    epoch = meta.get("epoch")
    params, batch_stats = state["train"]["params"], state["train"].get("batch_stats") or {}
    finished = bool(meta.get("finished"))
  else:
    epoch = meta.get("epoch", steps[-1])
    params, batch_stats = state["params"], state.get("batch_stats") or {}
    finished = summary is not None
  if checkpoint == "selected" and summary is not None and "selected_epoch" in summary \
      and epoch != summary["selected_epoch"]:
    raise checkpointing.CheckpointError(
        f"{run_dir!r}: checkpoints/{kind} holds epoch {epoch}, but summary.json selected epoch "
        f"{summary['selected_epoch']} ({selection}); the run directory was changed after it "
        "finished")
  dataset = config.get("dataset")
  if dataset not in DATASET_IMAGE_SHAPES:
    raise ValueError(f"{config_path}: dataset {dataset!r} cannot be exported; ONNX export "
                     f"takes the image datasets {', '.join(DATASET_IMAGE_SHAPES)}")
  image_shape = DATASET_IMAGE_SHAPES[dataset]
  if dataset == "tinyimagenet":  # the class count is the folder's: read it from the head
    head = params.get("fc") or params.get("classifier")  # ResNet / VGG heads
    if head is None or "bias" not in head:
      raise checkpointing.CheckpointError(f"{run_dir!r}: no fc/classifier layer in the checkpoint")
    num_classes = int(np.shape(head["bias"])[0])
  else:
    num_classes = 100 if dataset == "cifar100" else 10
  model = models.create_model(config["model"], num_classes=num_classes, depth=config.get("depth"),
                              batch_norm=config.get("batch_norm", True),
                              width=config.get("width", 1.0))
  expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1,) + image_shape), train=False))
  variables = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
  shapes = lambda tree: jax.tree.map(lambda x: tuple(np.shape(x)), tree)  # noqa: E731
  if shapes(variables) != shapes(dict(expected)):
    raise checkpointing.CheckpointError(
        f"the {kind} checkpoint of {run_dir!r} does not fit the model of its config.json "
        f"({config['model']}, depth {config.get('depth')}, width {config.get('width', 1.0):g})")
  info = {"checkpoint": kind, "epoch": epoch, "selection": selection,
          "selection_reason": reason, "dataset": dataset, "model": config["model"],
          "depth": config.get("depth"), "sparsity_target": config.get("sparsity"),
          "num_classes": num_classes, "image_shape": image_shape, "finished": finished}
  return model, variables, info


def preprocessing(run_dir: str) -> dict:
  """What a deployed model's input needs: ``{'layout': 'NHWC', 'dtype': 'uint8', 'scale':
  1/255, 'mean': [...], 'std': [...]}``, i.e. ``(image * scale - mean) / std`` per channel on
  uint8 NHWC images, as the run was trained.

  Read from ``summary.json``'s ``preprocessing`` when the run recorded it; else computed as
  the trainer does: CIFAR and TinyImageNet from the reference's fixed constants
  (:data:`hypersparse_jax.data.NORMALIZATION`), others (digits: bundled, no download) from
  their training split.
  """
  from hypersparse_jax import data
  summary = _read_json(os.path.join(run_dir, "summary.json")) or {}
  recorded = summary.get("preprocessing")
  if isinstance(recorded, dict) and {"mean", "std"} <= set(recorded):
    return {"layout": "NHWC", "dtype": "uint8", "scale": 1 / 255, **recorded}
  config = _read_json(os.path.join(run_dir, "config.json")) or {}
  dataset = config.get("dataset")
  if dataset in data.NORMALIZATION:  # fixed constants: no pass over the data
    mean, std = data.NORMALIZATION[dataset]
  elif dataset in data.DATASET_NAMES:  # computed from the training split (digits: bundled)
    loaded = data.load_dataset(dataset, config.get("data_dir"))
    mean, std = loaded.mean, loaded.std
  else:
    raise ValueError(f"no image preprocessing for dataset {dataset!r}")
  return {"layout": "NHWC", "dtype": "uint8", "scale": 1 / 255,
          "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def check_output_path(path: str) -> None:
  """Raises (one line) unless a file can be written at ``path``: checked before the minutes of
  loading and conversion, not after."""
  if os.path.isdir(path):
    raise IsADirectoryError(f"output {path!r} is a directory; pass a file name such as "
                            f"{os.path.join(path, 'model.onnx')!r}")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist")
  try:  # the write itself is a temporary file renamed into this folder: try one
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".hypersparse-export-check-"):
      pass
  except OSError as e:
    raise PermissionError(f"cannot write {path}: folder {folder} is not writable "
                          f"({e.strerror or first_line(e)})") from None


def write_slim_npz(model, variables, path: str) -> None:
  """The slimmed model's variables as plain arrays (``'params/conv1/kernel'``, ...) plus
  ``'model'``: JSON of its class and widths (:func:`load_slim_npz` rebuilds both)."""
  import jax
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(variables)[0]}
  from hypersparse_jax import channels
  flat["model"] = np.asarray(json.dumps(channels.describe_model(model)))
  tmp = path + ".tmp.npz"
  np.savez_compressed(tmp, **flat)
  os.replace(tmp, path)


def load_slim_npz(path: str):
  """``(model, variables)`` from :func:`write_slim_npz`'s file."""
  with np.load(path) as f:
    desc = json.loads(str(f["model"]))
    variables: dict = {}
    for name in f.files:
      if name == "model":
        continue
      node = variables
      *parents, leaf = name.split("/")
      for p_ in parents:
        node = node.setdefault(p_, {})
      node[leaf] = f[name]
  from hypersparse_jax import channels
  return channels.model_from_description(desc), variables


def build_parser() -> argparse.ArgumentParser:
  """The ``hypersparse-export`` argument parser."""
  p = argparse.ArgumentParser(
      prog="hypersparse-export",
      description="Export the pruned model of a hypersparse-train run directory as ONNX "
                  "(eval mode, dynamic batch; input: float32 NHWC images normalised as in "
                  "training, (x / 255 - mean) / std, with mean and std in the file's metadata "
                  "'preprocessing'). Needs: " + _EXTRA_HINT)
  p.add_argument("run_dir", help="a hypersparse-train --outdir")
  p.add_argument("output", help="the .onnx file to write")
  p.add_argument("--checkpoint", choices=CHECKPOINTS, default="selected",
                 help="selected (default): the model the run's headline test accuracy "
                      "describes (summary.json's selection: best validation epoch with "
                      "--val-fraction, else the last epoch); final: the last fine-tune epoch; "
                      "best-test: the epoch with the best test accuracy, i.e. selected on the "
                      "test set, the reference's convention")
  p.add_argument("--final", action="store_const", const="final", dest="checkpoint",
                 help="the same as --checkpoint final")
  p.add_argument("--sparse-initializers", action="store_true",
                 help="store pruned weight tensors as ONNX sparse_initializers (smaller file)")
  p.add_argument("--slim", action="store_true",
                 help="a --structure channel run: write the physically smaller model (its "
                      "removed channels gone; hypersparse_jax.slim), as ONNX, or as an .npz "
                      "of its variables when the output ends in .npz")
  p.add_argument("--no-verify", dest="verify", action="store_false",
                 help="skip the onnxruntime comparison with the Flax model")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs ``hypersparse-export``; returns the exit code (2 with a one-line error)."""
  args = build_parser().parse_args(argv)
  from hypersparse_jax import checkpointing, masking
  try:
    check_output_path(args.output)  # first: a bad path fails in a second, not after the export
    _import_onnx_stack()
    model, variables, info = load_run_variables(args.run_dir, checkpoint=args.checkpoint)
    if not info["finished"]:
      print(f"hypersparse-export: note: the run has not finished; exporting fine-tune epoch "
            f"{info['epoch']}", file=sys.stderr)
    shape = (None,) + info["image_shape"]
    metadata = {k: v for k, v in info.items() if k != "image_shape"}
    metadata.update(
        selected_epoch=info["epoch"],
        input_shape=json.dumps([None, *info["image_shape"]]),
        preprocessing=json.dumps(preprocessing(args.run_dir)))
    run_config = _read_json(os.path.join(args.run_dir, "config.json")) or {}
    nm = run_config.get("nm")
    slimmed = None
    if args.slim:
      if run_config.get("structure", "weight") != "channel":
        raise ValueError(f"--slim needs a run trained with --structure channel; "
                         f"{args.run_dir} pruned single weights (its zeros are scattered, no "
                         "channel is gone)")
      import jax
      from hypersparse_jax import channels
      dense_params = sum(int(np.size(x)) for x in jax.tree.leaves(variables["params"]))
      mask = jax.tree.map(lambda x: np.asarray(x) != 0, variables["params"])
      model, variables = channels.slim(model, variables, mask)
      slimmed = {"params_dense": dense_params, "params_slim": sum(
          int(np.size(x)) for x in jax.tree.leaves(variables["params"]))}
      metadata.update(slim=json.dumps(channels.describe_model(model)))
      if args.output.endswith(".npz"):
        write_slim_npz(model, variables, args.output)
        print(f"wrote {args.output}: the slimmed {info['model']} ({slimmed['params_slim']:,} "
              f"of {slimmed['params_dense']:,} parameters), "
              f"{json.dumps(channels.describe_model(model))}")
        return 0
    if nm:  # an N:M run: the exported kernels must have the pattern (zeros are kept as zeros)
      from hypersparse_jax import budgets
      n, m = budgets.parse_nm(nm)
      over = budgets.nm_violations(variables["params"], n, m)
      if over:
        raise ValueError(f"the run's model does not have its {nm} pattern: {over} groups of "
                         f"{m} hold more than {n} non-zeros")
      metadata.update(nm=nm, nm_dense_leaves=json.dumps(
          [name for name, _, _ in budgets.nm_dense_leaves(variables["params"], n, m)]))
    report = export_onnx(model, variables, args.output, input_shape=shape,
                         sparse_initializers=args.sparse_initializers, verify=args.verify,
                         metadata=metadata)
    sparsity = masking.sparsity(variables["params"])
  except (ValueError, TypeError, OSError, ImportError, checkpointing.CheckpointError) as e:
    print(f"hypersparse-export: error: {first_line(e)}", file=sys.stderr)
    return 2
  check = ("" if report["max_rel_error"] is None else
           f", onnxruntime max |error| {report['max_rel_error']:.1e} x max |logit|")
  print(f"wrote {args.output}: {info['model']}{info['depth'] or ''} {info['dataset']}, "
        f"checkpoint {info['checkpoint']} epoch {info['epoch']} ({info['selection_reason']}), "
        f"sparsity {sparsity:.4f}" + (f" ({nm} pattern: every group checked)" if nm else "")
        + (f", slimmed: {slimmed['params_slim']:,} of {slimmed['params_dense']:,} parameters"
           if slimmed else "")
        + f", {report['bytes']:,} bytes "
        f"({report['sparse_initializers']} sparse initializers)" + check)
  print(json.dumps({**report, **{k: v for k, v in info.items() if k != "image_shape"},
                    "sparsity": sparsity, "nm": nm}))
  return 0


if __name__ == "__main__":
  from hypersparse_jax import console
  console.export()
