"""Tests for hypersparse_jax.transform: lambda_schedule, art(), fixed_mask, ARTState.

Every value is compared with an independent computation: hand-computed λ, a float64 NumPy
sort-based HyperSparse gradient (DESIGN §1), NumPy SGD-momentum-weight-decay.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from hypersparse_jax import masking
from hypersparse_jax.transform import ARTState, art, fixed_mask, lambda_schedule

SCALE = 0.6585  # atanh(1/sqrt(3)), DESIGN §1


# ----- independent NumPy references ---------------------------------------------------------------


def _params(seed=0):
    """A small Flax-like params dict: dense and conv kernels (prunable) and biases (not)."""
    rng = np.random.default_rng(seed)
    return {
        "Conv_0": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
                   "bias": rng.normal(size=(4,)).astype(np.float32)},
        "Dense_0": {"kernel": rng.normal(size=(4, 6)).astype(np.float32),
                    "bias": rng.normal(size=(6,)).astype(np.float32)},
        "Dense_1": {"kernel": (0.3 * rng.normal(size=(6, 3))).astype(np.float32),
                    "bias": rng.normal(size=(3,)).astype(np.float32)},
    }


def _grads_like(params, seed):
    rng = np.random.default_rng(seed)
    return {k: {n: rng.normal(size=v.shape).astype(np.float32) for n, v in layer.items()}
            for k, layer in params.items()}


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _kernel_names(params):
    return [(layer, "kernel") for layer in sorted(params)]


def np_threshold(params, kappa):
    """``sort(|w|)[floor(κ·n)]`` over all kernels (float64 on the float32 values)."""
    a = np.sort(np.concatenate([np.abs(np.asarray(params[l][n], np.float64)).ravel()
                                for l, n in _kernel_names(params)]))
    return a[min(int(math.floor(kappa * a.size)), a.size - 1)]


def np_hypersparse_grad(params, kappa):
    """DESIGN §1: g_i = sign(w_i)·s·sech²(s·a_i)·A/T on kernels, 0 on biases (float64)."""
    t = np_threshold(params, kappa)
    s = SCALE / t
    kernels = [np.asarray(params[l][n], np.float64) for l, n in _kernel_names(params)]
    total_a = sum(np.abs(k).sum() for k in kernels)
    total_t = sum(np.tanh(s * np.abs(k)).sum() for k in kernels)
    out = {}
    for layer, leaves in params.items():
        out[layer] = {}
        for name, w in leaves.items():
            w = np.asarray(w, np.float64)
            if name == "kernel":
                with np.errstate(over="ignore"):  # cosh -> inf for far-out weights: 1/cosh^2 -> 0
                    out[layer][name] = (np.sign(w) * s / np.cosh(s * np.abs(w)) ** 2 * total_a
                                        / total_t)
            else:
                out[layer][name] = np.zeros_like(w)
    return out


def np_l1_grad(params):
    return {l: {n: (np.sign(np.asarray(w, np.float64)) if n == "kernel"
                    else np.zeros(w.shape)) for n, w in leaves.items()}
            for l, leaves in params.items()}


def np_l2_grad(params):
    return {l: {n: (2.0 * np.asarray(w, np.float64) if n == "kernel" else np.zeros(w.shape))
                for n, w in leaves.items()} for l, leaves in params.items()}


def _assert_tree_close(actual, expected, rtol, atol, msg=""):
    a_flat, a_def = jax.tree_util.tree_flatten_with_path(actual)
    e_flat, e_def = jax.tree_util.tree_flatten_with_path(expected)
    assert a_def == e_def, (a_def, e_def)
    for (path, a), (_, e) in zip(a_flat, e_flat):
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol,
                                   err_msg=f"{msg} {jax.tree_util.keystr(path)}")


def _assert_tree_equal(actual, expected, msg=""):
    a_flat, a_def = jax.tree_util.tree_flatten_with_path(actual)
    e_flat, e_def = jax.tree_util.tree_flatten_with_path(expected)
    assert a_def == e_def, (a_def, e_def)
    for (path, a), (_, e) in zip(a_flat, e_flat):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e),
                                      err_msg=f"{msg} {jax.tree_util.keystr(path)}")


# ----- lambda_schedule ----------------------------------------------------------------------------


class LambdaScheduleTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_staircase_values(self):
        lam0, eta, spe, warm = 2e-3, 1.5, 4, 2
        sched = self.variant(lambda_schedule(lam0, eta, steps_per_epoch=spe, warmup_epochs=warm))
        expected = {
            0: 0.0, 3: 0.0, 4: 0.0, 7: 0.0,             # warm-up epochs 0 and 1
            8: lam0, 9: lam0, 10: lam0, 11: lam0,       # first regularisation epoch: λ_init
            12: lam0 * 1.5, 15: lam0 * 1.5,             # constant within an epoch
            16: lam0 * 2.25, 19: lam0 * 2.25,
            20: lam0 * 1.5 ** 3, 8 + 4 * 10: lam0 * 1.5 ** 10,
        }
        for step, want in expected.items():
            got = float(sched(jnp.int32(step)))
            if want == 0.0:
                self.assertEqual(got, 0.0, msg=f"step {step}")
            else:
                np.testing.assert_allclose(got, want, rtol=2e-6, err_msg=f"step {step}")

    @chex.variants(with_jit=True, without_jit=True)
    def test_no_warmup_starts_at_lambda_init(self):
        sched = self.variant(lambda_schedule(5e-6, 1.05, steps_per_epoch=3, warmup_epochs=0))
        np.testing.assert_allclose(float(sched(jnp.int32(0))), 5e-6, rtol=1e-6)
        np.testing.assert_allclose(float(sched(jnp.int32(2))), 5e-6, rtol=1e-6)
        np.testing.assert_allclose(float(sched(jnp.int32(3))), 5e-6 * 1.05, rtol=1e-6)
        np.testing.assert_allclose(float(sched(jnp.int32(3 * 60))), 5e-6 * 1.05 ** 60, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_smooth_values(self):
        lam0, eta, spe, warm = 1e-2, 2.0, 4, 2
        sched = self.variant(lambda_schedule(lam0, eta, steps_per_epoch=spe, warmup_epochs=warm,
                                             staircase=False))
        self.assertEqual(float(sched(jnp.int32(0))), 0.0)
        self.assertEqual(float(sched(jnp.int32(7))), 0.0)  # epoch 1.75 < 2
        for step in (8, 9, 10, 11, 12, 13, 19):
            want = lam0 * eta ** (step / spe - warm)
            np.testing.assert_allclose(float(sched(jnp.int32(step))), want, rtol=2e-6,
                                       err_msg=f"step {step}")
        # smooth grows within an epoch, staircase does not
        self.assertLess(float(sched(jnp.int32(8))), float(sched(jnp.int32(9))))

    @pytest.mark.filterwarnings("ignore")
    def test_bad_arguments_raise_naming_the_value(self):
        cases = [
            (dict(steps_per_epoch=0), "0"),
            (dict(steps_per_epoch=-3), "-3"),
            (dict(steps_per_epoch=2.5), "2.5"),
            (dict(steps_per_epoch=4, warmup_epochs=-1), "-1"),
            (dict(steps_per_epoch=4, lambda_init=0.0), "0.0"),
            (dict(steps_per_epoch=4, lambda_init=-1e-3), "-0.001"),
            (dict(steps_per_epoch=4, lambda_init=float("nan")), "nan"),
            (dict(steps_per_epoch=4, eta=0.0), "0.0"),
            (dict(steps_per_epoch=4, eta=-1.05), "-1.05"),
        ]
        for kwargs, shown in cases:
            with self.assertRaises(ValueError, msg=str(kwargs)) as ctx:
                lambda_schedule(**kwargs)
            self.assertIn(shown, str(ctx.exception), msg=str(kwargs))
            # art() validates through the same schedule
            with self.assertRaises(ValueError, msg=str(kwargs)):
                art(0.9, **kwargs)


# ----- art() ----------------------------------------------------------------------------------------


def _chain(tx_first=None, wd=1e-4, lr=0.1):
    parts = [] if tx_first is None else [tx_first]
    return optax.chain(*parts, optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9))


class ArtTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_warmup_equals_chain_without_art_exactly(self):
        params = jax.tree.map(jnp.asarray, _params(0))
        with_art = _chain(art(0.9, 0.5, 1.1, steps_per_epoch=1, warmup_epochs=3))
        plain = _chain()
        s1, s2 = with_art.init(params), plain.init(params)
        up1, up2 = self.variant(with_art.update), self.variant(plain.update)
        p1 = p2 = params
        for step in range(3):  # 3 warm-up epochs of 1 step
            grads = jax.tree.map(jnp.asarray, _grads_like(_params(0), 100 + step))
            u1, s1 = up1(grads, s1, p1)
            u2, s2 = up2(grads, s2, p2)
            _assert_tree_equal(u1, u2, f"step {step}")
            p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
            self.assertEqual(int(s1[0].count), step + 1)
            self.assertEqual(float(s1[0].lambda_), 0.0)
        # first regularised step differs
        grads = jax.tree.map(jnp.asarray, _grads_like(_params(0), 200))
        u1, s1 = up1(grads, s1, p1)
        u2, s2 = up2(grads, s2, p2)
        np.testing.assert_allclose(float(s1[0].lambda_), 0.5, rtol=1e-6)
        diff = max(float(jnp.max(jnp.abs(a - b)))
                   for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)))
        self.assertGreater(diff, 1e-3)

    @chex.variants(with_jit=True, without_jit=True)
    def test_hypersparse_regularisation_matches_numpy(self):
        kappa, lam0, eta, spe, warm = 0.9, 0.25, 1.5, 1, 1
        tx = art(kappa, lam0, eta, steps_per_epoch=spe, warmup_epochs=warm)
        params_np = _params(1)
        params = jax.tree.map(jnp.asarray, params_np)
        state = tx.init(params)
        self.assertIsInstance(state, ARTState)
        self.assertEqual(int(state.count), 0)
        self.assertEqual(float(state.threshold), np_threshold(params_np, kappa))
        update = self.variant(tx.update)
        rng = np.random.default_rng(5)
        for step in range(4):
            grads_np = _grads_like(params_np, 300 + step)
            out, new_state = update(jax.tree.map(jnp.asarray, grads_np), state,
                                    jax.tree.map(jnp.asarray, params_np))
            epoch = step // spe
            lam = 0.0 if epoch < warm else lam0 * eta ** (epoch - warm)
            self.assertEqual(int(new_state.count), step + 1)
            if lam == 0.0:
                self.assertEqual(float(new_state.lambda_), 0.0)
                _assert_tree_equal(out, grads_np, f"warm-up step {step}")
                # warm-up keeps the previous threshold
                self.assertEqual(float(new_state.threshold), float(state.threshold))
            else:
                np.testing.assert_allclose(float(new_state.lambda_), lam, rtol=1e-6)
                g = np_hypersparse_grad(params_np, kappa)
                expected = jax.tree.map(lambda gr, h: gr.astype(np.float64) + lam * h,
                                        grads_np, g)
                _assert_tree_close(out, expected, rtol=1e-5, atol=1e-5, msg=f"step {step}")
                # the regulariser part alone, relative to its own size
                reg = jax.tree.map(lambda o, gr: (np.asarray(o, np.float64) - gr) / lam,
                                   out, grads_np)
                _assert_tree_close(reg, g, rtol=2e-3, atol=2e-5, msg=f"λ·g step {step}")
                for layer in params_np:  # biases untouched, exactly
                    np.testing.assert_array_equal(np.asarray(out[layer]["bias"]),
                                                  grads_np[layer]["bias"])
                self.assertEqual(float(new_state.threshold), np_threshold(params_np, kappa))
                # relative change of t over the step, kept for the next search (0 after the
                # first regularised step, and where |change| >= 5 %)
                if float(state.lambda_) > 0:
                    change = np_threshold(params_np, kappa) / float(state.threshold) - 1
                    want = change if abs(change) < 0.05 else 0.0
                else:
                    want = 0.0
                np.testing.assert_allclose(float(new_state.threshold_change), want,
                                           rtol=1e-5, atol=1e-7)
            state = new_state
            # move the parameters so that the threshold changes from step to step
            params_np = jax.tree.map(
                lambda w: (w + 0.05 * rng.normal(size=w.shape)).astype(np.float32), params_np)

    @chex.variants(with_jit=True, without_jit=True)
    def test_l1_l2_and_user_penalty(self):
        params_np = _params(2)
        params = jax.tree.map(jnp.asarray, params_np)
        grads_np = _grads_like(params_np, 7)
        grads = jax.tree.map(jnp.asarray, grads_np)
        lam = 0.125

        def user_penalty(p):  # touches every leaf, biases included: gradient 3·w²
            return sum(jnp.sum(x ** 3) for x in jax.tree.leaves(p))

        expected_reg = {
            "l1": np_l1_grad(params_np),
            "l2": np_l2_grad(params_np),
            "user": jax.tree.map(lambda w: 3.0 * np.asarray(w, np.float64) ** 2, params_np),
        }
        for name, penalty in (("l1", "l1"), ("l2", "l2"), ("user", user_penalty)):
            tx = art(0.9, lam, 1.05, steps_per_epoch=1, warmup_epochs=0, penalty=penalty)
            state = tx.init(params)
            out, state = self.variant(tx.update)(grads, state, params)
            expected = jax.tree.map(lambda g, r: g.astype(np.float64) + lam * r, grads_np,
                                    expected_reg[name])
            _assert_tree_close(out, expected, rtol=1e-6, atol=1e-6, msg=name)
            self.assertEqual(int(state.count), 1)
            np.testing.assert_allclose(float(state.lambda_), lam, rtol=1e-7)
            if name in ("l1", "l2"):
                for layer in params_np:
                    np.testing.assert_array_equal(np.asarray(out[layer]["bias"]),
                                                  grads_np[layer]["bias"])

    def test_missing_params_raises(self):
        params = jax.tree.map(jnp.asarray, _params(0))
        tx = art(0.9, steps_per_epoch=2, warmup_epochs=0)
        state = tx.init(params)
        with self.assertRaisesRegex(ValueError, "param"):
            tx.update(params, state)
        with self.assertRaisesRegex(ValueError, "param"):
            jax.jit(tx.update)(params, state)

    def test_bad_penalty_and_sparsity_raise(self):
        with self.assertRaisesRegex(ValueError, "'l3'"):
            art(0.9, steps_per_epoch=2, penalty="l3")
        with self.assertRaisesRegex(ValueError, "1.5"):
            art(1.5, steps_per_epoch=2)
        with self.assertRaises(ValueError):
            art(-0.1, steps_per_epoch=2)

    def test_init_rejects_tree_without_kernels(self):
        tx = art(0.9, steps_per_epoch=2)
        with self.assertRaisesRegex(ValueError, "prunable"):
            tx.init({"Dense_0": {"bias": jnp.ones(3)}})


def test_art_state_orbax_round_trip(tmp_path):
    kappa = 0.8
    params_np = _params(3)
    params = jax.tree.map(jnp.asarray, params_np)
    tx = _chain(art(kappa, 0.05, 1.3, steps_per_epoch=2, warmup_epochs=1))
    update = jax.jit(tx.update)
    state = tx.init(params)
    for step in range(3):  # through warm-up into regularisation
        u, state = update(jax.tree.map(jnp.asarray, _grads_like(params_np, 40 + step)), state,
                          params)
        params = optax.apply_updates(params, u)
    art_state = state[0]
    assert int(art_state.count) == 3
    np.testing.assert_allclose(float(art_state.lambda_), 0.05, rtol=1e-6)

    path = tmp_path / "opt_state"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, state)
    ckptr.wait_until_finished()
    restored = ckptr.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    assert isinstance(restored[0], ARTState)
    _assert_tree_equal(restored, state, "restored state")

    # the next updates (λ changes to λ_init·η at count 4) are identical
    s_a, s_b, p_a, p_b = state, restored, params, params
    for step in range(3, 6):
        grads = jax.tree.map(jnp.asarray, _grads_like(params_np, 40 + step))
        u_a, s_a = update(grads, s_a, p_a)
        u_b, s_b = update(grads, s_b, p_b)
        _assert_tree_equal(u_b, u_a, f"step {step}")
        _assert_tree_equal(s_b, s_a, f"state step {step}")
        p_a, p_b = optax.apply_updates(p_a, u_a), optax.apply_updates(p_b, u_b)
    np.testing.assert_allclose(float(s_a[0].lambda_), 0.05 * 1.3, rtol=1e-6)


# ----- fixed_mask -------------------------------------------------------------------------------


class FixedMaskTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_pruned_stay_zero_and_kept_follow_numpy_sgd(self):
        wd, lr, mom = 1e-4, 0.1, 0.9
        params_np = _params(4)
        rng = np.random.default_rng(11)
        mask_np = {l: {n: (rng.random(w.shape) > 0.7) if n == "kernel"
                       else np.ones(w.shape, bool) for n, w in leaves.items()}
                   for l, leaves in params_np.items()}
        mask = jax.tree.map(jnp.asarray, mask_np)
        params0 = masking.apply_mask(jax.tree.map(jnp.asarray, params_np), mask)
        tx = optax.chain(fixed_mask(mask), optax.add_decayed_weights(wd),
                         optax.sgd(lr, momentum=mom))
        state = tx.init(params0)
        update = self.variant(tx.update)
        params = params0
        # NumPy reference: masked SGD with momentum and weight decay, float64
        w_ref = jax.tree.map(lambda w, m: np.where(m, np.asarray(w, np.float64), 0.0),
                             params_np, mask_np)
        trace = jax.tree.map(np.zeros_like, w_ref)
        for step in range(20):
            grads_np = jax.tree.map(
                lambda w: (rng.normal(size=w.shape) + 0.5).astype(np.float32), params_np)
            assert all(np.all(g != 0) for g in jax.tree.leaves(grads_np))
            u, state = update(jax.tree.map(jnp.asarray, grads_np), state, params)
            params = optax.apply_updates(params, u)
            for (lk, nk) in [(l, n) for l in w_ref for n in w_ref[l]]:
                m = mask_np[lk][nk]
                d = np.where(m, grads_np[lk][nk].astype(np.float64), 0.0) + wd * w_ref[lk][nk]
                trace[lk][nk] = d + mom * trace[lk][nk]
                w_ref[lk][nk] = w_ref[lk][nk] - lr * trace[lk][nk]
        for l in params_np:
            for n in params_np[l]:
                m = mask_np[l][n]
                got = np.asarray(params[l][n])
                start = np.asarray(params0[l][n])
                assert np.all(got[~m] == 0.0), (l, n)
                assert not np.any(np.signbit(got[~m])), (l, n)  # +0.0, not -0.0
                assert np.all(got[m] != start[m]), (l, n)
                np.testing.assert_allclose(got[m], w_ref[l][n][m], rtol=1e-5, atol=1e-5,
                                           err_msg=f"{l}/{n}")
        # the momentum buffer of pruned weights is exactly zero too
        trace_state = state[2][0].trace
        for l in params_np:
            m = mask_np[l]["kernel"]
            assert np.all(np.asarray(trace_state[l]["kernel"])[~m] == 0.0)

    def test_mask_mismatch_raises(self):
        params = jax.tree.map(jnp.asarray, _params(0))
        mask = jax.tree.map(lambda w: jnp.ones(w.shape, bool), params)
        missing = {k: v for k, v in mask.items() if k != "Dense_1"}
        with self.assertRaisesRegex(ValueError, "structure"):
            fixed_mask(missing).init(params)
        wrong_shape = jax.tree.map(lambda m: m, mask)
        wrong_shape["Dense_0"]["kernel"] = jnp.ones((6, 4), bool)
        with self.assertRaisesRegex(ValueError, "shape"):
            fixed_mask(wrong_shape).init(params)
        not_bool = jax.tree.map(lambda m: m.astype(jnp.float32), mask)
        with self.assertRaises(TypeError):
            fixed_mask(not_bool).init(params)


# ----- tiny end-to-end training --------------------------------------------------------------------


def _mlp_data(seed=0, n=256, d=20):
    rng = np.random.default_rng(seed)
    w_true = np.zeros(d)
    w_true[:3] = [2.0, -1.5, 1.0]  # only 3 informative features: a sparse net suffices
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ w_true > 0).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


def _mlp_init(seed=0, d=20, h=16):
    rng = np.random.default_rng(seed)
    return {
        "Dense_0": {"kernel": jnp.asarray(rng.normal(size=(d, h)) / np.sqrt(d), jnp.float32),
                    "bias": jnp.zeros(h, jnp.float32)},
        "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(h, 2)) / np.sqrt(h), jnp.float32),
                    "bias": jnp.zeros(2, jnp.float32)},
    }


def _mlp_apply(p, x):
    h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def _train(tx, epochs, batch=32, seed=0):
    x, y = _mlp_data(seed)
    params = _mlp_init(seed)
    state = tx.init(params)

    def loss_fn(p, xb, yb):
        logits = _mlp_apply(p, xb)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], 1))

    @jax.jit
    def epoch_fn(params, state):
        def step(carry, i):
            p, s = carry
            xb = jax.lax.dynamic_slice_in_dim(x, i * batch, batch)
            yb = jax.lax.dynamic_slice_in_dim(y, i * batch, batch)
            g = jax.grad(loss_fn)(p, xb, yb)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None
        (params, state), _ = jax.lax.scan(step, (params, state), jnp.arange(x.shape[0] // batch))
        return params, state

    for _ in range(epochs):
        params, state = epoch_fn(params, state)
    return params, state, x, y


def test_end_to_end_hypersparse_shrinks_small_weights():
    kappa, epochs, warm, spe = 0.9, 16, 3, 256 // 32
    tx_art = _chain(art(kappa, 2e-3, 1.2, steps_per_epoch=spe, warmup_epochs=warm), lr=0.1)
    p_art, s_art, x, y = _train(tx_art, epochs)
    p_plain, _, _, _ = _train(_chain(lr=0.1), epochs)
    assert int(s_art[0].count) == epochs * spe
    np.testing.assert_allclose(float(s_art[0].lambda_), 2e-3 * 1.2 ** (epochs - 1 - warm),
                               rtol=1e-5)

    def small_l1_and_pruned_acc(p):
        p_np = _np(p)
        t = np_threshold(p_np, kappa)
        kernels = [p_np[l]["kernel"] for l in sorted(p_np)]
        small = sum(np.abs(k)[np.abs(k) <= t].sum() for k in kernels)
        total = sum(np.abs(k).sum() for k in kernels)
        pruned = {l: {"kernel": jnp.asarray(np.where(np.abs(v["kernel"]) > t, v["kernel"], 0),
                                            jnp.float32),
                      "bias": jnp.asarray(v["bias"], jnp.float32)} for l, v in p_np.items()}
        acc = float(jnp.mean(jnp.argmax(_mlp_apply(pruned, x), -1) == y))
        return small / total, acc

    frac_art, acc_art = small_l1_and_pruned_acc(p_art)
    frac_plain, acc_plain = small_l1_and_pruned_acc(p_plain)
    # HyperSparse moves the weight mass of the 90 % smallest weights away: after pruning to κ
    # the regularised model loses little, the plain one much more.
    assert frac_art < 0.5 * frac_plain, (frac_art, frac_plain)
    assert acc_art >= 0.9, acc_art
    assert acc_art >= acc_plain, (acc_art, acc_plain)


def test_check_steps_per_epoch_warns_when_the_loop_makes_other_step_counts():
  """A loop that drops the last partial batch (floor) with art(steps_per_epoch=ceil): the
  λ epochs drift silently; check_steps_per_epoch makes it visible."""
  import warnings
  from hypersparse_jax import check_steps_per_epoch
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  num_train, batch = 10, 4
  ceil, floor = -(-num_train // batch), num_train // batch  # 3 and 2
  tx = optax.chain(optax.add_decayed_weights(1e-4),
                   art(0.5, steps_per_epoch=ceil, warmup_epochs=1), optax.sgd(0.1))
  state = tx.init(params)
  for _ in range(2 * floor):  # two epochs of the dropping loop
    _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  with pytest.warns(UserWarning, match=r"made 4 optimiser steps in 2 epochs.*expects 6"):
    assert check_steps_per_epoch(state, 2, ceil) == 4
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert check_steps_per_epoch(state, 2, floor) == 4
  with pytest.raises(ValueError, match="exactly one art"):
    check_steps_per_epoch(optax.sgd(0.1).init(params), 1, 2)


# ----- numerical edges: λ overflow, low-precision updates, non-finite weights ----------------------


def test_lambda_overflow_epoch_against_python_floats():
    from hypersparse_jax.transform import lambda_overflow_epoch
    f32_max = float(np.finfo(np.float32).max)
    for lam0, eta in [(5e-6, 2.0), (5e-6, 1.05), (2e-4, 1.25), (1e30, 10.0), (1e-3, 1.5)]:
        k = lambda_overflow_epoch(lam0, eta)
        # the first k with λ_init·η^k > float32 max, found by plain iteration
        want = 0
        while lam0 * eta ** want <= f32_max:
            want += 1
        assert k == want, (lam0, eta, k, want)
    assert lambda_overflow_epoch(5e-6, 2.0) == 146  # the docstring's figure
    assert lambda_overflow_epoch(5e-6, 1.0) is None and lambda_overflow_epoch(1.0, 0.5) is None


@pytest.mark.parametrize("jit", [True, False])
def test_lambda_saturates_instead_of_inf(jit):
    # η = 2: η^k overflows float32 from k = 128 although λ_init·η^k is still finite up to 145
    sched = lambda_schedule(5e-6, 2.0, steps_per_epoch=1, warmup_epochs=0)
    sched = jax.jit(sched) if jit else sched
    f32_max = float(np.finfo(np.float32).max)
    for k in (10, 127, 128, 140, 145):
        np.testing.assert_allclose(float(sched(jnp.int32(k))), 5e-6 * 2.0 ** k, rtol=2e-5)
    for k in (146, 147, 500):
        assert float(sched(jnp.int32(k))) == f32_max
    # the updates stay finite with a saturated λ and a finite gradient of 0 on zero weights
    params = {"Dense_0": {"kernel": jnp.zeros((2, 2), jnp.float32)}}
    tx = art(0.5, 5e-6, 2.0, steps_per_epoch=1, warmup_epochs=0, penalty="l1")
    state = tx.init(params)
    state = state._replace(count=jnp.int32(300))
    updates, state = tx.update(params, state, params)
    assert float(state.lambda_) == f32_max
    assert np.all(np.isfinite(np.asarray(updates["Dense_0"]["kernel"])))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_updates_scale_lambda_in_float32_and_saturate(dtype):
    # one 1e-7 weight at κ = 0: the HyperSparse gradient is ~1.8e5 in float32 (over float16's
    # 65504); with λ = 0.01, λ·g ~ 1.8e3 is representable: it must not pass through inf
    w = np.array([[1e-7, 0.5], [0.25, -0.75]], np.float32)
    params = {"Dense_0": {"kernel": jnp.asarray(w, dtype)}}
    w_cast = np.asarray(params["Dense_0"]["kernel"].astype(jnp.float32), np.float64)
    g = np_hypersparse_grad({"Dense_0": {"kernel": w_cast}}, 0.0)["Dense_0"]["kernel"]
    tx = art(0.0, 0.01, 1.0, steps_per_epoch=1, warmup_epochs=0)
    zero = {"Dense_0": {"kernel": jnp.zeros((2, 2), dtype)}}
    updates, state = tx.update(zero, tx.init(params), params)
    got = np.asarray(updates["Dense_0"]["kernel"].astype(jnp.float32), np.float64)
    assert updates["Dense_0"]["kernel"].dtype == dtype
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, 0.01 * g, rtol=1e-2)
    # a λ·g beyond the dtype's range saturates at its largest finite value
    lam = 1e3 if dtype == jnp.float16 else 1e36  # bfloat16 reaches 3.4e38, like float32
    tx = art(0.0, lam, 1.0, steps_per_epoch=1, warmup_epochs=0)
    updates, _ = tx.update(zero, tx.init(params), params)
    big = float(jnp.finfo(dtype).max)
    assert float(updates["Dense_0"]["kernel"][0, 0].astype(jnp.float32)) == big


def test_nonfinite_weights_are_counted_not_raised_under_jit():
    params = jax.tree.map(jnp.asarray, _params(3))
    tx = art(0.5, 0.1, 1.0, steps_per_epoch=1, warmup_epochs=1)
    update = jax.jit(tx.update)
    state = tx.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    _, state = update(grads, state, params)  # warm-up: nothing is computed or counted
    assert int(state.nonfinite_steps) == 0
    _, state = update(grads, state, params)  # finite weights
    assert int(state.nonfinite_steps) == 0
    bad = jax.tree.map(lambda x: x, params)
    bad["Dense_0"]["kernel"] = bad["Dense_0"]["kernel"].at[0, 0].set(jnp.nan)
    updates, state = update(grads, state, bad)
    assert int(state.nonfinite_steps) == 1
    # the regulariser added exactly nothing to the finite weights in that step (documented)
    for leaf, w in zip(jax.tree.leaves(updates), jax.tree.leaves(bad)):
        finite = np.isfinite(np.asarray(w))
        np.testing.assert_array_equal(np.asarray(leaf)[finite], 0.0)
    bad["Dense_1"]["kernel"] = bad["Dense_1"]["kernel"].at[0, 0].set(jnp.inf)
    _, state = update(grads, state, bad)
    assert int(state.nonfinite_steps) == 2


def test_scale_constant_reaches_the_update():
    from hypersparse_jax.penalties import EXACT_SCALE
    params = jax.tree.map(jnp.asarray, _params(4))
    zero = jax.tree.map(jnp.zeros_like, params)
    got = {}
    for c in (0.6585, EXACT_SCALE):
        tx = art(0.98, 1.0, 1.0, steps_per_epoch=1, warmup_epochs=0, scale_constant=c)
        got[c], _ = tx.update(zero, tx.init(params), params)
    want = np_hypersparse_grad(_params(4), 0.98)  # with the reference's 0.6585
    _assert_tree_close(got[0.6585], want, rtol=2e-6, atol=1e-7)
    diff = np.max(np.abs(np.asarray(got[0.6585]["Dense_0"]["kernel"])
                         - np.asarray(got[EXACT_SCALE]["Dense_0"]["kernel"])))
    assert diff > 0  # the constant is used, not ignored
    with pytest.raises(ValueError, match="scale_constant"):
        art(0.9, steps_per_epoch=1, scale_constant=-1.0)
