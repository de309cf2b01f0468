"""Same results before and after a code change: runs the same jobs with an old commit of the
library and with the working tree, in one environment, and compares their outputs bit for bit.

    python benchmarks/compare_refactor.py --old 3a002d9 --out /tmp/refactor-check

XLA:CPU's results differ between machines and JAX versions, so an old run recorded elsewhere
proves nothing: both sides run here, now. The old side is ``git archive REF`` unpacked into
``OUT/old-src`` and put first on ``PYTHONPATH``; the new side is the working tree. Each job is a
fresh process of ``hypersparse-train`` (its ``main``, found in ``cli.py`` or, before the split,
``train.py``). Compared: ``summary.json`` and ``metrics.jsonl`` with the ``time`` fields removed
(values and key order), and every member of ``model_sparse.npz`` (bytes). A side's job whose
``summary.json`` exists is kept (rerun with ``--fresh``). Exit 0 when every job matches; a JSON
report goes to ``OUT/report.json`` (and ``--json``).

Jobs: the bare main job (digits preset), a short ``--dataset pysource`` run, and a short digits
run on 2 devices (``--xla_force_host_platform_device_count=2``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

JOBS = {
    "digits_main": {"argv": [], "env": {}},
    "pysource_short": {
        "argv": ["--dataset", "pysource", "--steps-per-epoch", "6", "--warmup-epochs", "1",
                 "--max-art-epochs", "3", "--epochs", "2", "--lr-steps", "1", "--layers", "1",
                 "--d-model", "32", "--heads", "2", "--context", "32", "--eval-windows", "32",
                 "--batch-size", "16", "--eval-batch-size", "32"],
        "env": {}},
    "digits_2dev": {
        "argv": ["--devices", "2", "--warmup-epochs", "3", "--max-art-epochs", "6",
                 "--epochs", "3", "--lr-steps", "2"],
        "env": {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}},
}

CODE = ("import sys, pathlib, importlib; import hypersparse_jax as h; "
        "mod = 'cli' if (pathlib.Path(h.__file__).parent / 'cli.py').exists() else 'train'; "
        "sys.exit(importlib.import_module('hypersparse_jax.' + mod).main(sys.argv[1:]))")


def _unpack(ref: str, dest: pathlib.Path) -> str:
  commit = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
  stamp = dest / ".commit"
  if stamp.exists() and stamp.read_text() == commit:
    return commit
  shutil.rmtree(dest, ignore_errors=True)
  dest.mkdir(parents=True)
  archive = subprocess.run(["git", "archive", commit, "hypersparse_jax"], cwd=ROOT, check=True,
                           capture_output=True).stdout
  with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
    tar.extractall(dest, filter="data")
  stamp.write_text(commit)
  return commit


def _run(side: str, src: pathlib.Path | None, job: str, out: pathlib.Path, fresh: bool) -> dict:
  outdir = out / side / job
  if fresh:
    shutil.rmtree(outdir, ignore_errors=True)
  if (outdir / "summary.json").exists():
    return {"kept": True}
  shutil.rmtree(outdir, ignore_errors=True)
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the job's own, or none
  env.update(JOBS[job]["env"])
  if src is not None:
    env["PYTHONPATH"] = os.pathsep.join([str(src)] + [p for p in [env.get("PYTHONPATH")] if p])
  start = time.time()
  proc = subprocess.run([sys.executable, "-c", CODE, *JOBS[job]["argv"], "--no-progress",
                         "--outdir", str(outdir)], env=env, capture_output=True, text=True,
                        cwd=out)
  (out / side / f"{job}.log").write_text(proc.stdout + proc.stderr)
  if proc.returncode != 0:
    raise SystemExit(f"{side} {job} failed (exit {proc.returncode}); see "
                     f"{out / side / (job + '.log')}")
  return {"kept": False, "seconds": round(time.time() - start, 1)}


def _records(path: pathlib.Path) -> list:
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  for row in rows:
    row.pop("time", None)
  return rows


def _compare(a: pathlib.Path, b: pathlib.Path) -> list[str]:
  diffs = []
  sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
  if list(sa.items()) != list(sb.items()):
    keys = [k for k in sorted(set(sa) | set(sb)) if sa.get(k, "<missing>") != sb.get(k, "<missing>")]
    diffs.append(f"summary.json differs at {keys or 'key order'}")
  ma, mb = _records(a / "metrics.jsonl"), _records(b / "metrics.jsonl")
  if [list(r.items()) for r in ma] != [list(r.items()) for r in mb]:
    diffs.append(f"metrics.jsonl differs ({len(ma)} vs {len(mb)} records)")
  # member by member (the arrays as serialised, and the format's metadata): equal bytes
  with zipfile.ZipFile(a / "model_sparse.npz") as za, zipfile.ZipFile(b / "model_sparse.npz") as zb:
    if sorted(za.namelist()) != sorted(zb.namelist()):
      diffs.append("model_sparse.npz holds other members")
    else:
      bad = [k for k in za.namelist() if za.read(k) != zb.read(k)]
      if bad:
        diffs.append(f"model_sparse.npz differs in {bad}")
  return diffs


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--old", required=True, help="git ref of the code before the change")
  p.add_argument("--out", default="/tmp/hypersparse-compare")
  p.add_argument("--jobs", nargs="*", default=list(JOBS), choices=list(JOBS))
  p.add_argument("--sides", nargs="*", default=["old", "new"], choices=["old", "new"])
  p.add_argument("--fresh", action="store_true", help="rerun jobs whose outputs exist")
  p.add_argument("--json", default=None, help="also write the report here")
  args = p.parse_args(argv)
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  commit = _unpack(args.old, out / "old-src")
  report = {"old": commit, "new": "working tree of "
            + subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip(),
            "python": sys.version.split()[0], "jobs": {}}
  import jax  # the version both sides ran with
  report["jax"] = jax.__version__
  for job in args.jobs:
    entry = report["jobs"][job] = {"argv": JOBS[job]["argv"], "env": JOBS[job]["env"]}
    for side in args.sides:
      entry[side] = _run(side, out / "old-src" if side == "old" else None, job, out, args.fresh)
      print(f"{side} {job}: {entry[side]}", flush=True)
    if {"old", "new"} <= set(args.sides):
      entry["differences"] = _compare(out / "old" / job, out / "new" / job)
      entry["equal"] = not entry["differences"]
      print(f"{job}: {'bit-identical' if entry['equal'] else entry['differences']}", flush=True)
  text = json.dumps(report, indent=2) + "\n"
  (out / "report.json").write_text(text)
  if args.json:
    pathlib.Path(args.json).write_text(text)
  return 0 if all(e.get("equal", True) for e in report["jobs"].values()) else 1


if __name__ == "__main__":
  sys.exit(main())
