"""Tests of ``hypersparse-search`` (``hypersparse_jax.search``) on the bundled digits.

Trials use a tiny protocol (1 warm-up, at most 2 regularisation, 1 fine-tune epoch) and search
only ART's window (a host-side setting), so every trial compiles the same steps and JAX's
persistent compilation cache (a temporary folder) makes all but the first compile cheap.
Results are checked against the files the trials leave (each trial's ``summary.json``) and the
optuna study read back from the SQLite file.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import optuna  # the [search] extra is part of the test extra  # noqa: E402

from hypersparse_jax import config, search, train  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "mlp", "--warmup-epochs", "1", "--epochs", "1", "--max-art-epochs", "2",
        "--lambda-init", "1e-3", "--eta", "2", "--no-progress", "--val-fraction", "0.2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
              PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture()
def space_file(tmp_path):
  path = tmp_path / "space.json"
  path.write_text(json.dumps({"window": {"type": "int", "low": 1, "high": 3}}))
  return str(path)


def _command(outdir, space, trials, *extra):
  return [sys.executable, "-m", "hypersparse_jax.search", *TINY, "--space", space, "--trials",
          str(trials), "--outdir", str(outdir), *extra]


def _study(outdir):
  return optuna.load_study(study_name="hypersparse",
                           storage=f"sqlite:///{os.path.join(outdir, 'study.db')}")


def _finished(study):
  return [t for t in study.get_trials() if t.state in (optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED)]


def _summary(outdir, trial):
  with open(os.path.join(outdir, trial.user_attrs["run_dir"], "summary.json")) as f:
    return json.load(f)


def _assert_outputs_match_study(outdir, study):
  complete = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
  assert complete
  for t in complete:  # the objective is the run's best validation accuracy, never the test set
    summary = _summary(outdir, t)
    assert t.value == summary["best_val_accuracy"] and summary["num_val"] > 0
    assert t.user_attrs["test_accuracy"] == summary["test_accuracy"]
  with open(os.path.join(outdir, "best.json")) as f:
    best = json.load(f)
  top = max(complete, key=lambda t: t.value)
  assert best["value"] == top.value and best["params"] == top.params
  assert best["test_accuracy"] == _summary(outdir, top)["test_accuracy"]
  with open(os.path.join(outdir, "trials.csv")) as f:
    lines = f.read().splitlines()
  assert lines[0].startswith("number,state,value") and len(lines) == 1 + len(study.trials)
  with open(os.path.join(outdir, "search.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _snapshot(outdir):
  out = {}
  for name in ("best.json", "trials.csv", "search.png"):
    path = os.path.join(outdir, name)
    with open(path, "rb") as f:
      out[name] = (os.stat(path).st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
  return out


# ------------------------------------------------------------------------------------------------
# The space
# ------------------------------------------------------------------------------------------------


def test_default_space_scales_with_the_preset_and_drops_fixed_settings():
  digits = config.TrainConfig()
  space = search.load_space(None, digits, fixed={"eta", "lr_steps"})
  assert "eta" not in space and "lr_step_1" not in space and "lr_step_2" not in space
  assert space["lambda_init"] == {"type": "float", "low": pytest.approx(2e-5),
                                  "high": pytest.approx(2e-3), "log": True}
  assert space["window"] == {"type": "int", "low": 1, "high": 10, "log": False}
  cifar = config.TrainConfig(lambda_init=5e-6, eta=1.05, warmup_epochs=60, epochs=160)
  space = search.default_space(cifar)
  assert space["lambda_init"]["low"] == pytest.approx(5e-7)
  assert space["warmup_epochs"]["low"] == 30 and space["warmup_epochs"]["high"] == 90
  assert space["lr_step_1"]["high"] <= space["lr_step_2"]["low"] <= space["lr_step_2"]["high"]
  assert space["lr_step_2"]["high"] < 160


def test_trial_config_sorts_the_lr_steps():
  cfg = search.trial_config(config.TrainConfig(), {"lr_step_1": 12, "lr_step_2": 8, "eta": 1.1})
  assert cfg.lr_steps == (8, 12) and cfg.eta == 1.1


# ------------------------------------------------------------------------------------------------
# Bad input: one line each, nothing written
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("space, extra, needle", [
    ({"foo": {"low": 1, "high": 2}}, [], "unknown key 'foo'"),
    ({"lr": {"low": 0.1, "high": 0.01}}, [], "empty range"),
    ({"window": {"type": "int", "low": 2.2, "high": 2.8}}, [], "empty range"),
    ({"penalty": {"choices": []}}, [], "empty or non-list choices"),
    ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, [], "log range"),
    ({"window": {"low": 1, "high": 3}}, ["--trials", "0"], "--trials must be >= 1"),
    ({"window": {"low": 1, "high": 3}}, ["--storage", "sqlite:////nonexistent-dir/x/s.db"],
     "cannot open storage"),
    ({"window": {"low": 1, "high": 3}}, ["--storage", "postgresql://nobody@127.0.0.1:9/none"],
     "cannot open storage"),
    ({"window": {"low": 1, "high": 3}}, ["--val-fraction", "0"], "--val-fraction must be > 0"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, space, extra, needle):
  space_path = tmp_path / "space.json"
  space_path.write_text(json.dumps(space))
  outdir = tmp_path / "study"
  argv = [*TINY, "--space", str(space_path), "--outdir", str(outdir), *extra]
  if "--storage" not in extra and "--trials" not in extra and "--val-fraction" not in extra:
    argv += ["--storage", "sqlite:////nonexistent-dir/never-opened.db"]  # fails later if reached
  assert search.main(argv) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and needle in err[0], err
  assert not outdir.exists()


def test_missing_space_file_errors(tmp_path, capsys):
  assert search.main([*TINY, "--space", str(tmp_path / "nope.json"),
                      "--outdir", str(tmp_path / "s")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------
# Workers, totals, resume
# ------------------------------------------------------------------------------------------------


def test_two_worker_processes_share_one_sqlite_study(tmp_path, env, space_file):
  outdir = tmp_path / "study"
  procs = [subprocess.Popen(_command(outdir, space_file, 3, "--pruner", "none"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for _ in range(2)]
  outputs = [p.communicate(timeout=900)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs
  study = _study(outdir)
  finished = _finished(study)
  assert len(finished) == 3  # the study's total, not 3 per worker
  assert len({t.user_attrs["worker"] for t in finished}) == 2  # both processes ran trials
  assert len({t.user_attrs["run_dir"] for t in finished}) == 3
  _assert_outputs_match_study(outdir, study)


def test_report_between_another_workers_two_output_files(tmp_path, capsys):
  """The race behind a two-worker failure under load: worker A had written trials.csv and not
  yet best.json when worker B reported (A now writes best.json first; B must still cope with
  the state). B must not say 'no trial completed' (exit 1); it writes best.json itself, from
  the study."""
  study = optuna.create_study(direction="maximize")
  study.add_trial(optuna.trial.create_trial(
      params={"lr": 0.1}, distributions={"lr": optuna.distributions.FloatDistribution(0.01, 1)},
      value=0.75, user_attrs={"test_accuracy": 0.7}))
  outdir = str(tmp_path)
  search._write_outputs(study, outdir, optuna)
  os.remove(os.path.join(outdir, "best.json"))  # A's second file not there yet
  assert search._report(study, None, outdir, optuna) is True  # (_report reads no args)
  assert "best trial 0: validation accuracy 0.7500, test accuracy 0.7000" in capsys.readouterr().out
  with open(os.path.join(outdir, "best.json")) as f:
    assert json.load(f)["value"] == 0.75


def test_resume_after_sigkill_runs_only_the_missing_trials(tmp_path, env, space_file):
  outdir = tmp_path / "study"
  cmd = _command(outdir, space_file, 2, "--heartbeat", "1", "--pruner", "none")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  latest = outdir / "trials" / "trial-0000" / "checkpoints" / "latest"
  deadline = time.time() + 600
  while not (latest.exists() and any(s.isdigit() for s in os.listdir(latest))):
    assert proc.poll() is None and time.time() < deadline, "worker ended before a checkpoint"
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (outdir / "trials" / "trial-0000" / "summary.json").exists()
  time.sleep(3)  # past the grace period (2 heartbeats): the trial is stale
  run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stdout + run.stderr
  study = _study(outdir)
  states = [t.state for t in study.get_trials()]
  assert states.count(optuna.trial.TrialState.FAIL) == 1  # the killed attempt
  assert len(_finished(study)) == 2
  killed = next(t for t in study.get_trials() if t.state == optuna.trial.TrialState.FAIL)
  retry = next(t for t in _finished(study) if t.user_attrs["run_dir"] == "trials/trial-0000")
  assert retry.number != killed.number and retry.params == killed.params
  # The retry resumed the killed run directory: every epoch logged once, in order.
  with open(outdir / "trials" / "trial-0000" / "metrics.jsonl") as f:
    epochs = [json.loads(line)["epoch"] for line in f]
  assert epochs == list(range(len(epochs))) and epochs
  _assert_outputs_match_study(outdir, study)
  # A finished search re-run changes nothing.
  before, trials_before = _snapshot(outdir), len(study.get_trials())
  run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0 and "nothing to do" in run.stdout, run.stdout + run.stderr
  assert _snapshot(outdir) == before and len(_study(outdir).get_trials()) == trials_before


def test_storage_creation_race_is_retried(tmp_path, monkeypatch):
  """Two workers on a new database race to create its tables; the loser's "already exists"
  (as sqlite reported it in a CI run of the two-worker test) is retried, other errors are not."""
  real = optuna.storages.RDBStorage
  calls = []

  def racing(url, **kwargs):
    calls.append(url)
    if len(calls) <= len(seen):
      raise RuntimeError(seen[len(calls) - 1])
    return real(url, **kwargs)

  # the three messages seen with two processes creating one new SQLite study at once
  seen = ["(sqlite3.OperationalError) table studies already exists",
          "(sqlite3.IntegrityError) UNIQUE constraint failed: alembic_version.version_num",
          "(sqlite3.OperationalError) database is locked"]
  monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
  url = "sqlite:///" + str(tmp_path / "s.db")
  storage = search._storage(url, 0, optuna)
  assert len(calls) == 4 and isinstance(storage, real)

  def broken(url, **kwargs):
    calls.append(url)
    raise RuntimeError("unable to open database file")

  calls.clear()
  monkeypatch.setattr(optuna.storages, "RDBStorage", broken)
  with pytest.raises(RuntimeError, match="unable to open"):
    search._storage(url, 0, optuna)
  assert len(calls) == 1


def test_diverging_trials_are_pruned_with_their_cause_and_the_search_goes_on(tmp_path, env):
  """Every sampled learning rate is far too large: each trial diverges in its first warm-up
  epoch; both trials still run (the first does not end the search), each ends pruned with the
  trainer's one-line cause, and with no completed trial there is no best.json (exit 1)."""
  space = tmp_path / "space.json"
  space.write_text(json.dumps({"lr": {"low": 1e6, "high": 1e7, "log": True}}))
  outdir = tmp_path / "study"
  run = subprocess.run(_command(outdir, str(space), 2, "--pruner", "none"), env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 1 and "no trial completed" in run.stdout, run.stdout + run.stderr
  trials = _study(outdir).get_trials()
  assert len(trials) == 2
  for t in trials:
    assert t.state == optuna.trial.TrialState.PRUNED and t.value is None
    assert t.user_attrs["diverged"].startswith("training diverged at epoch 0 (warmup)")
    assert f"--lr {t.params['lr']:g}" in t.user_attrs["diverged"]
  with open(outdir / "trials.csv") as f:
    header = f.readline().strip().split(",")
  assert "user_attrs_diverged" in header and not (outdir / "best.json").exists()


def test_an_unexpected_trial_error_is_one_line_with_the_traceback_kept(tmp_path, monkeypatch,
                                                                      capsys, space_file):
  """An error that is not a property of the sampled settings (a bug, a full disk) ends the
  search with one line naming the log file; the traceback goes to OUTDIR/errors.log, trials.csv
  is written, and the trial is FAIL (so it does not count towards --trials)."""

  class Exploding:
    def __init__(self, cfg, run_dir, **kwargs):
      self.ckpt = type("Ckpt", (), {"close": lambda self: None})()

    def run(self):
      raise OSError(28, "No space left on device")

  monkeypatch.setattr(train, "Trainer", Exploding)
  outdir = tmp_path / "study"
  code = search.main([*TINY, "--space", space_file, "--trials", "2", "--outdir", str(outdir),
                      "--no-retain-host-memory"])
  err = capsys.readouterr().err
  assert code == 1
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "OSError" in lines[0] and "No space left on device" in lines[0]
  assert str(outdir / "errors.log") in lines[0]
  log = (outdir / "errors.log").read_text()
  assert "Traceback (most recent call last)" in log
  assert "in run\n    raise OSError" in log
  trials = _study(outdir).get_trials()
  assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL]
  with open(outdir / "trials.csv") as f:
    assert f.read().splitlines()[1].split(",")[1] == "FAIL"


