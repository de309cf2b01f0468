"""Tests for hypersparse_jax.torch_import against PyTorch's own computation of the same models."""

import sys

import pytest

import torch  # installed by the README's test command  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hypersparse_jax.models import (  # noqa: E402
    VGG,
    CIFARResNet,
    DigitsCNN,
    DigitsMLP,
    LeNet300,
    LeNet5,
)
from hypersparse_jax.torch_import import (  # noqa: E402
    from_torch_state_dict,
    load_torch_checkpoint,
)
from hypersparse_jax.torch_models import (  # noqa: E402
    TorchCIFARResNet,
    TorchDigitsCNN,
    TorchDigitsMLP,
    TorchLeNet300,
    TorchLeNet5,
    TorchVGG,
)

torch.set_num_threads(2)


def _randomise(model, seed, zero_fraction=0.3):
    """Non-trivial BN statistics and affine parameters, a larger head, exact zeros in weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.rand(c, generator=gen) * 0.4 - 0.2)
                module.running_var.copy_(torch.rand(c, generator=gen) + 1.0)
                module.weight.copy_(torch.rand(c, generator=gen) * 0.3 + 0.3)
                module.bias.copy_(torch.rand(c, generator=gen) * 0.4 - 0.2)
                module.num_batches_tracked.fill_(123)
            if isinstance(module, torch.nn.Linear):
                # The reference's N(0, 0.01) head gives tiny logits; larger ones test more.
                module.weight.normal_(0.0, 0.2, generator=gen)
                module.bias.uniform_(-0.1, 0.1, generator=gen)
            if isinstance(module, torch.nn.Conv2d) and module.bias is not None:
                module.bias.uniform_(-0.1, 0.1, generator=gen)
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                keep = torch.rand(module.weight.shape, generator=gen) >= zero_fraction
                module.weight.mul_(keep)  # pruned weights: exact zeros
    return model.eval()


def _torch_logits(model, x_nchw):
    with torch.no_grad():
        return model(x_nchw).numpy()


def _flax_logits(model, variables, x_nchw):
    x = jnp.asarray(x_nchw.permute(0, 2, 3, 1).numpy())
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


def _prunable_zeros_torch(model):
    return sum(int((m.weight == 0).sum()) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


def _kernel_zeros_flax(params):
    return sum(int(np.sum(np.asarray(leaf) == 0))
               for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if path[-1].key == "kernel")


CASES = {
    "resnet20": (lambda: TorchCIFARResNet(20, 10),
                 lambda: CIFARResNet(depth=20, num_classes=10), 32),
    "resnet32": (lambda: TorchCIFARResNet(32, 10),
                 lambda: CIFARResNet(depth=32, num_classes=10), 32),
    "resnet56": (lambda: TorchCIFARResNet(56, 100),
                 lambda: CIFARResNet(depth=56, num_classes=100), 32),
    "vgg11": (lambda: TorchVGG(11, False, 10), lambda: VGG(depth=11, batch_norm=False), 32),
    "vgg11_bn": (lambda: TorchVGG(11, True, 10), lambda: VGG(depth=11, batch_norm=True), 32),
    "vgg19": (lambda: TorchVGG(19, False, 100),
              lambda: VGG(depth=19, batch_norm=False, num_classes=100), 32),
    "vgg19_bn": (lambda: TorchVGG(19, True, 10), lambda: VGG(depth=19, batch_norm=True), 32),
    "vgg11_bn_64px": (lambda: TorchVGG(11, True, 200),
                      lambda: VGG(depth=11, batch_norm=True, num_classes=200), 64),
}


@pytest.mark.parametrize("name", list(CASES))
def test_imported_model_matches_pytorch_logits(name):
    make_torch, make_flax, size = CASES[name]
    torch.manual_seed(0)
    torch_model = _randomise(make_torch(), seed=1)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    expected = _torch_logits(torch_model, x)
    assert np.abs(expected).max() > 0.05  # the comparison is not between near-zero vectors

    model = make_flax()
    variables = from_torch_state_dict(torch_model.state_dict(), model,
                                      input_shape=(1, size, size, 3))
    np.testing.assert_allclose(_flax_logits(model, variables, x), expected, rtol=0, atol=1e-4)

    # Pruned weights stay exactly zero, position by position, and none are added.
    zeros = _prunable_zeros_torch(torch_model)
    assert zeros > 0
    assert _kernel_zeros_flax(variables["params"]) == zeros
    first = "conv1" if "resnet" in name else "features_0"
    torch_first = (torch_model.conv1 if "resnet" in name else torch_model.features[0]).weight
    np.testing.assert_array_equal(
        np.asarray(variables["params"][first]["kernel"]) == 0,
        torch_first.detach().numpy().transpose(2, 3, 1, 0) == 0)


@pytest.mark.parametrize("make_torch, model", [
    (lambda: TorchDigitsMLP(), DigitsMLP()),
    (lambda: TorchDigitsCNN(), DigitsCNN()),
    (lambda: TorchDigitsCNN(batch_norm=False, num_classes=5),
     DigitsCNN(batch_norm=False, num_classes=5)),
])
def test_digits_models_match_pytorch_from_numpy_state_dict(make_torch, model):
    torch.manual_seed(0)
    torch_model = _randomise(make_torch(), seed=3)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    # Plain NumPy arrays are accepted as well as tensors.
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    variables = from_torch_state_dict(state, model)
    np.testing.assert_allclose(_flax_logits(model, variables, x), _torch_logits(torch_model, x),
                               rtol=0, atol=1e-5)


def _lenet_twins(name, seed):
    """A PyTorch LeNet with PyTorch's default init, a third of its weights exactly zero."""
    torch.manual_seed(seed)
    torch_model = TorchLeNet300() if name == "lenet300" else TorchLeNet5()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in torch_model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.mul_(torch.rand(module.weight.shape, generator=gen) >= 0.3)
    return torch_model.eval(), LeNet300() if name == "lenet300" else LeNet5()


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_lenets_match_pytorch_logits(name, tmp_path):
    torch_model, model = _lenet_twins(name, seed=7)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    expected = _torch_logits(torch_model, x)
    assert np.abs(expected).max() > 0.05
    variables = from_torch_state_dict(torch_model.state_dict(), model)
    assert set(variables) == {"params"}
    np.testing.assert_allclose(_flax_logits(model, variables, x), expected, rtol=0, atol=1e-5)
    assert _kernel_zeros_flax(variables["params"]) == _prunable_zeros_torch(torch_model)
    # the same through files, as PyTorch users save them: bare and under 'state_dict'
    torch.save(torch_model.state_dict(), tmp_path / "bare.pth")
    torch.save({"epoch": 3, "state_dict": torch_model.state_dict()}, tmp_path / "ckpt.pth.tar")
    for path in (tmp_path / "bare.pth", tmp_path / "ckpt.pth.tar"):
        loaded = load_torch_checkpoint(path, model)
        np.testing.assert_allclose(_flax_logits(model, loaded, x), expected, rtol=0, atol=1e-5)


