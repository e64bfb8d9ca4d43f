"""Evaluate a fine-tuned checkpoint, with or without MuE early exits (OFA's ``evaluate.py``).

Usage (``mue-evaluate`` once installed; ``--user-dir`` is optional here)::

    python -m mue_fairseq.evaluate DATA.tsv --path CKPT.pt --task snli_ve --gen-subset test \\
        --batch-size 8 --results-path results/snli_ve \\
        [--bpe-dir BPE] [--selected-cols 0,2,3,4,5] [--model-overrides "{...}"] \\
        [--encoder-exit --image-exit-threshold 0.9 --text-exit-threshold 0.95] \\
        [--decoder-exit-policy similarity --decoder-exit-threshold 0.95] [--cpu] [--fp16]

The command line is fairseq-generate's (``fairseq.options.get_generation_parser``): beam
options (``--beam``, ``--max-len-b``, ``--no-repeat-ngram-size`` ...), ``--path``,
``--gen-subset``, ``--results-path``, ``--batch-size``, distributed options, plus the task's
options, among them the MuE exit options (``--encoder-exit``, ``--decoder-exit-policy`` ...).

What it does
------------
1. Loads the checkpoint(s) with ``fairseq.checkpoint_utils.load_model_ensemble_and_task``
   and the checkpoint's own task configuration, overridden (OFA's ``--model-overrides``,
   a Python dict literal) by the ``data``, ``bpe_dir`` and ``selected_cols`` given on this
   command line, and by ``eval_cider/eval_bleu = False`` (training-time validation scorers,
   whose cached files need not exist here) unless ``--model-overrides`` says otherwise.
   The exit options are always taken from this command line.
2. Runs the task's evaluation over ``--gen-subset`` (the last file of DATA, OFA's rule):
   SNLI-VE scores the 3 candidate answers (with exits: incrementally, per-token exits on
   the scored tokens; see ``SnliVeTask.score_answers_incremental``); caption generates
   with beam search (exit-aware generator). Device-agnostic: CUDA when available and no
   ``--cpu``; ``--fp16`` only applies on CUDA.
3. Writes to ``--results-path`` (rank 0 of a distributed run, results gathered):

   * ``{subset}_predict.json``: OFA's format, SNLI-VE ``[{"uniq_id", "answer"}]``,
     caption ``[{"image_id": str, "caption"}]``;
   * ``{subset}_metrics.json``: SNLI-VE ``accuracy``; caption ``Bleu_1..4``, ``METEOR``,
     ``ROUGE_L``, ``CIDEr`` (and ``SPICE`` when its CoreNLP models are installed; otherwise
     one line ``SPICE skipped: <why>`` is printed) against the TSV's references; plus
     ``expected_time_reduction`` and ``generation_seconds`` (wall clock around the
     evaluation calls, device-synchronised);
   * ``{subset}_sample_scores.json``: per-sample quality where the task has one (SNLI-VE:
     1/0 per prediction, in the order of the predictions);
   * ``{subset}_exit_stats.json`` (or ``--exit-stats-path``): ``ExitStats.to_json``, per
     sample exit layers, ETR (Eq. 14), compute-weighted reduction, generation wall clock.
     Written with exits off too (full depth: the baseline).

   and prints the exit summary (``ExitStats.format_summary``) and the metrics at the end.

Bad input (corrupt image, short row, unknown label, missing BPE file, missing checkpoint)
stops with one line ``mue-evaluate: error: <file>: row R, column C (...): ...`` and exit
status 1.
"""
import ast
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch

logger = logging.getLogger("mue_fairseq.evaluate")

# Task options that only serve training-time validation; evaluation switches them off unless
# --model-overrides sets them (OFA's caption evaluation script passes "eval_cider": False).
EVAL_OFF_BY_DEFAULT = {"eval_cider": False, "eval_bleu": False}
# Options copied from this command line into the checkpoint's task configuration.
DATA_OPTIONS = ("data", "bpe_dir", "selected_cols")


def parse_model_overrides(text: Optional[str]) -> Dict[str, Any]:
    """``--model-overrides`` (a Python dict literal, as OFA's scripts write it) → dict.
    Parsed with ``ast.literal_eval`` (OFA uses ``eval``)."""
    if not text:
        return {}
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"--model-overrides is not a Python dict literal ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--model-overrides must be a dict, got {text!r}")
    return value


