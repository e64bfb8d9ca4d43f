"""The main job: ``python -m mue_fairseq.demo``.

On the embedded procedural task it

1. generates the data (cached by :func:`mue_fairseq.procedural.build.build`),
2. fine-tunes OFA (``ofa_demo``) with MuE (``--decompose-modalities`` + layer-wise loss) on
   SNLI-VE and captioning through ``fairseq-train`` subprocesses (progress shown as fairseq's
   ``--log-format simple``; each training run is capped by ``--stop-time-hours``),
3. evaluates full depth, MuE at the paper's thresholds, a threshold sweep, and the decoder
   baselines DeeBERT / PABEE / static depth, all on the same checkpoint (and, with
   ``--shallow``, a 4+4-layer model trained the same way: the OFA-Tiny analogue),
4. writes ``results/``: ``results.md``/``results.json`` (tables), ``tradeoff.png``,
   ``similarity_<task>.png``, ``exits_<task>.png``, and prints a terminal summary.

A re-run reuses the cached data and checkpoints unless ``--force``. ``--tiny`` uses
seconds-scale sizes (for the test).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(PACKAGE_DIR)

MODEL_MUE = "mue (decomposition + layer-wise loss), 6+6"
MODEL_SHALLOW = "shallower 4+4, trained the same way"

# (name, BuildConfig kwargs, train settings, eval sizes, sweep)
SIZES = {
    "default": dict(
        data=dict(ve_train=1500, ve_valid=60, ve_test=150, ve_test_heldout=30,
                  caption_train_images=200, caption_eval_images=40, refs_per_image=5),
        ve=dict(max_update=150, batch_size=16, stop_hours=5 / 60),
        caption=dict(max_update=120, batch_size=16, stop_hours=5 / 60),
        eval_n=dict(snli_ve=150, caption=40),
        sweep=dict(snli_ve=[0.8, 0.9, 0.95, 0.99], caption=[0.9, 0.95, 0.99]),
    ),
    "tiny": dict(
        data=dict(ve_train=48, ve_valid=8, ve_test=8, ve_test_heldout=3,
                  caption_train_images=8, caption_eval_images=4, refs_per_image=2, vocab_size=300),
        ve=dict(max_update=2, batch_size=8, stop_hours=0.02),
        caption=dict(max_update=2, batch_size=8, stop_hours=0.02),
        eval_n=dict(snli_ve=8, caption=4),
        sweep=dict(snli_ve=[0.8], caption=[0.9]),
    ),
}


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# ---------------------------------------------------------------------------- data
def build_data(data_dir: str, size: dict, force: bool) -> dict:
    from mue_fairseq.procedural.build import BuildConfig, build

    t0 = time.time()
    manifest = build(data_dir, BuildConfig(**size["data"]), force=force)
    log(f"data in {data_dir} ({'cached' if manifest.get('cached') else f'built in {time.time() - t0:.0f}s'})")
    return manifest


# ---------------------------------------------------------------------------- training
def task_files(task: str, data_dir: str):
    if task == "snli_ve":
        d = os.path.join(data_dir, "snli_ve")
        return (f"{d}/snli_ve_train.tsv,{d}/snli_ve_dev.tsv", f"{d}/snli_ve_test.tsv",
                ["--selected-cols", "0,2,3,4,5"])
    d = os.path.join(data_dir, "caption")
    return (f"{d}/caption_stage1_train.tsv,{d}/caption_val.tsv", f"{d}/caption_test.tsv",
            ["--selected-cols", "0,4,2", "--max-tgt-length", "20"])


def train(task: str, data_dir: str, save_dir: str, tcfg: dict, force: bool,
          extra: Optional[List[str]] = None) -> str:
    ckpt = os.path.join(save_dir, "checkpoint_last.pt")
    if os.path.exists(ckpt) and not force:
        log(f"{task}: reusing {ckpt}")
        return ckpt
    if force and os.path.isdir(save_dir):
        shutil.rmtree(save_dir)
    data, _, cols = task_files(task, data_dir)
    cmd = [
        sys.executable, "-m", "fairseq_cli.train", data, "--user-dir", PACKAGE_DIR,
        "--task", task, "--arch", "ofa_demo", "--cpu", *cols,
        "--bpe-dir", os.path.join(data_dir, "bpe"), "--ignore-unused-valid-subsets",
        "--patch-image-size", "96", "--code-dict-size", "8", "--num-bins", "8",
        "--max-src-length", "64", "--decompose-modalities",
        "--criterion", "adjust_label_smoothed_cross_entropy", "--layerwise-loss",
        "--label-smoothing", "0.1", "--optimizer", "adam", "--adam-betas", "(0.9,0.999)",
        "--lr", "1e-3", "--lr-scheduler", "polynomial_decay", "--warmup-updates", "5",
        "--total-num-update", str(tcfg["max_update"]),
        "--batch-size", str(tcfg["batch_size"]), "--batch-size-valid", str(tcfg["batch_size"]),
        "--max-update", str(tcfg["max_update"]), "--max-epoch", "1000",
        "--stop-time-hours", f"{tcfg['stop_hours']:.4f}",
        "--disable-validation", "--no-epoch-checkpoints", "--save-interval-updates", "0",
        "--log-format", "simple", "--log-interval", "5", "--num-workers", "0",
        "--save-dir", save_dir, "--seed", "1", *(extra or []),
    ]
    log(f"{task}: training -> {save_dir}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env)
    log(f"{task}: trained in {time.time() - t0:.0f}s")
    if not os.path.exists(ckpt):
        raise RuntimeError(f"fairseq-train wrote no {ckpt}")
    return ckpt


# ---------------------------------------------------------------------------- evaluation
def load(ckpt: str, task_name: str, data_dir: str):
    from fairseq import checkpoint_utils

    _, test, cols = task_files(task_name, data_dir)
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [ckpt], arg_overrides={"data": test, "bpe_dir": os.path.join(data_dir, "bpe")})
    model = models[0].eval()
    task.load_dataset("test")
    return model, task


def similarity_hooks(model):
    """Forward hooks recording, per encoder/decoder layer, each sample's mean cosine similarity
    of the layer's input and output (Fig. 3)."""
    import torch

    store: Dict[str, Dict[int, list]] = {"encoder": {}, "decoder": {}}
    handles = []

    def make(kind, i):
        def hook(mod, inputs, output):
            x = inputs[0]
            y = output[0] if isinstance(output, (tuple, list)) else output
            if not (torch.is_tensor(x) and torch.is_tensor(y)) or x.shape != y.shape:
                return
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # (T, B)
            store[kind].setdefault(i, []).extend(cos.mean(0).tolist())
        return hook

    for kind in ("encoder", "decoder"):
        for i, layer in enumerate(getattr(getattr(model, kind), "layers", [])):
            handles.append(layer.register_forward_hook(make(kind, i)))
    return store, handles


