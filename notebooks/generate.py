"""Writes the notebooks of this folder (outputs stripped): ``python notebooks/generate.py``.

Each notebook runs in well under a minute on a CPU; ``tests/test_notebooks.py`` executes them.
"""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

# A user's own small Flax model and a plain training loop around hypersparse.art: shared by the
# notebooks (the quickstart shows it step by step).
SETUP = '''\
import jax, jax.numpy as jnp, numpy as np, optax, flax.linen as nn
import matplotlib.pyplot as plt
import hypersparse_jax as hypersparse
from hypersparse_jax.data import load_dataset

data = load_dataset("digits")  # scikit-learn's bundled 8x8 digits, no download
def prep(images):
    x = (images.astype(np.float32) / 255.0 - np.float32(data.mean[0])) / np.float32(data.std[0])
    return jnp.asarray(x)
x_train, y_train = prep(data.train_images), jnp.asarray(data.train_labels)
x_test, y_test = prep(data.test_images), jnp.asarray(data.test_labels)
BATCH = 64
STEPS = -(-len(y_train) // BATCH)  # steps per epoch
'''

MODEL = '''\
class TinyMLP(nn.Module):  # your own model: any Flax module works
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(96)(x))
        x = nn.relu(nn.Dense(48)(x))
        return nn.Dense(10)(x)
'''

LOOP = '''\
def make_step(model, tx):
    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    return step

def accuracy(model, params, x, y):
    return float(jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y))

def train_epoch(step, params, opt_state, epoch):
    order = np.random.default_rng(epoch).permutation(len(y_train))
    for i in range(STEPS):
        idx = order[i * BATCH:(i + 1) * BATCH]
        params, opt_state = step(params, opt_state, x_train[idx], y_train[idx])
    return params, opt_state

def run_art(model, params, sparsity, *, warmup=8, max_art=40, finetune=10, penalty="hypersparse",
            on_epoch=None):
    """Warm-up -> ART (stop rule of the controller) -> masked fine-tuning. Returns params, mask."""
    tx = optax.chain(
        hypersparse.art(sparsity, lambda_init=2e-4, eta=1.25, steps_per_epoch=STEPS,
                        warmup_epochs=warmup, penalty=penalty),
        optax.add_decayed_weights(1e-4),
        optax.sgd(0.05, momentum=0.9))
    step, opt_state = make_step(model, tx), tx.init(params)
    controller = hypersparse.ARTController(window=1, max_epochs=max_art)
    for epoch in range(warmup + max_art):
        params, opt_state = train_epoch(step, params, opt_state, epoch)
        if on_epoch is not None:
            on_epoch(epoch, params)
        if epoch < warmup:
            continue
        mask = hypersparse.magnitude_mask(params, sparsity)
        pruned = accuracy(model, hypersparse.apply_mask(params, mask), x_train, y_train)
        decision = controller.update(epoch, pruned, accuracy(model, params, x_train, y_train),
                                     payload=params)
        if decision.stop:
            print(f"ART stopped after {controller.epochs_seen} epochs ({decision.reason}); "
                  f"best pruned model from epoch {decision.best_epoch}")
            break
    params = controller.best.payload
    mask = hypersparse.magnitude_mask(params, sparsity)
    params = hypersparse.apply_mask(params, mask)
    ft = optax.chain(hypersparse.fixed_mask(mask), optax.add_decayed_weights(1e-4),
                     optax.sgd(0.05, momentum=0.9))
    step, opt_state = make_step(model, ft), ft.init(params)
    for epoch in range(finetune):
        params, opt_state = train_epoch(step, params, opt_state, 1000 + epoch)
    return params, mask
'''


