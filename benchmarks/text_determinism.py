"""Do fresh processes of the same text command end bit for bit alike? Counted per XLA setting.

The command is ``tests/test_text.py``'s tiny ``--dataset pysource`` preset (1 transformer block,
d_model 32, 4 steps an epoch, warm-up + ART + 2 fine-tune epochs) on the same kind of corpus the
test writes (the first 60 standard-library sources over 4 KB, cut to 4,000 bytes). Each run is a
fresh ``hypersparse-train`` process without JAX's compilation cache (it compiles its own steps,
as the SIGKILL-resume test's processes do), ``--parallel`` at a time, the variants interleaved so
that machine load falls on each alike. A run's result is the sha256 of ``summary.json`` (less the
corpus path), ``metrics.jsonl`` less its ``time`` fields, and the arrays of ``model_sparse.npz``;
the report gives, per variant, how many runs gave each distinct result, and the time the runs
spent in their epochs (the sum of ``metrics.jsonl``'s ``time``) and in all. ``--workdir`` keeps
the runs, and a later call with the same ``--workdir`` counts the finished ones and adds to them
(``--max-minutes`` bounds one call).

Variants (``--variants``): ``baseline`` (XLA_FLAGS as in the environment), ``ynn_off``
(``--xla_cpu_experimental_ynn_fusion_type=``: no YNNPACK fusions, dots and reductions by XLA's
own emitters), ``eigen_single`` (``--xla_cpu_multi_thread_eigen=false``).

Run: ``python benchmarks/text_determinism.py --runs 40 --workdir /tmp/text_determinism --out
benchmarks/results/text_determinism.json``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import hashlib
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

import jax
import numpy as np

import hypersparse_jax
import report

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--dataset", "pysource", "--layers", "1", "--d-model", "32", "--heads", "2",
        "--context", "32", "--steps-per-epoch", "4", "--batch-size", "8", "--warmup-epochs", "1",
        "--epochs", "2", "--max-art-epochs", "2", "--lr-steps", "1", "--eval-windows", "8",
        "--eval-batch-size", "24", "--lambda-init", "1e-3", "--eta", "2", "--no-progress"]
VARIANTS = {"baseline": "", "ynn_off": "--xla_cpu_experimental_ynn_fusion_type=",
            "eigen_single": "--xla_cpu_multi_thread_eigen=false"}


def write_corpus(root: pathlib.Path, num_files: int = 60, file_bytes: int = 4000) -> None:
  """The test's corpus: ``num_files`` standard-library sources, first ``file_bytes`` bytes."""
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  sources = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > file_bytes)[:num_files]
  for i, src in enumerate(sources):
    (root / f"pkg{i}").mkdir(parents=True)
    (root / f"pkg{i}" / "mod.py").write_bytes(src.read_bytes()[:file_bytes])


def result_hash(outdir: pathlib.Path) -> tuple[str, float]:
  """sha256 of what must repeat (summary less the corpus path, metrics less times, exported
  arrays); the time spent in epochs."""
  summary = json.loads((outdir / "summary.json").read_text())
  summary["corpus"].pop("root")  # where the corpus lies; its contents are hashed in "splits"
  digest = hashlib.sha256(json.dumps(summary, sort_keys=True).encode())
  epoch_time = 0.0
  for line in (outdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    epoch_time += record.pop("time")
    digest.update(json.dumps(record, sort_keys=True).encode())
  exported = hypersparse_jax.load_sparse(str(outdir / "model_sparse.npz"))
  for path, x in jax.tree_util.tree_flatten_with_path(exported)[0]:
    x = np.asarray(x)
    digest.update(jax.tree_util.keystr(path).encode() + x.dtype.str.encode() + x.tobytes())
  return digest.hexdigest()[:16], epoch_time


def run_once(variant: str, index: int, corpus: pathlib.Path, work: pathlib.Path,
             deadline: float) -> dict | None:
  """One fresh process (or the finished run already in ``work``); None once past ``deadline``."""
  outdir = work / f"{variant}-{index}"
  if (outdir / "run.json").exists():
    return json.loads((outdir / "run.json").read_text())
  if time.time() > deadline:
    return None
  shutil.rmtree(outdir, ignore_errors=True)  # a run cut short
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false")
  env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), VARIANTS[variant]]))
  start = time.time()
  proc = subprocess.run([sys.executable, "-c", "from hypersparse_jax.console import train; "
                         "train()", *TINY, "--data-dir", str(corpus), "--outdir", str(outdir)],
                        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
  wall = time.time() - start
  if proc.returncode != 0:
    raise RuntimeError(f"{variant} run {index} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
  digest, epoch_time = result_hash(outdir)
  record = {"variant": variant, "index": index, "result": digest, "epoch_time_s": epoch_time,
            "wall_s": wall}
  (outdir / "run.json").write_text(json.dumps(record))
  return record


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", type=int, default=40, help="fresh processes per variant")
  parser.add_argument("--parallel", type=int, default=2)
  parser.add_argument("--variants", default="baseline,ynn_off")
  parser.add_argument("--workdir", default=None,
                      help="keep the runs here; finished runs found here are counted, not rerun")
  parser.add_argument("--max-minutes", type=float, default=float("inf"),
                      help="start no new run after this; the report counts the finished ones")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  variants = args.variants.split(",")
  with tempfile.TemporaryDirectory() as tmp:
    work = pathlib.Path(args.workdir or tmp)
    if not (work / "corpus").exists():
      write_corpus(work / "corpus")
    jobs = [(v, i) for i in range(args.runs) for v in variants]  # interleaved
    started = time.time()
    deadline = started + 60 * args.max_minutes
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
      runs = [r for r in pool.map(lambda job: run_once(*job, work / "corpus", work, deadline),
                                  jobs) if r is not None]
    total = time.time() - started
  results = {}
  for v in variants:
    mine = [r for r in runs if r["variant"] == v]
    counts = collections.Counter(r["result"] for r in mine)
    results[v] = {
        "xla_flags_added": VARIANTS[v], "runs": len(mine),
        "distinct_results": len(counts), "results": dict(counts.most_common()),
        "runs_off_the_majority": len(mine) - counts.most_common(1)[0][1],
        "odd_run_indices": [r["index"] for r in mine if r["result"] != counts.most_common(1)[0][0]],
        "epoch_time_s_median": statistics.median(r["epoch_time_s"] for r in mine),
        "epoch_time_s_mean": statistics.fmean(r["epoch_time_s"] for r in mine),
        "wall_s_median": statistics.median(r["wall_s"] for r in mine if r["wall_s"] is not None)}
  report.emit({"benchmark": "text_determinism", "command": TINY, "parallel": args.parallel,
               "total_s_this_invocation": total, "machine": report.machine_info(),
               "variants": results}, args.out)


if __name__ == "__main__":
  main()