def evaluate(model, task, task_name: str, exit_kw: dict, n: int, record_similarity=False):
    """Greedy decoding of the first ``n`` test samples with the given exit settings; returns
    (metric_name, metric, metrics, ExitStats, similarities or None)."""
    import numpy as np
    import torch
    from fairseq import utils

    from mue_fairseq.exits.config import ExitConfig
    from mue_fairseq.generation.exit_generator import ExitAwareSequenceGenerator

    exit_cfg = ExitConfig(**exit_kw)
    kw = dict(beam_size=1, max_len_b=4 if task_name == "snli_ve" else 16, min_len=1)
    if task_name == "snli_ve":
        trie = task.constraint_trie
        from fairseq import search

        kw["search_strategy"] = search.PrefixConstrainedBeamSearch(
            task.tgt_dict, lambda b, toks: trie.next_tokens(toks.tolist()))
    else:
        kw["no_repeat_ngram_size"] = 3
    gen = ExitAwareSequenceGenerator([model], task.tgt_dict, exit_cfg=exit_cfg, **kw)
    ds = task.datasets["test"]
    itr = task.get_batch_iterator(ds, max_sentences=16).next_epoch_itr(shuffle=False)
    store, handles = similarity_hooks(model) if record_similarity else (None, [])
    hyps_all, refs_all, hits, seen = [], [], [], 0
    try:
        with torch.no_grad():
            for sample in itr:
                if not sample or seen >= n:
                    continue
                seen += len(sample["id"])
                if task_name == "snli_ve":
                    out = task.inference_step(gen, [model], sample)
                    for ref, hypos in zip(sample["ref_dict"], out):
                        text = task.bpe.decode(task.tgt_dict.string(utils.strip_pad(hypos[0]["tokens"], task.tgt_dict.pad()))).strip()
                        hits.append(ref.get(text, 0))
                else:
                    h, r = task.generate_captions(gen, sample, model)
                    hyps_all += h
                    refs_all += r
    finally:
        for h in handles:
            h.remove()
    if task_name == "snli_ve":
        acc = float(np.mean(hits)) if hits else 0.0
        name, value, metrics = "accuracy", acc, {"accuracy": acc}
    else:
        from mue_fairseq.cider import CiderD

        cider = float(CiderD(None).scores(hyps_all, refs_all).mean()) if hyps_all else 0.0
        name, value, metrics = "CIDEr", cider, {"CIDEr": cider}
        metrics["example"] = hyps_all[0] if hyps_all else ""
    sims = None
    if store is not None:
        sims = {}
        for kind, per in store.items():
            if per:
                k = min(len(v) for v in per.values())
                sims[f"{kind} (full depth)"] = np.array([per[i][:k] for i in sorted(per)]).T
    return name, value, metrics, gen.stats, sims


