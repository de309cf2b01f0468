"""Speed of channel-pruned (slimmed) models against the dense ones: XLA (jit) and onnxruntime.

    python benchmarks/bench_slim_speed.py            # -> benchmarks/results/slim_speed.json
    python benchmarks/bench_slim_speed.py --from-study benchmarks/results/channels_fashion_mnist_lenet5 \
        --unstructured benchmarks/results/study_fashion_mnist_lenet5 --plot tradeoff.png
                                                     # -> benchmarks/results/slim_speed_trained.json

For LeNet-5 (Fashion-MNIST's 28x28x1) and VGG-11 with BatchNorm (28x28x1 too), at 50 / 75 /
90 % of the prunable channels removed: the channel mask of the initial weights, BatchNorm
scales spread uniformly over [0.5, 1.5] (the speed of a smaller dense network does not depend
on which channels went), :func:`hypersparse_jax.slim`,
then per batch size (1 and 256) the median time of one forward pass of the dense and of each
slimmed model, in XLA (``jax.jit``, eval mode; once with the library's CPU convolution and
pooling, as the models run by default, once with ``lax.conv_general_dilated`` and Flax's pool
throughout) and in onnxruntime
(CPU, the exported files),
with the repeats of all models interleaved in one process so that the machine's load falls on
all alike. Also parameters and XLA's FLOP count. The dense model with 90 % of its *weights*
zeroed (unstructured, the paper's sparsity) is timed beside them: zeros alone buy no speed.

``--from-study`` times the trained models of channel studies instead: each run of
``benchmarks/study_channels.py`` records its slimmed architecture (``slim_model``), and every
distinct one is timed against the study's dense model the same way (speed depends on the
widths, not on the weights' values), with the dense model carrying the unstructured studies'
zeros beside them; ``--plot`` draws accuracy against the measured speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from study_channels import LABELS  # noqa: E402  (the channel study's method names)


def xla_forwards(model, variables):
  """Two jitted eval-mode forward passes: as the model runs by default (on CPU the library's
  convolution and narrow-layer pool, :mod:`hypersparse_jax.conv`) and with
  ``lax.conv_general_dilated`` and Flax's pool throughout (traced, on every new input shape,
  inside :func:`hypersparse_jax.conv.plain_convolutions`)."""
  import jax
  from hypersparse_jax import conv
  default = jax.jit(lambda x: model.apply(variables, x, train=False))
  plain = jax.jit(lambda x: model.apply(variables, x, train=False))

  def plain_run(x):
    with conv.plain_convolutions():
      return plain(x)
  return default, plain_run


def time_variants(variants, shape, repeats, onnx_ok, batches=(1, 256)):
  """``{key: {'params', 'flops', 'xla': {'batch_B': {'median_ms', 'speedup_vs_dense'}},
  'xla_lax': ..., 'onnxruntime': ...}}`` for ``variants`` ``{key: (model, variables)}`` (one
  of them ``'dense'``): one forward pass in eval mode per batch size, the repeats of all
  variants interleaved in this process so that the machine's load falls on all alike; medians.

  ``xla`` is the model as it runs by default: on CPU the library's convolution
  (:mod:`hypersparse_jax.conv` picks XLA's convolution or a patch matrix product by shape);
  ``xla_lax`` is the same jit with every convolution ``lax.conv_general_dilated`` (traced
  inside :func:`hypersparse_jax.conv.plain_convolutions`)."""
  import jax
  import jax.numpy as jnp
  from hypersparse_jax import channels
  if onnx_ok:
    import onnxruntime as ort
    from hypersparse_jax import onnx_export
  out, runners = {}, {}
  tmp = tempfile.mkdtemp(prefix="slim-speed-")
  for key, (m, v) in variants.items():
    out[key] = {"params": int(sum(np.size(x) for x in jax.tree.leaves(v["params"]))),
                "flops": channels.count_flops(m, v, (1,) + tuple(shape))}
    runners[("xla", key)], runners[("xla_lax", key)] = xla_forwards(m, v)
    if onnx_ok:
      path = os.path.join(tmp, f"{key}.onnx")
      onnx_export.export_onnx(m, v, path, input_shape=(None,) + tuple(shape), verify=False)
      sess = ort.InferenceSession(path, ort.SessionOptions(), providers=["CPUExecutionProvider"])
      runners[("onnxruntime", key)] = (sess, sess.get_inputs()[0].name)
  for batch in batches:
    x = np.random.default_rng(0).normal(size=(batch,) + tuple(shape)).astype(np.float32)
    xj = jnp.asarray(x)
    times = {k: [] for k in runners}
    for k, r in runners.items():  # warm-up / compile
      (r(xj).block_until_ready() if k[0].startswith("xla") else r[0].run(None, {r[1]: x}))
    inner = 20 if batch == 1 else 2
    for _ in range(repeats):
      for k, r in runners.items():
        t = time.perf_counter()
        for _ in range(inner):
          if k[0].startswith("xla"):
            r(xj).block_until_ready()
          else:
            r[0].run(None, {r[1]: x})
        times[k].append((time.perf_counter() - t) / inner)
    for (engine, key), ts in times.items():
      med = statistics.median(ts)
      dense = statistics.median(times[(engine, "dense")])
      out[key].setdefault(engine, {})[f"batch_{batch}"] = {
          "median_ms": med * 1e3, "speedup_vs_dense": dense / med}
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=None, help="default: benchmarks/results/slim_speed.json, or "
                 "slim_speed_trained.json with --from-study")
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument("--models", nargs="*", default=["lenet5", "vgg11"])
  p.add_argument("--no-onnx", action="store_true")
  p.add_argument("--from-study", nargs="*", default=None, metavar="DIR",
                 help="time the slimmed models of these channel studies' runs "
                      "(benchmarks/study_channels.py) instead of untrained masks")
  p.add_argument("--unstructured", nargs="*", default=[], metavar="DIR",
                 help="with --from-study: weight-pruning studies (benchmarks/study.py) of the "
                      "same models, drawn beside them (their zeros timed in the dense model)")
  p.add_argument("--seeds", type=int, nargs="*", default=None,
                 help="with --from-study: only these seeds' runs (default all)")
  p.add_argument("--plot", default=None, help="with --from-study: draw accuracy against "
                 "measured speed-up here (PNG)")
  args = p.parse_args(argv)
  onnx_ok = not args.no_onnx
  if onnx_ok:
    import importlib.util
    onnx_ok = importlib.util.find_spec("onnxruntime") is not None
  if args.from_study is not None:
    return from_studies(args, onnx_ok)
  if args.out is None:
    args.out = os.path.join("benchmarks", "results", "slim_speed.json")
  import jax
  import jax.numpy as jnp
  import hypersparse_jax as hs
  from hypersparse_jax import models
  makers = {"lenet5": lambda: models.LeNet5(),
            "vgg11": lambda: models.VGG(depth=11, num_classes=10)}
  shape = (28, 28, 1)
  result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "jax": jax.__version__, "load_average_start": os.getloadavg()},
            "repeats": args.repeats, "input": list(shape), "models": []}
  for name in args.models:
    model = makers[name]()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape), train=False)
    # BatchNorm scales start all equal (1): every channel would tie at the threshold. Spread
    # them as training does, so that the mask removes the stated fraction.
    variables = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.random.uniform(jax.random.PRNGKey(len(jax.tree_util.keystr(path))),
                                           x.shape, minval=0.5, maxval=1.5)
        if jax.tree_util.keystr(path).endswith("['scale']") else x, variables)
    variants = {"dense": (model, variables)}
    unstructured = dict(variables, params=hs.apply_mask(
        variables["params"], hs.magnitude_mask(variables["params"], 0.9)))
    variants["weights_90"] = (model, unstructured)
    for kappa in (0.5, 0.75, 0.9):
      mask = hs.channel_mask(variables["params"], kappa)
      variants[f"channels_{int(kappa * 100)}"] = hs.slim(model, variables, mask)
    entry = {"model": name, "variants": time_variants(variants, shape, args.repeats, onnx_ok)}
    result["models"].append(entry)
    print(json.dumps(entry, indent=1), flush=True)
  result["machine"]["load_average_end"] = os.getloadavg()
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  return 0


def _load(folder):
  with open(os.path.join(folder, "study.json")) as f:
    return json.load(f)


def from_studies(args, onnx_ok):
  """Accuracy against measured speed: every distinct slimmed architecture of the channel
  studies' runs (``slim_model`` in ``study.json``; the speed depends on the widths alone, so
  the weights are a fresh initialisation) timed against the study's dense model, and the dense
  model with the unstructured studies' fractions of its weights zeroed."""
  import jax
  import jax.numpy as jnp
  import hypersparse_jax as hs
  from hypersparse_jax import channels, models
  from hypersparse_jax.onnx_export import DATASET_IMAGE_SHAPES
  result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "jax": jax.__version__, "load_average_start": os.getloadavg()},
            "repeats": args.repeats, "studies": []}
  unstructured = [(folder, _load(folder)) for folder in args.unstructured]
  for folder in args.from_study:
    report = _load(folder)
    s = report["settings"]
    shape = DATASET_IMAGE_SHAPES[s["dataset"]]
    runs = [r for r in report["runs"] if r["method"] != "dense"
            and (args.seeds is None or r["seed"] in args.seeds)]
    if any(not r.get("slim_model") for r in runs):
      print(f"{folder}: {sum(not r.get('slim_model') for r in runs)} of {len(runs)} runs do not "
            "record their slimmed model (older runs): left out", flush=True)
    runs = [r for r in runs if r.get("slim_model")]
    if not runs:
      raise SystemExit(f"{folder}: no run records its slimmed model (slim_model); rerun "
                       "benchmarks/study_channels.py with this version")
    num_classes = runs[0]["slim_model"]["num_classes"]
    dense = models.create_model(s["model"], num_classes=num_classes, depth=s.get("depth"),
                                batch_norm=s.get("batch_norm", True), width=s.get("width", 1.0))
    init = lambda m: m.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape),  # noqa: E731
                            train=False)
    dense_vars = init(dense)
    variants, archs, rows = {"dense": (dense, dense_vars)}, {}, []
    for r in runs:
      key = json.dumps(r["slim_model"], sort_keys=True)
      if key not in archs:
        archs[key] = f"arch{len(archs)}"
        m = channels.model_from_description(r["slim_model"])
        variants[archs[key]] = (m, init(m))
      rows.append({k: r.get(k) for k in ("method", "fraction", "seed", "final_test_accuracy",
                                          "params_slim", "flops_slim")} | {"arch": archs[key]})
    same = [(f, u) for f, u in unstructured
            if all(u["settings"].get(k) == s.get(k) for k in ("dataset", "model", "depth"))
            and u["settings"].get("width", 1.0) == s.get("width", 1.0)]
    if len(same) < len(unstructured):
      print(f"{folder}: {len(unstructured) - len(same)} --unstructured studies are of another "
            "dataset or model: not drawn beside it", flush=True)
    for _, u in same:
      for kappa in u["settings"]["sparsities"]:
        zeroed = dict(dense_vars, params=hs.apply_mask(
            dense_vars["params"], hs.magnitude_mask(dense_vars["params"], kappa)))
        variants[f"weights_{kappa:g}"] = (dense, zeroed)
    timing = time_variants(variants, shape, args.repeats, onnx_ok)
    entry = {"study": folder, "model": s["model"], "depth": s.get("depth"),
             "width": s.get("width", 1.0), "runs": rows, "variants": timing,
             "dense_accuracy": next((c["final_test_accuracy"]["mean"] for c in report["cells"]
                                     if c["method"] == "dense"), None),
             "unstructured": [{"study": f, "cells": [
                 {"method": c["method"], "target": c["target"],
                  "final_test_accuracy": c["final_test_accuracy"]}
                 for c in u["cells"] if c["method"] != "dense"]} for f, u in same]}
    result["studies"].append(entry)
    print(json.dumps({k: entry[k] for k in ("study", "model")}), flush=True)
  result["machine"]["load_average_end"] = os.getloadavg()
  out = args.out or os.path.join("benchmarks", "results", "slim_speed_trained.json")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  if args.plot:
    plot_tradeoff(result, args.plot)
  return 0