def checkpoint_overrides(cfg) -> Dict[str, Any]:
    """The ``arg_overrides`` for loading: --model-overrides, then DATA_OPTIONS given on the
    command line, then EVAL_OFF_BY_DEFAULT, then the exit options of this command line."""
    from mue_fairseq.exits.config import ExitConfig

    overrides = parse_model_overrides(cfg.common_eval.model_overrides)
    for key in DATA_OPTIONS:
        value = cfg.task.get(key, None)
        if value is not None:
            overrides.setdefault(key, value)
    for key, value in EVAL_OFF_BY_DEFAULT.items():
        overrides.setdefault(key, value)
    exit_cfg = ExitConfig.from_cfg(cfg.task)
    for key in _exit_fields():
        overrides[key] = getattr(exit_cfg, key)
    return overrides


def _exit_fields() -> List[str]:
    import dataclasses

    from mue_fairseq.exits.config import ExitConfig

    return [f.name for f in dataclasses.fields(ExitConfig) if not f.name.startswith("_")]


def _apply_half(t):
    return t.half() if torch.is_tensor(t) and t.dtype is torch.float32 else t


def _check_paths(paths: List[str]) -> None:
    from mue_fairseq.data.errors import MissingFileError

    for path in paths:
        if not os.path.isfile(path):
            raise MissingFileError(path, "--path", what="checkpoint")


def _set_exit_config(task, cli_task_cfg, model) -> None:
    """Put this command line's exit options into the loaded task (checkpoints made before
    the options existed lack their keys, so the loading overrides cannot set them)."""
    from omegaconf import open_dict

    from mue_fairseq.exits.config import ExitConfig

    exit_cfg = ExitConfig.from_cfg(cli_task_cfg)
    exit_cfg.validate(model.encoder.num_layers, model.decoder.num_layers)
    if exit_cfg.encoder_exit and not model.encoder.decompose_modalities:
        raise ValueError("--encoder-exit needs a model trained with --decompose-modalities "
                         "(this checkpoint's encoder is not decomposed)")
    task.exit_cfg = exit_cfg
    with open_dict(task.cfg):
        for key in _exit_fields():
            task.cfg[key] = exit_cfg.policy_name if key == "decoder_exit_policy" else getattr(exit_cfg, key)