def quickstart():
  return new_notebook(cells=[
      new_markdown_cell(
          "# Quickstart: HyperSparse + ART on your own Flax model\n\n"
          "`hypersparse.art(...)` is an optax transformation: put it first in your chain. "
          "It trains dense for `warmup_epochs`, then adds the HyperSparse gradient with an "
          "exponentially growing λ. After each regularisation epoch, prune a copy and hand its "
          "training accuracy to `ARTController`, which decides when to stop and which pruned "
          "model to keep; then fine-tune with `fixed_mask`."),
      new_code_cell(SETUP),
      new_code_cell(MODEL + "\nmodel = TinyMLP()\n"
                    "params = model.init(jax.random.PRNGKey(0), x_train[:1])['params']\n"
                    "print(jax.tree.map(jnp.shape, params))"),
      new_markdown_cell("The whole recipe (warm-up → ART → masked fine-tuning) in a plain loop:"),
      new_code_cell(LOOP),
      new_code_cell(
          "sparse_params, mask = run_art(model, params, sparsity=0.95)\n"
          "print(hypersparse.sparsity_report(sparse_params))\n"
          "print(f\"test accuracy at {hypersparse.sparsity(sparse_params):.2%} sparsity: \"\n"
          "      f\"{accuracy(model, sparse_params, x_test, y_test):.4f}\")"),
      new_code_cell(
          "report = hypersparse.sparsity_report(sparse_params)\n"
          "names = [l.name for l in report.layers]\n"
          "plt.figure(figsize=(5, 3))\n"
          "plt.bar(names, [1 - l.sparsity for l in report.layers])\n"
          "plt.ylabel('kept fraction'); plt.title('kept weights per layer (95 % global)')\n"
          "plt.tight_layout(); plt.show()"),
  ])


def gradient():
  return new_notebook(cells=[
      new_markdown_cell(
          "# The HyperSparse gradient along the sorted weight vector\n\n"
          "The paper's central figure: at κ = 90 %, the HyperSparse gradient magnitude "
          "`|g_i| = s·sech²(s|w_i|)·A/T` is ≈ 1 (like L1) for weights far below the pruning "
          "threshold and ≈ 0 above it, so the large weights keep exploring while the small "
          "ones are pushed to zero. Snapshots come from an actual short ART run on digits."),
      new_code_cell(SETUP),
      new_code_cell(MODEL + "\n" + LOOP),
      new_code_cell(
          "KAPPA = 0.9\n"
          "model = TinyMLP()\n"
          "params = model.init(jax.random.PRNGKey(0), x_train[:1])['params']\n"
          "snapshots = {}\n"
          "def keep(epoch, p):\n"
          "    snapshots[epoch] = jax.tree.map(np.asarray, p)\n"
          "final, mask = run_art(model, params, KAPPA, warmup=5, max_art=25, finetune=2,\n"
          "                      on_epoch=keep)\n"
          "print('snapshots of epochs', sorted(snapshots))"),
      new_code_cell(
          "def flat(tree):\n"
          "    leaves = [x for _, x in hypersparse.masking.prunable_leaves(tree)]\n"
          "    return np.concatenate([np.ravel(np.asarray(x)) for x in leaves])\n"
          "epochs = sorted(snapshots)\n"
          "picked = [epochs[0], epochs[len(epochs) // 3], epochs[2 * len(epochs) // 3], epochs[-1]]\n"
          "fig, axes = plt.subplots(1, len(picked), figsize=(15, 3.4), sharey=True)\n"
          "for ax, e in zip(axes, picked):\n"
          "    p = snapshots[e]\n"
          "    w = flat(p); order = np.argsort(np.abs(w))\n"
          "    g_hs = np.abs(flat(hypersparse.hypersparse_grad(p, KAPPA)))[order]\n"
          "    g_l1 = np.abs(flat(hypersparse.l1_grad(p)))[order]\n"
          "    ax.plot(g_hs, lw=1, label='HyperSparse |g|')\n"
          "    ax.plot(g_l1, lw=1, ls='--', label='L1 |g|')\n"
          "    ax.axvline(int(KAPPA * len(w)), color='r', lw=1, label='pruning boundary')\n"
          "    ax.set_title(f'epoch {e}'); ax.set_xlabel('index in sorted |w|')\n"
          "axes[0].set_ylabel('gradient magnitude'); axes[0].legend(fontsize=8)\n"
          "plt.tight_layout(); plt.show()"),
      new_code_cell(
          "plt.figure(figsize=(6, 4))\n"
          "cmap = plt.get_cmap('viridis')\n"
          "for i, e in enumerate(epochs):\n"
          "    a = np.sort(np.abs(flat(snapshots[e])))\n"
          "    plt.plot(a, color=cmap(i / max(1, len(epochs) - 1)), lw=1)\n"
          "plt.axvline(int(KAPPA * len(a)), color='r', lw=1)\n"
          "plt.yscale('log'); plt.xlabel('index in sorted |w|'); plt.ylabel('|w|')\n"
          "plt.title('sorted magnitudes over epochs (dark: early, light: late)')\n"
          "plt.tight_layout(); plt.show()"),
  ])


