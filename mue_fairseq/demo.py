"""The main job on the embedded procedural task: MuE end to end on a laptop CPU.

    python -m mue_fairseq.demo [--work-dir demo_work] [--results results] [--full] [--force] [--tiny]

1. Generates the procedural SNLI-VE and caption data (OFA's TSV formats, its own BPE;
   cached under ``--work-dir``).
2. Fine-tunes ``ofa_demo`` (6 + 6 layers) with MuE — ``--decompose-modalities`` and the
   layer-wise task loss — through ``fairseq-train --user-dir mue_fairseq`` (its progress is
   shown), and a shallower 4 + 4 model trained the same way (the OFA-Tiny analogue).
   ``--full`` adds the ablations "w/o layer-wise loss" and "w/o decomposition" (Table 4
   analogue; a joint encoder cannot exit per modality, so there only the decoder exits) and
   image-only / text-only encoder exits (Table 2 analogue).
3. Evaluates with ``mue_fairseq.evaluate`` on the test split: full depth, MuE at the paper's
   thresholds, a MuE threshold sweep, and the DeeBERT / PABEE / static-depth decoder exits,
   each a sweep so methods can be compared at equal ETR; and the held-out test set.
4. Calibrates the three thresholds on the validation split (Learn-then-Test, see
   ``mue_fairseq.calibration``) for a 1% accuracy / 2% CIDEr budget and reports them on test.
5. Writes ``--results``: ``results.md`` / ``results.json`` (Table 1/3 analogues),
   ``tradeoff.png`` (Fig. 1/4), ``similarity_<task>.png`` (Fig. 3), ``exits_<task>.png``
   (exit-layer histograms), ``calibration.json``, ``run.json``; and prints a summary.

A re-run reuses the data, checkpoints and evaluations already made (``--force`` redoes them).
"""
import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from .calibrate import calibrate, exit_options
from .calibrate import evaluate as evaluate_file

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(PACKAGE_DIR)
TASKS = ("snli_ve", "caption")


@dataclass
class Plan:
    """Sizes of one run (data, training, evaluation sweeps)."""
    data: dict
    updates: Dict[str, int]           # per task
    batch_size: int = 16
    lr: float = 5e-4
    sweep_mue: Tuple[float, ...] = (0.99, 0.95, 0.9, 0.85)
    sweep_deebert: Tuple[float, ...] = (0.05, 0.2, 0.5)
    sweep_pabee: Tuple[int, ...] = (1, 2, 3)
    sweep_static: Tuple[int, ...] = (2, 4)
    # thresholds (image, text, decoder) tested in this order, most conservative first
    calibration_path: Tuple[Tuple[float, float, float], ...] = ((0.99, 0.99, 0.99), (0.9, 0.9, 0.9))
    budget: Dict[str, float] = field(default_factory=lambda: {"snli_ve": 0.01, "caption": 0.02})


PLANS = {
    "default": Plan(
        data=dict(ve_train=9000, ve_valid=1000, ve_test=500, ve_test_heldout=500, caption_train_images=800,
                  caption_eval_images=100, refs_per_image=5),
        updates={"snli_ve": 800, "caption": 900},
        sweep_mue=(0.99, 0.95, 0.85), sweep_deebert=(1.0, 2.5), sweep_pabee=(1, 2), sweep_static=(2, 4),
        calibration_path=((0.99, 0.99, 0.99), (0.97, 0.97, 0.97), (0.95, 0.95, 0.95), (0.9, 0.95, 0.95),
                          (0.9, 0.9, 0.9), (0.85, 0.85, 0.85)),
    ),
    "tiny": Plan(
        data=dict(ve_train=48, ve_valid=12, ve_test=8, ve_test_heldout=4, caption_train_images=8,
                  caption_eval_images=4, refs_per_image=2, vocab_size=300),
        updates={"snli_ve": 2, "caption": 2}, batch_size=8,
        sweep_mue=(0.9,), sweep_deebert=(0.5,), sweep_pabee=(2,), sweep_static=(2,),
        calibration_path=((1.0, 1.0, 1.0), (0.9, 0.9, 0.9)),
    ),
}

