"""HyperSparse regularisation and Adaptive Regularized Training (ART) for JAX, Flax and Optax.

Glandorf, Kaiser, Rosenhahn: "HyperSparse Neural Networks: Shifting Exploration to Exploitation
through Adaptive Regularization", ICCV 2023 workshops (arXiv:2308.07163).
"""

from hypersparse_jax.transform import (ARTState, FixedMaskState, art, check_steps_per_epoch,
                                       fixed_mask, lambda_schedule)
from hypersparse_jax.controller import ARTController, ARTDecision
from hypersparse_jax.masking import (SparsityReport, apply_mask, default_where, magnitude_mask,
                                     magnitude_threshold, sparsity, sparsity_report)
from hypersparse_jax.models import (MODEL_NAMES, VGG_CONFIGS, CIFARResNet, DigitsCNN, DigitsMLP,
                                    LeNet300, LeNet5, TransformerLM, VGG, create_model)
from hypersparse_jax.penalties import (hypersparse_grad, hypersparse_penalty, l1_grad, l1_penalty,
                                       l2_grad, l2_penalty)
from hypersparse_jax.sparse_export import export_sparse, load_sparse
# jax2onnx / onnx / onnxruntime are imported when export_onnx runs (the optional [onnx] extra).
from hypersparse_jax.onnx_export import OnnxExportError, export_onnx
from hypersparse_jax.torch_import import from_torch_state_dict, load_torch_checkpoint
from hypersparse_jax import host_memory

__version__ = "0.1.0"

__all__ = [
    "ARTController", "ARTDecision", "ARTState", "CIFARResNet", "DigitsCNN", "DigitsMLP",
    "FixedMaskState", "LeNet300", "LeNet5", "MODEL_NAMES", "OnnxExportError", "SparsityReport",
    "TransformerLM", "VGG", "VGG_CONFIGS",
    "apply_mask", "art", "check_steps_per_epoch", "create_model", "default_where", "export_onnx",
    "export_sparse", "fixed_mask", "from_torch_state_dict", "host_memory", "hypersparse_grad",
    "hypersparse_penalty", "l1_grad", "l1_penalty", "l2_grad", "l2_penalty", "lambda_schedule",
    "load_sparse", "load_torch_checkpoint", "magnitude_mask", "magnitude_threshold", "sparsity",
    "sparsity_report",
]