def patterns():
  return new_notebook(cells=[
      new_markdown_cell(
          "# Sparsity patterns after ART at 98 % on digits\n\n"
          "Per-layer kept fraction (the threshold is global, so layers end up with very "
          "different densities), which of the 8×8 input pixels keep weights in an MLP, and "
          "which filters of a small CNN keep weights."),
      new_code_cell(SETUP),
      new_code_cell(MODEL + "\n" + LOOP + '''
class TinyCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))
'''),
      new_code_cell(
          "KAPPA = 0.98\n"
          "mlp = TinyMLP()\n"
          "mlp_params, mlp_mask = run_art(mlp, mlp.init(jax.random.PRNGKey(0), x_train[:1])['params'],\n"
          "                               KAPPA, warmup=6, max_art=30, finetune=6)\n"
          "print(hypersparse.sparsity_report(mlp_params, mlp_mask))\n"
          "print('MLP test accuracy', accuracy(mlp, mlp_params, x_test, y_test))\n"
          "cnn = TinyCNN()\n"
          "cnn_params, cnn_mask = run_art(cnn, cnn.init(jax.random.PRNGKey(0), x_train[:1])['params'],\n"
          "                               KAPPA, warmup=6, max_art=30, finetune=6)\n"
          "print(hypersparse.sparsity_report(cnn_params, cnn_mask))\n"
          "print('CNN test accuracy', accuracy(cnn, cnn_params, x_test, y_test))"),
      new_code_cell(
          "fig, axes = plt.subplots(1, 2, figsize=(10, 3))\n"
          "for ax, (name, p, m) in zip(axes, [('MLP', mlp_params, mlp_mask), ('CNN', cnn_params, cnn_mask)]):\n"
          "    rep = hypersparse.sparsity_report(p, m)\n"
          "    ax.bar([l.name for l in rep.layers], [l.kept / l.total for l in rep.layers])\n"
          "    ax.set_title(f'{name}: kept fraction per layer (global {1 - rep.sparsity:.1%})')\n"
          "    ax.tick_params(axis='x', rotation=30)\n"
          "plt.tight_layout(); plt.show()"),
      new_code_cell(
          "first = np.asarray(mlp_mask['Dense_0']['kernel'])  # (64 pixels, 96 units)\n"
          "w_first = np.abs(np.asarray(mlp_params['Dense_0']['kernel']))\n"
          "fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))\n"
          "im = axes[0].imshow(first.sum(1).reshape(8, 8), cmap='magma')\n"
          "axes[0].set_title('kept weights per input pixel'); fig.colorbar(im, ax=axes[0])\n"
          "im = axes[1].imshow(w_first.sum(1).reshape(8, 8), cmap='magma')\n"
          "axes[1].set_title('sum |w| per input pixel'); fig.colorbar(im, ax=axes[1])\n"
          "axes[2].imshow(data.train_images[:, :, :, 0].mean(0), cmap='gray')\n"
          "axes[2].set_title('mean training digit')\n"
          "for ax in axes: ax.set_xticks([]); ax.set_yticks([])\n"
          "plt.tight_layout(); plt.show()"),
      new_code_cell(
          "fig, axes = plt.subplots(1, 2, figsize=(11, 3))\n"
          "for ax, layer in zip(axes, ['Conv_0', 'Conv_1']):\n"
          "    m = np.asarray(cnn_mask[layer]['kernel'])  # (3, 3, in, out)\n"
          "    ax.bar(np.arange(m.shape[-1]), m.reshape(-1, m.shape[-1]).sum(0))\n"
          "    ax.set_title(f'{layer}: kept weights per filter'); ax.set_xlabel('filter')\n"
          "plt.tight_layout(); plt.show()\n"
          "print('filters with no weight left:',\n"
          "      {l: int((np.asarray(cnn_mask[l]['kernel']).reshape(-1, np.shape(cnn_mask[l]['kernel'])[-1]).sum(0) == 0).sum())\n"
          "       for l in ['Conv_0', 'Conv_1']})"),
  ])


