"""Benchmark on one GPU: training steps vs PyTorch eager, ART overhead, pruned eval, an epoch.

Everything runs in one process on one GPU, so every ratio compares figures from the same run:

* **Steps** (ResNet-32 and VGG-19-BN, CIFAR shapes, 10 classes; batch 64 as the CPU benchmark,
  plus larger batches): the jit-compiled Flax step of ``bench_training.py`` (cross-entropy,
  BatchNorm statistics, state donated) with ``plain`` = ``chain(add_decayed_weights(1e-4),
  sgd(0.1, momentum=0.9))``, ``art`` = ``chain(art(0.98, warmup_epochs=0), <plain>)`` (exact
  threshold + HyperSparse gradient every step), ``mask`` = ``chain(fixed_mask(m), <plain>)``
  (fine-tune), ``plain_bf16`` (``create_model(..., dtype=bfloat16)``, f32 parameters); against the
  authors' PyTorch models (``hypersparse_jax.torch_models``) in eager mode with
  ``SGD(lr=0.1, momentum=0.9, weight_decay=1e-4)``: ``torch`` (NCHW), ``torch_channels_last``,
  ``torch_cl_amp_bf16`` (channels_last + ``autocast(bfloat16)``), then the same three with
  ``torch.backends.cudnn.benchmark = True`` (timed after the others: the flag is global).
  Both frameworks run float32 with their GPU defaults (TF32 convolutions in both).
* **Timing**: each variant runs ``--chunk`` steps back to back with no host sync in between
  (as ``hypersparse-train``, which syncs every 20 steps), then one sync
  (``jax.block_until_ready`` / ``torch.cuda.synchronize``); ms/step = chunk time / chunk.
  Variants are interleaved chunk by chunk with the order rotated each round, after a warm-up
  round; figures are medians over ``--reps`` rounds, ratios are ratios of medians (and, for
  the ART overhead, medians of per-round ratios too).
* **ART update alone**: ``tx.update`` + ``apply_updates`` jitted, per variant (as
  ``bench_training.time_updates``).
* **Pruned eval per ART epoch**: ``apply_mask(p, magnitude_mask(p, 0.98))`` + the eval forward
  over 100 batches of 500 (50,000 images, one device-resident batch reused), against a
  782-step training epoch of the ``plain`` step at batch 64.
* **``hypersparse-train`` epochs** (``--trainer``): the :class:`hypersparse_jax.train.Trainer`
  of the CLI, ResNet-32, reference defaults (batch 64, eval batch 500) on a CIFAR-10-shaped
  in-memory ``data.Dataset`` of random uint8 images (50,000 train, 10,000 test,
  random labels: accuracies are meaningless, times are not) — ``load_dataset`` is replaced,
  nothing else. ``Trainer.run()`` with 2 warm-up, at most 2 ART and 2 fine-tune epochs; the
  per-epoch wall time is the ``time`` field of ``metrics.jsonl`` (training epoch with host
  batching, on-device augmentation and prefetch, test eval, pruned train eval in ART epochs,
  the controller's host copy); the training part alone is timed around ``_train_epoch``.
  The first epoch of each phase includes compilation.

* **Selection alone** (``--selection-rounds R``): the exact threshold by each method of
  ``threshold.kth_magnitude`` (``bracket``, ``sort``, ``radix`` at several digit widths)
  against one fused pass, thresholds compared with the sort bit for bit.
* **Forms of ``art()``** (``--forms ...``): the ART step with the λ > 0 branch as ``lax.cond``
  or as a select, and each selection method, against ``plain`` (benchmark-only patches:
  :class:`selection_form`).

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu.json

Prints one JSON object (progress lines go to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_training as bt  # noqa: E402
import report  # noqa: E402

log = bt.log


# ----------------------------------------------------------------------------------------------
# Machine
# ----------------------------------------------------------------------------------------------


def gpu_info() -> dict:
  import flax
  import jax
  import jaxlib
  import optax
  info = {**report.machine_info(), "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "optax": optax.__version__,
          "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision)}
  try:
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                        "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    info["nvidia_smi"] = q.stdout.strip()
  except Exception as e:  # no nvidia-smi: CPU smoke runs
    info["nvidia_smi"] = repr(e)
  try:
    import torch
    info["torch_cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version()
    info["torch_device"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                            else "cpu")
    info["torch_cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    info["torch_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
  except ImportError:
    pass
  return info


def conv_specialised() -> bool:
  """Whether ``hypersparse_jax.conv`` takes its CPU path here (it must not on GPU/TPU)."""
  import jax
  import jax.numpy as jnp
  from hypersparse_jax import conv
  x, w = jnp.zeros((2, 8, 8, 4)), jnp.zeros((3, 3, 4, 4))
  jaxpr = jax.make_jaxpr(lambda x, w: conv.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))(x, w)
  return "custom_vjp" in str(jaxpr)


# ----------------------------------------------------------------------------------------------
# Chunked runners
# ----------------------------------------------------------------------------------------------


class JaxChunk:
  """``k`` donated steps back to back, one sync at the end.

  Also records the host time spent enqueueing the ``k`` steps (before the sync), per step: when
  it approaches the whole chunk's time per step, the host (dispatch, or a device-to-host read
  inside the step) and not the GPU sets the pace.
  """

  def __init__(self, compiled, state, batch):
    self.compiled, self.state, self.batch = compiled, state, batch
    self.enqueue = []

  def __call__(self, k):
    import jax
    metrics = None
    start = time.perf_counter()
    for _ in range(k):
      self.state, metrics = self.compiled(self.state, self.batch)
    self.enqueue.append((time.perf_counter() - start) / k)
    jax.block_until_ready((self.state, metrics))


def torch_chunk(name, batch, *, channels_last=False, amp_bf16=False, seed=0):
  """The PyTorch twin's eager training step on the GPU, ``k`` at a time, one sync at the end."""
  import torch
  from hypersparse_jax.torch_models import create_torch_model
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(seed)
  if name == "resnet":
    model = create_torch_model("resnet", depth=32, num_classes=bt.NUM_CLASSES)
  else:
    model = create_torch_model("vgg", depth=19, batch_norm=True, num_classes=bt.NUM_CLASSES)
  model = model.to(dev).train()
  rng = np.random.default_rng(seed)
  x = torch.from_numpy(rng.standard_normal((batch, 3, 32, 32), np.float32)).to(dev)
  y = torch.from_numpy(rng.integers(0, bt.NUM_CLASSES, batch)).long().to(dev)
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

  def sync():
    if dev.type == "cuda":
      torch.cuda.synchronize()

  def run(k):
    for _ in range(k):
      opt.zero_grad(set_to_none=True)
      with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp_bf16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
      loss.backward()
      opt.step()
    sync()

  return run


