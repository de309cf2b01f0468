"""Tests for hypersparse_jax.sparse_export: round trips, errors, compression, atomic writes."""

from __future__ import annotations

import json
import os
import zipfile

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from hypersparse_jax import sparse_export
from hypersparse_jax.sparse_export import FORMAT_NAME, export_sparse, load_sparse

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]


def _bits(array: np.ndarray) -> np.ndarray:
    """Bit pattern of an array, for exact comparison (NaN and -0.0 included)."""
    array = np.ascontiguousarray(array)
    return array.view(f"u{array.dtype.itemsize}")


def _assert_trees_identical(actual, expected, path=""):
    assert isinstance(actual, dict), path
    assert set(actual) == set(expected), (path, sorted(actual), sorted(expected))
    for key, value in expected.items():
        if isinstance(value, dict):
            _assert_trees_identical(actual[key], value, f"{path}/{key}")
        else:
            got = actual[key]
            assert got.dtype == value.dtype, (f"{path}/{key}", got.dtype, value.dtype)
            assert got.shape == value.shape, (f"{path}/{key}", got.shape, value.shape)
            np.testing.assert_array_equal(_bits(got), _bits(value), err_msg=f"{path}/{key}")


def _small_variables(dtype, seed=0):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape).astype(dtype)

    return {
        "params": {
            "conv1": {"kernel": normal(3, 3, 3, 8)},
            "bn1": {"scale": np.ones(8, dtype), "bias": normal(8)},
            "block": {
                "conv_a": {"kernel": normal(3, 3, 8, 8)},
                "inner": {"conv_b": {"kernel": normal(1, 1, 8, 16), "bias": normal(16)}},
            },
            "fc": {"kernel": normal(16, 10), "bias": normal(10)},
        },
        "batch_stats": {"bn1": {"mean": normal(8), "var": np.abs(normal(8))}},
    }


def _params_mask(params, keep_fraction, seed=1):
    """Random mask on kernels (keep about keep_fraction), all-True elsewhere."""
    rng = np.random.default_rng(seed)
    mask = {}
    for key, value in params.items():
        if isinstance(value, dict):
            mask[key] = _params_mask(value, keep_fraction, seed + 1)
        elif key == "kernel":
            mask[key] = rng.random(value.shape) < keep_fraction
        else:
            mask[key] = np.ones(value.shape, bool)
    return mask


def _apply(tree, mask):
    """Independent reference: zero where the mask is False."""
    return {key: (_apply(value, mask[key]) if isinstance(value, dict)
                  else np.where(mask[key], value, np.zeros((), value.dtype)).astype(value.dtype))
            for key, value in tree.items()}


def _manifest(path):
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("manifest.json"))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_params_mask(tmp_path, dtype):
    variables = _small_variables(dtype)
    mask = _params_mask(variables["params"], keep_fraction=0.2)
    path = tmp_path / "model.hsz"
    stats = export_sparse(variables, mask, path)
    loaded = load_sparse(path)

    expected = {"params": _apply(variables["params"], mask),
                "batch_stats": variables["batch_stats"]}
    _assert_trees_identical(loaded, expected)

    leaves = [v for v in _iter_leaves(variables)]
    assert stats["dense_bytes"] == sum(v.nbytes for v in leaves)
    assert stats["sparse_bytes"] == path.stat().st_size
    assert stats["compression_ratio"] == pytest.approx(stats["dense_bytes"] / stats["sparse_bytes"])
    param_leaves = list(_iter_leaves(variables["params"]))
    assert stats["num_weights"] == sum(v.size for v in param_leaves)
    assert stats["num_nonzero"] == sum(
        int(np.count_nonzero(v.astype(np.float32))) for v in _iter_leaves(expected["params"]))
    encodings = {tuple(r["path"]): r["encoding"] for r in _manifest(path)["leaves"]}
    assert encodings[("params", "block", "conv_a", "kernel")] == "sparse"
    assert encodings[("params", "fc", "bias")] == "dense"
    assert encodings[("batch_stats", "bn1", "mean")] == "dense"
    assert {r["dtype"] for r in _manifest(path)["leaves"]} == {np.dtype(dtype).name}


def _iter_leaves(tree):
    for value in tree.values():
        if isinstance(value, dict):
            yield from _iter_leaves(value)
        else:
            yield value