# ------------------------------------------------------------------------------------------------
# Every draw of the space is a setting the trainer accepts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("epochs, lr_steps", [(20, (10, 15)), (160, (80, 120)), (4, (2, 3)),
                                              (3, (1, 2))])
def test_default_space_draws_only_increasing_lr_steps(epochs, lr_steps):
  """Drawn independently, the two steps' ranges share a value (digits: 6–12 and 12–19), and a
  draw of 12 and 12 is refused by the trainer. Over many draws of optuna's TPE and random
  samplers every pair must be strictly increasing within [0, epochs), and (random sampler)
  every value of each range must still be drawn."""
  base = config.TrainConfig(epochs=epochs, lr_steps=lr_steps)
  space = search.load_space(None, base, fixed=())
  ranges = {k: range(space[k]["low"], space[k]["high"] + 1) for k in ("lr_step_1", "lr_step_2")}
  for sampler in (optuna.samplers.RandomSampler(seed=0), optuna.samplers.TPESampler(seed=0)):
    study = optuna.create_study(sampler=sampler, direction="maximize")
    seen = {k: set() for k in ranges}
    for i in range(300 if isinstance(sampler, optuna.samplers.RandomSampler) else 60):
      trial = study.ask()
      params = search._suggest(trial, space, base.lr_steps)
      s1, s2 = params["lr_step_1"], params["lr_step_2"]
      assert 0 <= s1 < s2 < epochs, params
      assert s1 in ranges["lr_step_1"] and s2 in ranges["lr_step_2"], params
      search.trial_config(base, params).validate()  # the trainer's own check
      seen["lr_step_1"].add(s1)
      seen["lr_step_2"].add(s2)
      study.tell(trial, float(s1 + s2 + i % 3))
    if isinstance(sampler, optuna.samplers.RandomSampler):
      # every value of a range is drawable, except step 1's top when step 2 has no value above it
      assert seen["lr_step_2"] == set(ranges["lr_step_2"])
      assert seen["lr_step_1"] == {v for v in ranges["lr_step_1"] if v < max(ranges["lr_step_2"])}


