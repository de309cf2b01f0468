"""Checks that the figures the READMEs quote still match the committed result files.

    python benchmarks/check_readme_figures.py      # exit 1 and one line per stale figure

Each entry of ``FIGURES`` is one cited sentence: the document, a regular expression that finds
the sentence and captures its figures, the result file it names, and a function that computes
from that file the text each captured figure must read (with the sentence's rounding). A
sentence that is no longer found is reported too, so rewording a sentence means updating its
entry here. When a result file is re-measured, this check (run by ``tests/test_readme.py``)
fails until every sentence quoting it is updated.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Callable, Dict, List, NamedTuple, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join("benchmarks", "results")


class Figure(NamedTuple):
  doc: str                               # path relative to the repository root
  pattern: str                           # regex; each group captures one quoted figure
  source: str                            # result file, relative to the repository root
  expected: Callable[[dict], Sequence[str]]  # what each group must read, from the file


def at(data, path: str):
  """``at(d, "results[0].step_ms.plain")``: a value inside nested dicts and lists."""
  for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
    data = data[int(part[1:-1])] if part.startswith("[") else data[part]
  return data


def span(values, fmt: str) -> str:
  """``'lo–hi'`` of values, each formatted with ``fmt`` (an en dash, as the READMEs write)."""
  return f"{format(min(values), fmt)}–{format(max(values), fmt)}"


def span1(values, fmt: str) -> str:
  """:func:`span`, or the one figure where ``lo`` and ``hi`` read the same."""
  lo, hi = format(min(values), fmt), format(max(values), fmt)
  return lo if lo == hi else f"{lo}–{hi}"


def sci(x: float) -> str:
  """1.5e-6, as the READMEs write it (no zero-padded exponent)."""
  mantissa, exponent = f"{x:.1e}".split("e")
  return f"{mantissa}e{int(exponent)}"


def pct(x: float, digits: int = 2) -> str:
  return f"{100 * x:.{digits}f}"


# Weight studies (benchmarks/study.py) name a run's sparsity ``target``; channel studies
# (benchmarks/study_channels.py) name the fraction of channels ``fraction``.


def loose(template: str) -> str:
  """A pattern from a sentence written as it reads, with ``{}`` where a figure stands: each
  ``{}`` captures (lazily), any run of white space matches any run (lines may wrap anywhere
  a space is), the rest is literal. A template ends in literal text, which bounds its last
  figure."""
  words = lambda part: r"\s+".join(re.escape(w) for w in re.split(r"\s+", part))  # noqa: E731
  return "(.+?)".join(words(part) for part in template.split("{}"))


def cell(report, method, target, key="final_test_accuracy", field="target"):
  return next(c[key]["mean"] for c in report["cells"]
              if c["method"] == method and abs(c[field] - target) < 1e-9)


def seed_run(report, method, target, seed=0, key="final_test_accuracy", field="target"):
  """One seed's run of a study (figures quoted before every seed is in)."""
  return next(r[key] for r in report["runs"] if r["method"] == method
              and abs(r[field] - target) < 1e-9 and r["seed"] == seed)


def seeds_of(report):
  return sorted({r["seed"] for r in report["runs"]})


def _warmup_seconds(d):
  """LeNet-5's and LeNet-300-100's seconds per warm-up epoch in epoch_times.json."""
  by = {m["model"]: m["seconds_per_epoch"]["warmup"] for m in d["models"]}
  return f"{by['lenet5']:.1f}", f"{by['lenet300']:.2f}"


def _cell_seconds(report, seed):
  """Least and most worker-seconds a finished cell of ``seed`` took (its runs' times summed)."""
  cells = {}
  for r in report["runs"]:
    if r["method"] != "dense" and r["seed"] == seed:
      cells[r["target"]] = cells.get(r["target"], 0.0) + r["time"]
  return f"{min(cells.values()):.0f}", f"{max(cells.values()):.0f}"


def paired(report, method, target, key="final_test_accuracy", field="target",
           base="art_hypersparse"):
  """``base`` (ART + HyperSparse) minus ``method`` per seed, in points, seed order."""
  return [100 * (seed_run(report, base, target, s, key, field)
                 - seed_run(report, method, target, s, key, field)) for s in seeds_of(report)]


_COUNT = ("no", "one", "two", "three")


def seeds_ahead(diffs):
  """On how many seeds the differences are positive, as the READMEs word it: 'every seed',
  'two seeds of three', 'one seed of three'."""
  k, n = sum(d > 0 for d in diffs), len(diffs)
  return "every seed" if k == n else f"{_COUNT[k]} seed{'' if k == 1 else 's'} of {_COUNT[n]}"


def span_of(values):
  """(min, max) of ``values`` as the READMEs write them, two decimals."""
  return (f"{min(values):.2f}", f"{max(values):.2f}")


def spread(report, method, target, key="final_test_accuracy"):
  """The standard deviation over seeds of a study cell."""
  return next(c[key]["std"] for c in report["cells"]
              if c["method"] == method and c["target"] == target)


def rows(report, key):
  return [r[key] for r in report["results"]]


def ratio_range(report, models, keys):
  """Range over models of the whole-step ratios (median of round ratios and ratio of medians,
  wall and CPU time), as the READMEs quote ART's whole-step overhead."""
  out = {}
  for m in models:
    vals = [report["results"][m][k][s] for k in keys
            for s in ("median_of_round_ratios", "ratio_of_medians")]
    out[m] = span(vals, ".2f")
  return out


def gpu_row(report, model, batch=64):
  return next(r for r in report["steps_run1"]["results"]
              if r["model"] == model and r["batch"] == batch)


def onnx_row(report, model, sparsity):
  return next(r for r in report["rows"] if r["model"] == model and r["sparsity"] == sparsity)


README, BENCH = "README.md", os.path.join("benchmarks", "README.md")
R = lambda name: os.path.join(RESULTS, name)  # noqa: E731

_WHOLE = ("art_over_plain_wall", "art_over_plain_cpu")

PATTERNS = os.path.join(RESULTS, "patterns_fashion_mnist_lenet300", "study.json")
PATTERNS5 = os.path.join(RESULTS, "patterns_fashion_mnist_lenet5", "study.json")


def pcell(report, pattern, method, stat="mean"):
  """A pattern-study cell's final test accuracy (mean or std over seeds)."""
  return next(c["final_test_accuracy"][stat] for c in report["cells"]
              if c["pattern"] == pattern and c["method"] == method)


def pdiff(report, pattern, method, base="art_hypersparse"):
  """A pattern-study cell: ``base`` minus ``method`` per seed, in points, seed order."""
  acc = {(r["method"], r["seed"]): r["final_test_accuracy"] for r in report["runs"]
         if r["pattern"] == pattern}
  return [100 * (acc[(base, s)] - acc[(method, s)]) for s in seeds_of(report)]


def _pattern_l5_figures(d):
  """The LeNet-5 pattern study's reading: ART + HyperSparse against one-shot and GMP per seed."""
  a = lambda p: pct(pcell(d, p, "art_hypersparse"))  # noqa: E731
  diff = lambda p, m: span_of(pdiff(d, p, m))  # noqa: E731
  behind = lambda p, m: span_of([-v for v in pdiff(d, p, m)])  # noqa: E731
  capped = [r for r in d["runs"] if r["method"] == "art_hypersparse"
            and r["pattern"].startswith("uniform@")]
  every = lambda ok: "every seed" if ok else "not every seed"  # noqa: E731
  uni = [pdiff(d, f"uniform@{x}", "oneshot") for x in ("0.9", "0.98", "0.99")]
  beaten = any(pcell(d, f"{b}@{x}", m) > pcell(d, f"global@{x}", m) for b in ("uniform", "erk")
               for x in ("0.9", "0.98", "0.99") for m in ("art_hypersparse", "oneshot", "gmp"))
  return (f"{d['wall_time'] / 60:.1f}", "a" if beaten else "no",
          a("global@0.99"), a("erk@0.99"), a("uniform@0.99"),
          every(min(pdiff(d, "erk@0.98", "oneshot") + pdiff(d, "erk@0.99", "oneshot")) > 0),
          *diff("erk@0.98", "oneshot"), *diff("erk@0.99", "oneshot"),
          *(diff("erk@0.99", "gmp") if min(pdiff(d, "erk@0.99", "gmp")) > 0 else ("?", "?")),
          every(max(pdiff(d, "erk@0.9", "gmp")) < 0), *behind("erk@0.9", "gmp"),
          seeds_ahead([-v for v in pdiff(d, "erk@0.98", "gmp")]),
          every(min(sum(uni, [])) > 0), *(x for u in uni for x in span_of(u)),
          every(max(pdiff(d, "uniform@0.98", "gmp") + pdiff(d, "uniform@0.99", "gmp")) < 0),
          *behind("uniform@0.98", "gmp"), *behind("uniform@0.99", "gmp"),
          str(sum(r["stop_reason"] == "max_epochs" for r in capped)), str(len(capped)))


