"""Flax Linen models used with HyperSparse / ART: CIFAR ResNet, VGG, two small digits models and
the two LeNets of the pruning literature (LeNet-300-100, LeNet-5) for 28x28 MNIST / Fashion-MNIST.

All models take NHWC images and are called as ``model.apply(variables, x, train=...)``.
BatchNorm follows PyTorch's defaults (running-average momentum 0.1, written ``momentum=0.9`` in
Flax; epsilon 1e-5) and keeps its statistics in the ``batch_stats`` collection, so call
``apply(..., train=True, mutable=['batch_stats'])`` while training.

Prunable weights are the leaves named ``kernel`` (conv and dense, ``ndim >= 2``); biases and
BatchNorm parameters are named ``bias`` / ``scale``.

:class:`TransformerLM` (a byte-level decoder-only language model) takes ``(N, L)`` integer
tokens instead and returns ``(N, L, vocab)`` logits; see its docstring for what is prunable.

Submodule names mirror the module names of the authors' PyTorch reference models, with ``.``
written as ``_`` (``layer1.0.conv1`` is ``layer1_0/conv1``, ``features.3`` is ``features_3``).
:mod:`hypersparse_jax.torch_import` relies on this to load PyTorch checkpoints.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import functools
import math

import flax.linen as nn

from hypersparse_jax import conv as conv_lib
import jax.numpy as jnp

__all__ = [
    "CIFARResNet",
    "VGG",
    "DigitsMLP",
    "DigitsCNN",
    "LeNet300",
    "LeNet5",
    "TransformerLM",
    "transformer_where",
    "VGG_CONFIGS",
    "MODEL_NAMES",
    "create_model",
]

Dtype = Any

# Reference initialisers (torch: kaiming_normal_(mode='fan_out') for ResNet convs,
# normal_(0, 0.01) for every Linear). 'normal' in JAX is an untruncated normal, like torch's.
_he_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_he_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
_dense_init = nn.initializers.normal(stddev=0.01)
_zeros = nn.initializers.zeros

# PyTorch BatchNorm2d defaults: running = 0.9 * running + 0.1 * batch, eps 1e-5.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5

# Explicit symmetric padding: Flax's 'SAME' pads (0, 1) for a stride-2 3x3 conv on even sizes,
# whereas PyTorch's padding=1 pads (1, 1); the two would sample different pixels.
# Flax Conv whose kernel gradient is a matmul: several times faster training on XLA:CPU
# (see hypersparse_jax.conv); the forward pass is lax's own.
_Conv = functools.partial(nn.Conv, conv_general_dilated=conv_lib.conv_general_dilated)


def _max_pool(x):
    """2×2 max pooling, stride 2: on CPU, for narrow layers (at most
    :data:`hypersparse_jax.conv.NARROW_POOL_CHANNELS` channels, as channel pruning leaves them),
    :func:`hypersparse_jax.conv.max_pool_2x2` (same values and gradient, faster there);
    otherwise, and while exporting, Flax's pool — with ``window_shape`` by keyword: jax2onnx
    replaces ``nn.max_pool`` while it traces with a function whose ``window_shape`` is
    keyword-only (a positional one fails there)."""
    if conv_lib.specialised() and x.shape[-1] <= conv_lib.NARROW_POOL_CHANNELS:
        return conv_lib.max_pool_2x2(x)
    return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))


_PAD1 = ((1, 1), (1, 1))
_PAD0 = ((0, 0), (0, 0))

# Depths from which the reference CIFAR ResNet switches BasicBlock -> Bottleneck.
_BOTTLENECK_FROM_DEPTH = 54

# VGG layer configurations of the reference (numbers: conv widths; 'M': 2x2 max-pool).
VGG_CONFIGS: dict[int, tuple] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512),
}


def _batch_norm(name: str, train: bool, dtype: Dtype) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=_BN_MOMENTUM,
        epsilon=_BN_EPSILON,
        dtype=dtype,
        name=name,
    )


def resnet_blocks_per_stage(depth: int) -> tuple[int, bool]:
    """Validate a CIFAR-ResNet depth and return its layout.

    The reference (GreenAutoML4FAS/HyperSparse ``models/resnet.py``) accepts any depth
    ``6n + 2`` and builds ``n`` blocks per stage; from depth 54 on the blocks are Bottlenecks
    (1x1, 3x3, 1x1 convs, expansion 4) instead of BasicBlocks, still ``n = (depth - 2) / 6`` per
    stage. Depth is therefore nominal for bottleneck networks (ResNet-56 has 9 bottleneck blocks
    per stage, 83 weight layers), exactly as in the reference.

    Args:
      depth: network depth; must be an ``int`` of the form ``6n + 2`` with ``n >= 1``.

    Returns:
      ``(n, bottleneck)``: blocks per stage and whether Bottleneck blocks are used.

    Raises:
      ValueError: if ``depth`` is not an integer ``6n + 2 >= 8``.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"CIFAR ResNet depth must be an integer 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, "
            f"110, ...; Bottleneck blocks from depth {_BOTTLENECK_FROM_DEPTH}), got {depth!r}"
        )
    return (depth - 2) // 6, depth >= _BOTTLENECK_FROM_DEPTH