OFF_SCALE_POINTS = 20.0  # a run this many points below the dense model has collapsed


def y_floor(accuracies, dense, margin=OFF_SCALE_POINTS, pad=1.5):
  """The lower end of a panel's accuracy axis (percent), or ``None`` to let it fit everything.

  Runs more than ``margin`` points below the dense accuracy (a collapsed network: 10 % is
  chance on ten classes) would stretch the axis so far that the other runs could not be told
  apart; the axis then ends ``pad`` points below the lowest of the others, and the collapsed
  runs are drawn on its lower edge with their accuracy written beside them."""
  if dense is None:
    return None
  kept = [a for a in accuracies if a >= dense - margin]
  if len(kept) == len(accuracies) or not kept:
    return None
  return min(kept) - pad


def collapsed_label(fraction, accuracies):
  """The label of one fraction's collapsed runs: ``'90 %: 10.0 % (3 runs)'`` when they read
  the same, else ``'75 %: 62.2 / 77.2 %'`` (ascending)."""
  texts = sorted({f"{100 * a:.1f}" for a in accuracies}, key=float)
  if len(texts) == 1:
    runs = f" ({len(accuracies)} runs)" if len(accuracies) > 1 else ""
    return f"{fraction * 100:g} %: {texts[0]} %{runs}"
  return f"{fraction * 100:g} %: {' / '.join(texts)} %"