def _pattern_l5_nm(d):
  n14 = pdiff(d, "nm1:4", "oneshot") + pdiff(d, "nm1:4", "gmp")
  return ("every seed" if min(n14) > 0 else "not every seed",
          *(pct(pcell(d, f"nm{t}", m)) for t in ("1:4", "2:4")
            for m in ("art_hypersparse", "oneshot", "gmp")),
          seeds_ahead([-v for v in pdiff(d, "nm2:4", "oneshot")]),
          seeds_ahead([-v for v in pdiff(d, "nm2:4", "gmp")]),
          pct(pcell(d, "dense", "dense")))


def _slim_variant(d, model, key):
  return next(m for m in d["models"] if m["model"] == model)["variants"][key]


def _slim_figures(d):
  v90, dense = _slim_variant(d, "vgg11", "channels_90"), _slim_variant(d, "vgg11", "dense")
  v50 = _slim_variant(d, "vgg11", "channels_50")
  l90, ldense = _slim_variant(d, "lenet5", "channels_90"), _slim_variant(d, "lenet5", "dense")
  up = lambda v, e: f"{v[e]['batch_256']['speedup_vs_dense']:.2f}"  # noqa: E731
  return (f"{v90['params']:,}", f"{dense['params']:,}", f"{v90['flops'] / 1e6:.3f}",
          f"{dense['flops'] / 1e6:.3f}", up(v90, "xla"), up(v90, "onnxruntime"),
          up(v50, "xla"), up(v50, "onnxruntime"), f"{l90['params']:,}", f"{ldense['params']:,}",
          up(l90, "onnxruntime"), up(l90, "xla"))


def _unstructured_span(d):
  ups = [x["speedup_vs_dense"] for m in d["models"]
         for e in ("xla", "xla_lax", "onnxruntime")
         for x in m["variants"]["weights_90"][e].values()]
  return min(ups), max(ups)


CHANNELS = os.path.join(RESULTS, "channels_fashion_mnist_lenet5", "study.json")


def _ch(report, method, fraction, seed, key="final_test_accuracy"):
  return seed_run(report, method, fraction, seed, key, field="fraction")


def _chdiff(report, method, fraction, base="art_hypersparse"):
  return paired(report, method, fraction, field="fraction", base=base)


def _chmean(report, method, fraction):
  return cell(report, method, fraction, field="fraction")


def _flops_pct(report, method, fraction):
  return [100 * _ch(report, method, fraction, s, "flops_slim")
          / _ch(report, method, fraction, s, "flops_dense") for s in seeds_of(report)]


def _trained_speeds(d, method, fraction, engine="onnxruntime", batch="batch_256",
                    study=os.path.dirname(CHANNELS)):
  """Measured speed-ups of one channel study's runs in slim_speed_trained.json."""
  st = next(x for x in d["studies"] if os.path.normpath(x["study"]) == os.path.normpath(study))
  return [st["variants"][r["arch"]][engine][batch]["speedup_vs_dense"] for r in st["runs"]
          if r["method"] == method and abs(r["fraction"] - fraction) < 1e-9]


def _channel_figures(r):
  hs = "art_hypersparse"
  d = lambda m, x: span_of(_chdiff(r, m, x))  # noqa: E731
  gradual_gain = [v for x in (0.5, 0.75, 0.9)
                  for v in _chdiff(r, "l1_filter", x, base="gmp_filter")]
  return (f"{r['wall_time'] / 60:.1f}", f"{100 * _chmean(r, hs, 0.5):.2f}",
          f"{100 * _chmean(r, hs, 0.75):.2f}", f"{100 * _chmean(r, 'dense', 0.0):.2f}",
          *d("art_l1", 0.5), *d("l1_filter", 0.5), *d("gmp_filter", 0.5),
          *d("l1_filter", 0.75), *d("gmp_filter", 0.75), seeds_ahead(_chdiff(r, "art_l1", 0.75)),
          *span(_flops_pct(r, hs, 0.5), ".1f").split("–"),
          span(_flops_pct(r, "l1_filter", 0.5), ".1f").split("–")[0],
          *span_of([100 * _ch(r, hs, 0.9, s) for s in seeds_of(r)]),
          seeds_ahead([-v for v in _chdiff(r, "art_l1", 0.9)]),
          _COUNT[sum(v < 0 for v in _chdiff(r, "gmp_filter", 0.9))],
          "every seed at every fraction" if min(gradual_gain) > 0 else "not always",
          *span_of(gradual_gain))


LENET5_SPEED = (
    "medians of {} interleaved repeats, batch 256, the machine otherwise idle): in onnxruntime "
    "the filter methods' models run {} / {} / {}× faster than dense at 50 / 75 / 90 %, ART + "
    "group HyperSparse's {} / {} / {}×; "
    "in XLA the slimmed LeNet-5 models run {}× (the library's narrow-layer path speeds up those "
    "whose layers keep at most 8 channels, `benchmarks/results/narrow_layers.json`; XLA's "
    "convolution gains little from the other narrowings), and the models with 90–99.5 % of "
    "their weights zeroed run {}× in either engine.")


def _channel_speed_figures(d):
  st = next(x for x in d["studies"]
            if os.path.normpath(x["study"]) == os.path.normpath(os.path.dirname(CHANNELS)))
  f = lambda m, x: _trained_speeds(d, m, x)  # noqa: E731
  one = lambda v: f"{v[0]:.2f}" if len(set(v)) == 1 else "differ"  # noqa: E731
  xla = [v["xla"]["batch_256"]["speedup_vs_dense"] for k, v in st["variants"].items()
         if k.startswith("arch")]
  un = [v[e]["batch_256"]["speedup_vs_dense"] for k, v in st["variants"].items()
        if k.startswith("weights_") for e in ("xla", "onnxruntime")]
  return (str(d["repeats"]), one(f("l1_filter", 0.5)), one(f("l1_filter", 0.75)),
          one(f("l1_filter", 0.9)), span(f("art_hypersparse", 0.5), ".2f"),
          span(f("art_hypersparse", 0.75), ".2f"), span(f("art_hypersparse", 0.9), ".2f"),
          span(xla, ".2f"), span(un, ".2f"))


def _channel_per_speed(d):
  """Gradual filter pruning at 50 % against ART + group HyperSparse at 75 %: accuracy (the
  channel study) and measured speed (slim_speed_trained.json, ``d``)."""
  with open(os.path.join(ROOT, CHANNELS), encoding="utf-8") as fh:
    r = json.load(fh)
  g50, s50 = _chmean(r, "gmp_filter", 0.5), _trained_speeds(d, "gmp_filter", 0.5)[0]
  h75 = _chmean(r, "art_hypersparse", 0.75)
  return (f"{100 * g50:.2f}", f"{s50:.2f}", "more" if g50 > h75 else "less", f"{100 * h75:.2f}",
          seeds_ahead([s50 - v for v in _trained_speeds(d, "art_hypersparse", 0.75)]))


def _channel_uniform_figures(r):
  """ART + group HyperSparse per layer (uniform) against the filter methods, same architectures."""
  u = "art_hypersparse_uniform"
  flops = []
  for x in (0.5, 0.75, 0.9):
    mine = {round(v, 1) for v in _flops_pct(r, u, x)}
    theirs = {round(v, 1) for m in ("l1_filter", "gmp_filter") for v in _flops_pct(r, m, x)}
    flops.append(f"{mine.pop():.1f}" if len(mine) == 1 and mine == theirs else "differ")
  d = lambda m, x: _chdiff(r, m, x, base=u)  # noqa: E731
  behind = lambda x: span_of([-v for v in d("gmp_filter", x)])  # noqa: E731
  return (*flops, *(f"{100 * _chmean(r, u, x):.2f}" for x in (0.5, 0.75, 0.9)),
          "every seed" if min(d("l1_filter", 0.5) + d("l1_filter", 0.75)) > 0 else "not always",
          *span_of(d("l1_filter", 0.5)), *span_of(d("l1_filter", 0.75)),
          seeds_ahead(d("gmp_filter", 0.5)),
          *(f"{v:.2f}".replace("-", "−") for v in (min(d("gmp_filter", 0.5)),
                                                   max(d("gmp_filter", 0.5)))),
          "every seed" if max(d("gmp_filter", 0.75) + d("gmp_filter", 0.9)) < 0 else "not always",
          *behind(0.75), *behind(0.9))


