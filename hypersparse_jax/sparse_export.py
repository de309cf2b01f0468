"""Compressed export of pruned Flax variables: ``export_sparse`` and ``load_sparse``.

A pruned network keeps 1 % to 10 % of its kernel weights; storing it densely wastes the rest.
``export_sparse`` writes only the kept kernel values and their positions, everything else
(biases, normalisation parameters, ``batch_stats``) as it is, into one file that
``load_sparse`` turns back into the nested dicts of arrays, pruned entries exactly zero.

File format ``hypersparse-jax-sparse``, version 1
-------------------------------------------------
The file is a ZIP archive (entries DEFLATE-compressed) in the layout of NumPy's ``.npz``, so
``numpy.load`` and ``unzip`` can look inside it. It holds:

``manifest.json``
    UTF-8 JSON object::

        {"format": "hypersparse-jax-sparse", "version": 1,
         "leaves": [{"path": ["params", "Conv_0", "kernel"], "shape": [3, 3, 3, 32],
                     "dtype": "bfloat16", "encoding": "sparse", "index_dtype": "uint16",
                     "count": 17}, ...]}

    ``leaves`` lists every array leaf of the variables, in depth-first key order. ``path`` is the
    list of dict keys leading to the leaf (strings), ``shape`` its shape, ``dtype`` its dtype
    name (NumPy names and the ``ml_dtypes`` names such as ``bfloat16``), ``encoding`` is
    ``"dense"`` or ``"sparse"``; sparse leaves also carry ``index_dtype`` and ``count``
    (number of stored values).

``leaf<i>.npy`` (``encoding == "dense"``, i = position in ``leaves``)
    The whole leaf, C order, as its raw little-endian bytes in a 1-D ``uint8`` array. Raw bytes
    keep dtypes that ``.npy`` cannot describe (``bfloat16``) bit-exact.

``leaf<i>.values.npy`` and ``leaf<i>.gaps.npy`` (``encoding == "sparse"``)
    ``values``: the kept entries, in ascending flat (C-order) index, as raw little-endian bytes
    in a 1-D ``uint8`` array (``count * itemsize`` bytes). ``gaps``: the delta-encoded flat
    indices of those entries, a 1-D array of ``index_dtype``: ``gaps[0]`` is the first index
    and ``gaps[j]`` is ``index[j] - index[j-1]``, so ``index = cumsum(gaps)``. ``index_dtype``
    is the smallest of ``uint8/16/32/64`` holding the largest gap. A gap never exceeds the
    largest index, so delta encoding never needs a wider type than plain indices, and at high
    sparsity it is usually narrower (gaps near ``1 / density`` instead of indices up to the leaf
    size: ``uint16`` instead of ``uint32`` for a 128x128x3x3 kernel at 98 %). Every position
    not listed is zero.

Which leaves are sparse: those the mask covers and on which it drops at least one entry,
provided the sparse form (values + gaps) is smaller than the dense one; otherwise the leaf is
stored dense with the pruned entries set to zero. Empty sub-dicts are not recorded.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from hypersparse_jax.run_dir import default_file_mode

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "export_sparse", "load_sparse"]

FORMAT_NAME = "hypersparse-jax-sparse"
FORMAT_VERSION = 1

_MANIFEST = "manifest.json"
_INDEX_DTYPES = (np.uint8, np.uint16, np.uint32, np.uint64)
_BIG_ENDIAN_HOST = sys.byteorder == "big"


def _flatten(tree: Any, what: str) -> dict[tuple[str, ...], Any]:
    """Flattens nested mappings to ``{path: leaf}`` in depth-first, insertion order."""
    flat: dict[tuple[str, ...], Any] = {}

    def visit(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for key, child in node.items():
                if not isinstance(key, str):
                    where = "/".join(path) or "<root>"
                    raise ValueError(f"{what}: keys must be strings, got {key!r} at {where}")
                visit(child, path + (key,))
        else:
            flat[path] = node

    visit(tree, ())
    return flat


def _unflatten(flat: dict[tuple[str, ...], np.ndarray]) -> dict[str, Any]:
    """Inverse of ``_flatten``; ValueError if a path runs through a leaf."""
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"manifest path {'/'.join(path)} runs through a leaf")
        if path[-1] in node:
            raise ValueError(f"manifest path {'/'.join(path)} is both a leaf and a dict")
        node[path[-1]] = leaf
    return tree


def _resolve_dtype(name: str) -> np.dtype:
    """Maps a dtype name from the manifest to a dtype (ml_dtypes names first)."""
    if hasattr(ml_dtypes, name):
        candidate = getattr(ml_dtypes, name)
        if isinstance(candidate, type):
            return np.dtype(candidate)
    return np.dtype(name)


def _check_dtype(dtype: np.dtype, path: tuple[str, ...]) -> None:
    where = "/".join(path)
    if dtype.hasobject or dtype.fields is not None or dtype.kind in "OSUMm":
        raise ValueError(f"leaf {where}: dtype {dtype} cannot be exported (numeric dtypes only)")
    try:
        ok = _resolve_dtype(dtype.name) == dtype
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"leaf {where}: dtype {dtype} has no portable name, cannot be exported")


def _raw_bytes(array: np.ndarray) -> np.ndarray:
    """The array's C-order little-endian bytes as a 1-D uint8 array."""
    array = np.ascontiguousarray(array).reshape(-1)
    if _BIG_ENDIAN_HOST:
        array = array.byteswap()
    return array.view(np.uint8)


