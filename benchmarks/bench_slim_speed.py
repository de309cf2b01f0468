"""Speed of channel-pruned (slimmed) models against the dense ones: XLA (jit) and onnxruntime.

    python benchmarks/bench_slim_speed.py            # -> benchmarks/results/slim_speed.json

For LeNet-5 (Fashion-MNIST's 28x28x1) and VGG-11 with BatchNorm (28x28x1 too), at 50 / 75 /
90 % of the prunable channels removed: the channel mask of the initial weights, BatchNorm
scales spread uniformly over [0.5, 1.5] (the speed of a smaller dense network does not depend
on which channels went), :func:`hypersparse_jax.slim`,
then per batch size (1 and 256) the median time of one forward pass of the dense and of each
slimmed model, in XLA (``jax.jit``, eval mode) and in onnxruntime (CPU, the exported files),
with the repeats of all models interleaved in one process so that the machine's load falls on
all alike. Also parameters and XLA's FLOP count. The dense model with 90 % of its *weights*
zeroed (unstructured, the paper's sparsity) is timed beside them: zeros alone buy no speed.
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


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=os.path.join("benchmarks", "results", "slim_speed.json"))
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument("--models", nargs="*", default=["lenet5", "vgg11"])
  p.add_argument("--no-onnx", action="store_true")
  args = p.parse_args(argv)
  import jax
  import jax.numpy as jnp
  import hypersparse_jax as hs
  from hypersparse_jax import channels, conv, models
  onnx_ok = not args.no_onnx
  if onnx_ok:
    try:
      import onnxruntime as ort
      from hypersparse_jax import onnx_export
    except ImportError:
      onnx_ok = False
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
    entry = {"model": name, "variants": {}}
    runners = {}
    tmp = tempfile.mkdtemp(prefix="slim-speed-")
    for key, (m, v) in variants.items():
      entry["variants"][key] = {
          "params": int(sum(np.size(x) for x in jax.tree.leaves(v["params"]))),
          "flops": channels.count_flops(m, v, (1,) + shape)}
      with conv.plain_convolutions():
        fn = jax.jit(lambda x, m=m, v=v: m.apply(v, x, train=False))
      runners[("xla", key)] = fn
      if onnx_ok:
        path = os.path.join(tmp, f"{key}.onnx")
        onnx_export.export_onnx(m, v, path, input_shape=(None,) + shape, verify=False)
        opts = ort.SessionOptions()
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        runners[("onnxruntime", key)] = (sess, sess.get_inputs()[0].name)
    for batch in (1, 256):
      x = np.random.default_rng(0).normal(size=(batch,) + shape).astype(np.float32)
      xj = jnp.asarray(x)
      times = {k: [] for k in runners}
      for k, r in runners.items():  # warm-up / compile
        (r(xj).block_until_ready() if k[0] == "xla" else r[0].run(None, {r[1]: x}))
      inner = 20 if batch == 1 else 2
      for _ in range(args.repeats):
        for k, r in runners.items():
          t = time.perf_counter()
          for _ in range(inner):
            if k[0] == "xla":
              r(xj).block_until_ready()
            else:
              r[0].run(None, {r[1]: x})
          times[k].append((time.perf_counter() - t) / inner)
      for (engine, key), ts in times.items():
        med = statistics.median(ts)
        dense = statistics.median(times[(engine, "dense")])
        entry["variants"][key].setdefault(engine, {})[f"batch_{batch}"] = {
            "median_ms": med * 1e3, "speedup_vs_dense": dense / med}
    result["models"].append(entry)
    print(json.dumps(entry, indent=1), flush=True)
  result["machine"]["load_average_end"] = os.getloadavg()
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