def interleave_chunks(runners: dict, rounds: int, chunk: int, warmup: int = 1):
  """Round-robin, order rotated each round; returns per-runner lists of seconds per step."""
  names = list(runners)
  times = {k: [] for k in names}
  for r in range(warmup + rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for k in order:
      start = time.perf_counter()
      runners[k](chunk)
      dt = (time.perf_counter() - start) / chunk
      if r >= warmup:
        times[k].append(dt)
    if r >= warmup:
      log(f"  round {r}: " + ", ".join(f"{k}={times[k][-1] * 1e3:.2f}ms" for k in names))
  return times


def med_ms(ts):
  return float(np.median(ts) * 1e3)


# ----------------------------------------------------------------------------------------------
# The exact selection on its own
# ----------------------------------------------------------------------------------------------


def bench_selection(rounds, chunk, widths=(3, 4, 5, 6)):
  """Per call, on the ResNet-32 and VGG-19-BN prunable weights (He-initialised), κ 0.9/0.98:

  ``fused_pass`` (``sum(tanh(|w|))`` over the same weights), ``radix_b{B}`` (the fixed-pass
  selection, B bits per pass; ``threshold.RADIX_BITS`` is the default), ``bracket`` (the
  CPU's bracketing search), ``sort`` (``jnp.sort`` of all magnitudes, then index),
  ``hypersparse_grad`` (the whole closed-form gradient, default form); each thresholds
  compared bit for bit with the sort. ``chunk`` calls back to back, then one sync.
  """
  import jax
  import jax.numpy as jnp
  import hypersparse_jax as hs
  from hypersparse_jax import masking, threshold
  out = []
  for name in ("resnet", "vgg"):
    params = bt.init_variables(bt.build_model(name))["params"]
    leaves = [x for _, x in masking.prunable_leaves(params)]
    n = sum(int(x.size) for x in leaves)
    for kappa in (0.9, 0.98):
      k = threshold.rank_of_threshold(kappa, n)
      fns = {"fused_pass": jax.jit(lambda ls: sum(jnp.sum(jnp.tanh(jnp.abs(x))) for x in ls)),
             "bracket": jax.jit(lambda ls: threshold.kth_magnitude(ls, k, method="bracket")),
             "sort": jax.jit(lambda ls: jnp.sort(jnp.concatenate(
                 [jnp.abs(x).ravel() for x in ls]))[k]),
             "hypersparse_grad": jax.jit(lambda p: hs.hypersparse_grad(p, kappa))}
      for b in widths:
        fns[f"radix_b{b}"] = jax.jit(lambda ls, b=b: jax.lax.bitcast_convert_type(
            threshold._kth_bits_radix(threshold._flat_chunks([(None, x) for x in ls]), k, b),
            jnp.float32))
      args = {key: (params if key == "hypersparse_grad" else leaves) for key in fns}
      values = {key: jax.block_until_ready(fn(args[key])) for key, fn in fns.items()}

      def runner(key):
        def run(c):
          r = None
          for _ in range(c):
            r = fns[key](args[key])
          jax.block_until_ready(r)
        return run

      times = interleave_chunks({key: runner(key) for key in fns}, rounds, chunk)
      ms = {key: med_ms(v) for key, v in times.items()}
      sort_bits = np.asarray(values["sort"]).view(np.uint32)
      out.append({
          "model": {"resnet": "resnet32", "vgg": "vgg19_bn"}[name], "num_weights": n,
          "sparsity": kappa, "ms": ms,
          "ratio_to_fused_pass": {key: v / ms["fused_pass"] for key, v in ms.items()},
          "identical_to_sort": {key: bool(np.asarray(values[key]).view(np.uint32) == sort_bits)
                                for key in fns if key not in ("fused_pass", "hypersparse_grad",
                                                              "sort")}})
      log(json.dumps(out[-1]))
  return out


class _SelectingLax:
  """``jax.lax`` with ``cond`` replaced by both branches and a ``where`` (benchmark only)."""

  def __getattr__(self, name):
    from jax import lax
    return getattr(lax, name)

  @staticmethod
  def cond(pred, true_fn, false_fn, *operands):
    import jax
    import jax.numpy as jnp
    taken, other = true_fn(*operands), false_fn(*operands)
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), taken, other)