def _index_dtype(max_value: int) -> np.dtype:
    for dtype in _INDEX_DTYPES:
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"index {max_value} does not fit in uint64")


def _match_mask(
    flat_vars: dict[tuple[str, ...], Any], mask: Any
) -> dict[tuple[str, ...], np.ndarray]:
    """Returns ``{variables path: bool mask array}``; mask given for variables or params."""
    flat_mask = _flatten(mask, "mask")
    params_paths = {p[1:] for p in flat_vars if p and p[0] == "params"}
    if set(flat_mask) == set(flat_vars):
        prefix: tuple[str, ...] = ()
    elif params_paths and set(flat_mask) == params_paths:
        prefix = ("params",)
    else:
        mask_paths = set(flat_mask)
        missing = sorted("/".join(p) for p in params_paths - mask_paths)[:5]
        extra = sorted("/".join(p) for p in mask_paths - params_paths)[:5]
        raise ValueError(
            "mask structure matches neither variables['params'] nor variables: "
            f"paths missing from the mask {missing}, "
            f"paths in the mask but not in params {extra}")
    matched = {}
    for path, mask_leaf in flat_mask.items():
        full_path = prefix + path
        leaf_shape = np.shape(flat_vars[full_path])
        mask_array = np.asarray(mask_leaf)
        if mask_array.dtype != np.bool_:
            raise ValueError(
                f"mask leaf {'/'.join(path)} has dtype {mask_array.dtype}, expected bool")
        if mask_array.shape != leaf_shape:
            if mask_array.shape != ():
                raise ValueError(
                    f"mask leaf {'/'.join(path)} has shape {mask_array.shape}, "
                    f"the variable has {leaf_shape} (or give a scalar bool)")
            mask_array = np.broadcast_to(mask_array, leaf_shape)
        matched[full_path] = mask_array
    return matched