MODELS = {  # variant -> (table label, extra fairseq-train options)
    "mue": ("MuE model: decomposition + layer-wise loss, 6+6", ["--decompose-modalities", "--layerwise-loss"]),
    "shallow": ("shallower 4+4, trained the same way",
                ["--decompose-modalities", "--layerwise-loss", "--encoder-layers", "4", "--decoder-layers", "4"]),
    "no_layerwise": ("MuE w/o layer-wise loss, 6+6", ["--decompose-modalities"]),
    "no_decomposition": ("MuE w/o decomposition, 6+6", ["--layerwise-loss"]),
}


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# ---------------------------------------------------------------------------- data
def task_files(task: str, data_dir: str) -> dict:
    """Training data, evaluation files per split, and the options that read them."""
    if task == "snli_ve":
        d = os.path.join(data_dir, "snli_ve")
        return dict(train=f"{d}/snli_ve_train.tsv,{d}/snli_ve_dev.tsv",
                    splits={"valid": f"{d}/snli_ve_dev.tsv", "test": f"{d}/snli_ve_test.tsv",
                            "test_heldout": f"{d}/snli_ve_test_heldout.tsv"},
                    train_cols=["--selected-cols", "0,2,3,4,5"], eval_cols=["--selected-cols", "0,2,3,4,5"])
    d = os.path.join(data_dir, "caption")
    return dict(train=f"{d}/caption_stage1_train.tsv,{d}/caption_val.tsv",
                splits={"valid": f"{d}/caption_val.tsv", "test": f"{d}/caption_test.tsv",
                        "test_heldout": f"{d}/caption_test_heldout.tsv"},
                train_cols=["--selected-cols", "0,4,2"], eval_cols=["--selected-cols", "1,4,2"])


# 64 px: a 4x4 patch grid; the 96 px scenes stay legible and training is twice as fast
COMMON = ["--patch-image-size", "64", "--code-dict-size", "8", "--num-bins", "8", "--cpu"]


