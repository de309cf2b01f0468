"""Multi-device training on 8 forced host devices vs one device.

XLA_FLAGS must be set before JAX starts, so the checks run in subprocesses
(tests/sharding_worker.py, JSON out); the in-process tests cover the single-device API.
"""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from hypersparse_jax import sharding as sh

WORKER = os.path.join(os.path.dirname(__file__), "sharding_worker.py")
TOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """Runs the two worker modes concurrently (one JAX start-up each) and parses their JSON."""
  base = tmp_path_factory.mktemp("sharding")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = {}
  for mode in ("core", "cli"):
    work = base / mode
    work.mkdir()
    procs[mode] = subprocess.Popen(
        [sys.executable, WORKER, mode, str(work), str(base / "jax_cache")], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  out = {}
  for mode, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"worker {mode} failed:\n{stderr[-4000:]}"
    out[mode] = json.loads(stdout.strip().splitlines()[-1])
  return out


def test_worker_sees_eight_devices(results):
  assert results["core"]["devices"] == 8


@pytest.mark.parametrize("kappa", [0.5, 0.9, 0.98])
def test_threshold_and_grad_on_fsdp_params_equal_one_device(results, kappa):
  core = results["core"]
  assert any("'data'" in s for s in core["fsdp_specs"])  # the params really were sharded
  assert core[f"threshold_equal_{kappa}"]  # bit-exact
  assert core[f"mask_equal_{kappa}"]
  assert core[f"grad_rel_{kappa}"] < 1e-6


@pytest.mark.parametrize("name", ["2_dp", "2_fsdp", "8_dp", "8_fsdp"])
def test_training_steps_match_one_device(results, name):
  run, ref = results["core"][name], results["core"]["reference"]
  assert run["params_rel"] < TOL
  assert run["stats_rel"] < TOL  # BatchNorm statistics over the global batch
  assert run["threshold_rel"] < TOL
  assert run["specs_kept"]  # the step keeps the state's placement
  np.testing.assert_allclose(run["pruned"], ref["pruned"], atol=1e-6)
  np.testing.assert_allclose(run["dense"], ref["dense"], atol=1e-6)
  assert run["decisions"] == ref["decisions"]  # ART controller decisions identical


@pytest.mark.parametrize("pattern", ["nm", "erk"])
def test_pattern_grad_and_mask_on_fsdp_params_equal_one_device(results, pattern):
  assert results["core"][f"mask_equal_{pattern}"]
  assert results["core"][f"grad_rel_{pattern}"] < 1e-6


@pytest.mark.parametrize("pattern", ["nm", "erk"])
def test_cli_patterns_on_eight_sharded_devices_match_one(results, pattern):
  """--nm 2:4 and --distribution erk with FSDP on 8 devices: the run of one device.

  ERK: within float tolerance throughout. N:M: the warm-up within tolerance, then only the
  pattern and the size of the result: a group's threshold is its largest pruned weight, so
  once its two pruned weights are near zero its push (∝ 1/t) makes them flip sign from step
  to step, as L1 does, and the 1e-7 differences of another reduction order grow (the pattern
  gradient and mask on sharded parameters equal one device's: the test above)."""
  runs = results["cli"]["runs"]
  a, b = runs[f"d8{pattern}"], runs[f"d1{pattern}"]
  assert a["rc"] == 0 and b["rc"] == 0
  assert (b["summary"]["nm"], b["summary"]["distribution"]) == (
      ("2:4", "global") if pattern == "nm" else (None, "erk"))
  if pattern == "erk":
    _assert_summaries_close(a["summary"], b["summary"])
    _assert_metrics_close(a["metrics"], b["metrics"])
    return
  _assert_metrics_close(a["metrics"][:1], b["metrics"][:1])  # warm-up
  for s in (a["summary"], b["summary"]):
    assert s["sparsity_achieved"] == 0.5 and s["pattern"]["groups_over_n"] == 0
  assert abs(a["summary"]["final_test_accuracy"] - b["summary"]["final_test_accuracy"]) < 0.03


def test_process_local_batch_path(results):
  assert results["core"]["process_local_equal"]


def test_indivisible_batch_error(results):
  assert "not divisible by the number of devices 8" in results["core"]["indivisible_error"]


def _assert_summaries_close(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if k in ("sparse_bytes", "compression_ratio"):  # compressed size depends on the last bits
      assert math.isclose(a[k], b[k], rel_tol=1e-2), k
    elif isinstance(a[k], float):
      assert math.isclose(a[k], b[k], rel_tol=TOL, abs_tol=1e-7), (k, a[k], b[k])
    else:
      assert a[k] == b[k], (k, a[k], b[k])


def _assert_metrics_close(a, b):
  assert len(a) == len(b)
  for ra, rb in zip(a, b):
    _assert_summaries_close(ra, rb)


@pytest.mark.parametrize("name", ["d8", "d8fsdp"])
def test_cli_on_eight_devices_matches_one(results, name):
  runs = results["cli"]["runs"]
  assert runs[name]["rc"] == 0 and runs["d1"]["rc"] == 0
  _assert_summaries_close(runs[name]["summary"], runs["d1"]["summary"])
  _assert_metrics_close(runs[name]["metrics"], runs["d1"]["metrics"])


@pytest.mark.parametrize("name", ["r8to1", "r1to8"])
def test_checkpoint_resumes_on_another_device_count(results, name):
  run, full = results["cli"][name], results["cli"]["runs"]["d1"]
  assert run["rc"] == 0 and run["resumed"]
  _assert_summaries_close(run["summary"], full["summary"])
  _assert_metrics_close(run["metrics"], full["metrics"])


def test_cli_batch_not_divisible(results):
  bad = results["cli"]["bad_batch"]
  assert bad["rc"] == 2
  assert "--batch-size 60 is not divisible by the number of devices 8" in bad["stderr"]


# ----- single-device API (in process) -----


def test_leaf_spec_rule():
  P = jax.sharding.PartitionSpec
  assert sh._leaf_spec((3, 3, 32, 64), 8, 0) == P(None, None, None, "data")
  assert sh._leaf_spec((3, 3, 64, 64), 8, 0) == P(None, None, None, "data")  # last on ties
  assert sh._leaf_spec((256, 10), 8, 0) == P("data")
  assert sh._leaf_spec((10,), 8, 0) == P()  # indivisible
  assert sh._leaf_spec((), 8, 0) == P()  # scalar
  assert sh._leaf_spec((64, 64), 8, 10 ** 6) == P()  # small


def test_make_mesh_errors():
  with pytest.raises(ValueError, match="only"):
    sh.make_mesh(len(jax.local_devices()) + 1)
  with pytest.raises(ValueError, match="positive"):
    sh.make_mesh(0)


def test_one_device_mesh_places_everything():
  mesh = sh.make_mesh(1)
  tree = {"w": np.ones((16, 64), np.float32), "c": np.int32(3)}
  for placed in (sh.replicate(tree, mesh), sh.shard_params(tree, mesh, min_size=0)):
    for x in jax.tree.leaves(placed):
      assert x.sharding.mesh.shape == {"data": 1}
  batch = sh.shard_batch({"x": np.arange(12.0).reshape(6, 2)}, mesh)
  np.testing.assert_array_equal(batch["x"], np.arange(12.0).reshape(6, 2))
  with pytest.raises(ValueError, match="same leading"):
    sh.shard_batch({"x": np.zeros((4, 2)), "y": np.zeros((5,))}, mesh)
