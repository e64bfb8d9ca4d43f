"""Calibrate the three MuE exit thresholds of a trained model with a statistical guarantee.

    python -m mue_fairseq.calibrate --path CKPT --task snli_ve --bpe-dir BPE \\
        --calibration-data dev.tsv --test-data test.tsv --selected-cols 0,2,3,4,5 \\
        --allowed-drop 0.01 [--delta 0.1] [--out calibration/]

Evaluates the model (``mue_fairseq.evaluate``) at full depth and along a path of thresholds
(image, text, decoder), most conservative first (``--thresholds "0.99,0.99,0.99;0.95,0.95,0.95;..."``),
on the calibration split; picks with Learn-then-Test (``mue_fairseq.calibration``) the
thresholds with the largest ETR whose expected quality drop against full depth is at most
``--allowed-drop`` (relative: 0.01 = 1% of full-depth accuracy / CIDEr) with probability
``1 - delta``; then reports the test split at those thresholds. Captions use the decaying
decoder threshold (Eq. 11, θ = the decoder value, β 0.95, τ 1) and per-image CIDEr-D.
"""
import argparse
import json
import os
from typing import List, Optional, Sequence, Tuple

DEFAULT_PATH = ((0.99, 0.99, 0.99), (0.97, 0.97, 0.97), (0.95, 0.95, 0.95), (0.9, 0.95, 0.95),
                (0.9, 0.9, 0.9), (0.85, 0.85, 0.85))


def exit_options(policy: str, **kw) -> List[str]:
    """Exit options of ``mue_fairseq.evaluate`` for one configuration: ``full``, ``mue``
    (image/text/decoder thresholds; ``decay=True`` for the decaying decoder threshold),
    ``deebert`` (entropy), ``pabee`` (patience), ``static`` (layer)."""
    if policy == "full":
        return []
    if policy == "mue":
        opts = ["--encoder-exit", "--image-exit-threshold", str(kw["image"]),
                "--text-exit-threshold", str(kw["text"]), "--decoder-exit-policy", "similarity"]
        if kw.get("decay"):
            return opts + ["--decoder-threshold-decay", "--decay-theta", str(kw["decoder"]),
                           "--decay-beta", "0.95", "--decay-tau", "1"]
        return opts + ["--decoder-exit-threshold", str(kw["decoder"])]
    if policy == "deebert":
        return ["--decoder-exit-policy", "deebert", "--deebert-entropy-threshold", str(kw["entropy"])]
    if policy == "pabee":
        return ["--decoder-exit-policy", "pabee", "--pabee-patience", str(kw["patience"])]
    if policy == "static":
        return ["--decoder-exit-policy", "static", "--static-exit-layer", str(kw["layer"])]
    raise ValueError(f"unknown exit policy {policy!r}")


def evaluate(ckpt: str, task: str, tsv: str, selected_cols: str, bpe_dir: str, options: Sequence[str],
             out_dir: str, force: bool = False, extra: Sequence[str] = ("--cpu",)):
    """Run ``mue_fairseq.evaluate`` on one TSV (cached in `out_dir` unless `force`); returns
    (metrics, ExitStats, per-sample quality: SNLI-VE 1/0, caption CIDEr-D per image)."""
    from mue_fairseq.exits.accounting import ExitStats

    metrics_path = os.path.join(out_dir, "test_metrics.json")
    if force or not os.path.exists(metrics_path):
        from mue_fairseq.evaluate import run

        run([tsv, "--path", ckpt, "--task", task, "--gen-subset", "test", "--results-path", out_dir,
             "--bpe-dir", bpe_dir, "--selected-cols", selected_cols, "--batch-size", "16",
             "--beam", "1" if task == "caption" else "5", "--max-len-b", "16", "--no-repeat-ngram-size", "3",
             "--no-progress-bar", "--num-workers", "0", *extra, *options])
    with open(metrics_path) as f:
        metrics = json.load(f)
    stats = ExitStats.from_json(os.path.join(out_dir, "test_exit_stats.json"))
    return metrics, stats, per_sample_quality(task, out_dir, tsv, selected_cols)