# ---------------------------------------------------------------------------- training
def train(task: str, variant: str, data_dir: str, work_dir: str, plan: Plan, force: bool) -> str:
    save_dir = os.path.join(work_dir, f"ckpt_{task}_{variant}")
    ckpt = os.path.join(save_dir, "checkpoint_last.pt")
    if os.path.exists(ckpt) and not force:
        log(f"{task}/{variant}: reusing {ckpt}")
        return ckpt
    shutil.rmtree(save_dir, ignore_errors=True)
    files = task_files(task, data_dir)
    updates = plan.updates[task]
    cmd = [
        sys.executable, "-m", "fairseq_cli.train", files["train"], "--user-dir", PACKAGE_DIR,
        "--task", task, "--arch", "ofa_demo", *files["train_cols"], *COMMON,
        "--bpe-dir", os.path.join(data_dir, "bpe"), "--max-src-length", "64", "--max-tgt-length", "20",
        "--criterion", "adjust_label_smoothed_cross_entropy",
        "--label-smoothing", "0.0" if task == "snli_ve" else "0.1",
        "--optimizer", "adam", "--adam-betas", "(0.9,0.999)", "--weight-decay", "0.01", "--clip-norm", "1.0",
        "--lr", str(plan.lr), "--lr-scheduler", "polynomial_decay", "--warmup-ratio", "0.06",
        "--max-update", str(updates), "--batch-size", str(plan.batch_size),
        "--disable-validation", "--ignore-unused-valid-subsets", "--no-epoch-checkpoints",
        "--log-format", "simple", "--log-interval", str(max(1, updates // 10)), "--num-workers", "0",
        "--save-dir", save_dir, "--seed", "1", *MODELS[variant][1],
    ]
    log(f"{task}/{variant}: fairseq-train, {updates} updates -> {save_dir}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env)
    log(f"{task}/{variant}: trained in {time.time() - t0:.0f}s")
    return ckpt


# ---------------------------------------------------------------------------- evaluation
def evaluate(ckpt: str, task: str, split: str, options: List[str], out_dir: str, data_dir: str, force: bool):
    """mue_fairseq.evaluate on one split of the demo data (cached in `out_dir`)."""
    files = task_files(task, data_dir)
    return evaluate_file(ckpt, task, files["splits"][split], files["eval_cols"][1],
                         os.path.join(data_dir, "bpe"), options, out_dir, force)


def sweep(task: str, plan: Plan, n_dec: int) -> List[Tuple[str, dict, List[str]]]:
    """(method, thresholds shown in the table, exit options) of every evaluated configuration."""
    decay = task == "caption"
    paper = {"image": 0.9, "text": 0.95, "decoder": 0.99 if decay else 0.95}
    out = [("full depth", {}, exit_options("full")),
           ("MuE (paper's thresholds)", paper, exit_options("mue", decay=decay, **paper))]
    for t in plan.sweep_mue:
        th = {"image": t, "text": t, "decoder": t}
        out.append(("MuE", th, exit_options("mue", decay=decay, **th)))
    out += [("DeeBERT", {"entropy": e}, exit_options("deebert", entropy=e)) for e in plan.sweep_deebert]
    out += [("PABEE", {"patience": p}, exit_options("pabee", patience=p)) for p in plan.sweep_pabee]
    out += [("static depth", {"layer": k}, exit_options("static", layer=k)) for k in plan.sweep_static if k < n_dec]
    return out


def similarity_trace(ckpt: str, task: str, data_dir: str, limit: int = 64) -> Dict[str, "object"]:
    """Per-layer cosine similarity of each layer's input and output at full depth (Fig. 3):
    name -> (samples or tokens, layers), from the model's similarity observers."""
    import numpy as np
    import torch
    from fairseq import checkpoint_utils

    files = task_files(task, data_dir)
    models, _, t = checkpoint_utils.load_model_ensemble_and_task(
        [ckpt], arg_overrides={"data": files["splits"]["test"], "bpe_dir": os.path.join(data_dir, "bpe"),
                               "selected_cols": files["eval_cols"][1]})
    model = models[0].eval()
    t.load_dataset("test")
    ds = t.dataset("test")
    sample = ds.collater([ds[i] for i in range(min(limit, len(ds)))])
    seen: Dict[str, Dict[int, torch.Tensor]] = {}

    def observe(name, layer, rows, sim):
        seen.setdefault(name, {})[layer] = sim.detach().float()

    from mue_fairseq.exits.config import ExitConfig

    model.encoder.similarity_observer = model.decoder.similarity_observer = observe
    model.set_exit_config(ExitConfig(encoder_exit=True, image_exit_threshold=1.0, text_exit_threshold=1.0,
                                     decoder_exit_policy="similarity", decoder_exit_threshold=1.0), max_len=8)
    with torch.no_grad():
        enc = model.encoder(**sample["net_input"])
        state, tokens = {}, sample["net_input"]["prev_output_tokens"]
        steps: Dict[int, list] = {}
        for step in range(1, min(tokens.size(1), 6) + 1):
            seen.pop("decoder", None)
            model.decoder(tokens[:, :step], encoder_out=enc, incremental_state=state)
            for layer, sim in seen.get("decoder", {}).items():
                steps.setdefault(layer, []).append(sim)
    model.set_exit_config(None)
    curves = {f"{name} encoder": np.stack([seen[name][k].numpy() for k in sorted(seen[name])], axis=1)
              for name in ("image", "text") if name in seen}
    if steps:
        curves["decoder"] = np.stack([torch.cat(steps[k]).numpy() for k in sorted(steps)], axis=1)
    return curves


# ---------------------------------------------------------------------------- main
def run_task(task: str, args, plan: Plan, data_dir: str) -> list:
    from mue_fairseq.reporting import ResultRow, plot_exit_histograms, plot_similarity_curves

    rows = []
    eval_root = os.path.join(args.work_dir, "eval", task)
    variants = ["mue", "shallow"] + (["no_layerwise", "no_decomposition"] if args.full else [])
    ckpts = {v: train(task, v, data_dir, args.work_dir, plan, args.force) for v in variants}
    metric_name = "accuracy" if task == "snli_ve" else "CIDEr"

    def add_row(method, variant, th, options, split="test"):
        out_dir = os.path.join(eval_root, variant, split, method.replace(" ", "_") + "_" +
                               "_".join(f"{k}{v}" for k, v in th.items()))
        metrics, stats, _ = evaluate(ckpts[variant], task, split, options, out_dir, data_dir, args.force)
        value = metrics.get("accuracy" if task == "snli_ve" else "CIDEr")
        row = ResultRow.from_exit_stats(task, method, stats, model=MODELS[variant][0], thresholds=th,
                                        metric_name=metric_name, metric=value,
                                        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        log(f"{task} {split} {method} {th}: {metric_name} {value:.4g}, ETR {row.etr:.1%}")
        rows.append(row)
        return row

    n_dec = 6
    # one untimed evaluation first, so one-time start-up costs don't land on the full-depth row
    evaluate(ckpts["mue"], task, "test", exit_options("full"), os.path.join(eval_root, "warm-up"), data_dir, True)
    for method, th, options in sweep(task, plan, n_dec):
        row = add_row(method, "mue", th, options)
        if method.startswith("MuE (paper"):
            plot_exit_histograms(row.exit_summary, os.path.join(args.results, f"exits_{task}.png"),
                                 title=f"{task}: exit layers of MuE at the paper's thresholds")
    shallow = add_row("shallower model", "shallow", {}, exit_options("full"))
    # its reductions are against the 6+6 model at full depth (the paper's OFA-Tiny row): 4 of 6 layers
    shallow.etr = shallow.compute_reduction = 1 - 4 / 6
    paper = dict(sweep(task, plan, n_dec)[1][1])
    add_row("MuE (paper's thresholds), held-out test", "mue", paper,
            exit_options("mue", decay=task == "caption", **paper), split="test_heldout")
    if args.full:
        add_row("w/o layer-wise loss: full depth", "no_layerwise", {}, exit_options("full"))
        add_row("w/o layer-wise loss: MuE", "no_layerwise", paper, exit_options("mue", decay=task == "caption", **paper))
        # a joint encoder cannot exit per modality: only the decoder exits, at the paper's threshold
        add_row("w/o decomposition: full depth", "no_decomposition", {}, exit_options("full"))
        decoder_only = ["--decoder-exit-policy", "similarity"] + (
            ["--decoder-threshold-decay", "--decay-theta", str(paper["decoder"])] if task == "caption"
            else ["--decoder-exit-threshold", str(paper["decoder"])])
        add_row("w/o decomposition: MuE (decoder exits)", "no_decomposition", {"decoder": paper["decoder"]},
                decoder_only)
        for name, image, text in (("image exits only", paper["image"], 1.0), ("text exits only", 1.0, paper["text"])):
            add_row(f"MuE, {name}", "mue", {"image": image, "text": text},
                    exit_options("mue", image=image, text=text, decoder=1.0))

    curves = similarity_trace(ckpts["mue"], task, data_dir)
    plot_similarity_curves(curves, os.path.join(args.results, f"similarity_{task}.png"),
                           title=f"{task}: cosine(layer input, layer output), full depth")

    files = task_files(task, data_dir)
    calib = calibrate(ckpts["mue"], task, files["splits"]["valid"], files["eval_cols"][1], os.path.join(data_dir, "bpe"),
                      os.path.join(eval_root, "mue", "calibration"), plan.calibration_path, plan.budget[task],
                      force=args.force)
    log(calib.statement)
    record = calib.to_dict()
    if calib.thresholds is not None:
        image, text, decoder = calib.thresholds
        th = {"image": image, "text": text, "decoder": decoder}
        row = add_row("MuE (calibrated thresholds)", "mue", th,
                      exit_options("mue", decay=task == "caption", **th))
        record["test"] = {"metric": row.metric, "etr": row.etr}
    return rows, record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mue_fairseq.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="demo_work", help="data, checkpoints and evaluations (cached)")
    p.add_argument("--results", default="results", help="where the tables and plots go")
    p.add_argument("--full", action="store_true", help="also the ablations (Table 2 and Table 4 analogues)")
    p.add_argument("--force", action="store_true", help="regenerate data, retrain and re-evaluate")
    p.add_argument("--tiny", action="store_true", help="seconds-scale sizes (the test suite's run)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: snli_ve, caption")
    args = p.parse_args(argv)

    import mue_fairseq  # noqa: F401  (registrations, safe checkpoint loading)
    from mue_fairseq.procedural.build import BuildConfig, build
    from mue_fairseq.reporting import (fill_wallclock_reductions, format_terminal_summary, plot_tradeoff,
                                       write_table)

    logging.getLogger().setLevel(logging.WARNING)  # fairseq's import leaves the root logger at DEBUG
    plan = PLANS["tiny" if args.tiny else "default"]
    start = time.time()
    os.makedirs(args.results, exist_ok=True)
    data_dir = os.path.join(args.work_dir, "data")
    manifest = build(data_dir, BuildConfig(**plan.data), force=args.force)
    log(f"data in {data_dir} ({'cached' if manifest.get('cached') else 'built'})")

    rows, calibration = [], {}
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        task_rows, calibration[task] = run_task(task, args, plan, data_dir)
        rows += task_rows
    rows = fill_wallclock_reductions(rows)
    write_table(rows, os.path.join(args.results, "results.md"), os.path.join(args.results, "results.json"))
    plot_tradeoff([r for r in rows if "held-out" not in r.method and "w/o" not in r.method],
                  os.path.join(args.results, "tradeoff.png"))
    with open(os.path.join(args.results, "calibration.json"), "w") as f:
        json.dump(calibration, f, indent=1, default=str)
    with open(os.path.join(args.results, "run.json"), "w") as f:
        json.dump({"plan": "tiny" if args.tiny else "default", "full": args.full,
                   "data": plan.data, "updates": plan.updates, "seconds": time.time() - start}, f, indent=1)
    print(format_terminal_summary(rows))
    for task, record in calibration.items():
        print(f"[{task}] calibration: {record.get('statement')}")
    log(f"done in {time.time() - start:.0f}s; results in {args.results}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
