"""Executes every notebook in notebooks/ with nbclient and checks that it draws its figures."""

from __future__ import annotations

import base64
import pathlib

import pytest

# nbformat, nbclient and ipykernel come with the test extra: a broken install fails here
import ipykernel  # noqa: F401,E402
import nbclient  # noqa: E402
import nbformat  # noqa: E402

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MIN_PNG_BYTES = 5_000


def test_all_notebooks_found():
  names = {p.stem for p in NOTEBOOKS}
  assert {"quickstart", "hypersparse_gradient", "sparsity_patterns", "transformer",
          "channel_pruning"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_draws(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
      f"{path.name} is committed with outputs; run notebooks/generate.py"
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError on any error
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  pngs = [base64.b64decode(o["data"]["image/png"]) for c in nb.cells if c.cell_type == "code"
          for o in c.outputs if "data" in o and "image/png" in o["data"]]
  assert pngs, f"{path.name} drew no figure"
  for png in pngs:
    assert png.startswith(b"\x89PNG") and len(png) > MIN_PNG_BYTES