def configurations(task_name: str, sweep: List[float], n_dec: int):
    """(method, thresholds for the table, ExitConfig kwargs)."""
    out = [("full depth", {}, {})]
    if task_name == "snli_ve":
        out.append(("MuE", {"image": 0.9, "text": 0.95, "decoder": 0.95},
                    dict(encoder_exit=True, image_exit_threshold=0.9, text_exit_threshold=0.95,
                         decoder_exit_policy="similarity", decoder_exit_threshold=0.95)))
        for t in sweep:
            out.append(("MuE sweep", {"image": t, "text": t, "decoder": t},
                        dict(encoder_exit=True, image_exit_threshold=t, text_exit_threshold=t,
                             decoder_exit_policy="similarity", decoder_exit_threshold=t)))
    else:
        out.append(("MuE", {"image": 0.9, "text": 0.95, "decay θ": 0.99, "β": 0.95, "τ": 1.0},
                    dict(encoder_exit=True, image_exit_threshold=0.9, text_exit_threshold=0.95,
                         decoder_exit_policy="similarity", decoder_threshold_decay=True,
                         decay_theta=0.99, decay_beta=0.95, decay_tau=1.0)))
        for t in sweep:
            out.append(("MuE sweep", {"image": t, "text": t, "decay θ": t},
                        dict(encoder_exit=True, image_exit_threshold=t, text_exit_threshold=t,
                             decoder_exit_policy="similarity", decoder_threshold_decay=True,
                             decay_theta=t, decay_beta=0.95, decay_tau=1.0)))
    out.append(("DeeBERT", {"entropy": 0.5}, dict(decoder_exit_policy="deebert", deebert_entropy_threshold=0.5)))
    out.append(("PABEE", {"patience": 2}, dict(decoder_exit_policy="pabee", pabee_patience=2)))
    k = max(1, n_dec // 2)
    out.append((f"static depth {k}", {"decoder layer": k}, dict(decoder_exit_policy="static", static_exit_layer=k)))
    return out


def run_task(task_name, ckpt, model_label, data_dir, size, results_dir, full_only=False):
    from mue_fairseq.reporting import ResultRow, plot_exit_histograms, plot_similarity_curves

    model, task = load(ckpt, task_name, data_dir)
    n = size["eval_n"][task_name]
    confs = configurations(task_name, size["sweep"][task_name], model.decoder.num_layers)
    if full_only:
        confs = confs[:1]
    rows = []
    for method, th, kw in confs:
        t0 = time.time()
        try:
            name, value, metrics, stats, sims = evaluate(model, task, task_name, kw, n,
                                                         record_similarity=(method == "full depth" and not full_only))
        except Exception as e:  # one failing baseline must not sink the run
            log(f"{task_name} {method}: FAILED ({type(e).__name__}: {e})")
            continue
        example = metrics.pop("example", None)
        row = ResultRow.from_exit_stats(task_name, method, stats, model=model_label, thresholds=th,
                                        metric_name=name, metric=value, metrics=metrics)
        rows.append(row)
        log(f"{task_name} {method} {th}: {name} {value:.4g}, ETR {row.etr}, {time.time() - t0:.1f}s"
            + (f", e.g. {example!r}" if example else ""))
        if sims and not full_only:
            plot_similarity_curves(sims, os.path.join(results_dir, f"similarity_{task_name}.png"),
                                   title=f"{task_name}: layer input/output cosine similarity")
        if method == "MuE" and not full_only:
            plot_exit_histograms(row.exit_summary, os.path.join(results_dir, f"exits_{task_name}.png"),
                                 title=f"{task_name}: MuE exit layers")
    return rows


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mue_fairseq.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="demo_work", help="data and checkpoints (cached)")
    p.add_argument("--results", default="results", help="results folder")
    p.add_argument("--tiny", action="store_true", help="seconds-scale sizes (tests)")
    p.add_argument("--force", action="store_true", help="regenerate data and retrain")
    p.add_argument("--shallow", action="store_true",
                   help="also train and evaluate a 4+4-layer model (OFA-Tiny analogue; adds training time)")
    p.add_argument("--tasks", default="snli_ve,caption")
    args = p.parse_args(argv)

    import logging

    import mue_fairseq  # noqa: F401  (registrations, safe checkpoint loading)

    logging.getLogger("PIL").setLevel(logging.WARNING)
    from mue_fairseq.reporting import (fill_wallclock_reductions, format_terminal_summary,
                                       plot_tradeoff, write_table)

    size = SIZES["tiny" if args.tiny else "default"]
    t_start = time.time()
    data_dir = os.path.join(args.work_dir, "data")
    build_data(data_dir, size, args.force)
    rows = []
    for task_name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        tcfg = size["ve" if task_name == "snli_ve" else "caption"]
        ckpt = train(task_name, data_dir, os.path.join(args.work_dir, f"ckpt_{task_name}"), tcfg, args.force)
        rows += run_task(task_name, ckpt, MODEL_MUE, data_dir, size, args.results)
        if args.shallow:
            ckpt_s = train(task_name, data_dir, os.path.join(args.work_dir, f"ckpt_{task_name}_shallow"),
                           tcfg, args.force, ["--encoder-layers", "4", "--decoder-layers", "4"])
            shallow = run_task(task_name, ckpt_s, MODEL_SHALLOW, data_dir, size, args.results, full_only=True)
            for r in shallow:
                r.method = "shallower model"
            rows += shallow
    rows = fill_wallclock_reductions(rows)
    os.makedirs(args.results, exist_ok=True)
    write_table(rows, os.path.join(args.results, "results.md"), os.path.join(args.results, "results.json"))
    plot_tradeoff(rows, os.path.join(args.results, "tradeoff.png"))
    with open(os.path.join(args.results, "run.json"), "w") as f:
        json.dump({"tiny": args.tiny, "sizes": size, "seconds": time.time() - t_start}, f, indent=1)
    print(format_terminal_summary(rows))
    log(f"done in {time.time() - t_start:.0f}s; results in {args.results}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