CHANNELS_TRAIN = """\
from hypersparse_jax.models import DigitsCNN

model = DigitsCNN()                       # conv 32 -> BatchNorm -> conv 64 -> BatchNorm -> fc 10
variables = model.init(jax.random.PRNGKey(0), x_train[:1], train=False)

def make_step(tx):
    def loss_fn(params, stats, x, y):
        logits, new = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                  mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, new["batch_stats"]
    @jax.jit
    def step(params, stats, opt_state, x, y):
        grads, stats = jax.grad(loss_fn, has_aux=True)(params, stats, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state
    return step

def accuracy(params, stats, x, y, m=model):
    logits = m.apply({"params": params, "batch_stats": stats}, x, train=False)
    return float(jnp.mean(jnp.argmax(logits, -1) == y))

def train_epoch(step, params, stats, opt_state, epoch):
    order = np.random.default_rng(epoch).permutation(len(y_train))
    for i in range(STEPS):
        idx = order[i * BATCH:(i + 1) * BATCH]
        params, stats, opt_state = step(params, stats, opt_state, x_train[idx], y_train[idx])
    return params, stats, opt_state

KAPPA, WARMUP, MAX_ART, FINETUNE = 0.5, 6, 40, 6   # remove half of the 96 prunable channels
tx = optax.chain(
    hypersparse.art(KAPPA, lambda_init=2e-4, eta=1.25, steps_per_epoch=STEPS,
                    warmup_epochs=WARMUP, structure="channel"),   # group HyperSparse
    optax.add_decayed_weights(1e-4), optax.sgd(0.05, momentum=0.9))
params, stats = variables["params"], variables["batch_stats"]
step, opt_state = make_step(tx), tx.init(params)
controller = hypersparse.ARTController(window=1, max_epochs=MAX_ART)
history = []
for epoch in range(WARMUP + MAX_ART):
    params, stats, opt_state = train_epoch(step, params, stats, opt_state, epoch)
    if epoch < WARMUP:
        continue
    mask = hypersparse.channel_mask(params, KAPPA)    # the channel-pruned copy
    pruned = accuracy(hypersparse.apply_mask(params, mask), stats, x_train, y_train)
    dense = accuracy(params, stats, x_train, y_train)
    history.append((epoch, dense, pruned))
    decision = controller.update(epoch, pruned, dense, payload=(params, stats))
    if decision.stop:
        print(f"ART stopped after {controller.epochs_seen} epochs ({decision.reason})")
        break
art_params, stats = controller.best.payload
mask = hypersparse.channel_mask(art_params, KAPPA)
params = hypersparse.apply_mask(art_params, mask)
ft = optax.chain(hypersparse.fixed_mask(mask), optax.add_decayed_weights(1e-4),
                 optax.sgd(0.05, momentum=0.9))
step, opt_state = make_step(ft), ft.init(params)
for epoch in range(FINETUNE):
    params, stats, opt_state = train_epoch(step, params, stats, opt_state, 1000 + epoch)
print(f"test accuracy of the channel-pruned model: {accuracy(params, stats, x_test, y_test):.4f}")
"""

