"""Benchmark: ART training-step overhead, memory, pruned-eval cost and throughput vs PyTorch.

For ResNet-32 and VGG-19-BN (CIFAR-10 shapes: batch 64 of 32x32x3, 10 classes) it times one
jit-compiled Flax training step ``(state, batch) -> (state, metrics)`` (cross-entropy,
BatchNorm statistics updated, the state donated) with three optimisers:

* ``plain``: ``chain(add_decayed_weights(1e-4), sgd(0.1, momentum=0.9))``;
* ``art``:   ``chain(art(0.98, steps_per_epoch=782, warmup_epochs=0), <plain>)`` — λ > 0 from
  the first step, i.e. the regularisation phase (exact threshold + HyperSparse gradient each step);
* ``mask``:  ``chain(fixed_mask(mask), <plain>)`` — the fine-tune step;

plus the PyTorch twins (eager, CPU, same batch and optimiser; ``benchmarks/torch_step.py``) and a
few JAX variants (bfloat16 compute, XLA CPU flags in subprocesses, conv layouts). All variants of
a model are interleaved step by step in one process, so a noisy neighbour hurts them alike;
figures are medians, ratios are taken within the run. Memory is XLA's compiled memory analysis
of each step. The per-epoch pruned-accuracy evaluation (``magnitude_mask`` + ``apply_mask`` +
eval forward over 50,000 training images) is estimated from a few eval batches of 500.

    python benchmarks/bench_training.py [--models resnet vgg] [--out results.json]

Prints one JSON object (progress lines go to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

import report

HERE = os.path.dirname(os.path.abspath(__file__))

BATCH = 64
NUM_CLASSES = 10
STEPS_PER_EPOCH = 782          # ceil(50,000 / 64)
TRAIN_IMAGES = 50_000
SPARSITY = 0.98
DEFAULT_FLAG_VARIANTS = (
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_multi_thread_eigen=false",
)


def log(*args):
  print(*args, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# JAX side (imported lazily so that --worker can set XLA_FLAGS first)
# ----------------------------------------------------------------------------------------------


def _jax():
  import flax
  import jax
  import jax.numpy as jnp
  import optax

  import hypersparse_jax as hs
  return flax, jax, jnp, optax, hs


def build_model(name, dtype=None):
  _, _, jnp, _, hs = _jax()
  dtype = jnp.float32 if dtype is None else dtype
  if name == "resnet":
    return hs.create_model("resnet", depth=32, num_classes=NUM_CLASSES, dtype=dtype)
  return hs.create_model("vgg", depth=19, batch_norm=True, num_classes=NUM_CLASSES, dtype=dtype)


def make_batch(batch=BATCH, seed=0):
  _, jax, jnp, _, _ = _jax()
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((batch, 32, 32, 3), np.float32))
  y = jnp.asarray(rng.integers(0, NUM_CLASSES, batch).astype(np.int32))
  return x, y


def plain_tx():
  _, _, _, optax, _ = _jax()
  return optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))


def art_tx():
  _, _, _, optax, hs = _jax()
  return optax.chain(hs.art(SPARSITY, steps_per_epoch=STEPS_PER_EPOCH, warmup_epochs=0),
                     optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))


def mask_tx(mask):
  _, _, _, optax, hs = _jax()
  return optax.chain(hs.fixed_mask(mask), optax.add_decayed_weights(1e-4),
                     optax.sgd(0.1, momentum=0.9))


def init_variables(model, seed=0):
  _, jax, jnp, _, _ = _jax()
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  return jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(seed))


def make_state(variables, tx):
  """The training state: a dict pytree ``{step, params, batch_stats, opt_state}``."""
  _, jax, jnp, _, _ = _jax()
  # Fresh buffers: the state is donated, and the variants must not share (donated) arrays.
  params = jax.tree.map(jnp.copy, variables["params"])
  return {"step": jnp.zeros([], jnp.int32), "params": params,
          "batch_stats": jax.tree.map(jnp.copy, variables["batch_stats"]),
          "opt_state": tx.init(params)}


def train_step_fn(model, tx):
  """``step(state, batch) -> (state, metrics)`` (not yet jitted)."""
  _, jax, jnp, optax, _ = _jax()

  def loss_fn(params, batch_stats, x, y):
    logits, mutated = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"])
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits, mutated["batch_stats"])

  def step(state, batch):
    x, y = batch
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["batch_stats"], x, y)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
    new_state = {"step": state["step"] + 1, "params": params, "batch_stats": batch_stats,
                 "opt_state": opt_state}
    return new_state, {"loss": loss, "accuracy": accuracy}

  return step


def compile_step(model, tx, state, batch, donate=True):
  """AOT-compiles the step once; returns ``(compiled, memory_dict, compile_seconds)``."""
  _, jax, _, _, _ = _jax()
  start = time.perf_counter()
  jitted = jax.jit(train_step_fn(model, tx), donate_argnums=(0,) if donate else ())
  compiled = jitted.lower(state, batch).compile()
  seconds = time.perf_counter() - start
  return compiled, memory_of(compiled), seconds


def memory_of(compiled):
  try:
    ma = compiled.memory_analysis()
  except Exception as e:  # not every backend implements it
    return {"error": repr(e)}
  if ma is None:
    return {"error": "memory_analysis() returned None"}
  out = {}
  for key in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes"):
    out[key] = int(getattr(ma, key, 0))
  # Peak device memory of one call: live arguments + outputs not aliased to them + temporaries.
  out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                        - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  return out


class JaxRunner:
  """Holds a compiled step and its (donated, threaded-through) state."""

  def __init__(self, compiled, state, batch):
    self.compiled, self.state, self.batch = compiled, state, batch

  def __call__(self):
    _, jax, _, _, _ = _jax()
    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready(metrics)  # one host sync per step, as a loop that logs the loss
    return metrics


def settle():
  """Lets the previous variant's worker threads go idle (OpenMP and XLA pools spin for a while
  after their last task) so that they do not steal cores from the next one."""
  time.sleep(float(os.environ.get("BENCH_SETTLE_S", "0.5")))


def interleave(runners: dict, rounds: int, warmup: int = 1):
  """Runs every runner once per round, round-robin; returns per-runner lists of step seconds."""
  times = {k: [] for k in runners}
  for r in range(warmup + rounds):
    for name, fn in runners.items():
      settle()
      start = time.perf_counter()
      fn()
      dt = time.perf_counter() - start
      if r >= warmup:
        times[name].append(dt)
    log(f"  round {r}: " + ", ".join(f"{k}={times[k][-1] * 1e3:.0f}ms" if times[k] else k
                                    for k in runners))
  return times


def med_ms(ts):
  return float(np.median(ts) * 1e3)


# ----------------------------------------------------------------------------------------------
# Per-model benchmark
# ----------------------------------------------------------------------------------------------


def compile_with_lax_conv(name, tx, state, batch):
  """The plain step with XLA's own convolution (``nn.Conv``) instead of ``hypersparse_jax.conv``."""
  flax, _, _, _, hs = _jax()
  saved = hs.models._Conv
  hs.models._Conv = flax.linen.Conv  # read when the model is traced, i.e. while compiling
  try:
    return compile_step(build_model(name), tx, state, batch)
  finally:
    hs.models._Conv = saved


