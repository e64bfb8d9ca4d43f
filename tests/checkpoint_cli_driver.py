"""Run by test_checkpoint_safety.py in a fresh interpreter (cwd = repo root): the real fairseq
CLIs on a tiny translation corpus, in one process to pay fairseq's import once.

1. fairseq-preprocess, then fairseq-train (stock fairseq, no --user-dir) for one epoch;
2. stock fairseq.checkpoint_utils.load_checkpoint_to_cpu on that checkpoint (expected to be
   refused by torch's weights_only default: the checkpoint holds an argparse.Namespace);
3. fairseq-train --user-dir mue_fairseq --restore-file <that checkpoint> for a second epoch;
4. fairseq-generate --user-dir mue_fairseq --path <the new checkpoint>.

Prints one line ``RESULT {json}``. Usage: python tests/checkpoint_cli_driver.py WORKDIR
"""
import importlib
import json
import logging
import os
import pickle
import sys


def main(work: str) -> dict:
    os.makedirs(work, exist_ok=True)
    path = lambda name: os.path.join(work, name)  # noqa: E731
    words = "a b c d e f g h".split()
    for split, n in (("train", 16), ("valid", 4)):
        for lang in ("src", "tgt"):
            with open(path(f"{split}.{lang}"), "w") as f:
                for i in range(n):
                    shift = lang == "tgt"
                    f.write(" ".join(words[(i * 3 + j + shift) % 8] for j in range(4)) + "\n")

    def cli(module, argv):
        sys.argv = [f"fairseq-{module}"] + argv
        importlib.import_module(f"fairseq_cli.{module}").cli_main()

    cli("preprocess", ["--source-lang", "src", "--target-lang", "tgt", "--trainpref",
                       path("train"), "--validpref", path("valid"), "--destdir", path("bin"),
                       "--workers", "1"])
    tiny = ["--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1",
            "--encoder-embed-dim", "8", "--decoder-embed-dim", "8",
            "--encoder-ffn-embed-dim", "16", "--decoder-ffn-embed-dim", "16",
            "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
            "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "100", "--cpu",
            "--num-workers", "0", "--no-progress-bar", "--seed", "1", "--disable-validation"]
    cli("train", [path("bin")] + tiny + ["--max-epoch", "1", "--save-dir", path("ck1")])

    result = {}
    assert "mue_fairseq" not in sys.modules
    from fairseq import checkpoint_utils

    try:
        checkpoint_utils.load_checkpoint_to_cpu(path("ck1/checkpoint_last.pt"))
        result["stock_fairseq"] = "loaded"
    except pickle.UnpicklingError:
        result["stock_fairseq"] = "refused"

    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("fairseq.trainer").addHandler(Collect())
    cli("train", [path("bin")] + tiny + ["--user-dir", "mue_fairseq", "--max-epoch", "2",
                                         "--save-dir", path("ck2"),
                                         "--restore-file", path("ck1/checkpoint_last.pt")])
    result["restored"] = [m for m in messages if m.startswith("Loaded checkpoint")]
    result["patched"] = checkpoint_utils.load_checkpoint_to_cpu.__module__

    from mue_fairseq.checkpoint_safety import load_checkpoint

    state = load_checkpoint(path("ck2/checkpoint_last.pt"))
    result["next_epoch"] = state["extra_state"]["train_iterator"]["epoch"]

    cli("generate", [path("bin"), "--user-dir", "mue_fairseq",
                     "--path", path("ck2/checkpoint_last.pt"), "--beam", "2", "--max-len-b", "5",
                     "--batch-size", "4", "--cpu", "--gen-subset", "valid", "--num-workers", "0",
                     "--required-batch-size-multiple", "1", "--results-path", path("gen")])
    with open(path("gen/generate-valid.txt")) as f:
        result["hypotheses"] = sum(1 for line in f if line.startswith("H-"))
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])))