class selection_form:
  """Within: ``art()``'s λ > 0 branch as ``cond`` (``lax.cond``, the library's form) or
  ``select`` (both branches and a ``where``: no predicate read back to the host), and the
  threshold selected by ``method`` (``threshold.METHODS``). Trace caches are cleared on entry
  and exit, so no program traced inside is reused outside or vice versa."""

  def __init__(self, cond: str, method: str):
    self.cond, self.method = cond, method

  def __enter__(self):
    import jax
    from hypersparse_jax import threshold, transform
    self.saved = transform.lax, threshold._select_bits
    select_bits = self.saved[1]
    if self.cond == "select":
      transform.lax = _SelectingLax()
    threshold._select_bits = lambda c, n, k, h, m: select_bits(c, n, k, h, self.method)
    jax.clear_caches()
    return self

  def __exit__(self, *exc):
    import jax
    from hypersparse_jax import threshold, transform
    transform.lax, threshold._select_bits = self.saved
    jax.clear_caches()


FORMS = {  # variant: (tx factory, branch form, selection)
    "art_sort_cond": ("art", "cond", "sort"), "art_sort_select": ("art", "select", "sort"),
    "art_radix_select": ("art", "select", "radix"), "art_bracket_cond": ("art", "cond", "bracket"),
    "warmup_cond": ("warmup", "cond", "sort"), "warmup_sort_select": ("warmup", "select", "sort"),
}