VGG_CHANNELS = os.path.join(RESULTS, "channels_fashion_mnist_vgg11_w0.25", "study.json")
_FILTERS = ("l1_filter", "gmp_filter")


def _filter_flops(r, x):
  """The filter methods' FLOPs kept at fraction ``x`` (%, one decimal): the same architecture
  on every seed, so one figure; 'differ' otherwise."""
  v = {f"{f:.1f}" for m in _FILTERS for f in _flops_pct(r, m, x)}
  return v.pop() if len(v) == 1 else "differ"


# The VGG-11 paragraphs, as they read in the README with ``{}`` for each figure (see loose).
VGG_HEAD = (
    "a quarter-width VGG-11 with BatchNorm, {} prunable filters, the LeNet-5 study's schedule, "
    "3 seeds, final fine-tune epoch, {} min on 2 loaded cores; dense {} %).")
VGG_ACCURACY = (
    "global threshold takes filters from every layer (at 90 % it keeps {}–{} per layer) and "
    "keeps {}–{} / {}–{} / {}–{} % of the FLOPs at 50 / 75 / 90 %, against the filter methods' "
    "{} / {} / {} %. It is the {} accurate at 75 and 90 % ({} / {} %): ahead of gradual filter "
    "pruning on {} at 75 % ({} to {} points) and on {} at 90 % ({} to {}), and of one-shot "
    "filter pruning, ART + group L1, its per-layer variant and network slimming on {} (by at "
    "least {} points). At 50 % ({} %) it is ahead of gradual filter pruning on {} ({} to {}); "
    "network slimming reaches {} % there but keeps {}–{} % of the FLOPs.")
VGG_MORE = (
    "Like for like (`--distribution uniform`, the filter methods' architectures), ART + group "
    "HyperSparse reaches {} / {} / {} %: ahead of one-shot filter pruning on {} (by {}–{} "
    "points), behind gradual filter pruning on {} at 75 and 90 % (by {}–{} and {}–{}) and ahead "
    "of it on {} at 50 % ({} to {}). As on LeNet-5, at equal size gradual pruning with the same "
    "18 epochs chooses the filters as well or better; what the global threshold over "
    "normalised magnitudes changes is where the filters go: at 90 % it keeps {}–{}× the filter methods' FLOPs "
    "with {}–{}× their parameters, {}. Network slimming (L1 on the BatchNorm scales, λ "
    "scaled to the total pull of Liu et al.'s schedule, then their one threshold on the raw "
    "scales) thins the later layers instead: at 75 % it leaves one-channel layers on {} "
    "(widths {} on seed 0) and reaches {}–{} %; at 90 % its network is dead on {} (10.00 %, "
    "chance on ten classes; widths {} on seed 0). ART regularised up to its 12-epoch cap in {} "
    "of its {} VGG-11 runs.")

_signed = lambda v: f"{v:.2f}".replace("-", "\u2212")  # noqa: E731  (a minus sign, as written)


def _widths(d):
  """bench_slim_widths.py: the odd filter widths' time over the multiple-of-8 ones (onnxruntime,
  XLA), the rounded-up ART and slimming models' speed-ups (onnxruntime, XLA) and their extra
  FLOPs (%)."""
  v = d["variants"]
  ms = lambda k, e: v[k][e]["batch_256"]["median_ms"]  # noqa: E731
  up = lambda k, e: ms(k, e) / ms(k + "_up8", e)  # noqa: E731
  return {"odd": {e: ms("filters_50_minus1", e) / ms("filters_50", e)
                  for e in ("onnxruntime", "xla")},
          "up": {k: {e: up(k, e) for e in ("onnxruntime", "xla")}
                 for k in ("art_hypersparse_50", "slimming_50")},
          "flops": {k: 100 * (v[k + "_up8"]["flops"] / v[k]["flops"] - 1)
                    for k in ("art_hypersparse_50", "slimming_50")}}


def _widths_figures(d):
  """The README's sentence on widths."""
  w = _widths(d)
  return (f"{w['odd']['onnxruntime']:.2f}", f"{w['odd']['xla']:.2f}",
          f"{w['up']['art_hypersparse_50']['onnxruntime']:.2f}",
          f"{w['flops']['art_hypersparse_50']:.0f}")


def _widths_bench_figures(d):
  """The benchmarks README's sentence on widths."""
  w = _widths(d)
  hs, sl = w["up"]["art_hypersparse_50"], w["up"]["slimming_50"]
  return (f"{w['odd']['onnxruntime']:.2f}", f"{hs['onnxruntime']:.2f}",
          f"{sl['onnxruntime']:.2f}", f"{w['flops']['art_hypersparse_50']:.0f}",
          f"{w['flops']['slimming_50']:.0f}", f"{w['odd']['xla']:.2f}",
          *span([hs["xla"], sl["xla"]], ".2f").split("–"))


def _narrow_figures(d):
  """bench_narrow_layers.py: the speed-ups of the models with a layer of at most 8 channels
  (first and last such width per model, their ratio span) and the ratios of the others."""
  narrow = lambda row: min(row["widths"]) <= 8  # noqa: E731
  out = []
  for model in ("lenet5", "vgg11"):
    rows = [row for row in d["results"] if row["model"] == model and narrow(row)]
    out += ["-".join(map(str, rows[0]["widths"])), "-".join(map(str, rows[-1]["widths"])),
            *span([row["ratio"] for row in rows], ".2f").split("–")]
  return (*out, *span([row["ratio"] for row in d["results"] if not narrow(row)],
                      ".2f").split("–"))


def _vgg_head_figures(r):
  """The prunable filters (kept + removed of any run), wall time and dense accuracy."""
  run = next(q for q in r["runs"] if "channels_kept" in q)
  kept = sum(run["channels_kept"].values())
  return (str(round(kept / (1 - run["channel_sparsity_achieved"]))),
          f"{r['wall_time'] / 60:.1f}", f"{100 * _chmean(r, 'dense', 0.0):.2f}")


def _vgg_channel_figures(r):
  """VGG-11's channel study: where ART + group HyperSparse's filters go, its accuracy against
  the filter methods and the others (first paragraph)."""
  hs = "art_hypersparse"
  d = lambda m, x: _chdiff(r, m, x)  # noqa: E731
  widths90 = [w for s in seeds_of(r) for w in _ch(r, hs, 0.9, s, "slim_model")["widths"]]
  rest = [v for x in (0.75, 0.9)
          for m in ("l1_filter", "art_l1", "art_hypersparse_uniform", "slimming") for v in d(m, x)]
  others = lambda x: max(_chmean(r, m, x) for m in _methods(r) if m != hs)  # noqa: E731
  most = all(_chmean(r, hs, x) > others(x) for x in (0.75, 0.9))
  g = lambda x: (seeds_ahead(d("gmp_filter", x)), _signed(min(d("gmp_filter", x))),  # noqa: E731
                 _signed(max(d("gmp_filter", x))))
  return (str(min(widths90)), str(max(widths90)),
          *(v for x in (0.5, 0.75, 0.9) for v in span(_flops_pct(r, hs, x), ".1f").split("–")),
          *(_filter_flops(r, x) for x in (0.5, 0.75, 0.9)),
          "most" if most else "not the most",
          f"{100 * _chmean(r, hs, 0.75):.2f}", f"{100 * _chmean(r, hs, 0.9):.2f}",
          *g(0.75), *g(0.9),
          "every seed at both fractions" if min(rest) > 0 else "not always", f"{min(rest):.2f}",
          f"{100 * _chmean(r, hs, 0.5):.2f}", *g(0.5),
          f"{100 * _chmean(r, 'slimming', 0.5):.2f}",
          *span(_flops_pct(r, "slimming", 0.5), ".1f").split("–"))


def _methods(report):
  """The pruning methods of a channel study (its cells' methods but the dense baseline)."""
  return sorted({c["method"] for c in report["cells"]} - {"dense"})


def _vgg_spread(r, hs="art_hypersparse", ref="gmp_filter", x=0.9):
  """How ART + group HyperSparse spreads its filters at ``x`` against the filter methods'
  architecture, on every seed: more in the first two layers and fewer in the last four."""
  first = last = True
  for s in seeds_of(r):
    a, b = _ch(r, hs, x, s, "slim_model")["widths"], _ch(r, ref, x, s, "slim_model")["widths"]
    first &= all(p > q for p, q in zip(a[:2], b[:2]))
    last &= sum(a[-4:]) < sum(b[-4:])
  return ("more filters in the first two layers, where the feature maps are largest, and fewer "
          "in the last four" if first and last else "spread differently")