def test_digits_default_lr_step_ranges_are_the_readmes():
  space = search.default_space(config.TrainConfig())
  assert (space["lr_step_1"]["low"], space["lr_step_1"]["high"]) == (6, 12)
  assert (space["lr_step_2"]["low"], space["lr_step_2"]["high"]) == (12, 19)


def test_too_few_fine_tune_epochs_for_two_steps_leave_them_out():
  assert "lr_step_1" not in search.default_space(config.TrainConfig(epochs=2, lr_steps=(1,)))


@pytest.mark.parametrize("space, needle", [
    ({"lr_step_1": {"type": "int", "low": 5, "high": 8},
      "lr_step_2": {"type": "int", "low": 3, "high": 5}}, "no pair with step 2 > step 1"),
    ({"lr_step_1": {"type": "int", "low": 15, "high": 18}}, "no value apart from the other"),
])
def test_lr_step_ranges_without_a_valid_pair_are_one_line(tmp_path, capsys, space, needle):
  path = tmp_path / "space.json"
  path.write_text(json.dumps(space))
  argv = [*TINY, "--epochs", "20", "--space", str(path),  # the preset's steps: 10 and 15
          "--outdir", str(tmp_path / "s"), "--storage", "sqlite:////nonexistent-dir/n.db"]
  assert search.main(argv) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and needle in err[0], err