CHANNELS_SLIM = """\
small_model, small = hypersparse.slim(model, {"params": params, "batch_stats": stats}, mask)
print("dense widths", model.widths, "-> slimmed", small_model.widths)
n_dense = sum(x.size for x in jax.tree.leaves(variables["params"]))
n_small = sum(x.size for x in jax.tree.leaves(small["params"]))
print(f"parameters {n_dense:,} -> {n_small:,}")

# the smaller model computes the masked model's logits (up to float rounding)
masked_logits = model.apply({"params": params, "batch_stats": stats}, x_test, train=False)
small_logits = small_model.apply(small, x_test, train=False)
print("largest logit difference", float(jnp.max(jnp.abs(masked_logits - small_logits))))
print(f"test accuracy: masked {accuracy(params, stats, x_test, y_test):.4f}, "
      f"slimmed {accuracy(small['params'], small['batch_stats'], x_test, y_test, small_model):.4f}")

# forward-pass time at batch 256, dense against slimmed: median of interleaved repeats
import time
x256 = jnp.asarray(np.resize(np.asarray(x_test), (256,) + x_test.shape[1:]))
fwd = {name: jax.jit(lambda v, x, m=m: m.apply(v, x, train=False))
       for name, m in (("dense", model), ("slimmed", small_model))}
args = {"dense": {"params": params, "batch_stats": stats}, "slimmed": small}
times = {name: [] for name in fwd}
for name in fwd:
    fwd[name](args[name], x256).block_until_ready()          # compile
for _ in range(30):
    for name in fwd:
        t0 = time.perf_counter(); fwd[name](args[name], x256).block_until_ready()
        times[name].append(time.perf_counter() - t0)
med = {name: float(np.median(t)) for name, t in times.items()}
print({k: f"{v * 1e3:.3f} ms" for k, v in med.items()},
      f"speed-up {med['dense'] / med['slimmed']:.2f}x on this machine")
"""


def channels_notebook():
  return new_notebook(cells=[
      new_markdown_cell(
          "# Channel pruning: a physically smaller model\n\n"
          "Unstructured zeros do not make a model faster in XLA. Removing whole channels can: "
          "here ART with group HyperSparse (`hypersparse.art(..., structure='channel')`) removes "
          "half of the digits CNN's 96 convolution channels, `hypersparse.slim` builds the smaller "
          "dense model, and we check that it computes the masked model's logits and time it "
          "against the dense one. A channel's magnitude is its BatchNorm scale |γ| (divided by "
          "its layer's mean), so group HyperSparse pushes the scales of the channels it will "
          "remove down.\n\n"
          "This CNN is tiny (8×8 inputs, a forward pass of 256 images takes about a millisecond, "
          "mostly fixed costs), so its slimmed form is not expected to run faster here: the "
          "speed-ups measured on LeNet-5 and VGG-11 are in the README "
          "(`benchmarks/bench_slim_speed.py`)."),
      new_code_cell(SETUP),
      new_code_cell(CHANNELS_TRAIN),
      new_code_cell(
          "fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))\n"
          "e, d, p = zip(*history)\n"
          "axes[0].plot(e, d, label='dense (train)'); axes[0].plot(e, p, label='channel-pruned copy (train)')\n"
          "axes[0].set_xlabel('epoch'); axes[0].set_ylabel('accuracy'); axes[0].legend()\n"
          "axes[0].set_title('ART: the pruned copy catches up')\n"
          "offset = 0\n"
          "for layer in ('bn1', 'bn2'):\n"
          "    g = np.abs(np.asarray(art_params[layer]['scale']))\n"
          "    kept = np.asarray(mask[layer]['scale'])\n"
          "    xs = np.arange(offset, offset + g.size)\n"
          "    axes[1].bar(xs[kept], g[kept], color='tab:blue', label='kept' if layer == 'bn1' else None)\n"
          "    axes[1].bar(xs[~kept], g[~kept], color='tab:red', label='removed' if layer == 'bn1' else None)\n"
          "    offset += g.size + 4\n"
          "axes[1].set_title('|BatchNorm scale| per channel after ART (conv1 | conv2)')\n"
          "axes[1].set_xlabel('channel'); axes[1].legend()\n"
          "plt.tight_layout(); plt.show()"),
      new_code_cell(CHANNELS_SLIM),
  ])