def test_lenet5_fc1_rows_follow_pytorch_nchw_flattening():
    # One nonzero weight per channel c at map position (h, w): PyTorch's column c*16 + h*4 + w
    # (NCHW flattened) must become Flax's kernel row (h*4 + w)*50 + c (NHWC flattened).
    state = {k: v.numpy() * 0 for k, v in TorchLeNet5().state_dict().items()}
    picks = [(0, 0, 0), (1, 0, 1), (49, 3, 3), (17, 2, 1)]  # (c, h, w)
    for out, (c, h, w) in enumerate(picks):
        state["fc1.weight"][out, c * 16 + h * 4 + w] = out + 1.0
    kernel = np.asarray(from_torch_state_dict(state, LeNet5())["params"]["fc1"]["kernel"])
    assert kernel.shape == (800, 500)
    expected = np.zeros((800, 500), np.float32)
    for out, (c, h, w) in enumerate(picks):
        expected[(h * 4 + w) * 50 + c, out] = out + 1.0
    np.testing.assert_array_equal(kernel, expected)


def test_lenet5_fc1_of_another_size_is_a_shape_mismatch():
    state = dict(TorchLeNet5().state_dict())
    state["fc1.weight"] = torch.zeros(500, 801)
    with pytest.raises(ValueError, match=r"fc1.weight: expected \(500, 800\), found \(500, 801\)"):
        from_torch_state_dict(state, LeNet5())


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return _randomise(TorchCIFARResNet(20, 10), seed=5)