def test_round_trip_full_variables_mask_scalar_leaves_and_jax_input(tmp_path):
    variables = _small_variables(np.float32)
    mask = {"params": _params_mask(variables["params"], 0.1),
            "batch_stats": {"bn1": {"mean": True, "var": np.array(False)}}}
    mask["params"]["bn1"]["bias"] = True
    jax_variables = {"params": {"w": {"kernel": jnp.asarray(variables["params"]["fc"]["kernel"],
                                                           jnp.bfloat16)}}}
    path = tmp_path / "full.hsz"
    export_sparse(variables, mask, path)
    expected = {
        "params": _apply(variables["params"], {**mask["params"],
                                               "bn1": {"scale": np.ones(8, bool),
                                                       "bias": np.ones(8, bool)}}),
        "batch_stats": {"bn1": {"mean": variables["batch_stats"]["bn1"]["mean"],
                                "var": np.zeros(8, np.float32)}},
    }
    _assert_trees_identical(load_sparse(path), expected)

    jax_mask = {"w": {"kernel": jnp.abs(jax_variables["params"]["w"]["kernel"]) > 1.0}}
    export_sparse(jax_variables, jax_mask, tmp_path / "jax.hsz")
    loaded = load_sparse(tmp_path / "jax.hsz")["params"]["w"]["kernel"]
    reference = np.asarray(jax_variables["params"]["w"]["kernel"])
    expected_kernel = np.where(np.asarray(jax_mask["w"]["kernel"]), reference,
                               np.zeros((), reference.dtype)).astype(reference.dtype)
    assert loaded.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(_bits(loaded), _bits(expected_kernel))


def test_fully_pruned_and_unpruned_leaves(tmp_path):
    kernel = np.arange(1, 101, dtype=np.float32).reshape(10, 10)
    variables = {"params": {"a": {"kernel": kernel}, "b": {"kernel": kernel + 1},
                            "c": {"kernel": kernel + 2}}}
    mask = {"a": {"kernel": np.zeros((10, 10), bool)},   # everything pruned
            "b": {"kernel": np.ones((10, 10), bool)},    # nothing pruned
            "c": {"kernel": kernel > 10}}                 # 10 % pruned: dense is smaller
    path = tmp_path / "m.hsz"
    stats = export_sparse(variables, mask, path)
    assert stats["num_weights"] == 300
    assert stats["num_nonzero"] == 190
    encodings = [r["encoding"] for r in _manifest(path)["leaves"]]
    assert encodings == ["sparse", "dense", "dense"]
    _assert_trees_identical(load_sparse(path), {"params": _apply(variables["params"], mask)})


@pytest.mark.parametrize("bad_mask, message", [
    ({"conv": {"kernel": np.ones((3, 3), bool)}}, "structure"),                       # missing leaf
    ({"conv": {"kernel": np.ones((3, 3), bool), "bias": np.ones(3, bool),
               "extra": np.ones(3, bool)}}, "structure"),                              # extra leaf
    ({"conv": {"kernel": np.ones((3, 4), bool), "bias": np.ones(3, bool)}}, "shape"),
    ({"conv": {"kernel": np.ones((3, 3), np.float32), "bias": np.ones(3, bool)}}, "bool"),
    ({"conv": np.ones((3, 3), bool)}, "structure"),
])
def test_mask_mismatch_raises(tmp_path, bad_mask, message):
    variables = {"params": {"conv": {"kernel": np.ones((3, 3), np.float32),
                                     "bias": np.ones(3, np.float32)}}}
    path = tmp_path / "never.hsz"
    with pytest.raises(ValueError, match=message):
        export_sparse(variables, bad_mask, path)
    assert list(tmp_path.iterdir()) == []


def _resnet32_variables(rng):
    """Plain-numpy parameters shaped like the CIFAR ResNet-32 of the reference (32/64/128)."""
    params, stats = {}, {}

    def conv(name, kh, cin, cout):
        std = np.sqrt(2.0 / (kh * kh * cout))  # He, fan-out
        params[name] = {"kernel": (rng.standard_normal((kh, kh, cin, cout)) * std)
                        .astype(np.float32)}

    def bn(name, width):
        params[name] = {"scale": np.ones(width, np.float32), "bias": np.zeros(width, np.float32)}
        stats[name] = {"mean": rng.standard_normal(width).astype(np.float32) * 0.1,
                       "var": np.ones(width, np.float32)}

    conv("conv1", 3, 3, 32)
    bn("bn1", 32)
    cin = 32
    for stage, width in enumerate((32, 64, 128), start=1):
        for block in range(5):
            name = f"layer{stage}_{block}"
            conv(f"{name}_conv1", 3, cin, width)
            bn(f"{name}_bn1", width)
            conv(f"{name}_conv2", 3, width, width)
            bn(f"{name}_bn2", width)
            if cin != width:
                conv(f"{name}_shortcut_0", 1, cin, width)
                bn(f"{name}_shortcut_1", width)
            cin = width
    params["fc"] = {"kernel": (rng.standard_normal((128, 10)) * 0.01).astype(np.float32),
                    "bias": np.zeros(10, np.float32)}
    return {"params": params, "batch_stats": stats}


def _global_magnitude_mask(params, sparsity):
    """NumPy reference of the global magnitude mask on kernels: keep |w| > sort(|w|)[floor(k n)]."""
    kernels = [leaf["kernel"] for leaf in params.values() if "kernel" in leaf]
    magnitudes = np.sort(np.abs(np.concatenate([k.reshape(-1) for k in kernels])))
    threshold = magnitudes[int(np.floor(sparsity * magnitudes.size))]
    return {name: {key: (np.abs(value) > threshold if key == "kernel"
                         else np.ones(value.shape, bool)) for key, value in leaf.items()}
            for name, leaf in params.items()}