def _write_array(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with archive.open(name + ".npy", "w", force_zip64=True) as member:
        np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


def export_sparse(variables: Mapping[str, Any], mask: Any, path: str | os.PathLike) -> dict:
    """Writes pruned Flax variables to one compressed file (format in the module docstring).

    The mask is applied while writing: entries where it is False are dropped (sparse leaves) or
    stored as zero (dense leaves), whatever their current value.

    Args:
        variables: nested dict (or ``FrozenDict``) of arrays, e.g. ``{'params': ...,
            'batch_stats': ...}``; NumPy or JAX arrays (JAX arrays are copied to the host), any
            numeric dtype incl. ``bfloat16`` and ``float16``. Keys must be strings.
        mask: bool pytree, False = pruned. Either the structure of ``variables['params']`` (then
            the other collections are stored dense) or of ``variables`` as a whole. A leaf is a bool
            array of the variable's shape or a scalar bool (applies to the whole leaf).
        path: file to write. It is written to a temporary file in the same directory and moved
            into place with ``os.replace``, so ``path`` never holds a partial file; an existing file
            is replaced only on success.

    Returns:
        dict with ``dense_bytes`` (bytes of all leaves stored densely, ``sum(leaf.nbytes)``),
        ``sparse_bytes`` (size of the written file), ``compression_ratio``
        (``dense_bytes / sparse_bytes``), ``num_weights`` (entries of the leaves the mask covers)
        and ``num_nonzero`` (of those, the entries that are non-zero after masking).

    Raises:
        ValueError: mask structure, leaf shape or dtype does not match ``variables``, a key is not
            a string, or a dtype cannot be exported.
        OSError: the file cannot be written.
    """
    path = Path(path)
    flat_vars = {p: np.asarray(leaf) for p, leaf in _flatten(variables, "variables").items()}
    if not flat_vars or () in flat_vars:
        raise ValueError("variables must be a non-empty nested dict of arrays")
    for leaf_path, leaf in flat_vars.items():
        _check_dtype(leaf.dtype, leaf_path)
    masks = _match_mask(flat_vars, mask)

    entries: list[tuple[str, np.ndarray]] = []
    manifest_leaves = []
    dense_bytes = num_weights = num_nonzero = 0
    for i, (leaf_path, leaf) in enumerate(flat_vars.items()):
        dense_bytes += leaf.nbytes
        record = {"path": list(leaf_path), "shape": list(leaf.shape), "dtype": leaf.dtype.name}
        leaf_mask = masks.get(leaf_path)
        if leaf_mask is None:
            record["encoding"] = "dense"
            entries.append((f"leaf{i}", _raw_bytes(leaf)))
            manifest_leaves.append(record)
            continue
        flat_leaf = np.ascontiguousarray(leaf).reshape(-1)
        kept = np.flatnonzero(leaf_mask.reshape(-1))
        num_weights += leaf.size
        num_nonzero += int(np.count_nonzero(flat_leaf[kept]))
        gaps = np.diff(kept, prepend=0)
        index_dtype = _index_dtype(int(gaps.max()) if gaps.size else 0)
        sparse_size = kept.size * (leaf.dtype.itemsize + index_dtype.itemsize)
        if kept.size < leaf.size and sparse_size < leaf.nbytes:
            record.update(encoding="sparse", index_dtype=index_dtype.name, count=int(kept.size))
            entries.append((f"leaf{i}.values", _raw_bytes(flat_leaf[kept])))
            entries.append((f"leaf{i}.gaps", gaps.astype(index_dtype)))
        else:
            record["encoding"] = "dense"
            masked = np.where(leaf_mask, leaf, np.zeros((), leaf.dtype)).astype(leaf.dtype)
            entries.append((f"leaf{i}", _raw_bytes(masked)))
        manifest_leaves.append(record)

    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "leaves": manifest_leaves}
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, default_file_mode())  # the user's umask, not mkstemp's 0600
        with os.fdopen(fd, "wb") as raw_file:
            with zipfile.ZipFile(raw_file, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                archive.writestr(_MANIFEST, json.dumps(manifest, indent=1))
                for name, array in entries:
                    _write_array(archive, name, array)
            raw_file.flush()
            os.fsync(raw_file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise

    sparse_bytes = path.stat().st_size
    return {
        "dense_bytes": int(dense_bytes),
        "sparse_bytes": int(sparse_bytes),
        "compression_ratio": dense_bytes / sparse_bytes,
        "num_weights": int(num_weights),
        "num_nonzero": int(num_nonzero),
    }


def _read_array(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    with archive.open(name + ".npy") as member:
        array = np.lib.format.read_array(member, allow_pickle=False)
    if array.ndim != 1:
        raise ValueError(f"entry {name}.npy is not 1-D")
    return array


def _from_raw(raw: np.ndarray, dtype: np.dtype, count: int, name: str) -> np.ndarray:
    if raw.dtype != np.uint8 or raw.size != count * dtype.itemsize:
        raise ValueError(
            f"entry {name}.npy holds {raw.size} bytes of {raw.dtype}, expected "
            f"{count * dtype.itemsize} bytes of uint8")
    values = raw.view(dtype)
    return values.byteswap() if _BIG_ENDIAN_HOST else values


def _decode_leaf(
    archive: zipfile.ZipFile, i: int, record: Any
) -> tuple[tuple[str, ...], np.ndarray]:
    if not isinstance(record, dict):
        raise ValueError(f"manifest leaf {i} is not an object")
    try:
        leaf_path = tuple(record["path"])
        shape = tuple(int(d) for d in record["shape"])
        dtype = _resolve_dtype(record["dtype"])
        encoding = record["encoding"]
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"manifest leaf {i} lacks or has a bad path/shape/dtype/encoding: {err!r}") from None
    if not leaf_path or not all(isinstance(k, str) for k in leaf_path) or min(shape, default=0) < 0:
        raise ValueError(f"manifest leaf {i} has a bad path {leaf_path} or shape {shape}")
    size = int(np.prod(shape, dtype=np.int64))
    if encoding == "dense":
        raw = _read_array(archive, f"leaf{i}")
        return leaf_path, _from_raw(raw, dtype, size, f"leaf{i}").reshape(shape)
    if encoding != "sparse":
        raise ValueError(f"manifest leaf {i} has unknown encoding {encoding!r}")
    try:
        count = int(record["count"])
        index_dtype = np.dtype(record["index_dtype"])
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"manifest leaf {i} lacks or has a bad count/index_dtype: {err!r}") from None
    gaps = _read_array(archive, f"leaf{i}.gaps")
    if gaps.dtype != index_dtype or gaps.size != count:
        raise ValueError(
            f"entry leaf{i}.gaps.npy holds {gaps.size} x {gaps.dtype}, "
            f"expected {count} x {index_dtype}")
    values = _from_raw(_read_array(archive, f"leaf{i}.values"), dtype, count, f"leaf{i}.values")
    index = np.cumsum(gaps, dtype=np.uint64)
    if count and ((gaps[1:] == 0).any() or index[-1] >= size):
        raise ValueError(f"entry leaf{i}.gaps.npy has repeated or out-of-range indices")
    dense = np.zeros(size, dtype=dtype)
    dense[index.astype(np.int64)] = values
    return leaf_path, dense.reshape(shape)


def load_sparse(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a file written by :func:`export_sparse` back into nested dicts of NumPy arrays.

    Args:
        path: the file.

    Returns:
        nested dicts of ``numpy.ndarray`` with the original shapes and dtypes (``bfloat16`` as
        ``ml_dtypes.bfloat16``); pruned entries are exactly zero. Pass through ``jnp.asarray`` (or
        ``jax.device_put``) to get JAX arrays.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a ZIP archive, is truncated or corrupt, has another format name
            or version, or lacks entries the manifest names. The message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path, "r") as archive:
            try:
                manifest = json.loads(archive.read(_MANIFEST).decode("utf-8"))
            except KeyError:
                raise ValueError(f"no {_MANIFEST} entry (not a {FORMAT_NAME} file)") from None
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
                found = manifest.get("format") if isinstance(manifest, dict) else None
                raise ValueError(f"format is {found!r}, expected {FORMAT_NAME!r}")
            if manifest.get("version") != FORMAT_VERSION:
                raise ValueError(
                    f"format version {manifest.get('version')!r} is not supported "
                    f"(this reader: {FORMAT_VERSION})")
            records = manifest.get("leaves")
            if not isinstance(records, list) or not records:
                raise ValueError("manifest has no leaves")
            flat = {}
            for i, record in enumerate(records):
                try:
                    leaf_path, leaf = _decode_leaf(archive, i, record)
                except KeyError as err:
                    raise ValueError(f"missing entry for manifest leaf {i}: {err}") from None
                if leaf_path in flat:
                    raise ValueError(f"manifest lists leaf {'/'.join(leaf_path)} twice")
                flat[leaf_path] = leaf
    except ValueError as err:
        if str(err).startswith(f"{path}:"):
            raise
        raise ValueError(f"{path}: {err}") from err
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError,
            TypeError) as err:
        raise ValueError(f"{path}: corrupt or truncated {FORMAT_NAME} file ({err!r})") from err
    try:
        return _unflatten(flat)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
