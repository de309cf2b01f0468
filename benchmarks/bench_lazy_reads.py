"""What each process reads: eager against lazy loading of a TinyImageNet-layout folder.

A folder in TinyImageNet's layout is generated (``--num-train`` random 64x64 JPEGs in 10
classes, 1,000 validation images; no download). Timed, for one training epoch at ``--batch-size``
(the global batch):

* ``eager_load_s``: ``load_dataset(..., cache=False)`` (decodes every file), and its epoch of
  ``train_batches`` from memory (``eager_epoch``);
* ``lazy_epoch``: ``load_dataset(..., lazy=True)`` and one epoch of ``train_batches``, as one
  process (all rows) and as process 0 of 2 (``rows`` = the first half of every batch), with the
  records decoded and the bytes of the files read;
* with ``--grain`` (``pip install grain``): grain's ``MapDataset`` over the same files (one
  decoded file per record), shuffled, batched by the per-process batch and iterated with
  ``to_iter_dataset()`` (grain's read threads): as one process, and as process 0 of 2 with
  grain's own per-process split of the records (``ds[0::2]``). grain's split gives each process
  other batches than a one-process run; ours keeps the one-process batches.

Images per second are the images delivered to the process (its rows), best of ``--repeats``.
Prints one JSON object. Run: ``python benchmarks/bench_lazy_reads.py --grain``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import numpy as np
from PIL import Image

import report
from hypersparse_jax import data as ip
from hypersparse_jax.data import tinyimagenet

SEED = 0


def make_folder(root: pathlib.Path, num_train: int, num_val: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    wnids = [f"n{i:08d}" for i in range(classes)]
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for i in range(num_train):
        folder = root / "train" / wnids[i % classes] / "images"
        folder.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        Image.fromarray(image).save(folder / f"{wnids[i % classes]}_{i}.JPEG", quality=90)
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i in range(num_val):
        image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        Image.fromarray(image).save(root / "val" / "images" / f"val_{i}.JPEG", quality=90)
        lines.append(f"val_{i}.JPEG\t{wnids[i % classes]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def best_of(repeats: int, run) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
    return best, out


class Counted:
    """Counts the files ``hypersparse_jax.data`` decodes and their bytes."""

    def __init__(self):
        self.files, self.bytes = 0, 0
        self.real = tinyimagenet._decode_image

    def __call__(self, path):
        self.files += 1
        self.bytes += os.path.getsize(path)
        return self.real(path)


def lazy_epoch(root, batch_size: int, rows, repeats: int) -> dict:
    counted = Counted()
    tinyimagenet._decode_image = counted
    try:
        dataset = ip.load_dataset("tinyimagenet", root, lazy=True)

        def epoch():
            return sum(len(b["label"]) for b in ip.prefetch(
                ip.train_batches(dataset, batch_size, seed=SEED, epoch=1, rows=rows)))

        seconds, images = best_of(repeats, epoch)
    finally:
        tinyimagenet._decode_image = counted.real
    return {"images_per_second": round(images / seconds), "images": images,
            "files_decoded_per_epoch": counted.files // repeats,
            "bytes_read_per_epoch": counted.bytes // repeats}


def grain_epoch(root, batch_size: int, process: int, processes: int, repeats: int) -> dict:
    import grain

    lazy = ip.load_dataset("tinyimagenet", root, lazy=True)  # only for the file list
    source = lazy.train_images.source

    class Files:  # grain's random-access source protocol: one decoded file per record
        def __len__(self):
            return source.num_records

        def __getitem__(self, k):
            return {"image": tinyimagenet._decode_image(source.paths[k]), "label": source.labels[k]}

    def epoch():
        ds = grain.MapDataset.source(Files())[process::processes]
        ds = ds.shuffle(seed=SEED).batch(batch_size // processes)
        return sum(len(b["label"]) for b in ds.to_iter_dataset())

    seconds, images = best_of(repeats, epoch)
    return {"images_per_second": round(images / seconds), "images": images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--grain", action="store_true", help="also time grain (pip install grain)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp) / "tiny"
        make_folder(root, args.num_train, 1000)
        files = sorted(root.rglob("*.JPEG"))
        folder_bytes = sum(os.path.getsize(p) for p in files)
        start = time.perf_counter()
        eager = ip.load_dataset("tinyimagenet", root, cache=False)
        eager_load = time.perf_counter() - start
        seconds, images = best_of(args.repeats, lambda: sum(
            len(b["label"]) for b in ip.train_batches(eager, args.batch_size, seed=SEED, epoch=1)))
        half = slice(0, args.batch_size // 2)
        results = {
            "eager_load_s": round(eager_load, 2),
            "eager_load_files": len(files),
            "eager_load_bytes": folder_bytes,
            "eager_held_in_memory_bytes": eager.train_images.nbytes + eager.test_images.nbytes,
            "eager_epoch_images_per_second": round(images / seconds),
            "lazy_one_process": lazy_epoch(root, args.batch_size, None, args.repeats),
            "lazy_process_0_of_2": lazy_epoch(root, args.batch_size, half, args.repeats),
        }
        if args.grain:
            results["grain_one_process"] = grain_epoch(root, args.batch_size, 0, 1, args.repeats)
            results["grain_process_0_of_2"] = grain_epoch(root, args.batch_size, 0, 2,
                                                          args.repeats)
    config = {"num_train": args.num_train, "num_test": 1000, "batch_size": args.batch_size,
              "repeats": args.repeats, "image": "64x64x3 JPEG (quality 90)",
              "decode_threads": min(8, os.cpu_count() or 1)}
    if args.grain:
        from importlib.metadata import version

        config["grain"] = version("grain")
    report.emit({"benchmark": "lazy_reads", "config": config, "results": results,
                 "machine": report.machine_info()}, args.out)


if __name__ == "__main__":
    main()