def _vgg_slimming_figures(r):
  """Network slimming on VGG-11 (benchmarks README)."""
  acc = lambda x: [100 * _ch(r, "slimming", x, s) for s in seeds_of(r)]  # noqa: E731
  best = _chmean(r, "slimming", 0.5) >= max(_chmean(r, m, 0.5) for m in _methods(r))
  return (*span_of(acc(0.75)), "every seed" if max(acc(0.9)) <= 10 else "not every seed",
          f"{max(acc(0.9)):.2f}", "most" if best else "not the most",
          f"{100 * _chmean(r, 'slimming', 0.5):.2f}",
          *span(_flops_pct(r, "slimming", 0.5), ".1f").split("–"))


def _vgg_channel_more_figures(r):
  """VGG-11: the per-layer variant against the filter methods, ART's FLOPs against theirs at
  90 %, network slimming's collapse and ART's stop reasons (second paragraph)."""
  u, hs = "art_hypersparse_uniform", "art_hypersparse"
  du = lambda m, x: _chdiff(r, m, x, base=u)  # noqa: E731
  one_shot = [v for x in (0.5, 0.75, 0.9) for v in du("l1_filter", x)]
  behind = [-v for x in (0.75, 0.9) for v in du("gmp_filter", x)]
  ratio = lambda key: [_ch(r, hs, 0.9, s, key) / _ch(r, "gmp_filter", 0.9, s, key)  # noqa: E731
                       for s in seeds_of(r)]
  slim = lambda x: [_ch(r, "slimming", x, s) for s in seeds_of(r)]  # noqa: E731
  one_channel = lambda x: all(  # noqa: E731
      min(_ch(r, "slimming", x, s, "slim_model")["widths"]) == 1 for s in seeds_of(r))
  w = lambda x: "-".join(map(str, _ch(r, "slimming", x, 0, "slim_model")["widths"]))  # noqa: E731
  art = [q for q in r["runs"] if q["method"] in (hs, "art_l1", u)]
  return (*(f"{100 * _chmean(r, u, x):.2f}" for x in (0.5, 0.75, 0.9)),
          "every seed at every fraction" if min(one_shot) > 0 else "not always",
          *span_of(one_shot),
          "every seed" if min(behind) > 0 else "not always",
          *span_of([-v for v in du("gmp_filter", 0.75)]),
          *span_of([-v for v in du("gmp_filter", 0.9)]),
          seeds_ahead(du("gmp_filter", 0.5)), _signed(min(du("gmp_filter", 0.5))),
          _signed(max(du("gmp_filter", 0.5))),
          *span(ratio("flops_slim"), ".1f").split("–"),
          *span(ratio("params_slim"), ".2f").split("–"), _vgg_spread(r),
          "every seed" if one_channel(0.75) else "not every seed", w(0.75),
          *span_of([100 * v for v in slim(0.75)]),
          "every seed" if max(slim(0.9)) <= 0.1 else "not every seed", w(0.9),
          str(sum(q["stop_reason"] == "max_epochs" for q in art)), str(len(art)))


VGG_SPEED = (
    "batch 256), in onnxruntime the trained VGG-11 models of the filter methods run {} / {} / {}× "
    "faster than dense at 50 / 75 / 90 % and ART + group HyperSparse's {} / {} / {}×; in XLA {} / "
    "{} / {}× and {} / {} / {}×. Network slimming's 50 % models, which keep {}–{} % of the FLOPs, "
    "run {}× in onnxruntime: at 50 % the FLOPs do not predict the time (odd widths are slow: "
    "`multiple_of` under channel pruning above). Per unit of measured "
    "speed ART + group HyperSparse is not ahead on VGG-11 either: gradual filter pruning at 75 % "
    "({} %, {}× in onnxruntime) is {} points behind ART + group HyperSparse at 75 % ({} %, {}×) "
    "and {} accurate than it at 90 % ({} %, {}×).")


def _vgg_speed_figures(d):
  study = os.path.dirname(VGG_CHANNELS)
  f = lambda m, x, e: _trained_speeds(d, m, x, engine=e, study=study)  # noqa: E731
  one = lambda v: f"{v[0]:.2f}" if len({round(x, 2) for x in v}) == 1 else "differ"  # noqa: E731
  with open(os.path.join(ROOT, VGG_CHANNELS), encoding="utf-8") as fh:
    r = json.load(fh)
  fr = (0.5, 0.75, 0.9)
  hs, g = "art_hypersparse", "gmp_filter"
  ort = lambda m, x: f(m, x, "onnxruntime")  # noqa: E731
  return (*(one(ort("l1_filter", x) + ort(g, x)) for x in fr),
          *(span1(ort(hs, x), ".2f") for x in fr),
          *(one(f("l1_filter", x, "xla") + f(g, x, "xla")) for x in fr),
          *(span1(f(hs, x, "xla"), ".2f") for x in fr),
          *span(_flops_pct(r, "slimming", 0.5), ".1f").split("–"),
          span1(ort("slimming", 0.5), ".2f"),
          f"{100 * _chmean(r, g, 0.75):.2f}", one(ort(g, 0.75)),
          f"{100 * (_chmean(r, hs, 0.75) - _chmean(r, g, 0.75)):.2f}",
          f"{100 * _chmean(r, hs, 0.75):.2f}", span1(ort(hs, 0.75), ".2f"),
          "more" if _chmean(r, g, 0.75) > _chmean(r, hs, 0.9) else "less",
          f"{100 * _chmean(r, hs, 0.9):.2f}", span1(ort(hs, 0.9), ".2f"))


