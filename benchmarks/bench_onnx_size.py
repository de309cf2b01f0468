"""ONNX file sizes of pruned models: dense initializers vs ``sparse_initializer`` storage.

For each model and sparsity (0 %, 90 %, 98 %) the weights are drawn He-normal (fan-in), with
random BatchNorm statistics, and pruned by global magnitude (the project's ``magnitude_mask``);
then ``export_onnx`` writes the model twice: with dense initializers (pruned weights stored as
zeros, as the reference's exporter does) and with ``sparse_initializers=True`` (values + int64
flat indices for every weight tensor below one third density). Both files are checked with
onnxruntime by ``export_onnx`` (logits within 1e-4 of max |logit|, batch sizes 1 and 3). For
comparison: the dense file gzip-compressed (level 6) and the project's own compressed weight
file (``export_sparse``, ``model_sparse.npz`` of a run).

File sizes depend on how many weights survive and on the tensor shapes, hardly on the values,
so random weights give the sizes of trained ones up to how the kept weights spread over layers
(a layer left above one third density stays dense in the sparse-initializer file).

Run: ``python benchmarks/bench_onnx_size.py --out benchmarks/results/onnx_size.json``.
"""

from __future__ import annotations

import argparse
import gzip
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import report
from hypersparse_jax import masking, models, onnx_export, sparse_export

MODELS = {
    "resnet20": lambda: models.create_model("resnet", num_classes=10, depth=20),
    "resnet32": lambda: models.create_model("resnet", num_classes=10, depth=32),
    "vgg11_bn": lambda: models.create_model("vgg", num_classes=10, depth=11, batch_norm=True),
    "vgg19_bn": lambda: models.create_model("vgg", num_classes=10, depth=19, batch_norm=True),
    "digits_mlp": lambda: models.create_model("mlp", num_classes=10),
    "digits_cnn": lambda: models.create_model("cnn", num_classes=10),
}


def random_variables(model, seed=0):
  shape = (1,) + model.default_input_shape[1:]
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape),
                                               train=False))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(path[-1].key)
    if name == "kernel":
      return rng.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    if name in ("var", "scale"):
      return rng.uniform(0.5, 1.5, leaf.shape)
    return 0.1 * rng.standard_normal(leaf.shape)

  return jax.tree_util.tree_map_with_path(lambda p, x: draw(p, x).astype(np.float32), abstract)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="*", default=list(MODELS))
  parser.add_argument("--sparsities", nargs="*", type=float, default=[0.0, 0.9, 0.98])
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.models:
      model = MODELS[name]()
      base = random_variables(model)
      input_shape = (None,) + model.default_input_shape[1:]
      for kappa in args.sparsities:
        mask = masking.magnitude_mask(base["params"], kappa)
        variables = dict(base, params=jax.tree.map(np.asarray,
                                                   masking.apply_mask(base["params"], mask)))
        row = {"model": name, "sparsity": kappa}
        for key, sparse in (("dense_initializers", False), ("sparse_initializers", True)):
          path = os.path.join(tmp, f"{name}-{kappa}-{key}.onnx")
          start = time.perf_counter()
          out = onnx_export.export_onnx(model, variables, path, input_shape=input_shape,
                                        sparse_initializers=sparse)
          row[f"{key}_bytes"] = out["bytes"]
          row[f"{key}_export_seconds"] = round(time.perf_counter() - start, 2)
          row[f"{key}_max_rel_error"] = out["max_rel_error"]
          if not sparse:
            row["weights"], row["zero_weights"] = out["weights"], out["zero_weights"]
            with open(path, "rb") as f:
              row["dense_initializers_gzip_bytes"] = len(gzip.compress(f.read(), 6))
        npz = sparse_export.export_sparse(variables, mask, os.path.join(tmp, "m.npz"))
        row["export_sparse_npz_bytes"] = npz["sparse_bytes"]
        row["sparse_vs_dense"] = round(row["sparse_initializers_bytes"]
                                       / row["dense_initializers_bytes"], 4)
        rows.append(row)
        print(row, flush=True)
  report.emit({"benchmark": "onnx_size", "machine": report.machine_info(),
               "note": "random He-normal weights pruned by global magnitude; sizes in bytes",
               "rows": rows}, args.out)


if __name__ == "__main__":
  main()
