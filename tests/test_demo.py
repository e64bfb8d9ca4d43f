"""Miniature end-to-end run of the main job (``python -m mue_fairseq.demo --tiny``)."""
import json
import os

from mue_fairseq import demo


def test_demo_tiny_end_to_end(tmp_path, capsys):
    work, results = tmp_path / "work", tmp_path / "results"
    assert demo.main(["--tiny", "--work-dir", str(work), "--results", str(results)]) == 0

    rows = json.loads((results / "results.json").read_text())
    assert {r["task"] for r in rows} == {"snli_ve", "caption"}
    for task in ("snli_ve", "caption"):
        methods = {r["method"] for r in rows if r["task"] == task}
        assert {"full depth", "MuE", "MuE (paper's thresholds)", "DeeBERT", "PABEE", "static depth",
                "shallower model"} <= methods, methods
        for r in rows:
            assert r["model"] and r["metric"] is not None and r["etr"] is not None
    md = (results / "results.md").read_text()
    assert "### snli_ve" in md and "### caption" in md
    json.loads((results / "run.json").read_text())
    calibration = json.loads((results / "calibration.json").read_text())
    assert set(calibration) == {"snli_ve", "caption"} and all("statement" in c for c in calibration.values())

    from PIL import Image

    pngs = ["tradeoff.png"] + [f"{k}_{t}.png" for k in ("similarity", "exits") for t in ("snli_ve", "caption")]
    for name in pngs:
        with Image.open(results / name) as im:
            im.verify()
    out = capsys.readouterr().out
    assert "snli_ve" in out and "calibration" in out

    # a re-run reuses the cached data and checkpoints
    mtime = os.path.getmtime(work / "ckpt_snli_ve_mue" / "checkpoint_last.pt")
    assert demo.main(["--tiny", "--work-dir", str(work), "--results", str(results)]) == 0
    assert os.path.getmtime(work / "ckpt_snli_ve_mue" / "checkpoint_last.pt") == mtime
