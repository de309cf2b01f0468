"""TinyImageNet from a folder in its standard layout (64 px JPEGs), eager (cached) or lazy."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import pathlib
import tempfile
import warnings
from collections.abc import Sequence

import numpy as np

from hypersparse_jax.data.dataset import REFERENCE_CROP_PADDING, Dataset
from hypersparse_jax.data.records import RecordArray, _RecordSource

# The reference's normalisation constants (see hypersparse_jax.data.cifar).
_TINYIMAGENET_MEAN = (0.48024578664982126, 0.44807218089384643, 0.3975477478649648)
_TINYIMAGENET_STD = (0.2769864069088257, 0.26906448510256, 0.282081906210584)
_TINYIMAGENET_SIZE = 64
_TINYIMAGENET_CACHE = "hypersparse_jax_cache.npz"
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _list_images(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
    )


def _decode_image(path: pathlib.Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8)  # grey and CMYK files exist
    if array.shape != (_TINYIMAGENET_SIZE, _TINYIMAGENET_SIZE, 3):
        raise ValueError(
            f"{path}: expected a {_TINYIMAGENET_SIZE}x{_TINYIMAGENET_SIZE} image, "
            f"got shape {array.shape}"
        )
    return array


def _decode_pool() -> concurrent.futures.ThreadPoolExecutor:
    # PIL releases the GIL while decoding, so threads give a real speed-up.
    return concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                                 thread_name_prefix="hypersparse-decode")


def _decode_all(paths: Sequence[pathlib.Path],
                pool: concurrent.futures.ThreadPoolExecutor | None = None) -> np.ndarray:
    """The images of ``paths`` as uint8 ``(len, 64, 64, 3)``, decoded on ``pool`` (or on a pool
    of its own, closed afterwards) when there is more than one."""
    if len(paths) > 1 and pool is None:
        with _decode_pool() as own:
            return _decode_all(paths, own)
    out = np.empty((len(paths), _TINYIMAGENET_SIZE, _TINYIMAGENET_SIZE, 3), np.uint8)
    decoded = pool.map(_decode_image, paths) if len(paths) > 1 else map(_decode_image, paths)
    for i, array in enumerate(decoded):
        out[i] = array
    return out


def load_tinyimagenet(root: pathlib.Path, *, cache: bool, lazy: bool = False) -> Dataset:
    if not root.is_dir():
        raise FileNotFoundError(
            f"TinyImageNet folder {root} does not exist (expected wnids.txt, "
            "train/ and val/ inside; automatic download is not supported)"
        )
    wnids_path = root / "wnids.txt"
    if not wnids_path.is_file():
        raise FileNotFoundError(f"{wnids_path} not found: {root} is not a TinyImageNet folder")
    wnids = [line.strip() for line in wnids_path.read_text().splitlines() if line.strip()]
    if not wnids:
        raise ValueError(f"{wnids_path} lists no class ids")
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{wnids_path} lists a class id more than once")
    class_index = {wnid: i for i, wnid in enumerate(sorted(wnids))}

    train_paths, train_labels = [], []
    for wnid in sorted(wnids):
        folder = root / "train" / wnid / "images"
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found (class {wnid} is listed in {wnids_path})")
        files = _list_images(folder)
        train_paths += files
        train_labels += [class_index[wnid]] * len(files)
    if not train_paths:
        raise ValueError(f'No training images found under {root / "train"}')

    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise FileNotFoundError(f"{annotations} not found")
    test_paths, test_labels = [], []
    for line_number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(
                f'{annotations}:{line_number}: expected "<file>\\t<wnid>...", got {line!r}'
            )
        file_name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in class_index:
            raise ValueError(
                f"{annotations}:{line_number}: class id {wnid!r} is not in {wnids_path}"
            )
        path = root / "val" / "images" / file_name
        if not path.is_file():
            raise FileNotFoundError(f"{path} (named in {annotations}:{line_number}) not found")
        test_paths.append(path)
        test_labels.append(class_index[wnid])
    if not test_paths:
        raise ValueError(f"{annotations} names no validation images")

    train_labels = np.asarray(train_labels, np.int32)
    test_labels = np.asarray(test_labels, np.int32)
    if lazy:
        arrays = {f"{split}_images": RecordArray(
            _FolderSource("tinyimagenet", paths, labels, len(wnids)), "image")
            for split, paths, labels in (("train", train_paths, train_labels),
                                         ("test", test_paths, test_labels))}
    else:
        fingerprint = _fingerprint(root, sorted(wnids), train_paths + test_paths,
                                   train_labels.tolist() + test_labels.tolist())
        cache_path = root / _TINYIMAGENET_CACHE
        arrays = _read_cache(cache_path, fingerprint) if cache else None
        if arrays is None:
            arrays = {"train_images": _decode_all(train_paths),
                      "test_images": _decode_all(test_paths)}
            if cache:
                _write_cache(cache_path, fingerprint, arrays)
    return Dataset(
        "tinyimagenet",
        arrays["train_images"],
        train_labels,
        arrays["test_images"],
        test_labels,
        num_classes=len(wnids),
        mean=_TINYIMAGENET_MEAN,
        std=_TINYIMAGENET_STD,
        crop_padding=REFERENCE_CROP_PADDING,
        flip=True,
    )


def _fingerprint(
    root: pathlib.Path, wnids: list[str], paths: list[pathlib.Path], labels: list[int]
) -> str:
    """Hash of file names, sizes, mtimes and labels: a changed folder invalidates the cache."""
    digest = hashlib.sha256("\n".join(wnids).encode())
    for path, label in zip(paths, labels):
        stat = path.stat()
        digest.update(
            f"{path.relative_to(root)}\t{stat.st_size}\t{stat.st_mtime_ns}\t{label}\n".encode()
        )
    return digest.hexdigest()


def _read_cache(path: pathlib.Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["fingerprint"]) != fingerprint:
                return None
            return {"train_images": data["train_images"], "test_images": data["test_images"]}
    except (OSError, KeyError, ValueError) as err:
        warnings.warn(f"Ignoring unreadable cache {path}: {err}")
        return None


def _write_cache(path: pathlib.Path, fingerprint: str, arrays: dict[str, np.ndarray]) -> None:
    tmp_name = None
    try:
        # Write beside the target, then rename: readers never see a half-written file.
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False
        ) as tmp:
            tmp_name = tmp.name
            np.savez(tmp, fingerprint=np.asarray(fingerprint), **arrays)
        os.replace(tmp_name, path)
    except OSError as err:
        warnings.warn(f"Could not write cache {path}: {err}")
        if tmp_name is not None and os.path.exists(tmp_name):
            os.remove(tmp_name)


class _FolderSource(_RecordSource):
    """Image files decoded on demand (the labels come from the folder layout, in memory)."""

    def __init__(self, name: str, paths: Sequence[pathlib.Path], labels: np.ndarray,
                 num_classes: int):
        super().__init__(name, len(paths), (_TINYIMAGENET_SIZE, _TINYIMAGENET_SIZE, 3),
                         num_classes)
        self.paths, self.labels = list(paths), labels
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _read(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        if len(keys) > 1 and self._pool is None:  # kept for every later batch
            self._pool = _decode_pool()
        images = _decode_all([self.paths[k] for k in keys], self._pool)
        return {"image": images, "label": self.labels[keys]}
