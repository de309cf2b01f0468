"""Training curves of a HyperSparse / ART run, and the ``hypersparse-plot`` command.

A training run writes ``OUTDIR/metrics.jsonl``, one JSON object per epoch, with the keys
``epoch`` (global, 0-based), ``phase`` (``"warmup"``, ``"art"`` or ``"finetune"``),
``phase_epoch``, ``lambda``, ``lr``, ``train_loss``, ``train_accuracy``,
``pruned_train_accuracy`` (null outside ART), ``test_accuracy``, ``sparsity``, ``window_mean``,
``best_window_mean`` and ``time``; unknown keys are ignored. :func:`plot_run` turns it into one
PNG with three panels sharing the epoch axis:

1. accuracies: dense train, pruned train (ART epochs) and test;
2. the regularisation strength λ on a log scale (epochs with λ > 0 only);
3. sparsity, the fraction of prunable weights that are exactly zero.

The warm-up, ART and fine-tune epochs are shaded and labelled in every panel. Figures are
drawn with matplotlib's object API on an Agg canvas, so no display (and no pyplot state) is
involved.

Usage::

    hypersparse-plot runs/resnet32 [--out curves.png]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

__all__ = ["METRICS_FILE", "PHASES", "read_metrics", "make_figure", "plot_run", "main"]

METRICS_FILE = "metrics.jsonl"
PHASES = ("warmup", "art", "finetune")

_PHASE_LABELS = {"warmup": "warm-up", "art": "ART", "finetune": "fine-tune"}
_PHASE_COLOURS = {"warmup": "tab:blue", "art": "tab:orange", "finetune": "tab:green"}
# Keys each record must have (number, or null where allowed) for the panels.
_REQUIRED_NUMBERS = ("lambda", "train_accuracy", "test_accuracy", "sparsity")
_OPTIONAL_NUMBERS = ("pruned_train_accuracy",)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_record(record: Any, where: str) -> dict[str, Any]:
    """Validates one parsed line; ``where`` is ``'FILE, line N'``."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    epoch = record.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ValueError(f"{where}: 'epoch' must be an integer >= 0, got {epoch!r}")
    if record.get("phase") not in PHASES:
        raise ValueError(f"{where}: 'phase' must be one of {PHASES}, got {record.get('phase')!r}")
    for key in _REQUIRED_NUMBERS:
        if not _is_number(record.get(key)):
            raise ValueError(f"{where}: {key!r} must be a number, got {record.get(key)!r}")
    for key in _OPTIONAL_NUMBERS:
        if record.get(key) is not None and not _is_number(record[key]):
            raise ValueError(f"{where}: {key!r} must be a number or null, got {record[key]!r}")
    return record


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Reads and validates a ``metrics.jsonl`` file.

    Blank lines are skipped. If an epoch appears more than once (a resumed run that appended
    again), the last record for it wins. Records come back sorted by epoch.

    Args:
        path: the ``metrics.jsonl`` file.

    Returns:
        list of the records (dicts, as parsed), one per epoch, sorted by ``epoch``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no records, or a line is not valid JSON or lacks a needed
            key (``epoch``, ``phase``, ``lambda``, ``train_accuracy``, ``test_accuracy``,
            ``sparsity``) or has a value of the wrong type; the message names the file and the
            line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected the run's {METRICS_FILE})")
    by_epoch: dict[int, dict[str, Any]] = {}
    with path.open("r", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
            record = _check_record(record, where)
            by_epoch[record["epoch"]] = record
    if not by_epoch:
        raise ValueError(f"{path}: no records (the file is empty)")
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _phase_spans(records: Sequence[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """Contiguous runs of one phase as ``(phase, first epoch - 0.5, last epoch + 0.5)``."""
    spans: list[tuple[str, float, float]] = []
    for record in records:
        phase, epoch = record["phase"], record["epoch"]
        if spans and spans[-1][0] == phase:
            spans[-1] = (phase, spans[-1][1], epoch + 0.5)
        else:
            spans.append((phase, epoch - 0.5, epoch + 0.5))
    return spans


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


def make_figure(records: Sequence[dict[str, Any]], *, title: str | None = None,
                art_epoch: int | None = None) -> Figure:
    """Draws the training curves of a run (see the module docstring for the panels).

    The axes carry labels ``"accuracy"``, ``"lambda"`` and ``"sparsity"`` (``Axes.get_label``)
    and the lines the labels ``"dense train"``, ``"pruned train"``, ``"test"``, ``"lambda"`` and
    ``"sparsity"``; x data are the epochs, y data the record values as given (accuracies and
    sparsity as fractions, shown as percent). The λ line holds only the epochs with λ > 0;
    pruned accuracy is NaN where the record has null.

    Args:
        records: per-epoch records as returned by :func:`read_metrics` (sorted by epoch).
        title: figure title (e.g. the run directory and its settings).
        art_epoch: the ART epoch whose pruned model was fine-tuned: a dashed vertical line
            labelled ``"chosen ART epoch"`` in every panel.

    Returns:
        a ``matplotlib.figure.Figure`` attached to an Agg canvas.

    Raises:
        ValueError: ``records`` is empty.
    """
    if not records:
        raise ValueError("no records to plot")
    epochs = [record["epoch"] for record in records]

    figure = Figure(figsize=(9, 9), layout="constrained")
    FigureCanvasAgg(figure)
    ax_acc, ax_lambda, ax_sparsity = figure.subplots(3, 1, sharex=True)
    ax_acc.set_label("accuracy")
    ax_lambda.set_label("lambda")
    ax_sparsity.set_label("sparsity")

    ax_acc.plot(epochs, [record["train_accuracy"] for record in records],
                label="dense train", color="tab:blue")
    ax_acc.plot(epochs, [_as_float(record.get("pruned_train_accuracy")) for record in records],
                label="pruned train", color="tab:red", marker=".", markersize=4)
    ax_acc.plot(epochs, [record["test_accuracy"] for record in records],
                label="test", color="black")
    ax_acc.set_ylabel("accuracy")
    ax_acc.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax_acc.legend(loc="lower right")

    regularised = [record for record in records if record["lambda"] > 0]
    ax_lambda.plot([record["epoch"] for record in regularised],
                   [record["lambda"] for record in regularised],
                   label="lambda", color="tab:purple", marker=".", markersize=4)
    ax_lambda.set_ylabel("λ (log scale)")
    if regularised:
        ax_lambda.set_yscale("log")
    else:
        ax_lambda.text(0.5, 0.5, "no epochs with λ > 0", transform=ax_lambda.transAxes,
                       ha="center", va="center", color="grey")

    ax_sparsity.plot(epochs, [record["sparsity"] for record in records],
                     label="sparsity", color="tab:brown")
    ax_sparsity.set_ylabel("sparsity")
    ax_sparsity.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax_sparsity.set_xlabel("epoch")

    spans = _phase_spans(records)
    for axes in (ax_acc, ax_lambda, ax_sparsity):
        for phase, start, stop in spans:
            axes.axvspan(start, stop, color=_PHASE_COLOURS[phase], alpha=0.08, linewidth=0)
        axes.grid(True, alpha=0.3)
    for phase, start, stop in spans:
        # Labels sit just above the top panel, in data x / axes y coordinates.
        ax_acc.text((start + stop) / 2, 1.01, _PHASE_LABELS[phase],
                    transform=ax_acc.get_xaxis_transform(), ha="center", va="bottom",
                    color=_PHASE_COLOURS[phase], fontsize=9)
    ax_acc.set_xlim(spans[0][1], spans[-1][2])
    if art_epoch is not None:
        for axes in (ax_acc, ax_lambda, ax_sparsity):
            axes.axvline(art_epoch, color="tab:red", linestyle="--", linewidth=1,
                         label="chosen ART epoch" if axes is ax_acc else None)
        ax_acc.legend(loc="lower right")
    if title:
        figure.suptitle(title)
    return figure


_FORMATS = (".png", ".pdf", ".svg")


def _run_title(outdir: Path) -> tuple[str, int | None]:
    """``(title, chosen ART epoch)`` from the run's config.json / summary.json where present."""
    def load(name):
        try:
            with open(outdir / name) as f:
                value = json.load(f)
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    config, summary = load("config.json"), load("summary.json")
    title = outdir.resolve().name
    if config:
        model = f"{config.get('model')}{config.get('depth') or ''}"
        title += (f": {config.get('dataset')}, {model}, {config.get('penalty')}, "
                  f"sparsity {config.get('sparsity')}")
    art_epoch = summary.get("art_best_epoch")
    return title, art_epoch if isinstance(art_epoch, int) else None


def plot_run(outdir: str | Path, out_path: str | Path | None = None) -> Path:
    """Plots ``OUTDIR/metrics.jsonl`` of a training run into a PNG.

    Args:
        outdir: the run's output directory, holding ``metrics.jsonl``.
        out_path: where to write the figure; default ``OUTDIR/curves.png``. Its directory must
            exist; the format follows the extension (``.png``, ``.pdf`` or ``.svg``). The title
            names the run (from ``config.json``); the chosen ART epoch (``summary.json``'s
            ``art_best_epoch``) is marked.

    Returns:
        the path of the PNG written.

    Raises:
        FileNotFoundError: ``metrics.jsonl`` does not exist in ``outdir``.
        ValueError: the file is empty or malformed (message names the file and line), or
            ``out_path`` has another extension.
        OSError: the PNG cannot be written.
    """
    outdir = Path(outdir)
    out_path = Path(out_path) if out_path is not None else outdir / "curves.png"
    if out_path.suffix.lower() not in _FORMATS:
        raise ValueError(f"cannot write {str(out_path)!r}: its extension must be one of "
                         f"{', '.join(_FORMATS)} (the format follows the extension)")
    records = read_metrics(outdir / METRICS_FILE)
    title, art_epoch = _run_title(outdir)
    figure = make_figure(records, title=title, art_epoch=art_epoch)
    figure.savefig(out_path, format=out_path.suffix.lower()[1:], dpi=120)
    return out_path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line ``hypersparse-plot OUTDIR [--out PATH]``: plots a run, prints the PNG path.

    Args:
        argv: arguments without the program name; default ``sys.argv[1:]``.

    Returns:
        0 on success; 2 when the metrics are missing or malformed or the PNG cannot be written
        (a one-line message goes to stderr, no traceback). Bad command-line usage exits with
        status 2 through argparse.
    """
    parser = argparse.ArgumentParser(
        prog="hypersparse-plot",
        description=f"Plot the training curves of a HyperSparse/ART run "
                    f"from OUTDIR/{METRICS_FILE}.")
    parser.add_argument("outdir", help=f"run directory holding {METRICS_FILE}")
    parser.add_argument("--out", default=None,
                        help="figure to write, .png, .pdf or .svg (default: OUTDIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        written = plot_run(args.outdir, args.out)
    except (OSError, ValueError) as err:
        message = " ".join(str(err).split())
        print(f"hypersparse-plot: error: {message}", file=sys.stderr)
        return 2
    print(written)
    return 0


if __name__ == "__main__":
    from hypersparse_jax import console
    console.plot()
