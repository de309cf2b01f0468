"""The README's own-loop snippet is executed as it stands (extracted from README.md)."""

from __future__ import annotations

import os
import re
import warnings

import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_block(section: str) -> str:
  with open(README) as f:
    text = f.read()
  body = text[text.index(section):]
  return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_own_loop_snippet_runs_and_prunes(capsys):
  code = _python_block("## Use it in your own training loop")
  namespace = {"__name__": "readme_snippet"}
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)  # check_steps_per_epoch must stay silent
    exec(compile(code, "README.md", "exec"), namespace)
  out = capsys.readouterr().out
  params, mask = namespace["params"], namespace["mask"]
  # Independent count: the fine-tuned kernels are zero exactly where the mask drops, and at
  # least a fraction κ of all kernel entries is zero.
  kernels = {k: np.asarray(v["kernel"]) for k, v in params.items() if "kernel" in v}
  dropped = {k: ~np.asarray(v["kernel"]) for k, v in mask.items() if "kernel" in v}
  for name, w in kernels.items():
    assert np.all(w[dropped[name]] == 0), name
    assert np.all(w[~dropped[name]] != 0), name
  zeros = sum(int(np.sum(w == 0)) for w in kernels.values())
  total = sum(w.size for w in kernels.values())
  assert zeros / total >= namespace["SPARSITY"]
  accuracy = float(re.search(r"pruned test accuracy (\S+)", out).group(1))
  assert accuracy > 0.5  # 10 classes: chance is 0.1