def plot_tradeoff(result, path, engines=("xla", "onnxruntime"), batch="batch_256"):
  """One row per study, one panel per engine: final test accuracy against the measured
  speed-up over the dense model (log scale). Channel-pruned runs: one point per run, and the
  mean per method and fraction with the seeds' spread; unstructured sparsity (the dense model
  with the fraction of its weights zeroed): ART + HyperSparse's mean accuracy at its measured
  speed; the dense model at 1. Runs that collapsed (see :func:`y_floor`) are drawn as
  triangles on the lower edge, labelled with their accuracy; the means include them."""
  import matplotlib
  import matplotlib.ticker
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  studies = result["studies"]
  engines = [e for e in engines if any(e in v for s in studies for v in s["variants"].values())]
  fig, axes = plt.subplots(len(studies), len(engines), squeeze=False,
                           figsize=(5.5 * len(engines) + 3.5, 4 * len(studies)))
  colors = {"art_hypersparse": "C0", "art_l1": "C1", "art_hypersparse_uniform": "C9",
            "l1_filter": "C2", "gmp_filter": "C4",
            "slimming": "C5"}
  for row, s in zip(axes, studies):
    dense = None if s["dense_accuracy"] is None else 100 * s["dense_accuracy"]
    floor = y_floor([100 * r["final_test_accuracy"] for r in s["runs"] if r["method"] in colors],
                    dense)
    for ax, engine in zip(row, engines):
      speed = lambda key: s["variants"][key][engine][batch]["speedup_vs_dense"]  # noqa: E731
      for method, color in colors.items():
        rs = [r for r in s["runs"] if r["method"] == method]
        if not rs:
          continue
        label = f"{LABELS[method]} (channels)"  # on the method's first point drawn
        low = [r for r in rs if floor is not None and 100 * r["final_test_accuracy"] < floor]
        up = [r for r in rs if r not in low]
        ax.scatter([speed(r["arch"]) for r in up], [100 * r["final_test_accuracy"] for r in up],
                   s=10, color=color, alpha=0.35)
        for r in low:
          ax.scatter([speed(r["arch"])], [floor], marker="v", s=30, color=color, clip_on=False,
                     zorder=3, label=label if len(low) == len(rs) else None)
          label = label if len(low) < len(rs) else None
        # one label per fraction's runs, stacked so that neighbouring fractions' do not overlap
        for k, frac in enumerate(sorted({r["fraction"] for r in low})):
          fr = [r for r in low if r["fraction"] == frac]
          ax.annotate(collapsed_label(frac, [r["final_test_accuracy"] for r in fr]),
                      (min(speed(r["arch"]) for r in fr), floor), fontsize=6,
                      xytext=(2, 4 + 8 * k), textcoords="offset points", color=color)
        for frac in sorted({r["fraction"] for r in rs}):
          fr = [r for r in rs if r["fraction"] == frac]
          acc = np.array([100 * r["final_test_accuracy"] for r in fr])
          if floor is not None and acc.mean() < floor:  # a collapsed cell: its runs show it
            continue
          ax.errorbar(np.median([speed(r["arch"]) for r in fr]), acc.mean(),
                      yerr=acc.std(ddof=1) if len(acc) > 1 else 0, fmt="o", color=color,
                      capsize=3, label=label)
          label = None
          ax.annotate(f"{frac * 100:g} %", (np.median([speed(r["arch"]) for r in fr]),
                                            acc.mean()), fontsize=7, xytext=(4, 4),
                      textcoords="offset points")
      for u in s["unstructured"]:
        cells = [c for c in u["cells"] if c["method"] == "art_hypersparse"
                 and f"weights_{c['target']:g}" in s["variants"]]
        if cells:
          ax.errorbar([speed(f"weights_{c['target']:g}") for c in cells],
                      [100 * c["final_test_accuracy"]["mean"] for c in cells],
                      yerr=[100 * c["final_test_accuracy"]["std"] for c in cells], fmt="s",
                      color="C3", capsize=3, label="ART + HyperSparse (weights, unstructured)")
          for c in cells:
            ax.annotate(f"{c['target'] * 100:g} %", (speed(f"weights_{c['target']:g}"),
                                                     100 * c["final_test_accuracy"]["mean"]),
                        fontsize=7, xytext=(4, -10), textcoords="offset points", color="C3")
      if s["dense_accuracy"] is not None:
        ax.scatter([1.0], [100 * s["dense_accuracy"]], marker="*", s=120, color="k",
                   label="dense", zorder=3)
      ax.set_xscale("log")
      ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
      ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}×"))
      ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
      if floor is not None:
        ax.set_ylim(bottom=floor)
      ax.axvline(1.0, color="0.8", lw=0.8)
      ax.set_xlabel(f"measured speed-up over dense ({engine}, {batch.replace('_', ' ')})")
      ax.set_ylabel("final test accuracy (%)")
      width = "" if s["width"] == 1 else f" (width {s['width']:g})"
      ax.set_title(f"{s['model']}{s['depth'] or ''}{width}: {engine}", fontsize=10)
    # one legend per row, beside its last panel, so that it covers no point
    row[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  sys.exit(main())