def bench_forms(name, batch_size, forms, *, rounds, chunk):
  """Training steps of ``art()`` in each form of :data:`FORMS` against ``plain``, one run."""
  import jax
  log(f"== forms: {name}, batch {batch_size}")
  model = bt.build_model(name)
  variables = bt.init_variables(model)
  batch = bt.make_batch(batch_size)
  runners, compile_s = {}, {}
  tx = bt.plain_tx()
  state = bt.make_state(variables, tx)
  compiled, _, compile_s["plain"] = bt.compile_step(model, tx, state, batch)
  runners["plain"] = JaxChunk(compiled, state, batch)
  for variant in forms:
    kind, cond, method = FORMS[variant]
    tx = bt.art_tx() if kind == "art" else warmup_tx()
    state = bt.make_state(variables, tx)
    with selection_form(cond, method):
      compiled, _, compile_s[variant] = bt.compile_step(model, tx, state, batch)
    runners[variant] = JaxChunk(compiled, state, batch)
    log(f"  compiled {variant} in {compile_s[variant]:.1f}s")
  times = interleave_chunks(runners, rounds, chunk)
  ms = {k: med_ms(v) for k, v in times.items()}
  result = {"model": {"resnet": "resnet32", "vgg": "vgg19_bn"}[name], "batch": batch_size,
            "forms": {k: FORMS[k] for k in forms}, "step_ms": ms,
            "enqueue_ms": {k: med_ms(r.enqueue[1:]) for k, r in runners.items()},
            "over_plain_median_of_round_ratios": {
                k: float(np.median([a / b for a, b in zip(times[k], times["plain"])]))
                for k in forms},
            "compile_s": compile_s}
  log(json.dumps(result))
  jax.clear_caches()
  return result


# ----------------------------------------------------------------------------------------------
# Steps of one model at one batch size
# ----------------------------------------------------------------------------------------------


def warmup_tx():
  """``art_tx()`` held in its warm-up phase (λ = 0) for the whole benchmark."""
  _, _, _, optax, hs = bt._jax()
  return optax.chain(hs.art(bt.SPARSITY, steps_per_epoch=bt.STEPS_PER_EPOCH,
                            warmup_epochs=10_000), optax.add_decayed_weights(1e-4),
                     optax.sgd(0.1, momentum=0.9))