FIGURES: List[Figure] = [
    # --- quickstart ------------------------------------------------------------------------------
    Figure(README, r"\(2026-12-02, 2 shared CPU cores\): ([\d.]+) % sparsity after (\d+) ART epochs, "
           r"([\d.]+) % pruned test\s+accuracy at the final fine-tune epoch, ([\d.]+) s wall and "
           r"([\d.]+) s of CPU time", R("quickstart.json"),
           lambda d: (pct(d["sparsity"]), str(d["art_epochs"]), pct(d["final_test_accuracy"]),
                      f"{d['wall_s']:.1f}", f"{d['cpu_s']:.1f}")),
    Figure(BENCH, r"\(2026-12-02, 2 CPU cores shared with other jobs\): ([\d.]+) %\s+sparsity, "
           r"([\d.]+) % pruned test accuracy at the final fine-tune epoch \(also the best one\),\s+"
           r"([\d.]+) % dense test accuracy at the end of ART, ([\d.]+) s wall and ([\d.]+) s",
           R("quickstart.json"),
           lambda d: (pct(d["sparsity"]), pct(d["final_test_accuracy"]),
                      pct(d["dense_test_accuracy"]), f"{d['wall_s']:.1f}", f"{d['cpu_s']:.1f}")),
    # --- the Fashion-MNIST preset ------------------------------------------------------------
    Figure(README, r"fashion_mnist` reached ([\d.]+) % sparsity \(([\d,]+) of ([\d,]+) weights "
           r"left\) and ([\d.]+) % test\s+accuracy at the final epoch after (\d+) epochs \((\d+) "
           r"of them ART\) in ([\d.]+) s; LeNet-300-100 trained\s+densely for the same (\d+) epochs "
           r"reaches ([\d.]+) %, ([\d.]+) points above\. The same preset with the\s+reference's "
           r"augmentation \(`--augment`\) ends at ([\d.]+) %", R("fashion_preset.json"),
           lambda d: (pct(d["preset"]["sparsity_achieved"]),
                      f"{d['preset']['num_nonzero_weights']:,}", f"{d['preset']['num_weights']:,}",
                      pct(d["preset"]["test_accuracy"]), str(d["preset"]["total_epochs"]),
                      str(d["preset"]["art_epochs"]), f"{d['preset']['wall_seconds']:.1f}",
                      str(d["dense_same_epochs"]["total_epochs"]),
                      pct(d["dense_same_epochs"]["test_accuracy"]),
                      f"{d['points_below_dense']:.2f}",
                      pct(d["preset_augment"]["test_accuracy"]))),
    # --- the Fashion-MNIST study -------------------------------------------------------------
    Figure(README, r"ART \+ HyperSparse ([\d.]+) / ([\d.]+) / ([\d.]+) /\s+([\d.]+) / ([\d.]+) % at "
           r"90 / 95 / 98 / 99 / 99.5 %, against the dense baseline's ([\d.]+) %",
           R("study_fashion_mnist/study.json"),
           lambda d: tuple(pct(cell(d, "art_hypersparse", s)) for s in (0.9, 0.95, 0.98, 0.99, 0.995))
           + (pct(cell(d, "dense", 0.0)),)),
    Figure(README, r"GMP reaches ([\d.]+) % ± ([\d.]+), ahead at 99 %\), and it wins at 99.5 % "
           r"\(GMP\s+([\d.]+) %, ART \+ L1 ([\d.]+) %\); ART \+ L2 and one-shot\s+pruning fall behind "
           r"from 95 % \(([\d.]+) % and ([\d.]+) % at 99.5 %\)", R("study_fashion_mnist/study.json"),
           lambda d: (pct(cell(d, "gmp", 0.98)),
                      pct(spread(d, "gmp", 0.98)),
                      pct(cell(d, "gmp", 0.995)), pct(cell(d, "art_l1", 0.995)),
                      pct(cell(d, "art_l2", 0.995)), pct(cell(d, "oneshot", 0.995)))),
    Figure(README, r"a LeNet-5 warm-up\s+epoch took ([\d.]+) s against LeNet-300-100's ([\d.]+) s "
           r"in `benchmarks/results/epoch_times.json`", R("epoch_times.json"),
           lambda d: _warmup_seconds(d)),
    Figure(README, r"ART \+\s+HyperSparse " + " / ".join([r"([\d.]+)"] * 5) + r" % at 90 / 95 / 98 / "
           r"99 / 99.5 %, ART \+ L1\s+" + " / ".join([r"([\d.]+)"] * 5) + r" %, GMP "
           + " / ".join([r"([\d.]+)"] * 5) + r" %, one-shot\s+" + " / ".join([r"([\d.]+)"] * 5)
           + r" %, against ([\d.]+) % for the dense model trained (\d+) epochs",
           R("study_fashion_mnist_lenet5/study.json"),
           lambda d: tuple(pct(cell(d, m, x)) for m in ("art_hypersparse", "art_l1", "gmp",
                                                         "oneshot")
                           for x in (0.9, 0.95, 0.98, 0.99, 0.995))
           + (pct(cell(d, "dense", 0.0)),
              str(next(r["epochs"] for r in d["runs"] if r["method"] == "dense")))),
    Figure(README, r"seeds, final fine-tune epoch, (\d+) s on 2 loaded cores, a night",
           R("study_fashion_mnist_lenet5/study.json"), lambda d: (f"{d['wall_time']:.0f}",)),
    Figure(README, r"ART \+ L1 is ahead of it at 99\.5 % on every seed \(by ([\d.]+)–([\d.]+) points\)",
           R("study_fashion_mnist_lenet5/study.json"),
           lambda d: span_of([-x for x in paired(d, "art_l1", 0.995)])),
    Figure(BENCH, r"78 runs, (\d+) s of wall time \(([\d.]+) h, summed",
           R("study_fashion_mnist_lenet5/study.json"),
           lambda d: (f"{d['wall_time']:.0f}", f"{d['wall_time'] / 3600:.1f}")),
    Figure(BENCH, r"seed \(by ([\d.]+)–([\d.]+) points\), and ahead of GMP on every\s+seed at 99 % "
           r"\(by ([\d.]+)–([\d.]+)\) and at 99\.5 % \(by ([\d.]+)–([\d.]+); means ([\d.]+) % "
           r"against ([\d.]+) %\)\. ART \+\s+L1 is ahead of ART \+ HyperSparse at 99\.5 % on every "
           r"seed \(by ([\d.]+)–([\d.]+); means ([\d.]+) % against\s+([\d.]+) %\)",
           R("study_fashion_mnist_lenet5/study.json"),
           lambda d: (span_of([x for m in ("art_l2", "oneshot") for k in (0.98, 0.99, 0.995)
                               for x in paired(d, m, k)])
                      + span_of(paired(d, "gmp", 0.99)) + span_of(paired(d, "gmp", 0.995))
                      + (pct(cell(d, "art_hypersparse", 0.995)), pct(cell(d, "gmp", 0.995)))
                      + span_of([-x for x in paired(d, "art_l1", 0.995)])
                      + (pct(cell(d, "art_l1", 0.995)), pct(cell(d, "art_hypersparse", 0.995))))),
    Figure(BENCH, r"epoch took ([\d.]+) s against LeNet-300-100's ([\d.]+) s\s+\(`results/epoch_times"
           r"\.json`", R("epoch_times.json"), lambda d: _warmup_seconds(d)),
    Figure(BENCH, r"seed 0's cells took (\d+)–(\d+) s of\s+one\s+worker's time each",
           R("study_fashion_mnist_lenet5/study.json"), lambda d: _cell_seconds(d, seed=0)),
    # --- per-layer budgets and N:M ------------------------------------------------------------
    Figure(README, r"final fine-tune epoch, ([\d.]+) min on 2 loaded cores\)\. With ERK budgets\s+"
           r"ART \+ HyperSparse reaches ([\d.]+) / ([\d.]+) / ([\d.]+) % at 90 / 98 / 99 %, against "
           r"gradual pruning\s+with the same budgets at ([\d.]+) / ([\d.]+) / ([\d.]+) % and one-shot "
           r"at ([\d.]+) / ([\d.]+) / ([\d.]+) %", PATTERNS,
           lambda d: (f"{d['wall_time'] / 60:.1f}",)
           + tuple(pct(pcell(d, f"erk@{x:g}", m)) for m in ("art_hypersparse", "gmp", "oneshot")
                   for x in (0.9, 0.98, 0.99))),
    Figure(README, r"global-threshold\s+runs \(([\d.]+) % at 99 %\)", PATTERNS,
           lambda d: (pct(pcell(d, "global@0.99", "art_hypersparse")),)),
    Figure(README, r"\(ART \+ HyperSparse ([\d.]+) % ± ([\d.]+), GMP ([\d.]+) %, one-shot "
           r"([\d.]+) %\): it leaves", PATTERNS,
           lambda d: (pct(pcell(d, "uniform@0.99", "art_hypersparse")),
                      pct(pcell(d, "uniform@0.99", "art_hypersparse", "std")),
                      pct(pcell(d, "uniform@0.99", "gmp")),
                      pct(pcell(d, "uniform@0.99", "oneshot")))),
    Figure(README, r"2:4 ([\d.]+) % \(one-shot\s+([\d.]+) %, GMP ([\d.]+) %\), 1:4 ([\d.]+) % "
           r"\(one-shot ([\d.]+) %, GMP ([\d.]+) %\), dense ([\d.]+) %", PATTERNS,
           lambda d: tuple(pct(pcell(d, f"nm{t}", m)) for t in ("2:4", "1:4")
                           for m in ("art_hypersparse", "oneshot", "gmp"))
           + (pct(pcell(d, "dense", "dense")),)),
    Figure(README, r"cells took ([\d.]+) min on 2 loaded cores\)\. On LeNet-5 (\w+) per-layer budget "
           r"beats the paper's\s+global threshold, for any of the three methods: at 99 % ART \+ "
           r"HyperSparse reaches ([\d.]+) % with\s+it, ([\d.]+) % with ERK and ([\d.]+) % with a "
           r"uniform budget.*?ahead of one-shot pruning on (every seed) at 98 and\s+99 % \(by "
           r"([\d.]+)–([\d.]+) and ([\d.]+)–([\d.]+) points\) and of gradual pruning at 99 % \(by "
           r"([\d.]+)–([\d.]+)\), but\s+behind GMP at 90 % on (every seed) \(by ([\d.]+)–([\d.]+)\) "
           r"and at 98 % on (.+?)\. With uniform\s+budgets it is ahead of one-shot on (every seed) at "
           r"90 / 98 / 99 % \(by ([\d.]+)–([\d.]+), ([\d.]+)–([\d.]+) and\s+([\d.]+)–([\d.]+) "
           r"points\) and behind gradual pruning on (every seed) at 98 and 99 % \(by ([\d.]+)–"
           r"([\d.]+) and\s+([\d.]+)–([\d.]+)\); ART ended at its 12-epoch cap in (\d+) of (\d+)",
           PATTERNS5, _pattern_l5_figures),
    Figure(README, r"Under 1:4 ART \+ HyperSparse is ahead of\s+both on (every seed) \(([\d.]+) %; "
           r"one-shot ([\d.]+) %, GMP ([\d.]+) %\); under 2:4 it is not \(([\d.]+) %;\s+one-shot "
           r"([\d.]+) %, GMP ([\d.]+) %; behind one-shot on (.+?), GMP on (.+?)\), where the dense "
           r"model\s+reaches ([\d.]+) %", PATTERNS5, _pattern_l5_nm),
    # --- speed from channel pruning ----------------------------------------------------------
    Figure(README, r"removed keeps ([\d,]+) of ([\d,]+)\s+parameters and ([\d.]+) of ([\d.]+) MFLOP "
           r"and runs ([\d.]+)× \(XLA\) and ([\d.]+)× \(onnxruntime\) faster\s+at batch 256; with "
           r"50 % removed, ([\d.]+)× and ([\d.]+)×\. LeNet-5 with 90 % removed \(([\d,]+) of "
           r"([\d,]+)\s+parameters\) runs ([\d.]+)× faster in onnxruntime at batch 256 but only "
           r"([\d.]+)× in XLA", R("slim_speed.json"),
           lambda d: _slim_figures(d)),
    Figure(README, loose("with XLA's own convolution and pooling throughout (`xla_lax`) VGG-11 at "
                         "90 % runs {}× and LeNet-5 at 90 % {}× faster."), R("slim_speed.json"),
           lambda d: tuple(f"{_slim_variant(d, m, 'channels_90')['xla_lax']['batch_256']['speedup_vs_dense']:.2f}"
                           for m in ("vgg11", "lenet5"))),
    Figure(BENCH, r"one\s+process \((\d+) repeats; medians\)", R("slim_speed.json"),
           lambda d: (str(d["repeats"]),)),
    Figure(README, r"\*weights\* zeroed \(the paper's unstructured sparsity\) read ([\d.]+)–([\d.]+)× "
           r"of dense", R("slim_speed.json"),
           lambda d: tuple(f"{v:.2f}" for v in _unstructured_span(d))),
    # --- the ART window rules --------------------------------------------------------------------
    Figure(README, r"keeps another entry in (\d+) % of uniformly random accuracy sequences and "
           r"(\d+) % of noisy rising", R("controller_rules.json"),
           lambda d: (pct(d["results"]["uniform"]["decision_differs"], 0),
                      pct(d["results"]["trend"]["decision_differs"], 0))),
    Figure(BENCH, r"They stop at another epoch or keep another entry in ([\d.]+) % of\s+sequences "
           r"with uniform random accuracies and ([\d.]+) % of noisy", R("controller_rules.json"),
           lambda d: (pct(d["results"]["uniform"]["decision_differs"], 1),
                      pct(d["results"]["trend"]["decision_differs"], 1))),
    # --- digits study ----------------------------------------------------------------------------
    Figure(README, r"ART \+ HyperSparse reaches ([\d.]+) % at 90 % sparsity against ([\d.]+) % for\s+"
           r"the dense baseline, and ([\d.]+) % at 99.5 %, where gradual magnitude pruning reaches "
           r"([\d.]+) % and\s+one-shot pruning ([\d.]+) %; ART \+ L1 is ahead of it at 98 and 99 % "
           r"\(([\d.]+) % and ([\d.]+) %\)", R("study/study.json"),
           lambda d: tuple(pct(cell(d, m, t)) for m, t in (
               ("art_hypersparse", 0.9), ("dense", 0.0), ("art_hypersparse", 0.995),
               ("gmp", 0.995), ("oneshot", 0.995), ("art_l1", 0.98), ("art_l1", 0.99)))),
    Figure(BENCH, r"\| ART \+ HyperSparse \| \*\*([\d.]+) ± [\d.]+\*\* \| \*\*([\d.]+) ± [\d.]+\*\* \| "
           r"([\d.]+) ± [\d.]+ \| ([\d.]+) ± [\d.]+ \| \*\*([\d.]+) ±", R("study/study.json"),
           lambda d: tuple(pct(cell(d, "art_hypersparse", s))
                           for s in (0.9, 0.95, 0.98, 0.99, 0.995))),
    Figure(BENCH, r"\| dense baseline \(κ = 0\) \| ([\d.]+) ± ([\d.]+) \| \| \| \| \|\n", R("study/study.json"),
           lambda d: (pct(cell(d, "dense", 0.0)),
                      pct(next(c["final_test_accuracy"]["std"] for c in d["cells"]
                               if c["method"] == "dense")))),
    # --- transformer preset ----------------------------------------------------------------------
    Figure(README, r"summary\): ([\d.]+) % sparsity, ([\d.]+) bits per byte on the test split "
           r"against ([\d.]+) for the dense\s+model", R("pysource_preset/summary.json"),
           lambda d: (pct(d["sparsity_achieved"]), f"{d['test_bits_per_byte']:.3f}",
                      f"{d['dense_test_bits_per_byte']:.3f}")),
    Figure(BENCH, r"sparsity \*\*([\d.]+) %\*\* \(([\d,]+) of ([\d,]+) prunable weights kept\), "
           r"test \*\*([\d.]+) bits per byte\*\*\s+\(([\d.]+) % next-byte accuracy\) against "
           r"\*\*([\d.]+)\*\* \(([\d.]+) %\)", R("pysource_preset/summary.json"),
           lambda d: (pct(d["sparsity_achieved"]), f"{d['num_nonzero_weights']:,}",
                      f"{d['num_weights']:,}", f"{d['test_bits_per_byte']:.3f}",
                      pct(d["test_accuracy"], 1), f"{d['dense_test_bits_per_byte']:.3f}",
                      pct(d["dense_test_accuracy"], 1))),
    Figure(README, r"(\d,\d+) files, ([\d.]+) MB on CPython ([\d.]+) in\s+"
           r"`benchmarks/results/pysource_preset/summary.json`", R("pysource_preset/summary.json"),
           lambda d: (f"{d['corpus']['files']:,}", f"{d['corpus']['bytes'] / 1e6:.1f}",
                      d["corpus"]["python_version"])),
    # --- pysource study --------------------------------------------------------------------------
    Figure(README, r"test bits per byte of ART \+ HyperSparse ([\d.]+) / ([\d.]+) / ([\d.]+) at 90 / 95 /\s+"
           r"98 %, ahead of ART \+ L1 \(([\d.]+) / ([\d.]+) / ([\d.]+)\).*?dense baseline \(([\d.]+)\)",
           R("study_pysource/study.json"),
           lambda d: tuple(f"{cell(d, m, s, 'test_bits_per_byte'):.3f}" for m, s in (
               ("art_hypersparse", 0.9), ("art_hypersparse", 0.95), ("art_hypersparse", 0.98),
               ("art_l1", 0.9), ("art_l1", 0.95), ("art_l1", 0.98), ("dense", 0.0)))),
    Figure(BENCH, r"\| ART \+ HyperSparse \| \*\*([\d.]+) ± [\d.]+\*\* \| \*\*([\d.]+) ± [\d.]+\*\* \| "
           r"\*\*([\d.]+) ± [\d.]+\*\* \|\n\| ART \+ L1 \| ([\d.]+) ± [\d.]+ \| ([\d.]+) ± [\d.]+ \| "
           r"([\d.]+) ±", R("study_pysource/study.json"),
           lambda d: tuple(f"{cell(d, m, s, 'test_bits_per_byte'):.3f}"
                           for m in ("art_hypersparse", "art_l1") for s in (0.9, 0.95, 0.98))),
    Figure(BENCH, r"It took 85 minutes\s+\(([\d,]+) s\)", R("study_pysource/study.json"),
           lambda d: (f"{round(d['wall_time']):,}",)),
    # --- search ----------------------------------------------------------------------------------
    Figure(README, r"took (\d+) s and found ([\d.]+) validation accuracy \(test ([\d.]+)\)",
           R("search_digits.json"),
           lambda d: (f"{d['wall_seconds']:.0f}", f"{d['best']['value']:.4f}",
                      f"{d['best']['test_accuracy']:.4f}")),
    Figure(README, r"hyperband\s+pruned (\d+) trial, median none; both kept the best trial "
           r"\(([\d.]+)\), and the wall times \((\d+) / (\d+) /\s+(\d+) s\)",
           R("search_pruners.json"),
           lambda d: (str(d["rows"][2]["trials_pruned"]), f"{d['rows'][2]['best_value']:.4f}",
                      *(f"{r['wall_seconds']:.0f}" for r in d["rows"]))),
    # --- CPU speed -------------------------------------------------------------------------------
    Figure(README, r"`hypersparse_grad` costs ([\d.]+–[\d.]+)× one elementwise pass over\s+the weights "
           r"\(a sort-based threshold: (\d+–\d+)×\) and runs (\d+–\d+)× faster than the authors'",
           R("penalty.json"),
           lambda d: (span(rows(d, "ratio_grad_to_pass"), ".1f"),
                      span(rows(d, "ratio_sort_to_pass"), ".0f"),
                      span(rows(d, "ratio_reference_to_grad"), ".0f"))),
    Figure(README, r"ART's optimiser update adds an estimated\s+([\d.]+) % to a ResNet-32 training "
           r"step and ([\d.]+) % to a VGG-19-BN step; whole steps in the same run\s+read "
           r"([\d.]+–[\d.]+) \(ResNet-32\) and ([\d.]+–[\d.]+) \(VGG-19-BN\)",
           R("art_overhead_issue15.json"),
           lambda d: (pct(at(d, "results.resnet32.step_ratio_from_update.art") - 1, 1),
                      pct(at(d, "results.vgg19_bn.step_ratio_from_update.art") - 1, 1),
                      *ratio_range(d, ("resnet32", "vgg19_bn"), _WHOLE).values())),
    Figure(README, r"compiled memory analysis: ([\d.]+)× and ([\d.]+)×\)", R("training_issue15.json"),
           lambda d: (f"{at(d, 'results[0].memory.art.total_bytes') / at(d, 'results[0].memory.plain.total_bytes'):.6f}",
                      f"{at(d, 'results[1].memory.art.total_bytes') / at(d, 'results[1].memory.plain.total_bytes'):.5f}")),
    Figure(README, r"ResNet-32 trains at ([\d.]+)× PyTorch's images/s and VGG-19-BN at ([\d.]+)×",
           R("training_issue15.json"),
           lambda d: (f"{at(d, 'results[0].ratios.jax_throughput_over_torch'):.3f}",
                      f"{at(d, 'results[1].ratios.jax_throughput_over_torch'):.3f}")),
    Figure(BENCH, r"\*\*ResNet-32 throughput against PyTorch eager: ([\d.]+)×\*\*",
           R("training_issue15.json"),
           lambda d: (f"{at(d, 'results[0].ratios.jax_throughput_over_torch'):.2f}",)),
    Figure(BENCH, r"optimiser update alone \(`step_ratio_from_update`\) is \*\*([\d.]+)×\*\* for "
           r"ResNet-32 and \*\*([\d.]+)×\*\*", R("art_overhead_issue15.json"),
           lambda d: (f"{at(d, 'results.resnet32.step_ratio_from_update.art'):.3f}",
                      f"{at(d, 'results.vgg19_bn.step_ratio_from_update.art'):.3f}")),
    Figure(BENCH, r"this run: art/plain ([\d.]+)× for ResNet-32 \(all 6 rounds between ([\d.]+) and "
           r"([\d.]+)\) and ([\d.]+)×", R("art_overhead_issue15.json"),
           lambda d: (f"{at(d, 'results.resnet32.art_over_plain_wall.median_of_round_ratios'):.3f}",
                      f"{min(at(d, 'results.resnet32.art_over_plain_wall.round_ratios')):.2f}",
                      f"{max(at(d, 'results.resnet32.art_over_plain_wall.round_ratios')):.2f}",
                      f"{at(d, 'results.vgg19_bn.art_over_plain_wall.median_of_round_ratios'):.3f}")),
    # --- GPU -------------------------------------------------------------------------------------
    Figure(README, r"a training step at batch 64 takes ([\d.]+) ms \(ResNet-32\) and ([\d.]+) ms "
           r"\(VGG-19-BN\), ([\d.]+)× and ([\d.]+)×\s+faster than the PyTorch twins in eager mode "
           r"\(([\d.]+)× / ([\d.]+)× against channels_last\)", R("gpu.json"),
           lambda d: (f"{gpu_row(d, 'resnet32')['step_ms']['plain']:.2f}",
                      f"{gpu_row(d, 'vgg19_bn')['step_ms']['plain']:.2f}",
                      f"{gpu_row(d, 'resnet32')['speedup_jax_plain_over']['torch']:.2f}",
                      f"{gpu_row(d, 'vgg19_bn')['speedup_jax_plain_over']['torch']:.2f}",
                      f"{gpu_row(d, 'resnet32')['speedup_jax_plain_over']['torch_channels_last']:.2f}",
                      f"{gpu_row(d, 'vgg19_bn')['speedup_jax_plain_over']['torch_channels_last']:.2f}")),
    Figure(README, r"the ART step costs ([\d.]+)× \(ResNet-32\) and ([\d.]+)×\s+\(VGG-19-BN\) of the "
           r"plain step. Pruned evaluation per ART epoch costs ([\d.]+) / ([\d.]+) of a training",
           R("gpu.json"),
           lambda d: tuple(
               [f"{gpu_row(d, m)['overhead']['art_over_plain']['median_of_round_ratios']:.2f}"
                for m in ("resnet32", "vgg19_bn")] +
               [f"{gpu_row(d, m)['pruned_eval']['fraction_of_train_epoch']:.2f}"
                for m in ("resnet32", "vgg19_bn")])),
    # --- ONNX ------------------------------------------------------------------------------------
    Figure(README, r"ResNet-20 file is ([\d.]+)× the dense-initializer file at 90 % and ([\d.]+)× at "
           r"98 %; every exported\s+logit was within ([\d.e-]+) \(relative\)", R("onnx_size.json"),
           lambda d: (f"{onnx_row(d, 'resnet20', 0.9)['sparse_vs_dense']:.3f}",
                      f"{onnx_row(d, 'resnet20', 0.98)['sparse_vs_dense']:.3f}",
                      sci(max(max(r['dense_initializers_max_rel_error'], r['sparse_initializers_max_rel_error']) for r in d['rows'])))),
    Figure(BENCH, r"the largest\s+logit difference was ([\d.e-]+) of the largest logit",
           R("onnx_size.json"),
           lambda d: (sci(max(max(r['dense_initializers_max_rel_error'], r['sparse_initializers_max_rel_error']) for r in d['rows'])),)),
    # --- the issue-15 HyperSparse table ----------------------------------------------------------
    Figure(BENCH, r"\| ResNet-32 \(1\.86 M\), 0\.9 \| [\d.]+ / ([\d.]+) \| [\d.]+ \([\d.]+×\) → "
           r"\*\*([\d.]+) \(([\d.]+)×\)\*\*", R("penalty.json"),
           lambda d: (f"{d['results'][0]['fused_pass_ms']:.1f}",
                      f"{d['results'][0]['hypersparse_grad_ms']:.1f}",
                      f"{d['results'][0]['ratio_grad_to_pass']:.2f}")),
    # --- channel pruning on Fashion-MNIST, LeNet-5 ---------------------------------------------
    Figure(README, r"final fine-tune epoch, ([\d.]+) min on 2 loaded cores\)\.\s+At the same fraction "
           r"of LeNet-5's 570.*?most accurate at 50 and 75 % \(([\d.]+) / ([\d.]+) %; dense\s+"
           r"([\d.]+) %\): at 50 % ahead of ART \+ group L1, one-shot and gradual L1-norm filter "
           r"pruning on every\s+seed \(by ([\d.]+)–([\d.]+), ([\d.]+)–([\d.]+) and ([\d.]+)–([\d.]+) "
           r"points\), at 75 % ahead of both filter methods on\s+every seed \(([\d.]+)–([\d.]+) and "
           r"([\d.]+)–([\d.]+)\) and of ART \+ group L1 on (.+?)\. That is not a.*?keeps "
           r"([\d.]+)–([\d.]+) % of the FLOPs at 50 %, where the filter methods, the same fraction "
           r"in\s+every layer, keep ([\d.]+) %\. At 90 % it cuts conv1 to 1–2 filters and the seeds "
           r"scatter\s+\(([\d.]+)–([\d.]+) %\): ART \+ group L1 is ahead of it on (.+?), gradual "
           r"filter pruning on\s+(\w+)\. Gradual filter pruning.*?beats\s+its one-shot form on "
           r"(every seed at every fraction) \(by ([\d.]+)–([\d.]+) points\)",
           CHANNELS, _channel_figures),
    Figure(README, loose(LENET5_SPEED), R("slim_speed_trained.json"), _channel_speed_figures),
    Figure(BENCH, r"3 seeds, ([\d.]+) min of study\s+wall time on 2 loaded cores.*?models keep\s+"
           r"([\d.]+)–([\d.]+)× the FLOPs of the filter methods' at 50 and 75 %", CHANNELS,
           lambda r: (f"{r['wall_time'] / 60:.1f}", *span(
               [_ch(r, "art_hypersparse", x, s, "flops_slim") / _ch(r, "l1_filter", x, s,
                                                                    "flops_slim")
                for x in (0.5, 0.75) for s in seeds_of(r)], ".1f").split("–"))),
    Figure(README, r"filter methods' architectures \(([\d.]+) / ([\d.]+) / ([\d.]+) % of the FLOPs\s+"
           r"at 50 / 75 / 90 %\), hence their speed, and reaches ([\d.]+) / ([\d.]+) / ([\d.]+) %\. "
           r"That is ahead of\s+one-shot filter pruning at 50 and 75 % on (every seed) \(by "
           r"([\d.]+)–([\d.]+) and ([\d.]+)–([\d.]+) points\), but\s+not of gradual filter pruning "
           r"with the same 18 epochs: ahead on (.+?) at 50 %\s+\(([−\d.]+) to ([−\d.]+)\), behind "
           r"on (every seed) at 75 and 90 % \(by ([\d.]+)–([\d.]+) and ([\d.]+)–([\d.]+)\)",
           CHANNELS, _channel_uniform_figures),
    Figure(BENCH, loose("library's paths run LeNet-5 at {} to {} filters {}–{}× faster and VGG-11 at "
                        "{} to {} {}–{}× faster; models whose layers are all wider than 8 run the "
                        "same program both ways and read {}–{} (the noise band)."),
           R("narrow_layers.json"), _narrow_figures),
    Figure(README, loose("7-15-31-31-63-63-63-63 filters takes {}× the time of 8-16-32-32-64-64-64-64 "
                         "in onnxruntime and {}× in XLA; ART + group HyperSparse's 50 % widths "
                         "rounded up run {}× faster in onnxruntime with {} % more FLOPs)."),
           R("slim_widths.json"), _widths_figures),
    Figure(BENCH, loose("one filter fewer per layer takes {}× the time, and the ART and slimming "
                        "models rounded up run {}× and {}× faster with {} % and {} % more FLOPs; "
                        "XLA shows it less ({}× for the filter widths, {}–{}× for the others)."),
           R("slim_widths.json"), _widths_bench_figures),
    # --- channel pruning on Fashion-MNIST, VGG-11 ----------------------------------------------
    Figure(README, loose(VGG_HEAD), VGG_CHANNELS, _vgg_head_figures),
    Figure(BENCH, loose("filters, all {} prunable; the output layer is never pruned), the LeNet-5 "
                        "study's schedule (3 warm-up epochs, ART at most 12, 3 fine-tune epochs, "
                        "SGD at 0.05, no augmentation) with its own dense runs ({} / {} / {} % "
                        "for seeds 0 / 1 / 2), 50 / 75 / 90 % of the filters, 3 seeds, {} runs."),
           VGG_CHANNELS, lambda r: (_vgg_head_figures(r)[0], *(
               f"{100 * _ch(r, 'dense', 0.0, s):.2f}" for s in (0, 1, 2)), str(len(r["runs"])))),
    Figure(BENCH, loose("`study.json` records {} min over the sittings that finished runs."),
           VGG_CHANNELS, lambda r: (f"{r['wall_time'] / 60:.1f}",)),
    # the lost sitting's log figures equal the rerun's, which study.json holds
    Figure(BENCH, loose("as the lost sitting's log (at 75 / 90 %: ART + group HyperSparse {} / {} "
                        "%, gradual filter pruning {} / {} %, network slimming {} / {} %)."),
           VGG_CHANNELS, lambda r: tuple(f"{100 * _ch(r, m, x, 2):.2f}" for m in (
               "art_hypersparse", "gmp_filter", "slimming") for x in (0.75, 0.9))),
    Figure(BENCH, loose("ART regularised up to its 12-epoch cap in {} of its {} runs"),
           VGG_CHANNELS, lambda r: _vgg_channel_more_figures(r)[-2:]),
    Figure(BENCH, loose("and reaches {}–{} %; at 90 % the network is dead on {} ({} %, chance). "
                        "At 50 % it is the {} accurate method ({} %), with {}–{} % of the FLOPs "
                        "kept."), VGG_CHANNELS, _vgg_slimming_figures),
    Figure(README, loose(VGG_ACCURACY), VGG_CHANNELS, _vgg_channel_figures),
    Figure(README, loose(VGG_MORE), VGG_CHANNELS, _vgg_channel_more_figures),
    Figure(README, loose(VGG_SPEED), R("slim_speed_trained.json"), _vgg_speed_figures),
    Figure(README, loose("gradual filter pruning at 50 % ({} %, {}×) is {} accurate than ART + "
                         "group HyperSparse at 75 % ({} %) and faster on {}."),
           R("slim_speed_trained.json"), _channel_per_speed),
]