TRANSFORMER_SETUP = '''\
import jax, jax.numpy as jnp, numpy as np, optax
import matplotlib.pyplot as plt
import hypersparse_jax as hypersparse
from hypersparse_jax.data import pysource
from hypersparse_jax.tasks import language_model
from hypersparse_jax.models import TransformerLM

CONTEXT, BATCH, STEPS = 64, 16, 40          # short settings: this runs in about a minute
data = pysource.load_pysource(context=CONTEXT, max_eval_windows=128)  # this Python's stdlib *.py
print({k: (v["files"], v["bytes"]) for k, v in data.info["splits"].items()},
      "Python", data.info["python_version"])
model = TransformerLM(context=CONTEXT, layers=2, d_model=64, heads=4)
params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, CONTEXT), jnp.int32))["params"]
eval_step = language_model.make_eval_step(model)
test_windows, pruned_windows = data.eval_windows("test"), data.pruned_eval_windows()
'''

TRANSFORMER_TRAIN = '''\
def train_epochs(step, state, epochs, first_epoch):
    correct = count = 0.0
    for epoch in range(first_epoch, first_epoch + epochs):
        for batch in pysource.train_batches(data, BATCH, STEPS, seed=0, epoch=epoch):
            state, m = step(state, batch, None)
            correct, count = correct + float(m["correct"]), count + float(m["count"])
    return state, correct / count  # running next-byte accuracy (the dense side of the stop rule)

SPARSITY, WARMUP, MAX_ART, FINETUNE = 0.9, 4, 6, 3
tx = optax.chain(
    hypersparse.art(SPARSITY, lambda_init=2e-3, eta=2.0, steps_per_epoch=STEPS,
                    warmup_epochs=WARMUP),                       # art() first in the chain
    optax.adamw(3e-3, b1=0.9, b2=0.99, weight_decay=0.01))
state = {"params": params, "batch_stats": {}, "opt_state": tx.init(params)}
step = language_model.make_train_step(model, tx)
state, _ = train_epochs(step, state, WARMUP, 0)
dense_params = jax.tree.map(jnp.copy, state["params"])
dense = language_model.evaluate(eval_step, dense_params, test_windows, 128)
print(f"dense after warm-up: {dense['bits_per_byte']:.3f} bits/byte")

controller = hypersparse.ARTController(window=1, max_epochs=MAX_ART)
for epoch in range(WARMUP, WARMUP + MAX_ART):
    state, dense_acc = train_epochs(step, state, 1, epoch)
    mask = hypersparse.magnitude_mask(state["params"], SPARSITY)
    pruned = language_model.evaluate(eval_step, hypersparse.apply_mask(state["params"], mask),
                           pruned_windows, 128)["accuracy"]
    # a copy: the train step donates (reuses) the buffers of the state it is given
    decision = controller.update(epoch, pruned, dense_acc,
                                 payload=jax.tree.map(jnp.copy, state["params"]))
    print(f"epoch {epoch}: dense {dense_acc:.3f} pruned {pruned:.3f}")
    if decision.stop:
        print(decision.reason, "- keeping epoch", decision.best_epoch)
        break

mask = hypersparse.magnitude_mask(controller.best.payload, SPARSITY)
sparse = hypersparse.apply_mask(controller.best.payload, mask)
ft = optax.chain(hypersparse.fixed_mask(mask), optax.adamw(1e-3, b1=0.9, b2=0.99, weight_decay=0.01))
state, _ = train_epochs(language_model.make_train_step(model, ft),
                        {"params": sparse, "batch_stats": {}, "opt_state": ft.init(sparse)},
                        FINETUNE, 100)
sparse_params = state["params"]
result = language_model.evaluate(eval_step, sparse_params, test_windows, 128)
print(f"pruned to {hypersparse.sparsity(sparse_params):.1%}: {result['bits_per_byte']:.3f} bits/byte "
      f"(dense {dense['bits_per_byte']:.3f})")
'''


