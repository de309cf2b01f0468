"""Multi-device checks for tests/test_sharding.py, run in a subprocess.

XLA_FLAGS (``--xla_force_host_platform_device_count=8``) must be set before JAX starts, so the
test runs this script in a fresh interpreter and reads one JSON object from its last stdout line.

    python tests/sharding_worker.py core|cli WORKDIR
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from hypersparse_jax import cli as cli_lib  # noqa: E402
from hypersparse_jax import budgets, data, masking, models, penalties  # noqa: E402
from hypersparse_jax import sharding as sh  # noqa: E402
from hypersparse_jax import transform  # noqa: E402
from hypersparse_jax.tasks import image as image_task  # noqa: E402
from hypersparse_jax.controller import ARTController  # noqa: E402


def rel_diff(a, b) -> float:
  """max |a - b| / max |a| over all leaves (0 for all-zero trees)."""
  la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  num = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
            for x, y in zip(la, lb))
  den = max(float(np.max(np.abs(np.asarray(x, np.float64)))) for x in la)
  return num / den if den else num


def specs(tree):
  return [str(x.sharding.spec) for x in jax.tree.leaves(tree)]


def core(workdir):
  out = {"devices": jax.device_count()}
  ds = data.load_dataset("digits", None, False)
  model = models.create_model("cnn", num_classes=10, depth=None, batch_norm=True)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1,) + ds.image_shape), train=False))(
      jax.random.PRNGKey(0))
  params = variables["params"]

  # Threshold and HyperSparse gradient on FSDP-sharded parameters vs one device.
  mesh8 = sh.make_mesh(8)
  p8 = sh.shard_params(params, mesh8, min_size=0)
  out["fsdp_specs"] = specs(p8)
  for kappa in (0.5, 0.9, 0.98):
    t1 = masking.magnitude_threshold(params, kappa)
    t8 = jax.jit(lambda q, k=kappa: masking.magnitude_threshold(q, k))(p8)
    out[f"threshold_equal_{kappa}"] = bool(np.asarray(t1).view(np.int32)
                                           == np.asarray(t8).view(np.int32))
    g1 = penalties.hypersparse_grad(params, kappa)
    g8 = jax.jit(lambda q, k=kappa: penalties.hypersparse_grad(q, k))(p8)
    out[f"grad_rel_{kappa}"] = rel_diff(g1, g8)
    m8 = jax.jit(lambda q, k=kappa: masking.magnitude_mask(q, k))(p8)
    out[f"mask_equal_{kappa}"] = all(
        bool(np.array_equal(a, b)) for a, b in zip(
            jax.tree.leaves(masking.magnitude_mask(params, kappa)), jax.tree.leaves(
                jax.device_get(m8))))

  # The same for the patterns: N:M 2:4 and ERK at 90 %.
  for name, kappa, kw in (("nm", 0.5, dict(nm=(2, 4))), ("erk", 0.9, dict(distribution="erk"))):
    g1 = penalties.hypersparse_grad(params, kappa, **kw)
    g8 = jax.jit(lambda q, k=kappa, kw=kw: penalties.hypersparse_grad(q, k, **kw))(p8)
    out[f"grad_rel_{name}"] = rel_diff(g1, g8)
    m1 = budgets.pattern_mask(params, kappa, **kw)
    m8 = jax.jit(lambda q, k=kappa, kw=kw: budgets.pattern_mask(q, k, **kw))(p8)
    out[f"mask_equal_{name}"] = all(bool(np.array_equal(a, b)) for a, b in zip(
        jax.tree.leaves(m1), jax.tree.leaves(jax.device_get(m8))))

  # Training with art() in the regularisation phase, then ART controller decisions.
  steps_per_epoch, epochs, batch = 2, 4, 64
  tx = optax.chain(
      transform.art(0.9, 1e-3, 2.0, steps_per_epoch=steps_per_epoch, warmup_epochs=0),
      optax.add_decayed_weights(1e-4), optax.sgd(0.05, momentum=0.9))
  eval_images, eval_labels = ds.train_images[:512], ds.train_labels[:512]
  eval_step = image_task.make_eval_step(model, ds)
  mask_fn = jax.jit(lambda p: masking.magnitude_mask(p, 0.9))

  def run(num_devices, fsdp):
    state = {"params": params, "batch_stats": variables["batch_stats"],
             "opt_state": tx.init(params)}
    state = jax.tree.map(jnp.array, state)  # copies: the step donates its state
    mesh, shardings, place = None, None, None
    if num_devices > 1:
      mesh = sh.make_mesh(num_devices)
      state = (sh.shard_params(state, mesh, min_size=0) if fsdp else sh.replicate(state, mesh))
      shardings = (sh.param_shardings(state, mesh, min_size=0) if fsdp
                   else sh.replicated_shardings(state, mesh))
      place = lambda b: sh.shard_batch(b, mesh)  # noqa: E731
    in_specs = specs(state) if mesh is not None else None
    step = image_task.make_train_step(model, tx, ds, state_shardings=shardings)
    controller = ARTController(window=1, max_epochs=epochs)
    record = {"decisions": [], "pruned": [], "dense": []}
    for epoch in range(epochs):
      batches = data.train_batches(ds, batch, seed=0, epoch=epoch)
      for i in range(steps_per_epoch):
        b = next(batches)
        state, _ = step(state, b if place is None else place(b), jax.random.PRNGKey(i))
      pruned = masking.apply_mask(state["params"], mask_fn(state["params"]))
      acc_p = image_task.evaluate(eval_step, pruned, state["batch_stats"], eval_images, eval_labels,
                             128, place)
      acc_d = image_task.evaluate(eval_step, state["params"], state["batch_stats"], eval_images,
                             eval_labels, 128, place)
      d = controller.update(epoch, acc_p, acc_d, None)
      record["decisions"].append([d.stop, d.reason, d.improved, d.best_epoch])
      record["pruned"].append(acc_p)
      record["dense"].append(acc_d)
      if d.stop:
        break
    if mesh is not None:
      record["specs_kept"] = specs(state) == in_specs
    return jax.device_get(state), record

  ref_state, ref_record = run(1, False)
  out["reference"] = ref_record
  for n in (2, 8):
    for fsdp in (False, True):
      state, record = run(n, fsdp)
      name = f"{n}_{'fsdp' if fsdp else 'dp'}"
      out[name] = dict(record, params_rel=rel_diff(ref_state["params"], state["params"]),
                       threshold_rel=rel_diff(ref_state["opt_state"][0].threshold,
                                              state["opt_state"][0].threshold),
                       stats_rel=rel_diff(ref_state["batch_stats"], state["batch_stats"]))

  # shard_batch: host-local path (make_array_from_process_local_data) equals device_put path.
  b = next(data.train_batches(ds, 64, seed=0, epoch=0))
  a1, a2 = sh.shard_batch(b, mesh8), sh.shard_batch(b, mesh8, process_local=True)
  out["process_local_equal"] = all(
      bool(np.array_equal(x, y)) and x.sharding == y.sharding
      for x, y in zip(jax.tree.leaves(a1), jax.tree.leaves(a2)))
  try:
    sh.shard_batch({"x": np.zeros((60, 3))}, mesh8)
    out["indivisible_error"] = None
  except ValueError as e:
    out["indivisible_error"] = str(e)
  return out


def cli(workdir):
  args = ["--model", "mlp", "--warmup-epochs", "1", "--epochs", "1", "--max-art-epochs", "2",
          "--lambda-init", "1e-3", "--eta", "2", "--batch-size", "64", "--no-progress"]

  def main(devices, outdir, *extra):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      rc = cli_lib.main(args + ["--devices", str(devices), "--outdir", outdir, *extra])
    summary = None
    if os.path.exists(os.path.join(outdir, "summary.json")):
      with open(os.path.join(outdir, "summary.json")) as f:
        summary = json.load(f)
    return rc, summary, buf.getvalue()

  def metrics(outdir):
    with open(os.path.join(outdir, "metrics.jsonl")) as f:
      return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in f]

  def cut_last(src, dst):
    """Copy of a finished run as if killed before its last epoch's checkpoint."""
    shutil.copytree(src, dst)
    latest = os.path.join(dst, "checkpoints", "latest")
    steps = sorted(int(s) for s in os.listdir(latest) if s.isdigit())
    shutil.rmtree(os.path.join(latest, str(steps[-1])))
    best = os.path.join(dst, "checkpoints", "best", str(steps[-1]))
    if os.path.isdir(best):  # written just before "latest" in the same epoch
      shutil.rmtree(best)
    os.remove(os.path.join(dst, "summary.json"))
    return steps

  out = {}
  runs = {}
  nm, erk = ("--nm", "2:4"), ("--distribution", "erk", "--sparsity", "0.95")
  for name, devices, extra in (("d8", 8, ()), ("d1", 1, ()), ("d8fsdp", 8, ("--shard-params",)),
                               ("d8nm", 8, nm + ("--shard-params",)), ("d1nm", 1, nm),
                               ("d8erk", 8, erk + ("--shard-params",)), ("d1erk", 1, erk)):
    rc, summary, log = main(devices, os.path.join(workdir, name), *extra)
    runs[name] = {"rc": rc, "summary": summary, "metrics": metrics(os.path.join(workdir, name))}
  out["runs"] = runs
  # Resume across device counts: 8 -> 1 and 1 -> 8.
  for src, dst, devices in (("d8", "r8to1", 1), ("d1", "r1to8", 8)):
    steps = cut_last(os.path.join(workdir, src), os.path.join(workdir, dst))
    rc, summary, log = main(devices, os.path.join(workdir, dst))
    out[dst] = {"rc": rc, "summary": summary, "steps": steps, "resumed": "resuming" in log,
                "metrics": metrics(os.path.join(workdir, dst))}
  # Batch size not divisible by the device count: a clear error (exit status 2).
  buf = io.StringIO()
  with contextlib.redirect_stderr(buf):
    rc = cli_lib.main([a if a != "64" else "60" for a in args]
                    + ["--devices", "8", "--outdir", os.path.join(workdir, "bad")])
  out["bad_batch"] = {"rc": rc, "stderr": buf.getvalue()}
  return out


if __name__ == "__main__":
  mode, workdir = sys.argv[1], sys.argv[2]
  if len(sys.argv) > 3:  # persistent compilation cache shared by the test's subprocesses
    jax.config.update("jax_compilation_cache_dir", sys.argv[3])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  result = {"core": core, "cli": cli}[mode](workdir)
  print(json.dumps(result))