def bench_steps(name, batch_size, *, full, rounds, chunk, with_torch, eval_batch, eval_batches,
                with_bf16=True):
  import jax
  import jax.numpy as jnp
  log(f"== {name}, batch {batch_size}")
  model = bt.build_model(name)
  variables = bt.init_variables(model)
  batch = bt.make_batch(batch_size)
  runners, memory, compile_s, txs = {}, {}, {}, {}
  if full:
    compiled_runners, memory, compile_s, txs = bt.compile_variants(model, variables, batch)
    for k, r in compiled_runners.items():
      runners[k] = JaxChunk(r.compiled, r.state, r.batch)
    if with_bf16:
      bf_model = bt.build_model(name, jnp.bfloat16)
      tx = bt.plain_tx()
      state = bt.make_state(variables, tx)
      compiled, memory["plain_bf16"], compile_s["plain_bf16"] = bt.compile_step(
          bf_model, tx, state, batch)
      runners["plain_bf16"] = JaxChunk(compiled, state, batch)
  else:
    tx = bt.plain_tx()
    state = bt.make_state(variables, tx)
    compiled, memory["plain"], compile_s["plain"] = bt.compile_step(model, tx, state, batch)
    runners["plain"] = JaxChunk(compiled, state, batch)
  log(f"  compile_s {compile_s}")
  if with_torch:
    runners["torch"] = torch_chunk(name, batch_size)
    runners["torch_channels_last"] = torch_chunk(name, batch_size, channels_last=True)
    if full:
      runners["torch_cl_amp_bf16"] = torch_chunk(name, batch_size, channels_last=True,
                                                 amp_bf16=True)
  times = interleave_chunks(runners, rounds, chunk)
  if with_torch:  # cudnn.benchmark is global: its variants run after the others
    import torch
    torch.backends.cudnn.benchmark = True
    bench_runners = {"torch_cudnn_benchmark": torch_chunk(name, batch_size),
                     "torch_channels_last_cudnn_benchmark": torch_chunk(name, batch_size,
                                                                        channels_last=True)}
    if full:
      bench_runners["torch_cl_amp_bf16_cudnn_benchmark"] = torch_chunk(
          name, batch_size, channels_last=True, amp_bf16=True)
    times.update(interleave_chunks(bench_runners, rounds, chunk))
    torch.backends.cudnn.benchmark = False
  ms = {k: med_ms(v) for k, v in times.items()}
  enqueue_ms = {k: med_ms(r.enqueue[1:]) for k, r in runners.items()
                if isinstance(r, JaxChunk)}  # [1:]: without the warm-up round

  def ratio(a, b):
    return ms[a] / ms[b] if a in ms and b in ms else None

  result = {
      "model": {"resnet": "resnet32", "vgg": "vgg19_bn"}[name], "batch": batch_size,
      "chunk": chunk, "rounds": rounds, "step_ms": ms, "enqueue_ms": enqueue_ms,
      "step_ms_all": {k: [round(t * 1e3, 3) for t in v] for k, v in times.items()},
      "images_per_s": {k: batch_size / v * 1e3 for k, v in ms.items()},
      "compile_s": compile_s, "memory": memory,
      # speed-up of JAX over PyTorch eager: > 1 means JAX is faster
      "speedup_jax_plain_over": {k: ratio(k, "plain") for k in ms if k.startswith("torch")},
      "speedup_jax_bf16_over": {k: ratio(k, "plain_bf16") for k in ms
                                if k.startswith("torch") and "plain_bf16" in ms},
  }
  if full:
    per_round = {k: [a / b for a, b in zip(times[k], times["plain"])] for k in ("art", "mask")}
    result["overhead"] = {
        f"{k}_over_plain": {"ratio_of_medians": ratio(k, "plain"),
                            "median_of_round_ratios": float(np.median(v)),
                            "round_ratios": [round(x, 4) for x in v]}
        for k, v in per_round.items()}
    current = {k: runners[k] for k in txs}  # the chunk runners hold the live (donated) states
    grads = bt.batch_grads(model, current, batch)
    result["update_only"] = bt.time_updates(txs, current, rounds=30, grads=grads)
    upd = result["update_only"]["update_ms"]
    result["overhead"]["step_ratio_from_update"] = {
        k: 1 + (upd[k] - upd["plain"]) / ms["plain"] for k in ("art", "mask")}
    if eval_batches:
      result["pruned_eval"] = pruned_eval(model, runners["art"].state, ms["plain"], eval_batch,
                                          eval_batches)
  log(json.dumps({k: result[k] for k in ("model", "batch", "step_ms", "enqueue_ms",
                                         "speedup_jax_plain_over")}))
  if full:
    log(json.dumps(result["overhead"]))
  jax.clear_caches()  # compiled steps of this model and batch are not needed again
  return result