def test_resnet32_sized_at_98_percent_is_15x_smaller(tmp_path):
    variables = _resnet32_variables(np.random.default_rng(0))
    kernel_count = sum(leaf["kernel"].size for leaf in variables["params"].values()
                       if "kernel" in leaf)
    assert 1_800_000 < kernel_count < 1_900_000
    mask = _global_magnitude_mask(variables["params"], 0.98)
    kept = sum(int(m["kernel"].sum()) for m in mask.values() if "kernel" in m)
    assert kept == pytest.approx(0.02 * kernel_count, abs=2)

    path = tmp_path / "resnet32.hsz"
    stats = export_sparse(variables, mask, path)
    print(f"ResNet-32-sized, 98 % sparsity: {stats}")
    assert stats["dense_bytes"] >= 4 * kernel_count
    assert stats["compression_ratio"] >= 15.0
    assert stats["dense_bytes"] / path.stat().st_size >= 15.0
    _assert_trees_identical(
        load_sparse(path),
        {"params": _apply(variables["params"], mask), "batch_stats": variables["batch_stats"]})

    # Delta encoding is never wider than plain flat indices, and narrower for the big kernels.
    for record in _manifest(path)["leaves"]:
        if record["encoding"] == "sparse":
            size = int(np.prod(record["shape"]))
            plain = np.min_scalar_type(size - 1)
            assert np.dtype(record["index_dtype"]).itemsize <= plain.itemsize
            if size == 3 * 3 * 128 * 128:
                assert record["index_dtype"] == "uint16" and plain == np.uint32


def _write_small(tmp_path, name="m.hsz"):
    variables = _small_variables(np.float32)
    path = tmp_path / name
    export_sparse(variables, _params_mask(variables["params"], 0.3), path)
    return path


def test_truncated_file_raises_value_error(tmp_path):
    path = _write_small(tmp_path)
    data = path.read_bytes()
    for length in (0, 10, len(data) // 2, len(data) - 5):
        path.write_bytes(data[:length])
        with pytest.raises(ValueError, match=str(path)):
            load_sparse(path)


def test_garbage_and_corrupted_bytes_raise_value_error(tmp_path):
    garbage = tmp_path / "garbage.hsz"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="garbage.hsz"):
        load_sparse(garbage)

    path = _write_small(tmp_path)
    data = bytearray(path.read_bytes())
    # Overwrite a stretch in the middle of the compressed entries (central directory intact).
    start = len(data) // 3
    data[start:start + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="m.hsz"):
        load_sparse(path)


def _rewrite_manifest(path, edit):
    """Copies the archive with the manifest changed by edit(manifest) and entries filtered."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(members.pop("manifest.json"))
    drop = edit(manifest) or ()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("manifest.json", json.dumps(manifest))
        for name, data in members.items():
            if name not in drop:
                archive.writestr(name, data)


def _first_dense(manifest):
    return next(r for r in manifest["leaves"] if r["encoding"] == "dense")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format="something-else"), "format"),
    (lambda m: m.update(version=99), "version 99"),
    (lambda m: m.pop("leaves"), "no leaves"),
    (lambda m: ["leaf0.values.npy"], "missing entry"),
    (lambda m: m["leaves"][0].update(encoding="zstd"), "encoding"),
    (lambda m: m["leaves"][0].update(shape=[2, 2]), "out-of-range"),
    (lambda m: _first_dense(m).update(shape=[2, 2]), "bytes"),
    (lambda m: _first_dense(m).update(dtype="float64"), "bytes"),
])
def test_bad_manifest_or_missing_entry_raises(tmp_path, edit, message):
    path = _write_small(tmp_path)
    _rewrite_manifest(path, edit)
    with pytest.raises(ValueError, match=message) as info:
        load_sparse(path)
    assert str(path) in str(info.value)


def test_not_a_sparse_export_and_missing_file(tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, a=np.ones(3))
    with pytest.raises(ValueError, match=f"other.npz.*{FORMAT_NAME}"):
        load_sparse(other)
    with pytest.raises(FileNotFoundError):
        load_sparse(tmp_path / "absent.hsz")


def test_failure_mid_write_leaves_no_file(tmp_path, monkeypatch):
    variables = _small_variables(np.float32)
    mask = _params_mask(variables["params"], 0.3)
    real_write = sparse_export._write_array
    calls = []

    def failing_write(archive, name, array):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        real_write(archive, name, array)

    monkeypatch.setattr(sparse_export, "_write_array", failing_write)
    path = tmp_path / "model.hsz"
    with pytest.raises(OSError, match="simulated"):
        export_sparse(variables, mask, path)
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []

    # An existing file survives a failed overwrite unchanged.
    monkeypatch.setattr(sparse_export, "_write_array", real_write)
    export_sparse(variables, mask, path)
    before = path.read_bytes()
    calls.clear()
    monkeypatch.setattr(sparse_export, "_write_array", failing_write)
    with pytest.raises(OSError):
        export_sparse(_small_variables(np.float32, seed=5), mask, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.hsz"]