def _gather(obj, world_size: int) -> list:
    if world_size <= 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main(cfg, **unused) -> Optional[Dict[str, Any]]:
    """Evaluate (see the module docstring); returns the metrics on rank 0 (None elsewhere)."""
    from fairseq import checkpoint_utils, utils
    from fairseq.logging import progress_bar

    from mue_fairseq.generation.exit_generator import ExitAwareSequenceGenerator
    from mue_fairseq.tasks.ofa_task import new_exit_stats

    utils.import_user_module(cfg.common)
    utils.reset_logging()
    if cfg.dataset.max_tokens is None and cfg.dataset.batch_size is None:
        raise ValueError("set --batch-size (OFA tasks batch by sentences)")
    if cfg.common.seed is not None and not cfg.generation.no_seed_provided:
        import numpy as np

        np.random.seed(cfg.common.seed)
        utils.set_torch_seed(cfg.common.seed)

    use_cuda = torch.cuda.is_available() and not cfg.common.cpu
    use_fp16 = bool(cfg.common.fp16) and use_cuda
    if cfg.common.fp16 and not use_cuda:
        logger.warning("--fp16 ignored: evaluating on CPU in float32")
    if use_cuda:
        torch.cuda.set_device(cfg.distributed_training.device_id)

    paths = utils.split_paths(cfg.common_eval.path or "")
    if not paths:
        raise ValueError("--path is required: the checkpoint to evaluate")
    _check_paths(paths)
    overrides = checkpoint_overrides(cfg)
    logger.info("loading model(s) from %s", cfg.common_eval.path)
    models, saved_cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        paths,
        arg_overrides=overrides,
        suffix=cfg.checkpoint.checkpoint_suffix,
        strict=(cfg.checkpoint.checkpoint_shard_count == 1),
        num_shards=cfg.checkpoint.checkpoint_shard_count,
    )
    if not hasattr(task, "eval_step"):
        raise ValueError(f"task {task.cfg._name!r} has no evaluation here (snli_ve, caption)")
    _set_exit_config(task, cfg.task, models[0])
    if task.exit_cfg.enabled and len(models) != 1:
        raise ValueError("early exiting evaluates one model, not an ensemble of "
                         f"{len(models)} (--path holds several)")

    subset = cfg.dataset.gen_subset
    task.load_dataset(subset, task_cfg=saved_cfg.task)
    dataset = task.dataset(subset)
    for model in models:
        model.eval()
        if use_fp16:
            model.half()
        if use_cuda and not cfg.distributed_training.pipeline_model_parallel:
            model.cuda()
        model.prepare_for_inference_(cfg)

    itr = task.get_batch_iterator(
        dataset=dataset,
        max_tokens=cfg.dataset.max_tokens,
        max_sentences=cfg.dataset.batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), *[m.max_positions() for m in models]),
        ignore_invalid_inputs=cfg.dataset.skip_invalid_size_inputs_valid_test,
        required_batch_size_multiple=cfg.dataset.required_batch_size_multiple,
        seed=cfg.common.seed,
        num_shards=cfg.distributed_training.distributed_world_size,
        shard_id=cfg.distributed_training.distributed_rank,
        num_workers=cfg.dataset.num_workers,
        data_buffer_size=cfg.dataset.data_buffer_size,
    ).next_epoch_itr(shuffle=False)
    progress = progress_bar.progress_bar(
        itr, log_format=cfg.common.log_format, log_interval=cfg.common.log_interval,
        default_log_format=("tqdm" if not cfg.common.no_progress_bar else "simple"),
    )

    # Exit-aware generator for a single model whether exits are on or off, so that the
    # statistics and wall clock of the full-depth baseline are recorded the same way.
    seq_gen_cls = ExitAwareSequenceGenerator if len(models) == 1 else None
    generator = task.build_generator(models, cfg.generation, seq_gen_cls=seq_gen_cls)
    stats = getattr(generator, "stats", None)
    if stats is None and len(models) == 1:
        stats = new_exit_stats(models[0])

    results: List[dict] = []
    scores: List[float] = []
    seconds = 0.0
    for sample in progress:
        if not sample or "net_input" not in sample:
            continue  # an empty (dummy) batch of a short rank slice
        if use_cuda:
            sample = utils.move_to_cuda(sample)
        if use_fp16:
            sample = utils.apply_to_sample(_apply_half, sample)
        start = time.perf_counter()
        with torch.no_grad():
            batch_results, batch_scores = task.eval_step(generator, models, sample, exit_stats=stats)
        if use_cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        results += batch_results
        if batch_scores is not None:
            scores += batch_scores
        progress.log({"sentences": sample["nsentences"]})

    world = cfg.distributed_training.distributed_world_size
    gathered = _gather((results, scores, stats, seconds), world)
    if cfg.distributed_training.distributed_rank != 0:
        return None
    results = [r for part in gathered for r in part[0]]
    scores = [s for part in gathered for s in part[1]]
    seconds = sum(part[3] for part in gathered)
    if stats is not None:
        for part in gathered[1:]:
            stats.merge(part[2])

    metrics = task.evaluation_metrics(results, scores, dataset)
    if stats is not None:
        metrics["expected_time_reduction"] = stats.expected_time_reduction()
    metrics["generation_seconds"] = seconds

    results_path = cfg.common_eval.results_path
    if results_path:
        os.makedirs(results_path, exist_ok=True)
        with open(os.path.join(results_path, f"{subset}_predict.json"), "w") as f:
            json.dump(results, f)
        with open(os.path.join(results_path, f"{subset}_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        if scores:  # per-sample quality (SNLI-VE: 1/0), aligned with the predictions
            with open(os.path.join(results_path, f"{subset}_sample_scores.json"), "w") as f:
                json.dump(scores, f)
        logger.info("wrote %s/%s_predict.json and %s_metrics.json", results_path, subset, subset)
    else:
        logger.warning("no --results-path: predictions and metrics are not written")
    stats_path = task.exit_cfg.stats_path(results_path, subset)
    if stats is not None and stats_path:
        os.makedirs(os.path.dirname(os.path.abspath(stats_path)), exist_ok=True)
        stats.to_json(stats_path)
        logger.info("wrote exit statistics to %s", stats_path)
    if stats is not None:
        print(stats.format_summary())
    print(f"| {subset}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))
    sys.stdout.flush()
    return metrics


def run(argv: List[str]) -> Optional[Dict[str, Any]]:
    """The command line's evaluation, in this process (single process); returns the metrics."""
    import mue_fairseq  # noqa: F401
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_generation_parser(), input_args=argv)
    return main(convert_namespace_to_omegaconf(args))


def cli_main(argv: Optional[List[str]] = None) -> None:
    import mue_fairseq  # noqa: F401  (registers the tasks/models even without --user-dir)
    from fairseq import distributed_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from mue_fairseq.data.errors import DataError

    parser = options.get_generation_parser()
    args = options.parse_args_and_arch(parser, input_args=argv)
    cfg = convert_namespace_to_omegaconf(args)
    try:
        distributed_utils.call_main(cfg, main)
    except DataError as e:  # bad input: say where, without a traceback
        print(f"mue-evaluate: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli_main()
