"""Tests for hypersparse_jax.plotting: reading metrics.jsonl, the figure, the PNG and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hypersparse_jax import plotting

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _records():
    """A small run: 4 warm-up, 5 ART, 3 fine-tune epochs, with the keys the trainer writes."""
    records = []
    phases = ["warmup"] * 4 + ["art"] * 5 + ["finetune"] * 3
    for epoch, phase in enumerate(phases):
        phase_epoch = epoch - {"warmup": 0, "art": 4, "finetune": 9}[phase]
        art = phase == "art"
        records.append({
            "epoch": epoch,
            "phase": phase,
            "phase_epoch": phase_epoch,
            "lambda": 5e-6 * 1.05 ** phase_epoch if art else 0.0,
            "lr": 0.1,
            "train_loss": 2.0 / (epoch + 1),
            "train_accuracy": 0.5 + 0.04 * epoch,
            "pruned_train_accuracy": 0.3 + 0.1 * phase_epoch if art else None,
            "test_accuracy": 0.45 + 0.035 * epoch,
            "sparsity": 0.98 if phase == "finetune" else 0.001 * epoch,
            "window_mean": 0.4 if art else None,
            "best_window_mean": 0.5 if art else None,
            "time": 1.5,
            "some_future_key": {"ignored": True},
        })
    return records


def _write(outdir, records=None, text=None):
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "metrics.jsonl"
    if text is None:
        text = "".join(json.dumps(record) + "\n" for record in records)
    path.write_text(text)
    return path


def _axes_by_label(figure):
    return {axes.get_label(): axes for axes in figure.axes}


def _lines_by_label(axes):
    return {line.get_label(): line for line in axes.get_lines()}


def test_make_figure_panels_hold_the_records_values():
    records = _records()
    figure = plotting.make_figure(records)
    axes = _axes_by_label(figure)
    assert set(axes) == {"accuracy", "lambda", "sparsity"}
    epochs = [r["epoch"] for r in records]

    accuracy = _lines_by_label(axes["accuracy"])
    assert set(accuracy) == {"dense train", "pruned train", "test"}
    np.testing.assert_array_equal(accuracy["dense train"].get_xdata(), epochs)
    np.testing.assert_array_equal(accuracy["dense train"].get_ydata(),
                                  [r["train_accuracy"] for r in records])
    np.testing.assert_array_equal(accuracy["test"].get_ydata(),
                                  [r["test_accuracy"] for r in records])
    pruned = np.asarray(accuracy["pruned train"].get_ydata(), float)
    expected_pruned = [math.nan if r["pruned_train_accuracy"] is None
                       else r["pruned_train_accuracy"] for r in records]
    np.testing.assert_array_equal(pruned, expected_pruned)  # NaN == NaN here
    assert np.isnan(pruned[:4]).all() and np.isnan(pruned[9:]).all()

    lam = _lines_by_label(axes["lambda"])["lambda"]
    art = [r for r in records if r["phase"] == "art"]
    np.testing.assert_array_equal(lam.get_xdata(), [r["epoch"] for r in art])
    np.testing.assert_array_equal(lam.get_ydata(), [r["lambda"] for r in art])
    assert axes["lambda"].get_yscale() == "log"

    sparsity = _lines_by_label(axes["sparsity"])["sparsity"]
    np.testing.assert_array_equal(sparsity.get_xdata(), epochs)
    np.testing.assert_array_equal(sparsity.get_ydata(), [r["sparsity"] for r in records])

    # One shaded span per phase in every panel, and the three phase labels on top.
    for panel in axes.values():
        assert len(panel.patches) == 3
    labels = {text.get_text() for text in axes["accuracy"].texts}
    assert labels == {"warm-up", "ART", "fine-tune"}


def test_phase_spans_cover_contiguous_epochs():
    spans = plotting._phase_spans(_records())
    assert spans == [("warmup", -0.5, 3.5), ("art", 3.5, 8.5), ("finetune", 8.5, 11.5)]


def test_plot_run_writes_png(tmp_path):
    _write(tmp_path, _records())
    written = plotting.plot_run(tmp_path)
    assert written == tmp_path / "curves.png"
    data = written.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 20_000
    # IHDR: width and height, big-endian, right after the signature and chunk header.
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    assert (width, height) == (9 * 120, 9 * 120)

    other = tmp_path / "elsewhere.png"
    assert plotting.plot_run(tmp_path, other) == other
    assert other.read_bytes().startswith(PNG_SIGNATURE)


def test_warmup_only_run_has_no_lambda_line_but_plots(tmp_path):
    records = _records()[:3]
    figure = plotting.make_figure(records)
    lam = _lines_by_label(_axes_by_label(figure)["lambda"])["lambda"]
    assert len(lam.get_xdata()) == 0
    _write(tmp_path, records)
    assert plotting.plot_run(tmp_path).read_bytes().startswith(PNG_SIGNATURE)


def test_read_metrics_skips_blank_lines_and_keeps_last_duplicate(tmp_path):
    records = _records()
    replaced = dict(records[2], test_accuracy=0.123)
    text = "".join(json.dumps(r) + "\n\n" for r in records) + json.dumps(replaced) + "\n"
    path = _write(tmp_path, text=text)
    read = plotting.read_metrics(path)
    assert [r["epoch"] for r in read] == list(range(12))
    assert read[2]["test_accuracy"] == 0.123


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"epoch": 3}', "phase"),
    ('{"epoch": 3, "phase": "art", "lambda": 1e-6, "train_accuracy": 0.5, '
     '"test_accuracy": "high", "sparsity": 0.0}', "test_accuracy"),
    ('{"epoch": 3, "phase": "pretrain", "lambda": 0, "train_accuracy": 0.5, '
     '"test_accuracy": 0.5, "sparsity": 0.0}', "phase"),
])
def test_malformed_line_error_names_file_and_line(tmp_path, bad_line, message):
    lines = [json.dumps(r) for r in _records()[:3]]
    lines.insert(2, bad_line)
    path = _write(tmp_path, text="\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        plotting.plot_run(tmp_path)
    assert f"{path}, line 3" in str(info.value)


def test_missing_or_empty_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plotting.plot_run(tmp_path)
    path = _write(tmp_path, text="\n\n")
    with pytest.raises(ValueError, match="no records") as info:
        plotting.plot_run(tmp_path)
    assert str(path) in str(info.value)


def test_main_exit_codes(tmp_path, capsys):
    run = tmp_path / "run"
    _write(run, _records())
    assert plotting.main([str(run)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(run / "curves.png") and err == ""
    assert (run / "curves.png").read_bytes().startswith(PNG_SIGNATURE)

    custom = tmp_path / "custom.png"
    assert plotting.main([str(run), "--out", str(custom)]) == 0
    assert capsys.readouterr().out.strip() == str(custom)
    assert custom.is_file()

    assert plotting.main([str(tmp_path / "absent")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "metrics.jsonl" in err
    assert "Traceback" not in err

    _write(run, text=json.dumps(_records()[0]) + "\n{oops\n")
    assert plotting.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 2" in err

    _write(run, _records())
    assert plotting.main([str(run), "--out", str(tmp_path / "no_such_dir" / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_dir" in err

    with pytest.raises(SystemExit) as info:
        plotting.main([])
    assert info.value.code == 2


def test_out_extension_decides_the_format_and_others_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    _write(run, _records())
    assert plotting.main([str(run), "--out", str(tmp_path / "x.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".txt" in err and ".png" in err
    assert not (tmp_path / "x.txt").exists()
    assert plotting.main([str(run), "--out", str(tmp_path / "x.pdf")]) == 0
    assert (tmp_path / "x.pdf").read_bytes().startswith(b"%PDF")
    assert plotting.main([str(run), "--out", str(tmp_path / "x.svg")]) == 0
    assert b"<svg" in (tmp_path / "x.svg").read_bytes()[:2000]


def test_plot_run_titles_the_run_and_marks_the_chosen_art_epoch(tmp_path, monkeypatch):
    run = tmp_path / "cifar-run"
    _write(run, _records())
    (run / "config.json").write_text(json.dumps(
        {"dataset": "cifar10", "model": "resnet", "depth": 32, "penalty": "hypersparse",
         "sparsity": 0.98}))
    (run / "summary.json").write_text(json.dumps({"art_best_epoch": 6}))
    drawn = {}
    real = plotting.make_figure

    def spy(records, **kwargs):
        drawn["figure"] = real(records, **kwargs)
        return drawn["figure"]

    monkeypatch.setattr(plotting, "make_figure", spy)
    plotting.plot_run(run)
    figure = drawn["figure"]
    assert figure._suptitle.get_text() == "cifar-run: cifar10, resnet32, hypersparse, sparsity 0.98"
    for axes in figure.axes:
        marks = [line for line in axes.get_lines() if line.get_linestyle() == "--"]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [6, 6]
    assert "chosen ART epoch" in _lines_by_label(_axes_by_label(figure)["accuracy"])