def compile_variants(model, variables, batch):
  """The ``plain``, ``art`` and ``mask`` steps, compiled: ``(runners, memory, compile_s, txs)``."""
  _, jax, _, _, hs = _jax()
  mask = jax.jit(lambda p: hs.magnitude_mask(p, SPARSITY))(variables["params"])
  runners, memory, compile_s, txs = {}, {}, {}, {}
  for variant, tx in (("plain", plain_tx()), ("art", art_tx()), ("mask", mask_tx(mask))):
    state = make_state(variables, tx)
    if variant == "mask":
      state["params"] = hs.apply_mask(state["params"], mask)
    compiled, memory[variant], compile_s[variant] = compile_step(model, tx, state, batch)
    runners[variant], txs[variant] = JaxRunner(compiled, state, batch), tx
    log(f"  compiled {variant} in {compile_s[variant]:.1f}s; memory {memory[variant]}")
  return runners, memory, compile_s, txs


def bench_model(name, *, rounds, eval_batches, eval_batch, with_torch, with_bf16,
                with_channels_last, with_no_donation, with_lax_conv=True, overhead_rounds=0):
  _, jax, jnp, _, hs = _jax()
  log(f"== {name}")
  model = build_model(name)
  variables = init_variables(model)
  batch = make_batch()
  n_prunable = hs.masking.num_prunable(hs.masking.prunable_leaves(variables["params"]))
  runners, memory, compile_s, _ = compile_variants(model, variables, batch)
  if with_no_donation:  # memory only: what donating the state saves
    tx = plain_tx()
    _, memory["plain_no_donation"], _ = compile_step(model, tx, make_state(variables, tx), batch,
                                                     donate=False)
  if with_lax_conv:
    tx = plain_tx()
    state = make_state(variables, tx)
    compiled, memory["plain_lax_conv"], compile_s["plain_lax_conv"] = compile_with_lax_conv(
        name, tx, state, batch)
    runners["plain_lax_conv"] = JaxRunner(compiled, state, batch)
  if with_bf16:
    bf_model = build_model(name, jnp.bfloat16)
    tx = plain_tx()
    state = make_state(variables, tx)
    compiled, memory["plain_bf16"], compile_s["plain_bf16"] = compile_step(bf_model, tx, state,
                                                                           batch)
    runners["plain_bf16"] = JaxRunner(compiled, state, batch)
  if with_torch:
    sys.path.insert(0, HERE)
    from torch_step import make_torch_step
    runners["torch"] = make_torch_step(name)
    if with_channels_last:
      runners["torch_channels_last"] = make_torch_step(name, channels_last=True)

  times = interleave(runners, rounds)
  ms = {k: med_ms(v) for k, v in times.items()}
  paired = run_overhead(name, overhead_rounds, 3000) if overhead_rounds else {}

  # Pruned-accuracy evaluation of one ART epoch: mask + apply_mask + eval forward on the set.
  mask_fn = jax.jit(lambda p: hs.apply_mask(p, hs.magnitude_mask(p, SPARSITY)))
  eval_fn = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False), -1))
  params = runners["art"].state["params"]
  bstats = runners["art"].state["batch_stats"]
  ex = jnp.asarray(np.random.default_rng(1).standard_normal((eval_batch, 32, 32, 3), np.float32))
  pruned = jax.block_until_ready(mask_fn(params))  # compiles
  eval_compiled = eval_fn.lower({"params": pruned, "batch_stats": bstats}, ex).compile()
  mask_t, eval_t = [], []
  for _ in range(eval_batches):
    start = time.perf_counter()
    pruned = jax.block_until_ready(mask_fn(params))
    mask_t.append(time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(eval_compiled({"params": pruned, "batch_stats": bstats}, ex))
    eval_t.append(time.perf_counter() - start)
  n_eval = -(-TRAIN_IMAGES // eval_batch)
  eval_epoch_s = med_ms(mask_t) / 1e3 + n_eval * med_ms(eval_t) / 1e3
  train_epoch_s = STEPS_PER_EPOCH * ms["plain"] / 1e3

  def ratio(a, b):
    return ms[a] / ms[b] if a in ms and b in ms else None

  def mem_ratio(a, b):
    ta, tb = memory.get(a, {}).get("total_bytes"), memory.get(b, {}).get("total_bytes")
    return ta / tb if ta and tb else None

  ips = {k: BATCH / v * 1e3 for k, v in ms.items()}
  result = {
      "model": {"resnet": "resnet32", "vgg": "vgg19_bn"}[name],
      "num_prunable_weights": n_prunable,
      "timed_steps_per_variant": rounds,
      "step_ms": ms,
      "step_ms_all": {k: [round(t * 1e3, 1) for t in v] for k, v in times.items()},
      "images_per_s": ips,
      "compile_s": compile_s,
      "ratios": {
          "art_over_plain": ratio("art", "plain"),
          "mask_over_plain": ratio("mask", "plain"),
          "jax_plain_over_torch": ratio("plain", "torch"),
          "jax_bf16_over_jax_f32": ratio("plain_bf16", "plain"),
          "jax_lax_conv_over_torch": ratio("plain_lax_conv", "torch"),
          "plain_over_lax_conv": ratio("plain", "plain_lax_conv"),
          "jax_throughput_over_torch": ratio("torch", "plain"),
          "torch_channels_last_over_torch": ratio("torch_channels_last", "torch"),
          "memory_art_over_plain": mem_ratio("art", "plain"),
          "memory_mask_over_plain": mem_ratio("mask", "plain"),
          "memory_no_donation_over_plain": mem_ratio("plain_no_donation", "plain"),
      },
      "overhead_paired": paired,
      "memory": memory,
      "pruned_eval": {
          "eval_batch": eval_batch, "timed_batches": eval_batches,
          "mask_and_apply_ms": med_ms(mask_t), "eval_batch_ms": med_ms(eval_t),
          "epoch_eval_s_estimate": eval_epoch_s, "train_epoch_s_estimate": train_epoch_s,
          "fraction_of_train_epoch": eval_epoch_s / train_epoch_s,
      },
  }
  log(json.dumps({k: result[k] for k in ("model", "step_ms", "ratios")}))
  return result


# ----------------------------------------------------------------------------------------------
# Layouts: one conv layer, forward + backward, NHWC vs NCHW in XLA and PyTorch
# ----------------------------------------------------------------------------------------------


def bench_conv_layouts(repeats=5, shape=(64, 16, 16, 128, 128)):
  _, jax, jnp, _, _ = _jax()
  import torch
  from jax import lax
  n, h, w, cin, cout = shape
  rng = np.random.default_rng(0)
  x_nhwc = rng.standard_normal((n, h, w, cin), np.float32)
  k_hwio = (rng.standard_normal((3, 3, cin, cout), np.float32) * 0.05)

  def make(dn):
    def loss(x, k):
      y = lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
      return jnp.sum(y * y)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))

  fns = {}
  xs = {"NHWC": (jnp.asarray(x_nhwc), jnp.asarray(k_hwio)),
        "NCHW": (jnp.asarray(x_nhwc.transpose(0, 3, 1, 2)),
                 jnp.asarray(k_hwio.transpose(3, 2, 0, 1)))}
  dns = {"NHWC": ("NHWC", "HWIO", "NHWC"), "NCHW": ("NCHW", "OIHW", "NCHW")}
  for layout in ("NHWC", "NCHW"):
    f = make(dns[layout])
    args = xs[layout]
    jax.block_until_ready(f(*args))
    fns[f"jax_{layout}"] = (lambda f=f, args=args: jax.block_until_ready(f(*args)))
  tx = torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()).requires_grad_()
  tk = torch.from_numpy(k_hwio.transpose(3, 2, 0, 1).copy()).requires_grad_()
  txl = tx.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
  tkl = tk.detach().contiguous(memory_format=torch.channels_last).requires_grad_()

  def torch_fn(x, k):
    def run():
      y = torch.nn.functional.conv2d(x, k, padding=1)
      gx, gk = torch.autograd.grad((y * y).sum(), (x, k))
      return gx
    return run
  fns["torch_NCHW"] = torch_fn(tx, tk)
  fns["torch_channels_last"] = torch_fn(txl, tkl)
  times = interleave(fns, repeats)
  ms = {k: med_ms(v) for k, v in times.items()}
  return {"conv": f"3x3 {cin}->{cout}, {n}x{h}x{w}, forward+backward", "ms": ms,
          "ratio_jax_nchw_over_nhwc": ms["jax_NCHW"] / ms["jax_NHWC"],
          "ratio_jax_nhwc_over_torch": ms["jax_NHWC"] / ms["torch_NCHW"]}


