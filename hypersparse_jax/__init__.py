"""HyperSparse regularisation and Adaptive Regularized Training (ART) for JAX, Flax and Optax."""
from hypersparse_jax.masking import (apply_mask, default_where, magnitude_mask,
                                     magnitude_threshold, sparsity, sparsity_report)
from hypersparse_jax.penalties import (hypersparse_grad, hypersparse_penalty, l1_grad, l1_penalty,
                                       l2_grad, l2_penalty)