# ------------------------------------------------------------------------------------------------
# Ctrl-C and a killed worker: the interrupted trial resumes, the study ends with --trials
# ------------------------------------------------------------------------------------------------

# ~0.1 s per warm-up epoch (batch 8): a trial is still training when its first epoch is logged
SLOW = ["--warmup-epochs", "40", "--batch-size", "8", "--epochs", "2"]


def _lines(path):
  return path.read_text().splitlines() if path.exists() else []


def _wait_for_a_trained_epoch(proc, outdir):
  """Polls the study for a RUNNING trial whose run directory has logged an epoch; its number."""
  deadline = time.time() + 300
  while time.time() < deadline:
    assert proc.poll() is None, "the search ended before a trial trained an epoch"
    if (outdir / "study.db").exists():
      try:
        running = _study(outdir).get_trials(states=(optuna.trial.TrialState.RUNNING,))
      except Exception:  # the schema is still being created
        running = []
      for t in running:
        if "run_dir" in t.user_attrs and _lines(outdir / t.user_attrs["run_dir"] / "metrics.jsonl"):
          return t.number
    time.sleep(0.05)
  raise AssertionError("no trial trained an epoch within 300 s")


def _retry_of(study, number):
  return next(t for t in study.get_trials() if t.user_attrs.get("retry_of") == number)