def pruned_eval(model, state, plain_ms, eval_batch, eval_batches):
  """Mask + apply + eval forward over ``eval_batches`` batches (50,000 images at 100 × 500)."""
  import jax
  import jax.numpy as jnp
  import hypersparse_jax as hs
  mask_fn = jax.jit(lambda p: hs.apply_mask(p, hs.magnitude_mask(p, bt.SPARSITY)))
  eval_fn = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False), -1))
  params, bstats = state["params"], state["batch_stats"]
  ex = jnp.asarray(np.random.default_rng(1).standard_normal((eval_batch, 32, 32, 3), np.float32))
  pruned = jax.block_until_ready(mask_fn(params))
  jax.block_until_ready(eval_fn({"params": pruned, "batch_stats": bstats}, ex))
  totals, masks = [], []
  for _ in range(3):
    start = time.perf_counter()
    pruned = jax.block_until_ready(mask_fn(params))
    mid = time.perf_counter()
    outs = [eval_fn({"params": pruned, "batch_stats": bstats}, ex) for _ in range(eval_batches)]
    jax.block_until_ready(outs)
    totals.append(time.perf_counter() - start)
    masks.append(mid - start)
  epoch_s = float(np.median(totals))
  train_epoch_s = bt.STEPS_PER_EPOCH * plain_ms / 1e3
  return {"eval_batch": eval_batch, "eval_batches": eval_batches,
          "mask_and_apply_ms": med_ms(masks), "eval_epoch_s": epoch_s,
          "train_epoch_s_from_plain_step": train_epoch_s,
          "fraction_of_train_epoch": epoch_s / train_epoch_s}


# ----------------------------------------------------------------------------------------------
# hypersparse-train epochs on CIFAR-shaped in-memory data
# ----------------------------------------------------------------------------------------------