@pytest.fixture(scope="module")
def resnet20_input():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))


def test_load_checkpoint_file_with_dataparallel_prefix(tmp_path, resnet20, resnet20_input):
    path = tmp_path / "best.pth.tar"
    state = {f"module.{k}": v for k, v in resnet20.state_dict().items()}
    # The reference saves {'epoch', 'state_dict', 'acc', 'best_acc_pr', 'optimizer'}.
    optimizer = torch.optim.SGD(resnet20.parameters(), lr=0.1, momentum=0.9)
    torch.save({"epoch": 7, "state_dict": state, "acc": 91.5, "best_acc_pr": 91.5,
                "optimizer": optimizer.state_dict()}, path)
    model = CIFARResNet(depth=20, num_classes=10)
    variables = load_torch_checkpoint(path, model)
    np.testing.assert_allclose(_flax_logits(model, variables, resnet20_input),
                               _torch_logits(resnet20, resnet20_input), rtol=0, atol=1e-4)
    assert _kernel_zeros_flax(variables["params"]) == _prunable_zeros_torch(resnet20)


def test_load_state_dict_saved_under_state_dict_key(tmp_path, resnet20, resnet20_input):
    path = tmp_path / "model.pth"
    torch.save({"state_dict": resnet20.state_dict()}, path)
    model = CIFARResNet(depth=20, num_classes=10)
    variables = load_torch_checkpoint(str(path), model)
    np.testing.assert_allclose(_flax_logits(model, variables, resnet20_input),
                               _torch_logits(resnet20, resnet20_input), rtol=0, atol=1e-4)


def test_missing_key_is_reported(resnet20):
    state = dict(resnet20.state_dict())
    del state["layer2.0.downsample.1.running_var"]
    del state["fc.bias"]
    with pytest.raises(ValueError, match=r"missing keys \(2\)") as info:
        from_torch_state_dict(state, CIFARResNet(depth=20, num_classes=10))
    assert "layer2.0.downsample.1.running_var" in str(info.value)
    assert "fc.bias" in str(info.value)
    assert "unexpected" not in str(info.value)


def test_unexpected_key_is_reported(resnet20):
    state = dict(resnet20.state_dict())
    state["layer4.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): layer4\.0\.conv1\.weight"):
        from_torch_state_dict(state, CIFARResNet(depth=20, num_classes=10))


def test_shape_mismatch_reports_expected_and_found_shapes(resnet20):
    state = dict(resnet20.state_dict())
    state["fc.weight"] = torch.zeros(100, 128)
    state["layer1.0.conv1.weight"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(ValueError, match=r"shape mismatches \(2") as info:
        from_torch_state_dict(state, CIFARResNet(depth=20, num_classes=10))
    message = str(info.value)
    assert "fc.weight: expected (10, 128), found (100, 128)" in message
    assert "layer1.0.conv1.weight: expected (32, 32, 3, 3), found (32, 32, 1, 1)" in message


def test_wrong_architecture_is_refused(resnet20):
    with pytest.raises(ValueError, match=r"(?s)missing keys.*unexpected keys"):
        from_torch_state_dict(resnet20.state_dict(), VGG(depth=11, batch_norm=True))


def test_non_mapping_is_refused():
    with pytest.raises(TypeError, match="state dict"):
        from_torch_state_dict([1, 2, 3], DigitsMLP())


_EXECUTED = []


def _record_execution(tag):
    _EXECUTED.append(tag)
    return tag


class _Payload:
    """Unpickling this would call _record_execution: what an attacker's checkpoint would do."""

    def __reduce__(self):
        return (_record_execution, ("code ran",))


def test_checkpoint_with_pickled_object_is_refused(tmp_path, resnet20):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": resnet20.state_dict(), "extra": _Payload()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_torch_checkpoint(path, CIFARResNet(depth=20, num_classes=10))
    assert _EXECUTED == []


def test_checkpoint_that_is_not_a_dict_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="not a state dict"):
        load_torch_checkpoint(path, DigitsMLP())


def test_missing_torch_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[torch\]'"):
        load_torch_checkpoint(tmp_path / "any.pth", DigitsMLP())
