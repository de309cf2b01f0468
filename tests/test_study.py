"""Runs the sparsity study in --quick mode and checks what it writes."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = {"art_hypersparse", "art_l1", "art_l2", "oneshot", "gmp", "dense"}


def test_quick_study(tmp_path):
  out = tmp_path / "study"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "study.py"), "--quick", "--out", str(out),
       "--jit-cache", str(tmp_path / "jit")],
      cwd=tmp_path, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for name in ("study.json", "study.md", "study.png"):
    assert (out / name).is_file() and (out / name).stat().st_size > 0, name
  assert (out / "study.png").read_bytes().startswith(b"\x89PNG")
  report = json.loads((out / "study.json").read_text())
  settings = report["settings"]
  assert settings["quick"] is True and settings["seeds"] == [0]
  assert len(settings["sparsities"]) == 2
  assert report["complete"] is True
  runs = report["runs"]
  assert {r["method"] for r in runs} == METHODS
  assert len(runs) == 1 + 5 * len(settings["sparsities"])
  for r in runs:
    for key in ("best_test_accuracy", "final_test_accuracy"):
      assert 0.0 <= r[key] <= 1.0, r
    assert r["best_test_accuracy"] >= r["final_test_accuracy"] - 1e-12
    if r["method"] != "dense":
      assert r["target"] in settings["sparsities"]
      assert r["sparsity"] >= r["target"] - 1e-6, r
    assert r["time"] > 0
  cells = {(c["method"], c["target"]) for c in report["cells"]}
  assert ("dense", 0.0) in cells
  for m in METHODS - {"dense"}:
    for s in settings["sparsities"]:
      assert (m, s) in cells
  for c in report["cells"]:
    for key in ("best_test_accuracy", "final_test_accuracy", "sparsity", "time"):
      assert set(c[key]) == {"mean", "std", "n"}
  table = (out / "study.md").read_text()
  assert "ART + HyperSparse" in table and "| method |" in table
  # the headline pivot reports the final epoch (no selection on the test set), recomputed here
  pivot = table.split("Final fine-tune test accuracy")[1]
  row = next(line for line in pivot.splitlines() if line.startswith("| ART + HyperSparse |"))
  for s, cell in zip(settings["sparsities"], row.strip("|").split("|")[1:]):
    finals = [r["final_test_accuracy"] for r in runs
              if r["method"] == "art_hypersparse" and r["target"] == s]
    assert cell.strip().startswith(f"{100 * sum(finals) / len(finals):.2f} ±"), (cell, finals)