# ----------------------------------------------------------------------------------------------
# XLA flag variants: a fresh process per flag set (XLA_FLAGS is read once at start-up)
# ----------------------------------------------------------------------------------------------


def worker(name, rounds):
  """Runs in a subprocess: times the plain f32 step under the inherited XLA_FLAGS.

  The PyTorch twin runs interleaved with it in the same process (when PyTorch is installed), so
  ``jax_throughput_over_torch`` compares flag sets across processes without cross-run noise.
  """
  model = build_model(name)
  variables = init_variables(model)
  batch = make_batch()
  tx = plain_tx()
  state = make_state(variables, tx)
  compiled, memory, compile_s = compile_step(model, tx, state, batch)
  runners = {"plain": JaxRunner(compiled, state, batch)}
  try:
    sys.path.insert(0, HERE)
    from torch_step import make_torch_step
    runners["torch"] = make_torch_step(name)
  except ImportError:
    pass
  for fn in runners.values():  # warm-up (first calls grow the heap)
    fn()
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  times = interleave(runners, rounds, warmup=0)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
  ms = med_ms(times["plain"])
  out = {"step_ms": ms, "images_per_s": BATCH / ms * 1e3, "compile_s": compile_s,
         "step_ms_all": [round(t * 1e3, 1) for t in times["plain"]],
         "page_faults_per_round": faults / rounds}
  if "torch" in times:
    out["torch_step_ms"] = med_ms(times["torch"])
    out["jax_throughput_over_torch"] = out["torch_step_ms"] / ms
  print(json.dumps(out))