def _block_conv(features: int, k: int, stride: int, padding, name: str,
                dtype: Dtype) -> nn.Module:
    """A residual block's ``k x k`` conv: no bias, He-normal (fan-out) init, as the reference."""
    return _Conv(features, (k, k), (stride, stride), padding=padding, use_bias=False,
                 kernel_init=_he_fan_out, dtype=dtype, name=name)


def _add_shortcut(block: nn.Module, x: jnp.ndarray, out: jnp.ndarray,
                  train: bool) -> jnp.ndarray:
    """``relu(out + shortcut(x))`` for a residual ``block`` (called inside its compact call):
    the identity, or a strided 1x1 conv + BN (``downsample_0`` / ``downsample_1``) where the
    block's ``downsample`` is set."""
    residual = x
    if block.downsample:
        residual = _block_conv(block.planes * block.expansion, 1, block.stride, _PAD0,
                               "downsample_0", block.dtype)(x)
        residual = _batch_norm("downsample_1", train, block.dtype)(residual)
    return nn.relu(out + residual)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with an identity or 1x1-conv + BN shortcut (expansion 1).

    Attributes:
      planes: output channels.
      stride: stride of the first conv (and of the shortcut conv).
      downsample: whether the shortcut is a 1x1 conv + BN (on any shape change).
      dtype: computation dtype.
    """

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: Dtype = jnp.float32
    inner: Optional[Sequence[int]] = None  # (conv1's width,) when channel-pruned; else planes

    expansion = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """Apply the block to NHWC ``x``; ``train`` selects batch vs running BN statistics."""
        conv = functools.partial(_block_conv, dtype=self.dtype)
        width = self.inner[0] if self.inner else self.planes
        out = conv(width, 3, self.stride, _PAD1, "conv1")(x)
        out = nn.relu(_batch_norm("bn1", train, self.dtype)(out))
        out = conv(self.planes, 3, 1, _PAD1, "conv2")(out)
        out = _batch_norm("bn2", train, self.dtype)(out)
        return _add_shortcut(self, x, out, train)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 conv + BN block with expansion 4, as in the reference.

    Attributes:
      planes: inner width; output channels are ``4 * planes``.
      stride: stride of the 3x3 conv (and of the shortcut conv).
      downsample: whether the shortcut is a 1x1 conv + BN.
      dtype: computation dtype.
    """

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: Dtype = jnp.float32
    inner: Optional[Sequence[int]] = None  # (conv1, conv2) widths when channel-pruned

    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """Apply the block to NHWC ``x``; ``train`` selects batch vs running BN statistics."""
        conv = functools.partial(_block_conv, dtype=self.dtype)
        w1, w2 = self.inner if self.inner else (self.planes, self.planes)
        out = conv(w1, 1, 1, _PAD0, "conv1")(x)
        out = nn.relu(_batch_norm("bn1", train, self.dtype)(out))
        out = conv(w2, 3, self.stride, _PAD1, "conv2")(out)
        out = nn.relu(_batch_norm("bn2", train, self.dtype)(out))
        out = conv(self.planes * self.expansion, 1, 1, _PAD0, "conv3")(out)
        out = _batch_norm("bn3", train, self.dtype)(out)
        return _add_shortcut(self, x, out, train)


class CIFARResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` with stage widths 32/64/128 (the reference's ResNet;
    ``stage_widths`` scales them).

    3x3 stem conv (32) + BN + ReLU, three stages of ``n`` blocks (strides 1, 2, 2), global
    average pool, dense head. BasicBlocks below depth 54, Bottlenecks (expansion 4) from 54 on
    (see :func:`resnet_blocks_per_stage`). Shortcuts are 1x1 conv + BN wherever the shape
    changes. Convs have no bias and He-normal (fan-out) init; the head has N(0, 0.01) weights and
    zero bias; BN scale 1, bias 0. ResNet-32 for 10 classes has 1,855,584 conv + dense weights.

    Attributes:
      depth: ``6n + 2`` (20, 32, 56, ...).
      num_classes: output logits.
      dtype: computation dtype (parameters stay float32).
      inner: per block, its inner widths after channel pruning (None: ``planes``).
      stage_widths: the stem's and stages' ``planes`` (32, 64, 128); the stem has the first.

    Raises:
      ValueError: at construction, for a depth that is not ``6n + 2`` with ``n >= 1``.
    """

    depth: int
    num_classes: int
    dtype: Dtype = jnp.float32
    # per block (stage by stage), its inner widths after channel pruning; None: the full ones
    inner: Optional[Sequence[Sequence[int]]] = None
    # the stem's and the three stages' widths (``planes``); ``create_model(width=)`` scales them
    stage_widths: Sequence[int] = (32, 64, 128)

    default_input_shape = (1, 32, 32, 3)

    def __post_init__(self):
        n, _ = resnet_blocks_per_stage(self.depth)  # fail at construction, not at first call
        if self.inner is not None and len(self.inner) != 3 * n:
            raise ValueError(f"inner must give the widths of all {3 * n} blocks, got "
                             f"{len(self.inner)}")
        _check_widths("stage_widths", self.stage_widths, 3)
        _check_num_classes(self.num_classes)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """Return logits ``(N, num_classes)`` for NHWC images ``x``.

        Args:
          x: images ``(N, H, W, C)``.
          train: use batch statistics and update ``batch_stats`` (pass
            ``mutable=['batch_stats']``) when True; use the running averages when False.
        """
        n, bottleneck = resnet_blocks_per_stage(self.depth)
        block_cls = Bottleneck if bottleneck else BasicBlock
        x = jnp.asarray(x, self.dtype)
        stem = self.stage_widths[0]
        x = _Conv(stem, (3, 3), padding=_PAD1, use_bias=False, kernel_init=_he_fan_out,
                    dtype=self.dtype, name="conv1")(x)
        x = nn.relu(_batch_norm("bn1", train, self.dtype)(x))
        in_channels = stem
        for stage, (planes, stride) in enumerate(zip(self.stage_widths, (1, 2, 2)), start=1):
            for i in range(n):
                s = stride if i == 0 else 1
                out_channels = planes * block_cls.expansion
                inner = None if self.inner is None else tuple(self.inner[(stage - 1) * n + i])
                x = block_cls(planes, stride=s,
                              downsample=(s != 1 or in_channels != out_channels),
                              dtype=self.dtype, inner=inner,
                              name=f"layer{stage}_{i}")(x, train)
                in_channels = out_channels
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=_dense_init, bias_init=_zeros,
                        dtype=self.dtype, name="fc")(x)


class VGG(nn.Module):
    """VGG-11/13/16/19 for small images, with or without BatchNorm (the reference's VGG).

    3x3 convs with bias (padding 1) [+ BN] + ReLU, 2x2 max-pools per :data:`VGG_CONFIGS`, then an
    average pool over the remaining map (2x2 for 32 px inputs, 4x4 for 64 px, i.e. ``H / 16``)
    so that 512 features remain, and one dense layer 512 -> classes. The reference chooses the
    pool size from the number of classes (2 for 10/100 classes, else 4); deriving it from the
    input size gives the same network on CIFAR and TinyImageNet and works for any class count.

    Init follows the reference's code: conv weights N(0, sqrt(2 / (k * k * c_in))) — the
    reference computes ``n`` from ``in_channels`` (not ``out_channels`` as in some other CIFAR
    VGGs) — zero conv bias, dense N(0, 0.01) with zero bias, BN scale 1 / bias 0.
    VGG-19-BN for 10 classes has 20,024,000 conv + dense weights.

    Attributes:
      depth: 11, 13, 16 or 19.
      batch_norm: insert BatchNorm after every conv.
      num_classes: output logits.
      dtype: computation dtype (parameters stay float32).

    Raises:
      ValueError: at construction, for a depth not in {11, 13, 16, 19}.
    """

    depth: int
    batch_norm: bool = True
    num_classes: int = 10
    dtype: Dtype = jnp.float32
    # one width per conv (None: VGG_CONFIGS[depth]); fewer after channel pruning
    widths: Optional[Sequence[int]] = None

    default_input_shape = (1, 32, 32, 3)

    def __post_init__(self):
        _check_vgg_depth(self.depth)
        _check_num_classes(self.num_classes)
        if self.widths is not None:
            _check_widths("widths", self.widths,
                          sum(v != "M" for v in VGG_CONFIGS[self.depth]))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """Return logits ``(N, num_classes)`` for NHWC images ``x`` (H, W multiples of 16, or
        any size >= 16, such as 28x28, whose pools floor odd sizes as PyTorch's do).

        Args:
          x: images ``(N, H, W, C)``.
          train: use batch statistics and update ``batch_stats`` when True (only with
            ``batch_norm``); use the running averages when False.
        """
        x = jnp.asarray(x, self.dtype)
        # Names follow the indices of the reference's nn.Sequential (conv, [bn], relu, pool).
        index = 0
        widths = iter(self.widths or [v for v in VGG_CONFIGS[self.depth] if v != "M"])
        for v in VGG_CONFIGS[self.depth]:
            if v != "M":
                v = next(widths)
            if v == "M":
                x = _max_pool(x)
                index += 1
                continue
            x = _Conv(v, (3, 3), padding=_PAD1, use_bias=True, kernel_init=_he_fan_in,
                        bias_init=_zeros, dtype=self.dtype, name=f"features_{index}")(x)
            index += 1
            if self.batch_norm:
                x = _batch_norm(f"features_{index}", train, self.dtype)(x)
                index += 1
            x = nn.relu(x)
            index += 1
        x = jnp.mean(x, axis=(1, 2))  # the 2x2 (32 px) / 4x4 (64 px) average pool
        return nn.Dense(self.num_classes, kernel_init=_dense_init, bias_init=_zeros,
                        dtype=self.dtype, name="classifier")(x)


def _mlp_logits(x, hidden, num_classes, dtype):
    """Flatten, ``Dense -> ReLU`` per hidden width (He fan-in init), then the N(0, 0.01) head;
    layers ``fc1``, ``fc2``, ... with the head last. Called inside a module's compact
    ``__call__``, so the layers are that module's."""
    x = jnp.asarray(x, dtype).reshape(x.shape[0], -1)
    for i, width in enumerate(hidden, start=1):
        x = nn.relu(nn.Dense(width, kernel_init=_he_fan_in, bias_init=_zeros, dtype=dtype,
                             name=f"fc{i}")(x))
    return nn.Dense(num_classes, kernel_init=_dense_init, bias_init=_zeros, dtype=dtype,
                    name=f"fc{len(hidden) + 1}")(x)


class DigitsMLP(nn.Module):
    """Multi-layer perceptron for the bundled 8x8 scikit-learn digits, input ``(N, 8, 8, 1)``.

    Flatten, then ``Dense -> ReLU`` per hidden width, then a dense head. Hidden layers use
    He-normal (fan-in) init, the head N(0, 0.01); biases start at zero. Layers are named
    ``fc1``, ``fc2``, ... with the head last.

    Attributes:
      hidden: hidden widths.
      num_classes: output logits.
      dtype: computation dtype.
    """

    hidden: Sequence[int] = (256, 128)
    num_classes: int = 10
    dtype: Dtype = jnp.float32

    default_input_shape = (1, 8, 8, 1)

    def __post_init__(self):
        _check_num_classes(self.num_classes)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ValueError(f"hidden widths must be positive integers, got {self.hidden!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """Return logits ``(N, num_classes)``; ``train`` is accepted for a uniform interface."""
        del train  # no dropout / BatchNorm
        return _mlp_logits(x, self.hidden, self.num_classes, self.dtype)


class DigitsCNN(nn.Module):
    """Small CNN for the 8x8 digits, input ``(N, 8, 8, 1)``.

    ``conv1 (3x3) [+ BN] -> ReLU -> 2x2 max-pool -> conv2 (3x3) [+ BN] -> ReLU -> 2x2 max-pool
    -> flatten (2 * 2 * widths[1]) -> fc``. Convs have He-normal (fan-out) init and a bias only
    without BatchNorm; the head is N(0, 0.01) with zero bias. About 20k weights by default.

    Attributes:
      widths: channels of the two convs.
      batch_norm: BatchNorm after each conv.
      num_classes: output logits.
      dtype: computation dtype.
    """

    widths: Sequence[int] = (32, 64)
    batch_norm: bool = True
    num_classes: int = 10
    dtype: Dtype = jnp.float32

    default_input_shape = (1, 8, 8, 1)

    def __post_init__(self):
        _check_num_classes(self.num_classes)
        if len(self.widths) != 2 or any(
                isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.widths):
            raise ValueError(f"widths must be two positive integers, got {self.widths!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """Return logits ``(N, num_classes)`` for ``(N, 8, 8, 1)`` images.

        Args:
          x: images ``(N, H, W, C)``.
          train: batch statistics and ``batch_stats`` update when True (with ``batch_norm``).
        """
        x = jnp.asarray(x, self.dtype)
        for i, width in enumerate(self.widths, start=1):
            x = _Conv(width, (3, 3), padding=_PAD1, use_bias=not self.batch_norm,
                        kernel_init=_he_fan_out, bias_init=_zeros, dtype=self.dtype,
                        name=f"conv{i}")(x)
            if self.batch_norm:
                x = _batch_norm(f"bn{i}", train, self.dtype)(x)
            x = _max_pool(nn.relu(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, kernel_init=_dense_init, bias_init=_zeros,
                        dtype=self.dtype, name="fc")(x)


class LeNet300(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998; the pruning literature's MNIST MLP), input
    ``(N, 28, 28, 1)``.

    Flatten (784), ``fc1`` 784 -> 300, ReLU, ``fc2`` 300 -> 100, ReLU, ``fc3`` 100 -> classes:
    266,200 weights and 410 biases for 10 classes. No BatchNorm. Init as :class:`DigitsMLP`
    (He-normal fan-in for the hidden layers, N(0, 0.01) for the head, zero biases).

    Attributes:
      num_classes: output logits.
      dtype: computation dtype.
    """

    num_classes: int = 10
    dtype: Dtype = jnp.float32
    hidden: Sequence[int] = (300, 100)  # fewer after channel pruning (hypersparse_jax.slim)

    default_input_shape = (1, 28, 28, 1)

    def __post_init__(self):
        _check_num_classes(self.num_classes)
        _check_widths("hidden", self.hidden, 2)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """Return logits ``(N, num_classes)``; ``train`` is accepted for a uniform interface."""
        del train  # no dropout / BatchNorm
        return _mlp_logits(x, self.hidden, self.num_classes, self.dtype)


class LeNet5(nn.Module):
    """The Caffe LeNet-5 of the pruning literature (Han et al. 2015), input ``(N, 28, 28, 1)``.

    ``conv1`` 5x5 -> 20, ReLU, 2x2 max-pool, ``conv2`` 5x5 -> 50, ReLU, 2x2 max-pool (no padding:
    28 -> 24 -> 12 -> 8 -> 4), flatten (4 * 4 * 50 = 800), ``fc1`` 800 -> 500, ReLU, ``fc2``
    500 -> classes: 430,500 weights and 580 biases for 10 classes. No BatchNorm. (Caffe's
    prototxt has no ReLU after the convolutions; PyTorch versions usually do, and so does this.)
    Convs and ``fc1`` He-normal (fan-in), the head N(0, 0.01), zero biases.

    Flattening is Flax's NHWC order (h, w, c), whereas PyTorch flattens its NCHW map as
    (c, h, w): :mod:`hypersparse_jax.torch_import` reorders ``fc1``'s rows accordingly, guided by
    :attr:`torch_flatten_channels`.

    Attributes:
      num_classes: output logits.
      dtype: computation dtype.
    """

    num_classes: int = 10
    dtype: Dtype = jnp.float32
    widths: Sequence[int] = (20, 50, 500)  # conv1, conv2, fc1 (fewer after channel pruning)

    default_input_shape = (1, 28, 28, 1)
    # dense layers that read a flattened conv map, with the map's channel count
    torch_flatten_channels = {"fc1": 50}

    def __post_init__(self):
        _check_num_classes(self.num_classes)
        _check_widths("widths", self.widths, 3)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """Return logits ``(N, num_classes)``; ``train`` is accepted for a uniform interface."""
        del train  # no dropout / BatchNorm
        x = jnp.asarray(x, self.dtype)
        for i, width in enumerate(self.widths[:2], start=1):
            x = _Conv(width, (5, 5), padding="VALID", kernel_init=_he_fan_in, bias_init=_zeros,
                      dtype=self.dtype, name=f"conv{i}")(x)
            x = _max_pool(nn.relu(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.widths[2], kernel_init=_he_fan_in, bias_init=_zeros,
                             dtype=self.dtype, name="fc1")(x))
        return nn.Dense(self.num_classes, kernel_init=_dense_init, bias_init=_zeros,
                        dtype=self.dtype, name="fc2")(x)


def _check_widths(name: str, widths, count: int) -> None:
    if len(widths) != count or any(
            isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"{name} must be {count} positive integers, got {widths!r}")


def _check_vgg_depth(depth: int) -> None:
    if isinstance(depth, bool) or depth not in VGG_CONFIGS:
        raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth!r}")


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")


class TransformerBlock(nn.Module):
    """Pre-LayerNorm decoder block: ``x + attention(LN(x))``, then ``x + MLP(LN(x))``.

    Submodules: ``ln_attn``, ``attention`` (Flax multi-head attention: ``query``, ``key``,
    ``value`` kernels ``(d_model, heads, d_model / heads)``, ``out`` kernel
    ``(heads, d_model / heads, d_model)``), ``ln_mlp``, ``mlp_in`` (``d_model -> mlp_ratio ·
    d_model``, GELU) and ``mlp_out``.
    """

    heads: int
    mlp_ratio: int = 4
    residual_scale: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        d = x.shape[-1]
        init = nn.initializers.normal(stddev=0.02)
        # projections into the residual stream start smaller (GPT-2's 1/sqrt(2·layers))
        out_init = nn.initializers.normal(stddev=0.02 * self.residual_scale)
        h = nn.LayerNorm(dtype=self.dtype, name="ln_attn")(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=self.heads, qkv_features=d, out_features=d, kernel_init=init,
            out_kernel_init=out_init, bias_init=_zeros, dtype=self.dtype, deterministic=True,
            name="attention")(h, mask=mask)
        x = x + h
        h = nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
        h = nn.gelu(nn.Dense(self.mlp_ratio * d, kernel_init=init, bias_init=_zeros,
                             dtype=self.dtype, name="mlp_in")(h))
        h = nn.Dense(d, kernel_init=out_init, bias_init=_zeros, dtype=self.dtype,
                     name="mlp_out")(h)
        return x + h


class TransformerLM(nn.Module):
    """Decoder-only transformer language model (byte-level by default).

    Token embedding (``token_embed/embedding``, ``(vocab, d_model)``) plus learned positions
    (``pos_embed``, ``(context, d_model)``), ``layers`` pre-LayerNorm blocks with causal
    multi-head self-attention and a GELU MLP (:class:`TransformerBlock`, named ``block_0``,
    ``block_1``, ...), a final LayerNorm (``ln_final``) and an output layer tied to the token
    embedding (logits ``= h · embeddingᵀ``). Weights N(0, 0.02), the attention output and
    ``mlp_out`` N(0, 0.02 / sqrt(2·layers)), biases 0. No dropout.

    Prunable by the library's default ``where`` (leaves named ``kernel`` with ``ndim >= 2``):
    exactly the attention query / key / value / output kernels (3-D in Flax) and the two MLP
    kernels of every block. The embeddings (token and position; the token embedding is also the
    output layer), LayerNorm scales and biases are not; :func:`transformer_where` with
    ``prune_embeddings=True`` adds the token embedding.

    Attributes:
      vocab_size: number of tokens (256 for bytes).
      context: longest input sequence (rows of ``pos_embed``).
      layers: number of blocks.
      d_model: width of the residual stream.
      heads: attention heads; must divide ``d_model``.
      mlp_ratio: MLP hidden width / ``d_model``.
      dtype: computation dtype.

    Raises:
      ValueError: at construction, on a non-positive size or ``d_model`` not divisible by
        ``heads``.
    """

    vocab_size: int = 256
    context: int = 128
    layers: int = 2
    d_model: int = 128
    heads: int = 4
    mlp_ratio: int = 4
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "context", "layers", "d_model", "heads", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by heads "
                             f"({self.heads})")
        super().__post_init__()

    @property
    def default_input_shape(self) -> tuple[int, int]:
        return (1, self.context)

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Return next-token logits ``(N, L, vocab_size)`` for integer tokens ``(N, L)``,
        ``L <= context``; position ``i`` sees tokens ``0 … i`` only. ``train`` is accepted for
        a uniform interface (no dropout)."""
        del train
        if tokens.ndim != 2 or tokens.shape[1] > self.context:
            raise ValueError(f"tokens must be (N, L) with L <= context {self.context}, got "
                             f"shape {tokens.shape}")
        init = nn.initializers.normal(stddev=0.02)
        embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=init, dtype=self.dtype,
                         name="token_embed")
        positions = self.param("pos_embed", init, (self.context, self.d_model))
        x = embed(tokens.astype(jnp.int32)) + positions[:tokens.shape[1]].astype(self.dtype)
        mask = nn.make_causal_mask(tokens)
        for i in range(self.layers):
            x = TransformerBlock(self.heads, self.mlp_ratio, 1 / (2 * self.layers) ** 0.5,
                                 self.dtype, name=f"block_{i}")(x, mask)
        x = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)
        return embed.attend(x)


def transformer_where(prune_embeddings: bool = False):
    """The prunable-leaf predicate of :class:`TransformerLM`: None (the library default: the
    attention and MLP kernels) or, with ``prune_embeddings``, those plus the token embedding
    ``token_embed/embedding`` (which is also the output layer)."""
    if not prune_embeddings:
        return None
    from hypersparse_jax import masking

    def where(path, leaf):
        return masking.default_where(path, leaf) or masking.path_name(path).endswith(
            "token_embed/embedding")

    return where


MODEL_NAMES = ("resnet", "vgg", "mlp", "cnn", "lenet300", "lenet5", "transformer")
# models whose depth is fixed (``depth`` must be None)
FIXED_DEPTH_MODELS = ("mlp", "cnn", "lenet300", "lenet5", "transformer")


def create_model(name: str, *, num_classes: int, depth: int | None = None,
                 batch_norm: bool = True, dtype: Dtype = jnp.float32,
                 transformer: dict | None = None, width: float = 1.0) -> nn.Module:
    """Create a model by name.

    Args:
      name: ``'resnet'`` (:class:`CIFARResNet`), ``'vgg'`` (:class:`VGG`), ``'mlp'``
        (:class:`DigitsMLP`), ``'cnn'`` (:class:`DigitsCNN`), ``'lenet300'``
        (:class:`LeNet300`), ``'lenet5'`` (:class:`LeNet5`) or ``'transformer'``;
        case-insensitive.
      num_classes: output logits.
      depth: required for ``'resnet'`` (``6n + 2``) and ``'vgg'`` (11/13/16/19); must be None
        for the others (:data:`FIXED_DEPTH_MODELS`).
      batch_norm: BatchNorm for ``'vgg'`` and ``'cnn'`` (ResNet always has it, the MLP and the
        LeNets never; False is refused for ``'resnet'`` and ignored for the others).
      dtype: computation dtype.
      transformer: for ``'transformer'`` (:class:`TransformerLM`, ``num_classes`` is its
        vocabulary): ``{'layers', 'd_model', 'heads', 'context'}`` (missing keys: the class
        defaults).
      width: multiplier of every hidden width of an image model (channels of the convolutions,
        units of the hidden dense layers; the output layer keeps ``num_classes``): each becomes
        ``max(1, round(width * w))``, e.g. ``0.25`` for a quarter-width VGG-11
        (16-32-64-64-128-128-128-128). 1 (the default) is the published model. The transformer
        has ``d_model`` instead (a width other than 1 is refused there).

    Returns:
      An unbound Flax module; call ``model.init(rng, x, train=False)``.

    Raises:
      ValueError: for an unknown name, a missing or invalid depth, a depth given to a model
        that has none, or a width that is not a positive finite number.
    """
    key = name.lower() if isinstance(name, str) else name
    check_width(width)
    if key not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; choose one of {list(MODEL_NAMES)}")
    if key in ("resnet", "vgg") and depth is None:
        allowed = "6n+2, e.g. 20, 32, 56" if key == "resnet" else f"one of {sorted(VGG_CONFIGS)}"
        raise ValueError(f"model {key!r} needs a depth ({allowed})")
    if key in FIXED_DEPTH_MODELS and depth is not None:
        raise ValueError(f"model {key!r} has a fixed depth; pass depth=None, got {depth!r}")
    if key == "transformer":
        if width != 1:
            raise ValueError(f"width {width!r} is for the image models; the transformer's width "
                             "is d_model (--d-model)")
        return TransformerLM(vocab_size=num_classes, dtype=dtype, **(transformer or {}))
    if transformer is not None:
        raise ValueError(f"transformer settings are for model 'transformer', not {key!r}")
    scaled = lambda widths: tuple(scale_width(w, width) for w in widths)  # noqa: E731
    if key == "resnet":
        if not batch_norm:
            raise ValueError("the CIFAR ResNet always uses BatchNorm; batch_norm=False is "
                             "not supported")
        return CIFARResNet(depth=depth, num_classes=num_classes, dtype=dtype,
                           stage_widths=scaled(CIFARResNet.stage_widths))
    if key == "vgg":
        _check_vgg_depth(depth)
        return VGG(depth=depth, batch_norm=batch_norm, num_classes=num_classes, dtype=dtype,
                   widths=None if width == 1 else scaled(
                       v for v in VGG_CONFIGS[depth] if v != "M"))
    if key == "mlp":
        return DigitsMLP(num_classes=num_classes, dtype=dtype, hidden=scaled(DigitsMLP.hidden))
    if key == "lenet300":
        return LeNet300(num_classes=num_classes, dtype=dtype, hidden=scaled(LeNet300.hidden))
    if key == "lenet5":
        return LeNet5(num_classes=num_classes, dtype=dtype, widths=scaled(LeNet5.widths))
    return DigitsCNN(batch_norm=batch_norm, num_classes=num_classes, dtype=dtype,
                     widths=scaled(DigitsCNN.widths))


def check_width(width) -> None:
    """Raises ValueError unless ``width`` (a multiplier of the hidden widths) is a positive,
    finite number."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not (
            math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a positive finite number (a multiplier of the model's "
                         f"hidden widths; 1 = the published model), got {width!r}")


def scale_width(w: int, width: float) -> int:
    """``max(1, round(width * w))``: one hidden width under the multiplier ``width``.

    Python's ``round``: an exact half goes to the even neighbour (LeNet-5's 50 filters of conv2
    at width 0.25 → 12, not 13; 7 units at 0.5 → 4). Kept so: saved runs' shapes depend on it."""
    return max(1, int(round(width * w)))
