"""Smoke run of the whole inference path on the embedded procedural data (about a minute on a
laptop CPU): build a small procedural caption set, set up fairseq's `caption` task on it,
build the `ofa_demo` model (random weights), and caption a few images with MuE exits.

    python -m mue_fairseq.smoke [--out .cache/smoke]
"""
import argparse
import logging
import os

import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from .data import decode_tokens
from .procedural.build import BuildConfig, build


def main(argv=None):
    logging.getLogger().setLevel(logging.WARNING)  # fairseq's import leaves the root logger at DEBUG
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(".cache", "smoke"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cfg = BuildConfig(ve_train=30, ve_valid=9, ve_test=9, ve_test_heldout=9, caption_train_images=20,
                      caption_eval_images=8, vocab_size=300)
    build(args.out, cfg)
    data = os.path.join(args.out, "caption", "caption_test.tsv")
    user_dir = os.path.dirname(os.path.abspath(__file__))
    fairseq_args = [
        data, "--user-dir", user_dir, "--task", "caption", "--arch", "ofa_demo",
        "--bpe-dir", os.path.join(args.out, "bpe"), "--selected-cols", "1,4,2",
        "--patch-image-size", "96", "--code-dict-size", "8", "--num-bins", "8",
        "--decompose-modalities", "--encoder-exit", "--decoder-exit-policy", "similarity",
        "--beam", "3", "--max-len-b", "12", "--cpu",
    ]
    parser = options.get_training_parser()
    options.add_generation_args(parser)
    cfg_ns = options.parse_args_and_arch(parser, fairseq_args)
    cfg_fs = convert_namespace_to_omegaconf(cfg_ns)
    task = tasks.setup_task(cfg_fs.task)
    task.load_dataset("test")
    model = task.build_model(cfg_fs.model).eval()
    generator = task.build_generator([model], cfg_fs.generation)
    dataset = task.dataset("test")
    sample = dataset.collater([dataset[i] for i in range(min(4, len(dataset)))])
    hypos = task.inference_step(generator, [model], sample)
    for i, hyp in enumerate(hypos):
        text = decode_tokens(hyp[0]["tokens"], task.bpe, task.tgt_dict)
        print(f"sample {int(i)}: {text!r} (random weights)")
    stats = getattr(generator, "stats", None)
    if stats is None:
        raise SystemExit("the task did not build the exit-aware generator")
    print(stats.format_summary())


if __name__ == "__main__":
    main()