def overhead_worker(name, rounds):
  """Runs in a fresh subprocess: ART / fine-tune step overhead alone.

  Only the three JAX steps live in the process (no PyTorch, no other variants sharing the heap),
  they run round-robin with the order rotated every round, and each round's ratios are taken
  between neighbouring steps, so slow drifts of a shared machine cancel. Both wall time and
  process CPU time (all threads, user + system) are recorded per step: CPU time does not count
  the time other processes hold the cores, so its ratio is the steadier one.
  """
  model = build_model(name)
  variables = init_variables(model)
  batch = make_batch()
  runners, _, _, txs = compile_variants(model, variables, batch)
  for fn in runners.values():
    fn()
    fn()
  names = list(runners)
  wall = {k: [] for k in names}
  cpu = {k: [] for k in names}
  faults = {k: 0 for k in names}
  for r in range(rounds):
    for k in names[r % len(names):] + names[:r % len(names)]:
      settle()
      u0 = resource.getrusage(resource.RUSAGE_SELF)
      start = time.perf_counter()
      runners[k]()
      wall[k].append(time.perf_counter() - start)
      u1 = resource.getrusage(resource.RUSAGE_SELF)
      cpu[k].append(u1.ru_utime - u0.ru_utime + u1.ru_stime - u0.ru_stime)
      faults[k] += u1.ru_minflt - u0.ru_minflt
    log(f"  round {r}: " + ", ".join(f"{k}={wall[k][-1] * 1e3:.0f}ms/{cpu[k][-1] * 1e3:.0f}cpu-ms"
                                    for k in names))
  out = {"rounds": rounds, "step_ms": {k: med_ms(v) for k, v in wall.items()},
         "step_cpu_ms": {k: med_ms(v) for k, v in cpu.items()},
         "page_faults_per_step": {k: v / rounds for k, v in faults.items()}}
  out["update_only"] = time_updates(txs, runners, rounds=30, grads=batch_grads(model, runners,
                                                                                 batch))
  for k in ("art", "mask"):
    for label, series in (("wall", wall), ("cpu", cpu)):
      per_round = [a / b for a, b in zip(series[k], series["plain"])]
      out[f"{k}_over_plain_{label}"] = {
          "median_of_round_ratios": float(np.median(per_round)),
          "ratio_of_medians": med_ms(series[k]) / med_ms(series["plain"]),
          "round_ratios": [round(x, 4) for x in per_round]}
  print(json.dumps(out))


