"""HyperSparse regularisation and Adaptive Regularized Training (ART) for JAX, Flax and Optax.

Glandorf, Kaiser, Rosenhahn: "HyperSparse Neural Networks: Shifting Exploration to Exploitation
through Adaptive Regularization", ICCV 2023 workshops (arXiv:2308.07163).

The public names below are imported on first use (PEP 562), so that ``import hypersparse_jax``
is instant and the command-line tools can catch a Ctrl-C during JAX's start-up
(:mod:`hypersparse_jax.console`); ``from hypersparse_jax import art`` and
``hypersparse_jax.art`` work as usual.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(("ARTState", "FixedMaskState", "art", "check_steps_per_epoch", "fixed_mask",
                     "lambda_schedule"), "transform"),
    **dict.fromkeys(("ARTController", "ARTDecision"), "controller"),
    **dict.fromkeys(("layer_sparsities", "nm_mask"), "budgets"),
    **dict.fromkeys(("ChannelGroup", "channel_mask", "slim"), "channels"),
    **dict.fromkeys(("SparsityReport", "apply_mask", "default_where", "magnitude_mask",
                     "magnitude_threshold", "sparsity", "sparsity_report"), "masking"),
    **dict.fromkeys(("MODEL_NAMES", "VGG_CONFIGS", "CIFARResNet", "DigitsCNN", "DigitsMLP",
                     "LeNet300", "LeNet5", "TransformerLM", "VGG", "create_model"), "models"),
    **dict.fromkeys(("hypersparse_grad", "hypersparse_penalty", "l1_grad", "l1_penalty",
                     "l2_grad", "l2_penalty"), "penalties"),
    **dict.fromkeys(("export_sparse", "load_sparse"), "sparse_export"),
    # jax2onnx / onnx / onnxruntime are imported when export_onnx runs (the optional [onnx] extra)
    **dict.fromkeys(("OnnxExportError", "export_onnx"), "onnx_export"),
    **dict.fromkeys(("from_torch_state_dict", "load_torch_checkpoint"), "torch_import"),
}
_SUBMODULES = ("host_memory",)

__all__ = sorted((*_EXPORTS, *_SUBMODULES))


def __getattr__(name: str):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  elif name in _SUBMODULES or importlib.util.find_spec(f"{__name__}.{name}") is not None:
    value = importlib.import_module(f"{__name__}.{name}")  # hypersparse_jax.masking etc.
  else:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  globals()[name] = value  # imported once
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
