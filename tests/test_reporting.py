"""Reporting: tables (Markdown + JSON), trade-off / similarity / exit-histogram plots."""
import json

import numpy as np
import pytest
from PIL import Image

from mue_fairseq import reporting as rep
from mue_fairseq.exits.accounting import ExitStats


def _rows():
    rows = [
        dict(task="snli_ve", method="full depth", model="mue", metric_name="accuracy",
             metric=0.892, metrics={"accuracy": 0.892}, etr=0.0, compute_reduction=0.0,
             wallclock_s=10.0),
        dict(task="snli_ve", method="shallower model", model="ofa_tiny", metric_name="accuracy",
             metric=0.852, etr=0.33, compute_reduction=0.4, wallclock_s=6.0),
    ]
    for i, (th, acc, etr) in enumerate([(0.95, 0.888, 0.19), (0.9, 0.886, 0.37),
                                        (0.8, 0.875, 0.55)]):
        rows.append(dict(task="snli_ve", method="MuE", model="mue",
                         thresholds={"image": th, "text": 0.95, "decoder": 1.0},
                         metric_name="accuracy", metric=acc, etr=etr,
                         compute_reduction=etr - 0.05, wallclock_s=10.0 * (1 - etr / 2)))
    for th, acc, etr in [(0.95, 0.85, 0.15), (0.5, 0.79, 0.25)]:
        rows.append(dict(task="snli_ve", method="DeeBERT", model="mue",
                         thresholds={"entropy": th}, metric_name="accuracy", metric=acc,
                         etr=etr))
    rows += [
        dict(task="caption", method="full depth", model="mue", metric_name="CIDEr",
             metric=146.7, metrics={"CIDEr": 146.7, "BLEU-4": 42.8}, etr=0.0,
             compute_reduction=0.0, wallclock_s=20.0, wallclock_reduction=0.0),
        dict(task="caption", method="MuE", model="mue", metric_name="CIDEr", metric=137.0,
             metrics={"CIDEr": 137.0, "BLEU-4": 41.6}, etr=0.402, compute_reduction=0.35,
             wallclock_s=15.0, thresholds={"decoder": 0.95, "decay": True}),
    ]
    return rows


def _png_ok(path, min_w=300, min_h=200):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] >= min_w and im.size[1] >= min_h
        return im.size


def test_write_table_markdown_and_json(tmp_path):
    rows = rep.fill_wallclock_reductions(_rows())
    md, js = tmp_path / "t" / "table.md", tmp_path / "table.json"
    rep.write_table(rows, str(md), str(js), extra_metrics=["BLEU-4"])
    text = md.read_text()
    body = [l for l in text.splitlines()
            if l.startswith("| ") and not l.startswith(("| Method", "| ---"))]
    assert len(body) == len(rows)
    assert "### snli_ve" in text and "### caption" in text and "| BLEU-4 |" in text
    mue = "| MuE | mue | image 0.9, text 0.95, decoder 1 | 88.6 | -37.0% | -32.0% | -18.5% |"
    assert mue in text
    assert "| shallower model | ofa_tiny | - | 85.2 | -33.0% | -40.0% | -40.0% |" in text
    assert "| 137.0 | 41.6 | -40.2% | -35.0% | -25.0% |" in text
    assert "| n/a |" in text  # DeeBERT rows have no wall clock
    back = json.loads(js.read_text())
    assert back == [r.to_dict() for r in rows]
    assert rep.read_rows(str(js)) == rows


def test_formatting_and_row_validation():
    assert rep.fmt_reduction(0.5) == "-50.0%" and rep.fmt_reduction(0.0) == "0%"
    assert rep.fmt_reduction(-0.03) == "+3.0%" and rep.fmt_reduction(None) == "n/a"
    assert rep.fmt_metric("accuracy", 0.885) == "88.5" and rep.fmt_metric("CIDEr", 1.37) == "1.37"
    with pytest.raises(ValueError, match="unknown"):
        rep.ResultRow.from_dict({"task": "x", "method": "y", "bogus": 1})


def test_terminal_summary():
    rows = _rows()
    out = rep.format_terminal_summary(rows)
    assert len(out.splitlines()) == len(rows)
    assert "caption: MuE (mue) [decoder 0.95, decay True]: CIDEr 137.0, ETR -40.2%" in out


def test_plot_tradeoff(tmp_path):
    path = tmp_path / "plots" / "tradeoff.png"
    rep.plot_tradeoff(_rows(), str(path))
    w, h = _png_ok(path, 800, 300)
    assert w > h


def test_plot_similarity_curves(tmp_path):
    rng = np.random.default_rng(0)
    sims = {}
    for name, n_layers in [("image encoder", 6), ("text encoder", 6), ("decoder", 6)]:
        base = 1 - 0.5 * np.exp(-np.arange(n_layers))
        sims[name] = np.clip(base + rng.normal(0, 0.03, (50, n_layers)), -1, 1)
    sims["decoder"][:10, 4:] = np.nan  # exited samples: layers not run
    path = tmp_path / "similarity.png"
    rep.plot_similarity_curves(sims, str(path))
    _png_ok(path)


def test_plot_exit_histograms_from_exit_stats(tmp_path):
    stats = ExitStats(6, 6, 768, 3072)
    stats.add_batch([2, 3, 6], [6, 6, 5], [900, 900, 900], [20, 18, 22],
                    [[3, 2, 6], [1], [4, 4]])
    stats.add_wall_clock(1.5)
    path = tmp_path / "exits.png"
    rep.plot_exit_histograms(stats.summary(), str(path), title="MuE on snli_ve")
    _png_ok(path, 800, 250)
    # no decoder tokens (classification by scoring) still draws
    empty = ExitStats(6, 6, 768, 3072)
    empty.add_batch([2], [6], [900], [20], [[]])
    rep.plot_exit_histograms(empty.summary(), str(tmp_path / "empty.png"))
    _png_ok(tmp_path / "empty.png")
    row = rep.ResultRow.from_exit_stats("snli_ve", "MuE", stats, model="mue",
                                        metric=0.9, metrics={"accuracy": 0.9})
    assert row.etr == pytest.approx(stats.expected_time_reduction())
    assert row.wallclock_s == 1.5 and row.exit_summary["image_exit_histogram"][1] == 1