# Tables the READMEs copy from a study's study.md: (doc, study.md, the table's header line start).
TABLES = [
    (README, "benchmarks/results/study_fashion_mnist/study.md", "| method | 90 % | 95 %"),
    (README, "benchmarks/results/study_fashion_mnist_lenet5/study.md", "| method | 90 % | 95 %"),
    (BENCH, "benchmarks/results/study_fashion_mnist_lenet5/study.md", "| method | 90 % | 95 %"),
    (README, "benchmarks/results/patterns_fashion_mnist_lenet300/study.md", "| budget | method |"),
    (README, "benchmarks/results/patterns_fashion_mnist_lenet300/study.md", "| N:M | sparsity |"),
    (README, "benchmarks/results/patterns_fashion_mnist_lenet5/study.md", "| budget | method |"),
    (README, "benchmarks/results/patterns_fashion_mnist_lenet5/study.md", "| N:M | sparsity |"),
    (README, "benchmarks/results/channels_fashion_mnist_lenet5/study.md",
     "| method | 50 % of channels"),
    (README, "benchmarks/results/channels_fashion_mnist_lenet5/study.md", "| method | 50 %: FLOPs"),
    (README, "benchmarks/results/channels_fashion_mnist_vgg11_w0.25/study.md",
     "| method | 50 % of channels"),
    (README, "benchmarks/results/channels_fashion_mnist_vgg11_w0.25/study.md",
     "| method | 50 %: FLOPs"),
]