def batch_grads(model, runners, batch):
  """The loss gradient of the benchmark batch at the plain variant's current parameters."""
  _, jax, _, optax, _ = _jax()
  state = runners["plain"].state
  x, y = batch

  def loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": state["batch_stats"]}, x,
                            train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return jax.jit(jax.grad(loss))(state["params"])


def time_updates(txs, runners, rounds, grads):
  """The optimiser update alone (``tx.update`` + ``apply_updates``, jitted, state donated).

  The only part of the step in which the three variants differ: the forward and backward pass
  are the same program. Timed from each variant's current training state with the batch's
  gradient ``grads`` (as the steps, which train on one batch), round-robin; its milliseconds
  are far steadier than whole steps.
  """
  _, jax, jnp, optax, _ = _jax()

  def update_fn(tx):
    def update(params, opt_state, grads):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    return jax.jit(update, donate_argnums=(0, 1))

  fns, states = {}, {}
  for k, tx in txs.items():
    fns[k] = update_fn(tx)
    state = runners[k].state
    states[k] = (jax.tree.map(jnp.copy, state["params"]),
                 jax.tree.map(jnp.copy, state["opt_state"]))
    states[k] = jax.block_until_ready(fns[k](*states[k], grads))  # compile + warm-up
  times = {k: [] for k in txs}
  for _ in range(rounds):
    for k in txs:
      start = time.perf_counter()
      states[k] = jax.block_until_ready(fns[k](*states[k], grads))
      times[k].append(time.perf_counter() - start)
  return {"rounds": rounds, "update_ms": {k: med_ms(v) for k, v in times.items()},
          "update_ms_all": {k: [round(t * 1e3, 2) for t in v] for k, v in times.items()}}


