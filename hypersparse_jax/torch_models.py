"""PyTorch versions of the models in :mod:`hypersparse_jax.models` (optional, needs torch).

They use the module names of the authors' PyTorch reference (GreenAutoML4FAS/HyperSparse), so
their ``state_dict()`` has the reference's keys — ``conv1.weight``, ``layer1.0.bn1.running_mean``,
``layer2.0.downsample.0.weight``, ``fc.weight`` for the ResNet; ``features.N.weight`` and
``classifier.weight`` for VGG; ``fc1``–``fc3`` (LeNet-300-100) and ``conv1``, ``conv2``,
``fc1``, ``fc2`` (LeNet-5) as PyTorch users write them — and loads into the Flax models with
:func:`hypersparse_jax.torch_import.from_torch_state_dict`. They serve as an independent
reference in tests and as the PyTorch side of the speed benchmark. Inputs are NCHW.
"""

from __future__ import annotations

from typing import Sequence

try:
    import torch
    from torch import nn
    import torch.nn.functional as F
except ImportError as e:  # torch is an optional extra
    raise ImportError(
        "hypersparse_jax.torch_models needs PyTorch: pip install -e '.[torch]' "
        "(in the repository's clone)"
    ) from e

from hypersparse_jax.models import VGG_CONFIGS, resnet_blocks_per_stage

__all__ = ["TorchCIFARResNet", "TorchVGG", "TorchDigitsMLP", "TorchDigitsCNN", "TorchLeNet300",
           "TorchLeNet5", "create_torch_model"]


def _init_reference(model: nn.Module, conv_fan: str) -> None:
    """Reference init: He-normal convs (``conv_fan`` mode), zero bias, BN 1/0, Linear N(0, .01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=conv_fan, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class TorchCIFARResNet(nn.Module):
    """PyTorch CIFAR ResNet of depth ``6n + 2``, widths 32/64/128 (see ``models.CIFARResNet``).

    Args:
      depth: ``6n + 2``; Bottleneck blocks from depth 54 (as in the reference).
      num_classes: output logits.
      in_channels: image channels.

    Raises:
      ValueError: for a depth that is not ``6n + 2`` with ``n >= 1``.
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        n, bottleneck = resnet_blocks_per_stage(depth)
        block = _Bottleneck if bottleneck else _BasicBlock
        self.conv1 = nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        channels = 32
        for stage, (planes, stride) in enumerate(zip((32, 64, 128), (1, 2, 2)), start=1):
            blocks = []
            for i in range(n):
                s = stride if i == 0 else 1
                out_channels = planes * block.expansion
                downsample = None
                if s != 1 or channels != out_channels:
                    downsample = nn.Sequential(
                        nn.Conv2d(channels, out_channels, 1, s, bias=False),
                        nn.BatchNorm2d(out_channels))
                blocks.append(block(channels, planes, s, downsample))
                channels = out_channels
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.fc = nn.Linear(channels, num_classes)
        _init_reference(self, "fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(N, num_classes)`` for NCHW images ``x``."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


class TorchVGG(nn.Module):
    """PyTorch VGG-11/13/16/19 (see ``models.VGG``): ``features`` + a linear ``classifier``.

    Conv init N(0, sqrt(2 / (k * k * c_in))) as in the reference's code.

    Args:
      depth: 11, 13, 16 or 19.
      batch_norm: BatchNorm after every conv.
      num_classes: output logits.
      in_channels: image channels.

    Raises:
      ValueError: for a depth not in {11, 13, 16, 19}.
    """

    def __init__(self, depth: int, batch_norm: bool, num_classes: int, in_channels: int = 3):
        super().__init__()
        if isinstance(depth, bool) or depth not in VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth!r}")
        layers: list[nn.Module] = []
        channels = in_channels
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(channels, v, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            channels = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)
        _init_reference(self, "fan_in")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for NCHW images ``x``; averages the remaining 2x2 / 4x4 map."""
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class TorchDigitsMLP(nn.Module):
    """PyTorch version of ``models.DigitsMLP`` (layers ``fc1``, ``fc2``, ...; input NCHW 1x8x8).

    Args:
      hidden: hidden widths.
      num_classes: output logits.
      in_features: flattened input size.
    """

    def __init__(self, hidden: Sequence[int] = (256, 128), num_classes: int = 10,
                 in_features: int = 64):
        super().__init__()
        widths = [in_features, *hidden, num_classes]
        self.num_layers = len(widths) - 1
        for i in range(self.num_layers):
            layer = nn.Linear(widths[i], widths[i + 1])
            if i < self.num_layers - 1:
                nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            else:
                nn.init.normal_(layer.weight, 0.0, 0.01)
            nn.init.zeros_(layer.bias)
            setattr(self, f"fc{i + 1}", layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for NCHW images ``x``."""
        # Flatten in NHWC order so that fc1 matches the Flax model's flattening.
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        for i in range(1, self.num_layers):
            x = F.relu(getattr(self, f"fc{i}")(x))
        return getattr(self, f"fc{self.num_layers}")(x)


