"""Load PyTorch state dicts and checkpoints (e.g. the authors' reference models) into Flax models.

Key and layout conversion, per leaf of the Flax model's variables:

==========================  =======================  ===================================
Flax                        PyTorch key suffix       layout
==========================  =======================  ===================================
``params/.../kernel`` (4-D)  ``weight``               OIHW -> HWIO
``params/.../kernel`` (2-D)  ``weight``               (out, in) -> (in, out)
``params/.../bias``          ``bias``                 same
``params/.../scale``         ``weight`` (BatchNorm)   same
``batch_stats/.../mean``     ``running_mean``         same
``batch_stats/.../var``      ``running_var``          same
==========================  =======================  ===================================

Module paths map by writing each Flax submodule name's ``_`` as ``.`` (``layer1_0/downsample_0``
is ``layer1.0.downsample.0``), the naming convention of :mod:`hypersparse_jax.models`.

A dense layer that reads a flattened convolution map (LeNet-5's ``fc1``) sees its inputs in
(h, w, c) order in Flax (NHWC) but in (c, h, w) order in PyTorch (``x.flatten(1)`` on NCHW). A
model lists such layers in ``torch_flatten_channels`` (``{'fc1': 50}``: the map's channels);
their PyTorch ``(out, C·H·W)`` weight is reordered to Flax's ``(H·W·C, out)`` kernel.
Conversions are transposes and exact casts, so pruned (exactly zero) weights stay exactly zero.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from hypersparse_jax.run_dir import first_line

__all__ = ["from_torch_state_dict", "load_torch_checkpoint"]

_IGNORED_SUFFIXES = ("num_batches_tracked",)  # BatchNorm counter, no Flax counterpart
_MAX_LISTED = 20  # keys listed per error category; a wrong architecture mismatches hundreds


def _torch_key_and_converter(collection: str, names: tuple[str, ...], shape: tuple[int, ...],
                             flatten_channels: Mapping[str, int] | None = None):
    """Return ``(torch_key, torch_shape, to_flax)`` for one Flax leaf, or raise ValueError.

    ``flatten_channels``: Flax module path -> channels of the NCHW map its 2-D kernel reads.
    """
    module = ".".join(name.replace("_", ".") for name in names[:-1])
    leaf = names[-1]
    same = lambda a: a  # noqa: E731
    channels = (flatten_channels or {}).get("/".join(names[:-1]))
    if (collection == "params" and leaf == "kernel" and len(shape) == 2 and channels
            and shape[0] % channels == 0):
        positions = shape[0] // channels  # H·W

        def from_nchw(a):  # (out, C·HW) -> (out, C, HW) -> (HW, C, out) -> (HW·C, out)
            return np.transpose(a.reshape(a.shape[0], channels, positions), (2, 1, 0)).reshape(
                positions * channels, a.shape[0])

        return f"{module}.weight", (shape[1], shape[0]), from_nchw
    if collection == "params" and leaf == "kernel" and len(shape) == 4:
        h, w, i, o = shape
        return f"{module}.weight", (o, i, h, w), lambda a: np.transpose(a, (2, 3, 1, 0))
    if collection == "params" and leaf == "kernel" and len(shape) == 2:
        return f"{module}.weight", (shape[1], shape[0]), np.transpose
    if collection == "params" and leaf == "bias":
        return f"{module}.bias", shape, same
    if collection == "params" and leaf == "scale":
        return f"{module}.weight", shape, same
    if collection == "batch_stats" and leaf in ("mean", "var"):
        return f"{module}.running_{leaf}", shape, same
    raise ValueError(
        f"cannot map Flax variable {collection}/{'/'.join(names)} with shape {shape} to a "
        "PyTorch key (supported: conv/dense 'kernel', 'bias', BatchNorm 'scale', 'mean', 'var')")


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor; avoids importing torch here
        value = value.detach().cpu()
        try:
            return value.numpy()
        except TypeError:  # bfloat16 and other dtypes NumPy lacks
            return value.float().numpy()
    return np.asarray(value)


def _unwrap_state_dict(state_dict: Mapping) -> dict:
    if not isinstance(state_dict, Mapping):
        raise TypeError("expected a state dict (a mapping of names to tensors), got "
                        f"{type(state_dict).__name__}")
    inner = state_dict.get("state_dict")
    if isinstance(inner, Mapping):  # a full checkpoint {'epoch': ..., 'state_dict': ...}
        state_dict = inner
    keys = [k for k in state_dict if not str(k).endswith(_IGNORED_SUFFIXES)]
    # nn.DataParallel / DistributedDataParallel prefix every key with 'module.'.
    if keys and all(str(k).startswith("module.") for k in keys):
        return {str(k)[len("module."):]: v for k, v in state_dict.items()}
    return {str(k): v for k, v in state_dict.items()}


def _format_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return shown + more


def from_torch_state_dict(state_dict: Mapping, model: nn.Module, *,
                          input_shape: tuple[int, ...] | None = None) -> dict:
    """Convert a PyTorch state dict into Flax variables for ``model``.

    Every variable of ``model`` must be present with a matching shape, and every key of the
    state dict (other than BatchNorm's ``num_batches_tracked``) must be used. Values are cast to
    the dtypes of ``model.init``'s variables (float32 by default).

    Args:
      state_dict: ``module.state_dict()`` (tensors or NumPy arrays), optionally with the
        ``module.`` prefix of ``nn.DataParallel``, or a checkpoint dict holding it under
        ``'state_dict'`` (the reference's ``{'epoch', 'state_dict', 'optimizer', ...}``).
      model: a Flax model of :mod:`hypersparse_jax.models` (or one following its naming).
      input_shape: NHWC shape used to trace ``model.init`` for the variable shapes; defaults to
        ``model.default_input_shape`` (CIFAR 32 px for ResNet / VGG, 8x8x1 for the digits
        models, 28x28x1 for the LeNets). Matters where parameter shapes depend on the input size (digits models).

    Returns:
      Variables with the structure of ``model.init(...)``: ``{'params': ..., 'batch_stats':
      ...}`` (no ``'batch_stats'`` for models without BatchNorm), ready for ``model.apply``.

    Raises:
      ValueError: listing missing keys, unexpected keys and shape mismatches (expected and
        found shapes, in PyTorch layout); or when no ``input_shape`` is known.
      TypeError: if ``state_dict`` is not a mapping.
    """
    state_dict = _unwrap_state_dict(state_dict)
    if input_shape is None:
        input_shape = getattr(model, "default_input_shape", None)
        if input_shape is None:
            raise ValueError(
                f"{type(model).__name__} has no default_input_shape; pass input_shape=(1, H, W, C)")
    init = functools.partial(model.init, train=False)  # train must stay a Python bool
    abstract = jax.eval_shape(init, jax.random.key(0), jnp.zeros(tuple(input_shape), jnp.float32))

    converted: dict[tuple[str, ...], jnp.ndarray] = {}
    missing, mismatched, used = [], [], set()
    flatten_channels = getattr(model, "torch_flatten_channels", None)
    for path, spec in traverse_util.flatten_dict(dict(abstract)).items():
        collection, names = path[0], path[1:]
        key, torch_shape, to_flax = _torch_key_and_converter(collection, names, tuple(spec.shape),
                                                             flatten_channels)
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        value = _to_numpy(state_dict[key])
        if tuple(value.shape) != tuple(torch_shape):
            mismatched.append(
                f"{key}: expected {tuple(torch_shape)}, found {tuple(value.shape)}")
            continue
        converted[path] = jnp.asarray(to_flax(value).astype(spec.dtype))
    unexpected = [k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIXES)]

    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_format_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches ({len(mismatched)}, PyTorch layout): "
                            f"{_format_keys(mismatched)}")
        raise ValueError(f"PyTorch state dict does not fit {type(model).__name__}:\n  "
                         + "\n  ".join(problems))
    return traverse_util.unflatten_dict(converted)


def load_torch_checkpoint(path: str | os.PathLike, model: nn.Module, *,
                          input_shape: tuple[int, ...] | None = None) -> dict:
    """Load a PyTorch ``.pth`` / ``.pth.tar`` file into Flax variables for ``model``.

    The file is read with ``torch.load(path, map_location='cpu', weights_only=True)``: only
    tensors and plain containers are unpickled, so a checkpoint from an untrusted source cannot
    run code. See :func:`from_torch_state_dict` for the accepted contents and the conversion.

    Args:
      path: checkpoint file (a state dict, or a dict with a ``'state_dict'`` entry).
      model: the Flax model to load into.
      input_shape: see :func:`from_torch_state_dict`.

    Returns:
      Flax variables ``{'params': ..., 'batch_stats': ...}`` for ``model``.

    Raises:
      ImportError: if PyTorch is not installed.
      ValueError: if the file holds anything but tensors and plain containers (refused by
        ``weights_only``), or if its keys / shapes do not fit ``model``.
      FileNotFoundError: if ``path`` does not exist.
    """
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "loading PyTorch checkpoints needs PyTorch: pip install -e '.[torch]' "
            "(in the repository's clone)"
        ) from e
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {os.fspath(path)!r}: it contains objects other than tensors and "
            "plain containers (loaded with weights_only=True for safety). Re-save only the "
            "model's state_dict, e.g. torch.save({'state_dict': model.state_dict()}, path)."
        ) from e
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:  # damaged or not torch
        first = first_line(e)
        raise ValueError(f"{os.fspath(path)!r} is not a readable PyTorch checkpoint "
                         f"({type(e).__name__}: {first})") from e
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{os.fspath(path)!r} holds a {type(checkpoint).__name__}, not a state "
                         "dict or a checkpoint dict with a 'state_dict' entry")
    return from_torch_state_dict(checkpoint, model, input_shape=input_shape)