def run_worker(args, timeout, env=None):
  """Runs this script with ``args`` in a fresh process; its last stdout line (JSON) or an error."""
  cmd = [sys.executable, os.path.abspath(__file__), *args]
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout}s"}
  if proc.returncode != 0:
    return {"error": proc.stderr.strip().splitlines()[-1:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run_overhead(name, rounds, timeout):
  return run_worker(["--overhead-worker", name, "--rounds", str(rounds)], timeout)


def run_flag_variant(name, flags, rounds, timeout, retain_host_memory=True):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
  args = ["--worker", name, "--rounds", str(rounds)]
  if not retain_host_memory:
    args.append("--no-retain-host-memory")
  return {**run_worker(args, timeout, env), "flags": flags,
          "retain_freed_memory": retain_host_memory}


# ----------------------------------------------------------------------------------------------


def machine():
  info = report.machine_info()
  if "torch" in info:
    info["torch_threads"] = os.cpu_count()
  return info


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", choices=["resnet", "vgg"], default=["resnet", "vgg"])
  parser.add_argument("--resnet-steps", type=int, default=4, help="timed steps per variant")
  parser.add_argument("--vgg-steps", type=int, default=2, help="timed steps per variant")
  parser.add_argument("--eval-batch", type=int, default=500)
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--no-layouts", action="store_true")
  parser.add_argument("--overhead-rounds", type=int, default=16,
                      help="rounds of only plain/art/mask (fresh process) for the overhead ratio")
  parser.add_argument("--flag-variants", nargs="*", default=list(DEFAULT_FLAG_VARIANTS),
                      help="XLA_FLAGS sets timed on ResNet-32 in subprocesses (none: skip)")
  parser.add_argument("--flag-steps", type=int, default=2)
  parser.add_argument("--no-retain-host-memory", dest="retain_host_memory", action="store_false",
                      help="run with glibc's default malloc (see hypersparse_jax.host_memory)")
  parser.add_argument("--no-allocator-compare", dest="allocator_compare", action="store_false",
                      help="skip the ResNet-32 subprocesses with/without retained host memory")
  parser.add_argument("--out", default=None, help="also write the JSON here")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--overhead-worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--rounds", type=int, default=2, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  # Before JAX's first computation (machine() below starts the backend). JAX and PyTorch run
  # in this one process, so both steps are timed under the same allocator settings.
  from hypersparse_jax import host_memory
  retained = args.retain_host_memory and host_memory.retain_freed_memory()
  if args.worker:
    return worker(args.worker, args.rounds)
  if args.overhead_worker:
    return overhead_worker(args.overhead_worker, args.rounds)

  start = time.perf_counter()
  out = {"benchmark": "training_step", "date": time.strftime("%Y-%m-%d"),
         "machine": {**machine(), "retain_freed_memory": retained},
         "config": {"batch": BATCH, "input": [32, 32, 3], "num_classes": NUM_CLASSES,
                    "sparsity": SPARSITY, "steps_per_epoch": STEPS_PER_EPOCH,
                    "optimizer": "add_decayed_weights(1e-4) + sgd(0.1, momentum=0.9)",
                    "art": f"art({SPARSITY}, steps_per_epoch={STEPS_PER_EPOCH}, warmup_epochs=0)",
                    "donate_state": True, "dtype": "float32 (plain_bf16: bfloat16 compute)"},
         "results": []}
  for name in args.models:
    is_resnet = name == "resnet"
    out["results"].append(bench_model(
        name, rounds=args.resnet_steps if is_resnet else args.vgg_steps,
        eval_batches=2 if is_resnet else 1, eval_batch=args.eval_batch,
        with_torch=not args.no_torch, with_bf16=is_resnet,
        with_channels_last=is_resnet, with_no_donation=is_resnet,
        overhead_rounds=args.overhead_rounds))
  if not args.no_layouts and not args.no_torch:
    log("== conv layouts")
    out["conv_layouts"] = bench_conv_layouts()
  if args.flag_variants and "resnet" in args.models:
    base = next(r for r in out["results"] if r["model"] == "resnet32")
    variants = [run_flag_variant("resnet", "", args.flag_steps, 600)]
    for flags in args.flag_variants:
      log(f"== XLA_FLAGS {flags}")
      variants.append(run_flag_variant("resnet", flags, args.flag_steps, 600))
      log(json.dumps(variants[-1]))
    for v in variants:
      if "step_ms" in v and "step_ms" in variants[0]:
        v["ratio_over_default_flags_subprocess"] = v["step_ms"] / variants[0]["step_ms"]
      if "step_ms" in v and "torch" in base["step_ms"]:
        v["ratio_over_torch_main_run"] = v["step_ms"] / base["step_ms"]["torch"]
    out["xla_flag_variants_resnet32"] = variants
  if args.allocator_compare and "resnet" in args.models:
    # glibc's default (freed blocks unmapped: every step faults its buffers in again) against
    # hypersparse_jax.host_memory.retain_freed_memory(), each in a fresh process with its own
    # PyTorch twin interleaved.
    log("== allocator: glibc default vs retain_freed_memory")
    default, retain = (run_flag_variant("resnet", "", args.flag_steps, 600,
                                        retain_host_memory=r) for r in (False, True))
    runs = {"default": default, "retain": retain}
    log(json.dumps(runs))
    for key, label in (("step_ms", "jax"), ("torch_step_ms", "torch")):
      if key in default and key in retain:
        runs[f"{label}_retain_over_default"] = retain[key] / default[key]
    out["allocator_resnet32"] = runs
  out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  out["wall_s"] = time.perf_counter() - start
  report.emit(out, args.out)


if __name__ == "__main__":
  main()
