"""Tests for hypersparse_jax.models: shapes, exact weight counts, init, BatchNorm modes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hypersparse_jax.models import (VGG, CIFARResNet, DigitsCNN, DigitsMLP, LeNet300, LeNet5,
                                    create_model)


# Threefry's random-bit kernels take about a second to compile per shape on CPU; the 'rbg'
# generator compiles fast and draws from the same distributions the init rules are about.
_KEY = jax.random.key(0, impl="rbg")


def _abstract_variables(model, shape):
    return jax.eval_shape(lambda: model.init(_KEY, jnp.zeros(shape), train=False))


def _init(model, x):
    # One compiled init is much faster than op-by-op dispatch for the larger models.
    return jax.jit(lambda x: model.init(_KEY, x, train=False))(x)


def _kernels(params):
    return [(jax.tree_util.keystr(path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if path[-1].key == "kernel"]


def _kernel_weight_count(model, shape):
    return sum(int(np.prod(leaf.shape))
               for _, leaf in _kernels(_abstract_variables(model, shape)["params"]))


# Counts computed by hand from the architectures (conv k*k*c_in*c_out, dense in*out).
def test_resnet32_has_exact_reference_weight_count():
    # stem 3*3*3*32 + stage1 10*(9*32*32) + stage2 (9*32*64 + 9*64*64 + 32*64 + 8*9*64*64)
    # + stage3 (9*64*128 + 9*128*128 + 64*128 + 8*9*128*128) + fc 128*10
    expected = 864 + 92160 + 352256 + 1409024 + 1280
    assert expected == 1_855_584
    assert _kernel_weight_count(CIFARResNet(depth=32, num_classes=10), (1, 32, 32, 3)) == expected


def _bias_count(model, shape):
    return sum(int(np.prod(leaf.shape))
               for path, leaf in jax.tree_util.tree_leaves_with_path(
                   _abstract_variables(model, shape)["params"])
               if path[-1].key == "bias")


def test_lenet300_has_the_literature_weight_count_and_names():
    # 784*300 + 300*100 + 100*10 weights, 300 + 100 + 10 biases
    assert 784 * 300 + 300 * 100 + 100 * 10 == 266_200
    model = LeNet300()
    assert _kernel_weight_count(model, (1, 28, 28, 1)) == 266_200
    assert _bias_count(model, (1, 28, 28, 1)) == 410
    params = _abstract_variables(model, (1, 28, 28, 1))
    assert set(params) == {"params"}  # no BatchNorm
    assert {k: v["kernel"].shape for k, v in params["params"].items()} == {
        "fc1": (784, 300), "fc2": (300, 100), "fc3": (100, 10)}


def test_lenet5_has_the_literature_weight_count_and_names():
    # conv1 5*5*1*20, conv2 5*5*20*50, fc1 (4*4*50)*500, fc2 500*10; biases 20 + 50 + 500 + 10
    assert 5 * 5 * 20 + 5 * 5 * 20 * 50 + 800 * 500 + 500 * 10 == 430_500
    model = LeNet5()
    assert _kernel_weight_count(model, (1, 28, 28, 1)) == 430_500
    assert _bias_count(model, (1, 28, 28, 1)) == 580
    params = _abstract_variables(model, (1, 28, 28, 1))
    assert set(params) == {"params"}
    assert {k: v["kernel"].shape for k, v in params["params"].items()} == {
        "conv1": (5, 5, 1, 20), "conv2": (5, 5, 20, 50), "fc1": (800, 500), "fc2": (500, 10)}


def test_lenet5_convolutions_are_unpadded():
    # A single bright pixel in the corner: VALID 5x5 convs + 2x2 pools keep only the
    # 24x24 / 8x8 interior, so with zero biases conv1's map at that corner sees it once.
    model = LeNet5()
    variables = _init(model, jnp.zeros((1, 28, 28, 1)))
    x = jnp.zeros((1, 28, 28, 1)).at[0, 0, 0, 0].set(1.0)
    conv1 = model.apply(variables, x, train=False, capture_intermediates=True,
                        mutable=["intermediates"])[1]["intermediates"]["conv1"]["__call__"][0]
    assert conv1.shape == (1, 24, 24, 20)
    kernel = variables["params"]["conv1"]["kernel"]
    np.testing.assert_allclose(conv1[0, 0, 0], kernel[0, 0, 0], rtol=1e-6)
    assert float(jnp.abs(conv1[0, 1:, 1:]).max()) == 0.0


def test_vgg19_bn_has_exact_reference_weight_count():
    assert _kernel_weight_count(VGG(depth=19, batch_norm=True, num_classes=10),
                                (1, 32, 32, 3)) == 20_024_000


def test_vgg_weight_count_does_not_depend_on_batch_norm_or_input_size():
    # 64 px inputs (TinyImageNet) keep the 512 -> classes head, so only the head changes.
    count = _kernel_weight_count(VGG(depth=11, batch_norm=False, num_classes=200), (1, 64, 64, 3))
    conv = 9 * (3 * 64 + 64 * 128 + 128 * 256 + 256 * 256 + 256 * 512 + 3 * 512 * 512)
    assert count == conv + 512 * 200


def test_resnet56_uses_bottleneck_blocks_like_the_reference():
    params = _abstract_variables(CIFARResNet(depth=56, num_classes=10), (1, 32, 32, 3))["params"]
    kernels = _kernels(params)
    # stem + 3 stages * 9 blocks * 3 convs + one 1x1 shortcut per stage + fc
    assert len(kernels) == 1 + 3 * 9 * 3 + 3 + 1
    assert params["fc"]["kernel"].shape == (128 * 4, 10)
    assert params["layer1_0"]["conv3"]["kernel"].shape == (1, 1, 32, 128)
    assert params["layer1_0"]["downsample_0"]["kernel"].shape == (1, 1, 32, 128)


def test_resnet44_uses_basic_blocks():
    params = _abstract_variables(CIFARResNet(depth=44, num_classes=10), (1, 32, 32, 3))["params"]
    assert "conv3" not in params["layer1_0"]
    assert "downsample_0" not in params["layer1_0"]  # no shape change in stage 1
    assert params["layer2_0"]["downsample_0"]["kernel"].shape == (1, 1, 32, 64)
    assert params["fc"]["kernel"].shape == (128, 10)


@pytest.mark.parametrize("model, shape, num_classes", [
    (CIFARResNet(depth=20, num_classes=10), (2, 32, 32, 3), 10),
    (CIFARResNet(depth=56, num_classes=100), (2, 32, 32, 3), 100),
    (VGG(depth=19, batch_norm=True, num_classes=100), (2, 32, 32, 3), 100),
    (VGG(depth=11, batch_norm=False, num_classes=200), (2, 64, 64, 3), 200),
    # Fashion-MNIST / MNIST: 28x28x1 through the global average pool
    (CIFARResNet(depth=20, num_classes=10), (2, 28, 28, 1), 10),
    (VGG(depth=11, batch_norm=True, num_classes=10), (2, 28, 28, 1), 10),
])
def test_large_model_output_shapes(model, shape, num_classes):
    # Shapes only: traced, not run (the PyTorch parity tests run these models for real).
    variables = _abstract_variables(model, shape)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert logits.shape == (shape[0], num_classes)
    mutable = ["batch_stats"] if "batch_stats" in variables else False
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=mutable), variables, x)
    assert (out[0] if mutable else out).shape == (shape[0], num_classes)
    if mutable:
        assert jax.tree.structure(out[1]["batch_stats"]) == jax.tree.structure(
            variables["batch_stats"])


@pytest.mark.parametrize("model, num_classes", [
    (DigitsMLP(), 10),
    (DigitsMLP(hidden=(32,), num_classes=3), 3),
    (DigitsCNN(), 10),
    (DigitsCNN(batch_norm=False, num_classes=4), 4),
])
def test_digits_model_outputs(model, num_classes):
    x = np.random.default_rng(1).normal(size=(3, 8, 8, 1)).astype(np.float32)
    variables = model.init(_KEY, x, train=False)
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (3, num_classes)
    assert np.all(np.isfinite(logits))
    if "batch_stats" in variables:
        train_logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    else:
        train_logits = model.apply(variables, x, train=True)
    assert train_logits.shape == (3, num_classes)


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_lenet_outputs(name):
    model = create_model(name, num_classes=10)
    x = np.random.default_rng(1).normal(size=(3, 28, 28, 1)).astype(np.float32)
    variables = _init(model, jnp.asarray(x))
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (3, 10) and np.all(np.isfinite(logits))
    np.testing.assert_array_equal(model.apply(variables, x, train=True), logits)


def test_prunable_leaves_are_kernels_and_biases_are_separate():
    variables = DigitsCNN(batch_norm=False).init(_KEY, jnp.zeros((1, 8, 8, 1)),
                                                 train=False)
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
        name = path[-1].key
        assert name in ("kernel", "bias")
        assert (leaf.ndim >= 2) == (name == "kernel")


def test_resnet_init_matches_reference_rules():
    variables = _init(CIFARResNet(depth=8, num_classes=10), jnp.zeros((1, 32, 32, 3)))
    params = variables["params"]
    # He-normal fan-out: std = sqrt(2 / (3 * 3 * c_out)); 147,456 samples -> ~0.2 % error.
    kernel = np.asarray(params["layer3_0"]["conv2"]["kernel"])
    assert kernel.std() == pytest.approx(np.sqrt(2 / (9 * 128)), rel=0.02)
    assert abs(kernel.mean()) < 0.02 * kernel.std()
    assert np.asarray(params["fc"]["kernel"]).std() == pytest.approx(0.01, rel=0.1)
    np.testing.assert_array_equal(params["fc"]["bias"], 0.0)
    np.testing.assert_array_equal(params["bn1"]["scale"], 1.0)
    np.testing.assert_array_equal(params["bn1"]["bias"], 0.0)
    np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["mean"], 0.0)
    np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"], 1.0)
    assert "bias" not in params["conv1"]


def test_vgg_init_matches_reference_rules():
    params = _init(VGG(depth=11, batch_norm=False, num_classes=10),
                   jnp.zeros((1, 32, 32, 3)))["params"]
    # The reference computes n = k * k * in_channels: features.3 is a 64 -> 128 conv.
    kernel = np.asarray(params["features_3"]["kernel"])
    assert kernel.shape == (3, 3, 64, 128)
    assert kernel.std() == pytest.approx(np.sqrt(2 / (9 * 64)), rel=0.02)
    np.testing.assert_array_equal(params["features_3"]["bias"], 0.0)
    assert np.asarray(params["classifier"]["kernel"]).std() == pytest.approx(0.01, rel=0.1)


def _conv3x3_same(x, kernel, bias=None):
    """Plain NumPy 3x3 convolution with zero padding 1 (NHWC x, HWIO kernel)."""
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("nhwc,co->nhwo", padded[:, dy:dy + h, dx:dx + w], kernel[dy, dx])
    return out if bias is None else out + bias


def test_train_mode_updates_batch_stats_with_pytorch_momentum():
    model = DigitsCNN()
    x = np.random.default_rng(3).normal(size=(16, 8, 8, 1))
    variables = model.init(_KEY, x, train=False)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    conv1 = _conv3x3_same(x, np.asarray(variables["params"]["conv1"]["kernel"], np.float64))
    batch_mean = conv1.mean(axis=(0, 1, 2))
    batch_var = conv1.var(axis=(0, 1, 2))
    stats = updates["batch_stats"]["bn1"]
    # running = 0.9 * running + 0.1 * batch, starting from mean 0 / var 1 (PyTorch momentum 0.1).
    np.testing.assert_allclose(stats["mean"], 0.1 * batch_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * batch_var, rtol=1e-4, atol=1e-6)


def test_eval_mode_uses_running_averages():
    model = DigitsCNN()
    x = np.random.default_rng(3).normal(size=(8, 8, 8, 1)).astype(np.float32)
    variables = model.init(_KEY, x, train=False)
    # Per-sample outputs in eval mode do not depend on the rest of the batch...
    together = model.apply(variables, x, train=False)
    alone = model.apply(variables, x[:1], train=False)
    np.testing.assert_allclose(together[:1], alone, rtol=1e-5, atol=1e-6)
    # ...and the eval-mode conv1 output is normalised with the stored mean and variance.
    shifted = jax.tree.map(lambda a: a, variables)
    shifted["batch_stats"]["bn1"]["mean"] = shifted["batch_stats"]["bn1"]["mean"] + 3.0
    assert not np.allclose(model.apply(shifted, x, train=False), together, atol=1e-4)
    # Train mode ignores the stored statistics and uses the batch's.
    train_a, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    train_b, _ = model.apply(shifted, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(train_a, train_b, rtol=1e-5, atol=1e-6)
    train_alone, _ = model.apply(variables, x[:2], train=True, mutable=["batch_stats"])
    assert not np.allclose(train_alone, train_a[:2], atol=1e-4)


def test_eval_mode_normalises_with_running_stats_and_pytorch_epsilon():
    model = DigitsCNN()
    x = np.random.default_rng(4).normal(size=(4, 8, 8, 1))
    variables = model.init(_KEY, x, train=False)
    rng = np.random.default_rng(0)
    mean = rng.uniform(-0.5, 0.5, 32)
    var = rng.uniform(0.0, 0.01, 32)  # small variances make epsilon visible
    scale = rng.uniform(0.5, 1.5, 32)
    bias = rng.uniform(-0.5, 0.5, 32)
    variables["batch_stats"]["bn1"] = {"mean": jnp.asarray(mean, jnp.float32),
                                       "var": jnp.asarray(var, jnp.float32)}
    variables["params"]["bn1"] = {"scale": jnp.asarray(scale, jnp.float32),
                                  "bias": jnp.asarray(bias, jnp.float32)}
    _, state = model.apply(variables, x, train=False, capture_intermediates=True,
                           mutable=["intermediates"])
    bn1_out = state["intermediates"]["bn1"]["__call__"][0]
    conv1 = _conv3x3_same(x, np.asarray(variables["params"]["conv1"]["kernel"], np.float64))
    expected = (conv1 - mean) / np.sqrt(var + 1e-5) * scale + bias
    np.testing.assert_allclose(bn1_out, expected, rtol=1e-4, atol=1e-4)


def test_compute_dtype_is_respected_and_params_stay_float32():
    model = create_model("mlp", num_classes=10, dtype=jnp.bfloat16)
    x = jnp.ones((2, 8, 8, 1))
    variables = model.init(_KEY, x, train=False)
    assert model.apply(variables, x, train=False).dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


@pytest.mark.parametrize("depth", [33, 2, 0, -4, 21, 32.0, "32", True])
def test_bad_resnet_depth_raises_value_error_naming_value(depth):
    with pytest.raises(ValueError, match=r"6n\+2") as info:
        CIFARResNet(depth=depth, num_classes=10)
    assert repr(depth) in str(info.value)


@pytest.mark.parametrize("depth", [10, 12, 18, 20, "19"])
def test_bad_vgg_depth_raises_value_error_naming_value(depth):
    with pytest.raises(ValueError, match=r"\[11, 13, 16, 19\]") as info:
        VGG(depth=depth, batch_norm=True, num_classes=10)
    assert repr(depth) in str(info.value)


def test_create_model_builds_each_architecture():
    assert isinstance(create_model("resnet", num_classes=10, depth=20), CIFARResNet)
    vgg = create_model("VGG", num_classes=100, depth=16, batch_norm=False)
    assert isinstance(vgg, VGG) and vgg.depth == 16 and not vgg.batch_norm
    assert isinstance(create_model("mlp", num_classes=10), DigitsMLP)
    cnn = create_model("cnn", num_classes=10, batch_norm=False)
    assert isinstance(cnn, DigitsCNN) and not cnn.batch_norm
    assert isinstance(create_model("lenet300", num_classes=10), LeNet300)
    assert isinstance(create_model("LeNet5", num_classes=10), LeNet5)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(name="resnet50x", num_classes=10), r"unknown model name 'resnet50x'.*'resnet', 'vgg'"),
    (dict(name="resnet", num_classes=10), r"needs a depth"),
    (dict(name="vgg", num_classes=10), r"needs a depth.*11, 13, 16, 19"),
    (dict(name="resnet", num_classes=10, depth=30), r"6n\+2.*got 30"),
    (dict(name="vgg", num_classes=10, depth=17), r"got 17"),
    (dict(name="mlp", num_classes=10, depth=3), r"depth=None, got 3"),
    (dict(name="lenet5", num_classes=10, depth=5), r"'lenet5' has a fixed depth.*got 5"),
    (dict(name="lenet300", num_classes=0), r"num_classes.*got 0"),
    (dict(name="resnet", num_classes=10, depth=20, batch_norm=False), r"always uses BatchNorm"),
    (dict(name="cnn", num_classes=0), r"num_classes.*got 0"),
])
def test_create_model_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        create_model(kwargs.pop("name"), **kwargs)


@pytest.mark.parametrize("name,widths", [("vgg", (2, 4, 9, 7, 12, 5, 16, 8)),
                                         ("lenet5", (3, 8, 20))])
def test_narrow_models_on_cpu_equal_the_plain_xla_operations(name, widths):
    """Channel-pruned widths take the CPU paths of :mod:`hypersparse_jax.conv` (a grey-scale
    first layer as shifted products, pools of at most 8 channels as four slices); logits and
    every parameter gradient equal those of ``lax.conv_general_dilated`` and Flax's pool."""
    from hypersparse_jax import conv
    model = (VGG(depth=11, widths=widths, batch_norm=True) if name == "vgg"
             else LeNet5(widths=widths))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 28, 28, 1)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(1), x, train=False)

    def loss(params):
        return jnp.sum(jnp.sin(model.apply({**variables, "params": params}, x, train=False)))

    def run():  # a new jit each call: traced (CPU paths or plain) where it is called
        return (jax.jit(lambda x: model.apply(variables, x, train=False))(x),
                jax.jit(jax.grad(loss))(variables["params"]))

    def forward_jaxpr():
        return str(jax.make_jaxpr(lambda x: model.apply(variables, x, train=False))(x))

    assert "reduce_window" not in forward_jaxpr()
    logits, grads = run()
    with conv.plain_convolutions():
        assert "reduce_window" in forward_jaxpr()
        want_logits, want_grads = run()
    scale = float(jnp.max(jnp.abs(want_logits)))
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-5 * scale)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(want))))