def test_ctrl_c_is_one_line_and_the_rerun_resumes_the_interrupted_trial(tmp_path, env,
                                                                         space_file):
  outdir = tmp_path / "study"
  cmd = _command(outdir, space_file, 2, "--pruner", "none", *SLOW)
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  try:
    number = _wait_for_a_trained_epoch(proc, outdir)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == 130, out + err
  err = [line for line in err.splitlines() if line.strip()]
  assert len(err) == 1 and f"interrupted in trial {number}" in err[0], err
  run_dir = outdir / "trials" / f"trial-{number:04d}"
  before = _lines(run_dir / "metrics.jsonl")
  assert before and not (run_dir / "summary.json").exists()
  interrupted = _study(outdir).trials[number]
  assert interrupted.state == optuna.trial.TrialState.FAIL

  run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout + run.stderr
  study = _study(outdir)
  assert len(_finished(study)) == 2  # the interrupted attempt does not count, its retry does
  retry = _retry_of(study, number)
  assert retry.state == optuna.trial.TrialState.COMPLETE
  assert retry.params == interrupted.params
  assert retry.user_attrs["run_dir"] == f"trials/trial-{number:04d}"
  assert f"trial {retry.number}: resumes trial {number} (interrupted)" in run.stdout
  # resumed from the checkpoint after the last logged epoch: the earlier lines are kept as
  # they were, and every epoch is logged once, in order
  assert f"at epoch {len(before)} (warmup)" in run.stdout, run.stdout
  after = _lines(run_dir / "metrics.jsonl")
  assert after[:len(before)] == before and len(after) > len(before)
  assert [json.loads(line)["epoch"] for line in after] == list(range(len(after)))
  assert "1 interrupted" in run.stdout and "1 finished by resuming" in run.stdout
  _assert_outputs_match_study(outdir, study)


def test_a_search_killed_mid_trial_and_rerun_at_once_ends_with_all_trials(tmp_path, env,
                                                                          space_file):
  """With a 300 s heartbeat the killed trial is not stale for 600 s: the rerun must see at
  once that its worker (this host's, by pid) is gone, and resume it (the rerun is given 300 s)."""
  outdir = tmp_path / "study"
  cmd = _command(outdir, space_file, 2, "--pruner", "none", "--heartbeat", "300", *SLOW)
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    number = _wait_for_a_trained_epoch(proc, outdir)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  killed = _study(outdir).trials[number]
  assert killed.state == optuna.trial.TrialState.RUNNING  # as the dead worker left it
  run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr
  study = _study(outdir)
  assert len(_finished(study)) == 2
  assert study.trials[number].state == optuna.trial.TrialState.FAIL
  retry = _retry_of(study, number)
  assert retry.params == killed.params and retry.user_attrs["run_dir"] == killed.user_attrs[
      "run_dir"]
  assert f"trial {number}: its worker {killed.user_attrs['worker']} is gone" in run.stdout
  _assert_outputs_match_study(outdir, study)