def bench_trainer(num_train, num_test, warmup_epochs=2, art_epochs=2, ft_epochs=2):
  from hypersparse_jax import config, data, train
  from hypersparse_jax.data import cifar
  rng = np.random.default_rng(0)
  ds = data.Dataset(
      "cifar10", rng.integers(0, 256, (num_train, 32, 32, 3), dtype=np.uint8),
      rng.integers(0, 10, num_train).astype(np.int32),
      rng.integers(0, 256, (num_test, 32, 32, 3), dtype=np.uint8),
      rng.integers(0, 10, num_test).astype(np.int32), num_classes=10,
      mean=cifar._CIFAR10_MEAN, std=cifar._CIFAR10_STD, crop_padding=4,
      flip=True)
  saved = data.load_dataset
  data.load_dataset = lambda *a, **k: ds
  values = dict(config.REFERENCE_DEFAULTS, warmup_epochs=warmup_epochs,
                max_art_epochs=art_epochs, epochs=ft_epochs, lr_steps=(ft_epochs,))
  cfg = config.TrainConfig(dataset="cifar10", **values)
  log(f"== hypersparse-train Trainer: {num_train} train / {num_test} test images, {cfg}")
  lines = []
  try:
    with tempfile.TemporaryDirectory() as outdir:
      trainer = train.Trainer(cfg, outdir, progress=False, log=lambda s: (lines.append(s),
                                                                           log("  " + s)))
      inner = trainer._train_epoch
      train_s = []

      def timed(*a, **k):
        start = time.perf_counter()
        out = inner(*a, **k)
        train_s.append(time.perf_counter() - start)
        return out

      trainer._train_epoch = timed
      start = time.perf_counter()
      summary = trainer.run()
      total = time.perf_counter() - start
      with open(os.path.join(outdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
  finally:
    data.load_dataset = saved
  epochs = [{"epoch": r["epoch"], "phase": r["phase"], "epoch_s": r["time"],
             "train_epoch_s": s} for r, s in zip(records, train_s)]
  steps = trainer.steps_per_epoch
  steady = {}
  for phase in ("warmup", "art", "finetune"):
    rows = [e for e in epochs if e["phase"] == phase][1:]  # the first includes compilation
    if rows:
      steady[phase] = {"epoch_s": rows[-1]["epoch_s"], "train_epoch_s": rows[-1]["train_epoch_s"],
                       "train_ms_per_step": rows[-1]["train_epoch_s"] / steps * 1e3,
                       "images_per_s": num_train / rows[-1]["train_epoch_s"]}
  return {"num_train": num_train, "num_test": num_test, "steps_per_epoch": steps,
          "config": {k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in vars(cfg).items()},
          "epochs": epochs, "steady_state": steady, "run_total_s": total,
          "summary": {k: summary.get(k) for k in ("art_epochs", "stop_reason",
                                                   "sparsity_achieved")}}


# ----------------------------------------------------------------------------------------------


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="*", choices=["resnet", "vgg"], default=["resnet", "vgg"],
                      help="none: skip the step benchmarks")
  parser.add_argument("--batches", nargs="+", type=int, default=[64, 128, 256],
                      help="batch sizes; the first gets every variant, the others plain + torch")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--chunk", type=int, default=20, help="steps per timed chunk")
  parser.add_argument("--eval-batch", type=int, default=500)
  parser.add_argument("--eval-batches", type=int, default=100, help="0: skip the pruned eval")
  parser.add_argument("--no-bf16", dest="bf16", action="store_false")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--trainer-images", type=int, default=50_000,
                      help="training images of the hypersparse-train epoch (0: skip)")
  parser.add_argument("--trainer-test-images", type=int, default=10_000)
  parser.add_argument("--selection-rounds", type=int, default=0,
                      help="> 0: time the exact selection alone (radix widths, bracket, sort)")
  parser.add_argument("--forms", nargs="*", choices=sorted(FORMS), default=[],
                      help="only time these forms of art() against plain (first batch size)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  from hypersparse_jax import host_memory
  retained = host_memory.retain_freed_memory(warn=False)  # as hypersparse-train
  start = time.perf_counter()
  out = {"benchmark": "gpu", "date": time.strftime("%Y-%m-%d"),
         "machine": {**gpu_info(), "retain_freed_memory": retained},
         "conv_cpu_specialisation_active": conv_specialised(),
         "config": {"batches": args.batches, "rounds": args.rounds, "chunk": args.chunk,
                    "sparsity": bt.SPARSITY, "steps_per_epoch": bt.STEPS_PER_EPOCH,
                    "optimizer": "add_decayed_weights(1e-4) + sgd(0.1, momentum=0.9)",
                    "art": f"art({bt.SPARSITY}, steps_per_epoch={bt.STEPS_PER_EPOCH}, "
                           "warmup_epochs=0)", "donate_state": True},
         "results": []}
  log(json.dumps(out["machine"]))
  log(f"conv CPU specialisation active: {out['conv_cpu_specialisation_active']}")
  if args.selection_rounds:
    out["selection"] = bench_selection(args.selection_rounds, args.chunk)
    if args.out:
      _write(out, args.out)
  if args.forms:
    out["forms"] = []
    for name in args.models:
      out["forms"].append(bench_forms(name, args.batches[0], args.forms, rounds=args.rounds,
                                      chunk=args.chunk))
      if args.out:
        _write(out, args.out)
    args.models = []
  for name in args.models:
    for i, b in enumerate(args.batches):
      out["results"].append(bench_steps(
          name, b, full=i == 0, rounds=args.rounds, chunk=args.chunk,
          with_torch=not args.no_torch, eval_batch=args.eval_batch,
          eval_batches=args.eval_batches, with_bf16=args.bf16))
      if args.out:  # partial results survive a timeout
        _write(out, args.out)
  if args.trainer_images:
    out["trainer"] = bench_trainer(args.trainer_images, args.trainer_test_images)
  out["wall_s"] = time.perf_counter() - start
  report.emit(out, args.out)


def _write(out, path):
  with open(path, "w") as f:
    f.write(json.dumps(dict(out, partial=True), indent=2) + "\n")


if __name__ == "__main__":
  main()
