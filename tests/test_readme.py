"""The README's own-loop snippet is executed as it stands (extracted from README.md), and the
figures the READMEs quote are checked against the committed result files they name
(benchmarks/check_readme_figures.py)."""

from __future__ import annotations

import os
import re
import sys
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


def _figure_checker():
  sys.path.insert(0, os.path.join(os.path.dirname(README), "benchmarks"))
  try:
    import check_readme_figures
  finally:
    sys.path.pop(0)
  return check_readme_figures


def test_patterns_snippet_runs():
  """The patterns section's snippet: each mask has its pattern, and the slimmed LeNet-5 has
  fewer channels and the masked model's logits."""
  import jax
  import numpy as np
  code = _python_block("## Per-layer budgets, N:M patterns and channel pruning")
  ns = {"__name__": "readme_patterns"}
  exec(compile(code, "README.md", "exec"), ns)
  hs, params = ns["hs"], ns["params"]
  nm = hs.nm_mask(params, 2, 4)
  fc1 = np.asarray(nm["fc1"]["kernel"]).reshape(200, 4, 500).sum(axis=1)
  assert np.all(fc1 == 2)
  small = ns["small_model"]
  assert small.widths[0] < 20 and small.widths[2] < 500
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 1))
  masked = {"params": hs.apply_mask(params, ns["mask"])}
  want = np.asarray(ns["model"].apply(masked, x, train=False))
  got = np.asarray(small.apply(ns["small_variables"], x, train=False))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_quoted_figures_match_their_result_files():
  problems = _figure_checker().check()
  assert problems == [], "\n".join(problems)


def test_figure_check_fails_on_a_stale_figure_or_a_lost_sentence():
  checker = _figure_checker()
  docs = checker.load_docs()
  readme = docs["README.md"]
  # the figure an earlier README quoted from training.json, where training_issue15.json says 0.574
  stale = readme.replace("ResNet-32 trains at 0.574×", "ResNet-32 trains at 0.68×")
  assert stale != readme
  problems = checker.check({**docs, "README.md": stale})
  assert len(problems) == 1, problems
  assert "'0.68' (file: '0.574')" in problems[0] and "training_issue15.json" in problems[0]
  # a reworded sentence no longer carries its check: reported, not silently skipped
  reworded = readme.replace("ResNet-32 trains at 0.574×", "ResNet-32 runs at 0.574×")
  problems = checker.check({**docs, "README.md": reworded})
  assert len(problems) == 1 and "sentence not found" in problems[0], problems


def test_table_check_fails_on_an_edited_row_or_a_missing_image():
  checker = _figure_checker()
  docs = checker.load_docs()
  readme = docs["README.md"]
  row = "| ART + L1 | 91.16 ± 0.29 | 91.05 ± 0.30 |"  # LeNet-5's, copied from its study.md
  assert readme.count(row) == 1
  edited = readme.replace(row, "| ART + L1 | 91.61 ± 0.29 | 91.05 ± 0.30 |")
  problems = checker.check({**docs, "README.md": edited})
  assert len(problems) == 1 and "study_fashion_mnist_lenet5/study.md" in problems[0], problems
  image = "benchmarks/results/study_fashion_mnist_lenet5/study.png"
  assert image in readme
  moved = readme.replace(image, "benchmarks/results/study_fashion_mnist_lenet5/gone.png")
  problems = checker.check({**docs, "README.md": moved})
  assert problems == ["README.md: image benchmarks/results/study_fashion_mnist_lenet5/gone.png "
                      "does not exist"], problems


def test_loose_template_matches_wrapped_text_and_captures_each_figure():
  """A sentence template ({} per figure) found in text wrapped at other spaces, with its
  figures captured in order; literal text (brackets, dots, ×) must match exactly."""
  loose = _figure_checker().loose
  pattern = loose("keeps {}–{} % of the FLOPs (at 90 %), {}× faster on {}.")
  text = "It keeps 2.2–2.9 %\nof the  FLOPs (at 90\n%), 4.10× faster on two seeds of\nthree."
  m = re.search(pattern, text, re.S)
  assert m is not None
  assert [" ".join(g.split()) for g in m.groups()] == ["2.2", "2.9", "4.10", "two seeds of three"]
  assert re.search(pattern, text.replace("(at 90", "[at 90"), re.S) is None
  assert re.search(pattern, text.replace("4.10×", "4.10x"), re.S) is None