class TorchDigitsCNN(nn.Module):
    """PyTorch version of ``models.DigitsCNN`` (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``fc``).

    Args:
      widths: channels of the two convs.
      batch_norm: BatchNorm after each conv (convs have a bias only without it).
      num_classes: output logits.
      in_channels: image channels.
      image_size: input height = width.
    """

    def __init__(self, widths: Sequence[int] = (32, 64), batch_norm: bool = True,
                 num_classes: int = 10, in_channels: int = 1, image_size: int = 8):
        super().__init__()
        self.batch_norm = batch_norm
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=not batch_norm)
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, padding=1, bias=not batch_norm)
        if batch_norm:
            self.bn1 = nn.BatchNorm2d(widths[0])
            self.bn2 = nn.BatchNorm2d(widths[1])
        side = image_size // 4
        self.fc = nn.Linear(widths[1] * side * side, num_classes)
        _init_reference(self, "fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for NCHW images ``x``."""
        for i in (1, 2):
            x = getattr(self, f"conv{i}")(x)
            if self.batch_norm:
                x = getattr(self, f"bn{i}")(x)
            x = F.max_pool2d(F.relu(x), 2)
        # Flatten in NHWC order so that fc matches the Flax model's flattening.
        return self.fc(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1))


class TorchLeNet300(nn.Module):
    """LeNet-300-100 as PyTorch users write it (see ``models.LeNet300``): ``fc1`` 784 -> 300,
    ``fc2`` 300 -> 100, ``fc3`` 100 -> classes, ReLU; PyTorch's default init.

    Args:
      num_classes: output logits.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for NCHW images ``x`` ``(N, 1, 28, 28)``."""
        x = x.flatten(1)  # one channel: NCHW and NHWC flatten alike
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class TorchLeNet5(nn.Module):
    """The Caffe LeNet-5 as PyTorch users write it (see ``models.LeNet5``): ``conv1`` 5x5 -> 20,
    ``conv2`` 5x5 -> 50 (no padding), each ReLU + 2x2 max-pool, then ``fc1`` 800 -> 500, ReLU,
    ``fc2`` 500 -> classes; PyTorch's default init.

    ``fc1`` reads the NCHW map flattened as (c, h, w), PyTorch's usual ``x.flatten(1)``;
    :mod:`hypersparse_jax.torch_import` reorders it for Flax's (h, w, c).

    Args:
      num_classes: output logits.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for NCHW images ``x`` ``(N, 1, 28, 28)``."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def create_torch_model(name: str, *, num_classes: int, depth: int | None = None,
                       batch_norm: bool = True) -> nn.Module:
    """PyTorch twin of :func:`hypersparse_jax.models.create_model` (same names and rules).

    Args:
      name: ``'resnet'``, ``'vgg'``, ``'mlp'``, ``'cnn'``, ``'lenet300'`` or ``'lenet5'``.
      num_classes: output logits.
      depth: for ``'resnet'`` and ``'vgg'``.
      batch_norm: for ``'vgg'`` and ``'cnn'``.

    Returns:
      A ``torch.nn.Module`` in training mode (call ``.eval()`` for inference).

    Raises:
      ValueError: for an unknown name or a missing / invalid depth.
    """
    key = name.lower() if isinstance(name, str) else name
    if key == "resnet":
        if depth is None:
            raise ValueError("model 'resnet' needs a depth (6n+2, e.g. 20, 32, 56)")
        return TorchCIFARResNet(depth, num_classes)
    if key == "vgg":
        if depth is None:
            raise ValueError(f"model 'vgg' needs a depth (one of {sorted(VGG_CONFIGS)})")
        return TorchVGG(depth, batch_norm, num_classes)
    if key == "mlp":
        return TorchDigitsMLP(num_classes=num_classes)
    if key == "cnn":
        return TorchDigitsCNN(batch_norm=batch_norm, num_classes=num_classes)
    if key == "lenet300":
        return TorchLeNet300(num_classes)
    if key == "lenet5":
        return TorchLeNet5(num_classes)
    raise ValueError(f"unknown model name {name!r}; choose one of ['resnet', 'vgg', 'mlp', "
                     "'cnn', 'lenet300', 'lenet5']")