def per_sample_quality(task: str, out_dir: str, tsv: str, selected_cols: str) -> List[float]:
    if task == "snli_ve":
        with open(os.path.join(out_dir, "test_sample_scores.json")) as f:
            return json.load(f)
    from mue_fairseq.caption_metrics import read_references
    from mue_fairseq.cider import CiderD

    with open(os.path.join(out_dir, "test_predict.json")) as f:
        predictions = json.load(f)
    refs = read_references(tsv, [int(c) for c in selected_cols.split(",")])
    captions = [p["caption"] for p in predictions]
    return [float(s) for s in CiderD(None).scores(captions, [refs[p["image_id"]] for p in predictions])]


def calibrate(ckpt: str, task: str, tsv: str, selected_cols: str, bpe_dir: str, out_dir: str,
              path: Sequence[Tuple[float, float, float]] = DEFAULT_PATH, allowed_drop: float = 0.01,
              delta: float = 0.1, force: bool = False):
    """Learn-then-Test along `path` on the calibration TSV; returns the CalibrationResult."""
    from mue_fairseq.calibration import Thresholds, calibrate_thresholds

    decay = task == "caption"
    _, _, full = evaluate(ckpt, task, tsv, selected_cols, bpe_dir, exit_options("full"),
                          os.path.join(out_dir, "full"), force)
    quality, etr = {}, {}
    for image, text, decoder in path:
        _, stats, q = evaluate(ckpt, task, tsv, selected_cols, bpe_dir,
                               exit_options("mue", image=image, text=text, decoder=decoder, decay=decay),
                               os.path.join(out_dir, f"{image}_{text}_{decoder}"), force)
        key = Thresholds(image, text, decoder)
        quality[key], etr[key] = q, stats.expected_time_reduction()
    return calibrate_thresholds(full, quality, etr, epsilon=allowed_drop, delta=delta,
                                metric_name="accuracy" if task == "snli_ve" else "cider",
                                ordering="given", order=[Thresholds(*p) for p in path])


def _parse_path(text: str) -> List[Tuple[float, float, float]]:
    points = []
    for part in text.split(";"):
        values = tuple(float(v) for v in part.split(","))
        if len(values) != 3:
            raise argparse.ArgumentTypeError(f"--thresholds: {part!r} is not image,text,decoder")
        points.append(values)
    return points


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mue_fairseq.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--path", required=True, help="checkpoint")
    p.add_argument("--task", required=True, choices=["snli_ve", "caption"])
    p.add_argument("--bpe-dir", required=True)
    p.add_argument("--calibration-data", required=True, help="TSV of the calibration split")
    p.add_argument("--test-data", help="TSV to report at the chosen thresholds")
    p.add_argument("--selected-cols", required=True, help="as for evaluation (SNLI-VE 0,2,3,4,5; caption 1,4,2)")
    p.add_argument("--allowed-drop", type=float, default=0.01, help="relative to full depth (0.01 = 1%%)")
    p.add_argument("--delta", type=float, default=0.1, help="the guarantee holds with probability 1 - delta")
    p.add_argument("--thresholds", type=_parse_path, default=DEFAULT_PATH,
                   help='path "i,t,d;i,t,d;..." tested in this order, most conservative first')
    p.add_argument("--out", default="calibration", help="evaluations and calibration.json")
    p.add_argument("--force", action="store_true", help="re-evaluate what is cached in --out")
    args = p.parse_args(argv)
    for name in ("path", "bpe_dir", "calibration_data", "test_data"):
        value = getattr(args, name)
        if value and not os.path.exists(value):
            p.error(f"--{name.replace('_', '-')} not found: {value}")
    result = calibrate(args.path, args.task, args.calibration_data, args.selected_cols, args.bpe_dir,
                       os.path.join(args.out, "calibration"), args.thresholds, args.allowed_drop,
                       args.delta, args.force)
    record = result.to_dict()
    print(result.statement)
    if args.test_data and result.thresholds is not None:
        image, text, decoder = result.thresholds
        metrics, stats, _ = evaluate(args.path, args.task, args.test_data, args.selected_cols, args.bpe_dir,
                                     exit_options("mue", image=image, text=text, decoder=decoder,
                                                  decay=args.task == "caption"),
                                     os.path.join(args.out, "test"), args.force)
        record["test"] = {"metrics": metrics, "etr": stats.expected_time_reduction(),
                          "compute_weighted_reduction": stats.compute_weighted_reduction()}
        print(f"test at {result.thresholds}: {metrics}, ETR {stats.expected_time_reduction():.1%}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "calibration.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