def table_block(text: str, header: str) -> str:
  """The Markdown table of ``text`` whose header line starts with ``header``."""
  lines = text.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith(header))
  end = start
  while end < len(lines) and lines[end].startswith("|"):
    end += 1
  return "\n".join(lines[start:end])


def check_tables(docs: Dict[str, str], root: str = ROOT) -> List[str]:
  """Copied tables must equal their study.md's, line for line; images must exist."""
  problems = []
  for doc, source, header in TABLES:
    with open(os.path.join(root, source), encoding="utf-8") as fh:
      want = table_block(fh.read(), header)
    if want not in docs[doc]:
      problems.append(f"{doc}: the table of {source} (header {header!r}) is missing or differs "
                      f"from the file's")
  for doc, text in docs.items():
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
      if not os.path.isfile(os.path.join(root, os.path.dirname(doc), target)):
        problems.append(f"{doc}: image {target} does not exist")
  return problems


def load_docs(root: str = ROOT) -> Dict[str, str]:
  docs = {}
  for f in {f.doc for f in FIGURES}:
    with open(os.path.join(root, f), encoding="utf-8") as fh:
      docs[f] = fh.read()
  return docs


def check(docs: Dict[str, str] = None, root: str = ROOT) -> List[str]:
  """One line per problem: a sentence not found, or a figure that does not match its file."""
  docs = load_docs(root) if docs is None else docs
  problems = check_tables(docs, root)
  for fig in FIGURES:
    with open(os.path.join(root, fig.source), encoding="utf-8") as fh:
      data = json.load(fh)
    expected = tuple(str(e) for e in fig.expected(data))
    found = list(re.finditer(fig.pattern, docs[fig.doc], re.S))
    if not found:
      problems.append(f"{fig.doc}: sentence not found (pattern {fig.pattern[:60]!r}…); "
                      f"it should quote {fig.source}: {', '.join(expected)}")
      continue
    for m in found:
      quoted = tuple(" ".join(g.split()) for g in m.groups())  # words may wrap across lines
      if quoted != expected:
        line = docs[fig.doc].count("\n", 0, m.start()) + 1
        wrong = [f"{g!r} (file: {e!r})" for g, e in zip(quoted, expected) if g != e]
        problems.append(f"{fig.doc}:{line}: figures differ from {fig.source}: {'; '.join(wrong)}")
  return problems


def main() -> int:
  problems = check()
  for p in problems:
    print(p)
  print(f"{len(FIGURES)} cited sentences checked, {len(problems)} problem(s)", file=sys.stderr)
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