def test_process_gone_tells_live_dead_zombie_and_reused_pids():
  child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    time.sleep(0.5)
    assert not search._process_gone(child.pid, time.time() - 0.2)  # running since before
    assert search._process_gone(child.pid, time.time() - 3600)  # started after: a reused pid
    child.kill()
    time.sleep(0.5)  # killed, not yet reaped: a zombie
    assert search._process_gone(child.pid, time.time() - 0.2)
  finally:
    child.kill()
    child.wait()
  assert search._process_gone(child.pid, time.time())  # reaped: no such process


# ------------------------------------------------------------------------------------------------
# The byte-level language model: its own validation split is the objective
# ------------------------------------------------------------------------------------------------


def _python_folder(root):
  """Real standard-library sources (first 6 kB) as m<i>.py until each split of pysource's rule
  (sha256 of the relative path: < 0.05 test, < 0.10 validation, else train) has two files."""
  import hashlib as _h
  import sysconfig
  sources = sorted(p for p in os.listdir(sysconfig.get_paths()["stdlib"]) if p.endswith(".py"))
  counts = {"train": 0, "val": 0, "test": 0}
  i = 0
  while min(counts.values()) < 2:
    name = f"m{i}.py"
    u = int(_h.sha256(name.encode()).hexdigest()[:16], 16) / 2.0**64
    split = "test" if u < 0.05 else "val" if u < 0.10 else "train"
    if split != "train" or counts["train"] < 12:
      src = os.path.join(sysconfig.get_paths()["stdlib"], sources[i % len(sources)])
      with open(src, "rb") as f:
        (root / name).write_bytes(f.read()[:6000])
      counts[split] += 1
    i += 1
  return str(root)


def test_a_pysource_search_runs_on_its_own_validation_windows(tmp_path, env, space_file):
  (tmp_path / "src").mkdir()
  data = _python_folder(tmp_path / "src")
  outdir = tmp_path / "study"
  cmd = [sys.executable, "-m", "hypersparse_jax.search", "--dataset", "pysource",
         "--data-dir", data, "--layers", "1", "--d-model", "32", "--heads", "2", "--context",
         "32", "--steps-per-epoch", "2", "--batch-size", "8", "--eval-windows", "8",
         "--warmup-epochs", "1", "--epochs", "2", "--max-art-epochs", "1", "--lr-steps", "1",
         "--no-progress", "--pruner", "none", "--space", space_file, "--trials", "2",
         "--outdir", str(outdir)]
  run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout + run.stderr
  study = _study(outdir)
  complete = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
  assert len(complete) == 2
  for t in complete:
    summary = _summary(outdir, t)
    assert summary["dataset"] == "pysource" and summary["val_fraction"] == 0
    with open(os.path.join(outdir, t.user_attrs["run_dir"], "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f]
    finetune = [r["val_accuracy"] for r in records if r["phase"] == "finetune"]
    # the objective: the best per-epoch next-byte accuracy on the validation windows
    assert len(finetune) == 2 and t.value == max(finetune)
    assert t.user_attrs["test_accuracy"] == summary["test_accuracy"]
  # a split fraction is refused for the language model, in one line
  bad = subprocess.run(cmd + ["--val-fraction", "0.1"], env=env, capture_output=True,
                       text=True, timeout=300)
  err = [line for line in bad.stderr.splitlines() if line.strip()]
  assert bad.returncode == 2 and len(err) == 1 and "--val-fraction" in err[0], bad.stderr


def test_outputs_write_best_json_before_trials_csv(tmp_path, monkeypatch):
  """A reader that finds trials.csv current (the staleness check) must find best.json too."""
  study = optuna.create_study(direction="maximize")
  study.add_trial(optuna.trial.create_trial(
      params={"lr": 0.1}, distributions={"lr": optuna.distributions.FloatDistribution(0.01, 1)},
      value=0.75, user_attrs={"test_accuracy": 0.7}))
  order = []
  real = search.write_text_atomic
  monkeypatch.setattr(search, "write_text_atomic",
                      lambda path, text: order.append(os.path.basename(path)) or real(path, text))
  search._write_outputs(study, str(tmp_path), optuna)
  assert order == ["best.json", "trials.csv"]
