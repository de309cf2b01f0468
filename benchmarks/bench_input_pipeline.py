"""Throughput of the input pipeline alone (no model), in images per second.

Synthetic CIFAR-shaped data (50,000 x 32x32x3 uint8, no download) in a ``Dataset``. For each batch
size it times one epoch of:

* ``host_batching``: ``train_batches`` only (shuffled gather + padding on the host);
* ``augment_on_device``: the jitted ``augment`` on a batch already on the device;
* ``pipeline_serial``: host batching, ``device_put`` and the jitted ``augment`` in one thread
  (JAX's async dispatch lets the device run ahead; one ``block_until_ready`` per epoch);
* ``pipeline_prefetch``: the same with ``prefetch(..., transfer=jax.device_put)``, so host batching
  and the transfer overlap the device work.

With ``--grain`` (needs ``pip install grain``; not a dependency of the package), the same epoch
through grain, Google's data loader for JAX (random-access ``MapDataset`` over the arrays,
``shuffle``, ``batch``): ``grain_host_batching`` indexes the batched ``MapDataset`` in one
thread, ``grain_iter_prefetch`` iterates ``to_iter_dataset()`` (grain's read threads prefetch),
``grain_pipeline_prefetch`` adds ``device_put`` and the jitted ``augment`` as above.

Each figure is the best of ``--repeats`` epochs, after one compile/warm-up step. Prints one JSON
object. On a CPU-only machine the "device" shares the host's cores, so prefetching can buy little
there and the figures are noisy; the interesting comparison is against a training step's rate. Run: ``python benchmarks/bench_input_pipeline.py``.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import report
from hypersparse_jax import data as ip


def _synthetic_cifar(num_examples: int) -> ip.Dataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_examples, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, num_examples, dtype=np.int32)
    return ip.Dataset(
        "synthetic_cifar",
        images,
        labels,
        images[:1000],
        labels[:1000],
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010),
        crop_padding=4,
        flip=True,
    )


def _best_rate(run, num_images: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return num_images / best


class _Records:
    """A random-access source of ``{'image', 'label'}`` records (what TFDS ``data_source`` and
    the image folder give) over in-memory arrays."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return {"image": self.images[index], "label": self.labels[index]}


def _grain_stages(batch_size: int, dataset: ip.Dataset, repeats: int, num_images: int, augment):
    """grain's figures for the same epoch (shuffled, batched; last batch kept, as ours)."""
    import grain

    def batches():
        source = _Records(dataset.train_images, dataset.train_labels)
        return grain.MapDataset.source(source).shuffle(seed=1).batch(batch_size)

    def host_batching():
        ds = batches()
        for i in range(len(ds)):
            ds[i]

    def iter_prefetch():
        for _ in batches().to_iter_dataset():
            pass

    def pipeline_prefetch():
        out = None
        key = jax.random.key(0)
        for step, batch in enumerate(batches().to_iter_dataset()):
            out = augment(key, step, jax.device_put(batch["image"]))
        out.block_until_ready()

    return {
        "grain_host_batching": round(_best_rate(host_batching, num_images, repeats)),
        "grain_iter_prefetch": round(_best_rate(iter_prefetch, num_images, repeats)),
        "grain_pipeline_prefetch": round(_best_rate(pipeline_prefetch, num_images, repeats)),
    }


def bench(batch_size: int, dataset: ip.Dataset, repeats: int, with_grain: bool = False) -> dict:
    """Returns images/second for each stage at one batch size."""
    # The per-step key is derived inside the jitted function, as a training step would.
    augment = jax.jit(
        lambda key, step, images: ip.augment(
            jax.random.fold_in(key, step),
            images,
            mean=dataset.mean,
            std=dataset.std,
            crop_padding=dataset.crop_padding,
            flip=dataset.flip,
        )
    )
    steps = ip.steps_per_epoch(dataset.num_train, batch_size)
    num_images = steps * batch_size  # padded images are processed too
    key = jax.random.key(0)
    first = next(ip.train_batches(dataset, batch_size, seed=0, epoch=0))
    on_device = jax.device_put(first["image"])
    augment(key, 0, on_device).block_until_ready()  # compile outside the timings

    def host_batching():
        for _ in ip.train_batches(dataset, batch_size, seed=0, epoch=1):
            pass

    def augment_on_device():
        out = None
        for step in range(steps):
            out = augment(key, step, on_device)
        out.block_until_ready()

    def pipeline(use_prefetch: bool):
        batches = ip.train_batches(dataset, batch_size, seed=0, epoch=1)
        if use_prefetch:
            batches = ip.prefetch(batches, buffer_size=2, transfer=jax.device_put)
        out = None
        for step, batch in enumerate(batches):
            out = augment(key, step, jax.device_put(batch["image"]))
        out.block_until_ready()

    rates = {
        "host_batching": round(_best_rate(host_batching, num_images, repeats)),
        "augment_on_device": round(_best_rate(augment_on_device, num_images, repeats)),
        "pipeline_serial": round(_best_rate(lambda: pipeline(False), num_images, repeats)),
        "pipeline_prefetch": round(_best_rate(lambda: pipeline(True), num_images, repeats)),
    }
    if with_grain:
        rates.update(_grain_stages(batch_size, dataset, repeats, num_images, augment))
    return {"batch_size": batch_size, "steps_per_epoch": steps, "images_per_second": rates}


def _grain_version() -> str:
    from importlib.metadata import version

    return version("grain")


def main() -> None:
    """Runs the benchmark and prints one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=50_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--grain", action="store_true", help="also time grain (pip install grain)")
    args = parser.parse_args()

    dataset = _synthetic_cifar(args.num_examples)
    results = [bench(b, dataset, args.repeats, args.grain) for b in args.batch_sizes]
    report.emit(
        {
            "benchmark": "input_pipeline",
            "config": {
                "num_examples": args.num_examples,
                "image_shape": list(dataset.image_shape),
                "crop_padding": dataset.crop_padding,
                "flip": dataset.flip,
                "repeats": args.repeats,
                "grain": _grain_version() if args.grain else None,
                "timing": "best epoch of repeats, after one warm-up step; async dispatch, one block per epoch",
            },
            "results": results,
            "machine": report.machine_info(),
        },
        args.out,
    )

if __name__ == "__main__":
    main()