def transformer():
  return new_notebook(cells=[
      new_markdown_cell(
          "# ART + HyperSparse on a transformer language model\n\n"
          "A byte-level decoder-only transformer (`hypersparse_jax.models.TransformerLM`) "
          "trained on the Python standard library's own source code (`--dataset pysource` of "
          "`hypersparse-train`; no download), pruned to 90 % with ART + HyperSparse. Prunable "
          "are the attention query/key/value/output and MLP kernels, which is exactly what the "
          "library's default `where` selects (embeddings, LayerNorm and biases are not). "
          "The settings here are short; the CLI preset trains longer."),
      new_code_cell(TRANSFORMER_SETUP),
      new_markdown_cell("Warm-up (dense), ART until the controller's stop rule (pruned vs dense "
                        "next-byte accuracy; the pruned copy on fixed training windows), then "
                        "masked fine-tuning:"),
      new_code_cell(TRANSFORMER_TRAIN),
      new_markdown_cell("Where did the sparsity go? Attention versus MLP kernels:"),
      new_code_cell(
          "report = hypersparse.sparsity_report(sparse_params)\n"
          "print(report)\n"
          "kind = lambda name: 'attention' if '/attention/' in name else 'MLP'\n"
          "totals = {}\n"
          "for layer in report.layers:\n"
          "    kept, total = totals.get(kind(layer.name), (0, 0))\n"
          "    totals[kind(layer.name)] = (kept + layer.kept, total + layer.total)\n"
          "fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))\n"
          "axes[0].bar(list(totals), [k / t for k, t in totals.values()], color=['C0', 'C1'])\n"
          "axes[0].set_ylabel('kept fraction'); axes[0].set_title('kept weights by layer type')\n"
          "names = [l.name.replace('/kernel', '') for l in report.layers]\n"
          "axes[1].bar(names, [1 - l.sparsity for l in report.layers],\n"
          "            color=['C0' if kind(l.name) == 'attention' else 'C1' for l in report.layers])\n"
          "axes[1].tick_params(axis='x', rotation=70); axes[1].set_title('kept fraction per layer')\n"
          "plt.tight_layout(); plt.show()\n"
          "print({k: f'{1 - kept / total:.1%} sparse' for k, (kept, total) in totals.items()})"),
      new_markdown_cell("A few lines of code sampled from the dense (end of warm-up) and the "
                        "pruned model (temperature 0.7, the same random draws). After these "
                        "few hundred steps (about 3.2–3.7 bits per byte) they look like Python "
                        "only in their spacing, keywords and punctuation; expect gibberish:"),
      new_code_cell(
          "@jax.jit\n"
          "def next_logits(params, window):\n"
          "    return model.apply({'params': params}, window[None])[0]\n"
          "\n"
          "def sample(params, prompt=b'def ', length=160, temperature=0.7, seed=0):\n"
          "    out = list(prompt)\n"
          "    key = jax.random.PRNGKey(seed)\n"
          "    for _ in range(length):\n"
          "        recent = out[-CONTEXT:]\n"
          "        window = np.zeros(CONTEXT, np.int32); window[:len(recent)] = recent\n"
          "        logits = next_logits(params, jnp.asarray(window))[len(recent) - 1]\n"
          "        key, sub = jax.random.split(key)\n"
          "        out.append(int(jax.random.categorical(sub, logits / temperature)))\n"
          "    return bytes(out).decode('utf-8', errors='replace')\n"
          "\n"
          "for name, p in (('dense', dense_params), ('pruned 90 %', sparse_params)):\n"
          "    print(f'--- {name} ---'); print(sample(p))"),
  ])


def main():
  for name, nb in (("quickstart", quickstart()), ("hypersparse_gradient", gradient()),
                   ("sparsity_patterns", patterns()), ("transformer", transformer()),
                   ("channel_pruning", channels_notebook())):
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.validate(nb)
    nbformat.write(nb, os.path.join(HERE, f"{name}.ipynb"))


if __name__ == "__main__":
  main()
