"""End to end through the real command lines, on tiny data and a tiny model (width 32, 2+2
layers, 32 px images): stock ``fairseq-train --user-dir <mue_fairseq>`` with the layer-wise
loss and modality decomposition on both tasks, ``python -m mue_fairseq.evaluate`` with exits,
a 2-process CPU (gloo) run against the single-process run, resuming after a checkpoint, and
bad inputs reported with file/row/column.

The SNLI-VE training run is shared (module fixture): it makes 6 updates with checkpoints at
updates 2 and 4; the resume test restarts from its update-4 checkpoint, the distributed test
replays its batches on 2 ranks, the evaluation test evaluates its final checkpoint.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from helpers_data import image_b64, make_bpe_dir, make_image, write_tsv

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO_ROOT, "mue_fairseq")

TINY_MODEL = [
    "--arch", "ofa_tiny", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-layers", "2",
    "--decoder-layers", "2", "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
    "--resnet-type", "resnet_light", "--freeze-resnet", "--code-dict-size", "4", "--num-bins", "4",
    "--patch-image-size", "32", "--encoder-normalize-before", "--decoder-normalize-before",
    "--share-decoder-input-output-embed", "--share-all-embeddings", "--layernorm-embedding",
    "--patch-layernorm-embedding", "--code-layernorm-embedding", "--add-type-embedding",
    "--scale-attn", "--scale-fc", "--scale-heads", "--disable-entangle", "--decompose-modalities",
    "--dropout", "0", "--attention-dropout", "0",
]
OPTIM = [
    "--cpu", "--num-workers", "0", "--seed", "1", "--optimizer", "adam", "--adam-betas", "(0.9,0.999)",
    "--adam-eps", "1e-08", "--weight-decay", "0.01", "--clip-norm", "1.0", "--lr", "1e-3",
    "--lr-scheduler", "polynomial_decay", "--warmup-ratio", "0.5",
    "--log-format", "json", "--log-interval", "1", "--no-progress-bar",
]
SNLI_TASK = ["--task", "snli_ve", "--selected-cols", "0,2,3,4,5", "--prompt-type", "prev_output",
             "--add-caption", "--max-src-length", "20", "--max-tgt-length", "10",
             "--criterion", "adjust_label_smoothed_cross_entropy", "--layerwise-loss",
             "--disable-validation"]
LABELS = ["entailment", "contradiction", "neutral"]
HYPOTHESES = ["a man rides a horse", "two dogs sleep", "a woman reads", "a cat sleeps",
              "dogs play in the snow", "a man reads a book"]
CAPTIONS = ["a cat sleeping on a mat", "two dogs play in the snow", "a woman reads a book",
            "a man rides a horse"]


def snli_rows(n=12):
    return [(str(i), f"img{i}", image_b64(make_image(i, (20, 16))), HYPOTHESES[i % 6],
             "a man is outdoors with a horse", LABELS[i % 3]) for i in range(n)]


def caption_rows(n=8):
    return [(str(i), str(100 + i), f"{CAPTIONS[i % 4]}&&{CAPTIONS[(i + 1) % 4]}", "cat",
             image_b64(make_image(10 + i, (20, 16)), "JPEG")) for i in range(n)]


@pytest.fixture(autouse=True)
def one_thread():
    """In-process model runs: one intra-op thread (the 2 cores are shared; spinning OpenMP
    threads slow tiny models down by orders of magnitude under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    make_bpe_dir(folder / "bpe")
    rows = snli_rows()
    write_tsv(folder / "snli_train.tsv", rows)
    write_tsv(folder / "snli_valid.tsv", rows[:4])
    # For 2 ranks with 1 row per batch: rank 0 reads rows 0-5, rank 1 rows 6-11 of this file,
    # so its batch i (rows i, 6 + i) holds the rows of the single process' batch i (2i, 2i+1).
    write_tsv(folder / "snli_train_2ranks.tsv", rows[0::2] + rows[1::2])
    caps = caption_rows()
    write_tsv(folder / "cap_train.tsv", caps)
    write_tsv(folder / "cap_valid.tsv", caps[:4])
    return folder


def run(cmd, cwd, timeout=240):
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"  # 2 shared cores: no thread oversubscription
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)


def fairseq_train():
    exe = shutil.which("fairseq-train")
    return [exe] if exe else [sys.executable, "-m", "fairseq_cli.train"]


def evaluate_cmd():
    return [sys.executable, "-m", "mue_fairseq.evaluate"]


def logged(output: str, tag: str = "train_inner"):
    """{num_updates: record} of fairseq's json log lines ``... | INFO | <tag> | {...}``."""
    records = {}
    for line in output.splitlines():
        marker = f"| {tag} | "
        if marker in line:
            record = json.loads(line.split(marker, 1)[1])
            updates = record.get("num_updates", record.get(f"{tag}_num_updates"))
            records[int(updates)] = record
    return records


def snli_train_cmd(work, save_dir, data="snli_train.tsv", batch_size=2, extra=()):
    return fairseq_train() + [
        f"{data},snli_valid.tsv", "--user-dir", USER_DIR, "--bpe-dir", str(work / "bpe"),
        *SNLI_TASK, *TINY_MODEL, *OPTIM, "--batch-size", str(batch_size), "--max-update", "6",
        "--save-dir", str(save_dir), *extra,
    ]


@pytest.fixture(scope="module")
def snli_run(work):
    save = work / "ck_snli"
    proc = run(snli_train_cmd(work, save, extra=["--save-interval-updates", "2"]), work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"proc": proc, "log": logged(proc.stdout + proc.stderr), "save": save}


@pytest.fixture(scope="module")
def caption_run(work):
    save = work / "ck_cap"
    cmd = fairseq_train() + [
        "cap_train.tsv,cap_valid.tsv", "--user-dir", USER_DIR, "--bpe-dir", str(work / "bpe"),
        "--task", "caption", "--selected-cols", "0,4,2", "--max-src-length", "20", "--max-tgt-length", "10",
        "--criterion", "adjust_label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--layerwise-loss",
        "--drop-worst-ratio", "0.2", "--drop-worst-after", "2",
        "--freeze-encoder-embedding", "--freeze-decoder-embedding",
        *TINY_MODEL, *OPTIM, "--batch-size", "2", "--max-epoch", "1", "--save-dir", str(save),
        "--eval-cider", "--eval-args", '{"beam":2,"max_len_b":8,"no_repeat_ngram_size":3}',
        "--best-checkpoint-metric", "cider", "--maximize-best-checkpoint-metric",
        "--ignore-unused-valid-subsets",
    ]
    proc = run(cmd, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    return {"proc": proc, "log": logged(output), "valid": logged(output, "valid"), "save": save}


# ---------------------------------------------------------------------- training
def test_train_snli_ve_layerwise_with_warmup_ratio(snli_run):
    log = snli_run["log"]
    assert sorted(log) == [1, 2, 3, 4, 5, 6]
    for record in log.values():
        assert {"loss", "loss_layer1", "loss_layer2"} <= set(record)
    # --warmup-ratio 0.5 of --max-update 6: 3 warmup updates, then linear decay to 0 at 6
    lrs = [float(log[u]["lr"]) for u in range(1, 7)]
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 2e-3 / 3, 1e-3 / 3, 0.0], rel=1e-3, abs=1e-9)
    for name in ("checkpoint_1_2.pt", "checkpoint_1_4.pt", "checkpoint_last.pt"):
        assert (snli_run["save"] / name).is_file()


def test_train_caption_layerwise_epoch_based_warmup(caption_run):
    log = caption_run["log"]
    # 8 rows / batch 2 = 4 updates in the one epoch (--max-epoch 1): 2 warmup updates
    assert sorted(log) == [1, 2, 3, 4]
    assert [float(log[u]["lr"]) for u in range(1, 5)] == pytest.approx([5e-4, 1e-3, 5e-4, 0.0])
    assert "loss_layer2" in log[1]
    assert "polynomial_decay: 4 updates in total, 2 warmup updates" in caption_run["proc"].stdout + caption_run["proc"].stderr
    assert "valid_cider" in caption_run["valid"][4]
    assert (caption_run["save"] / "checkpoint_last.pt").is_file()


# ---------------------------------------------------------------------- evaluation
# thresholds that a 2-layer model certainly passes: every stream and token exits at layer 1
FORCED_EXITS = ["--encoder-exit", "--image-exit-threshold", "-0.5", "--text-exit-threshold", "-0.5",
                "--decoder-exit-policy", "similarity", "--decoder-exit-threshold", "-0.5"]


def test_evaluate_snli_ve_with_exits(work, snli_run):
    results = work / "res_snli"
    cmd = evaluate_cmd() + [
        "snli_valid.tsv", "--path", str(snli_run["save"] / "checkpoint_last.pt"), "--user-dir", USER_DIR,
        "--task", "snli_ve", "--bpe-dir", str(work / "bpe"), "--selected-cols", "0,2,3,4,5",
        "--gen-subset", "test", "--batch-size", "2", "--cpu", "--num-workers", "0",
        "--results-path", str(results), *FORCED_EXITS,
    ]
    proc = run(cmd, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predictions = json.loads((results / "test_predict.json").read_text())
    assert [p["uniq_id"] for p in predictions] == ["0", "1", "2", "3"]
    assert {p["answer"] for p in predictions} <= {"yes", "no", "maybe"}
    metrics = json.loads((results / "test_metrics.json").read_text())
    truth = {"0": "yes", "1": "no", "2": "maybe", "3": "yes"}
    assert metrics["accuracy"] == pytest.approx(sum(truth[p["uniq_id"]] == p["answer"] for p in predictions) / 4)
    stats = json.loads((results / "test_exit_stats.json").read_text())
    assert stats["summary"]["num_samples"] == 4
    # every stream exits at layer 1 of 2; 3 candidates x (answer token + eos) scored per sample
    for record in stats["records"]:
        assert record["image_exit_layer"] == record["text_exit_layer"] == 1
        assert record["decoder_exit_layers"] == [1] * 6
    assert stats["summary"]["expected_time_reduction"] == pytest.approx(0.5)
    assert metrics["expected_time_reduction"] == pytest.approx(0.5)
    assert "expected time reduction (Eq. 14) 50.0%" in proc.stdout
    assert "| test: accuracy" in proc.stdout


def test_evaluate_caption_with_exits(work, caption_run):
    from mue_fairseq.caption_metrics import spice_unavailable

    results = work / "res_cap"
    cmd = evaluate_cmd() + [
        "cap_valid.tsv", "--path", str(caption_run["save"] / "checkpoint_last.pt"),
        "--task", "caption", "--bpe-dir", str(work / "bpe"), "--selected-cols", "1,4,2",
        "--gen-subset", "test", "--batch-size", "2", "--cpu", "--num-workers", "0",
        "--beam", "2", "--max-len-b", "8", "--no-repeat-ngram-size", "3",
        "--results-path", str(results), *FORCED_EXITS,
    ]
    proc = run(cmd, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predictions = json.loads((results / "test_predict.json").read_text())
    assert [p["image_id"] for p in predictions] == ["100", "101", "102", "103"]
    assert all(isinstance(p["caption"], str) for p in predictions)
    metrics = json.loads((results / "test_metrics.json").read_text())
    for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert 0.0 <= metrics[name] <= 10.0
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("SPICE skipped: ")]
    if spice_unavailable() is None:
        assert "SPICE" in metrics and not skipped
    else:
        assert "SPICE" not in metrics and len(skipped) == 1
    stats = json.loads((results / "test_exit_stats.json").read_text())
    assert stats["summary"]["num_samples"] == 4 and stats["summary"]["num_tokens"] > 0
    assert stats["summary"]["mean_decoder_exit_layer"] == pytest.approx(1.0)
    assert stats["summary"]["expected_time_reduction"] == pytest.approx(0.5)
    assert "| exits: 4 samples" in proc.stdout


# ---------------------------------------------------------------------- distributed, resume
def test_two_process_gloo_run_matches_single_process(work, snli_run):
    """Same global batch (2 ranks x 1 row vs 1 process x 2 rows, same rows per update):
    the same logged training losses."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not installed")
    train = snli_train_cmd(work, work / "ck_ddp", data="snli_train_2ranks.tsv", batch_size=1, extra=[
        "--distributed-backend", "gloo", "--distributed-world-size", "2", "--distributed-no-spawn",
        "--distributed-init-method", "env://", "--ddp-backend", "legacy_ddp", "--no-save"])
    script = "exec " + shlex.join(train) + " --distributed-rank $RANK"
    proc = run(["torchrun", "--standalone", "--nproc_per_node", "2", "--no-python", "bash", "-c", script], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = logged(proc.stdout + proc.stderr)
    single = snli_run["log"]
    assert sorted(ddp) == [1, 2, 3, 4, 5, 6]
    for update in range(1, 7):
        assert int(ddp[update]["nsentences"]) == 2
        assert float(ddp[update]["loss"]) == pytest.approx(float(single[update]["loss"]), abs=2e-3)


def test_resume_after_checkpoint_matches_uninterrupted_run(work, snli_run):
    """A run stopped after its update-4 checkpoint, started again with the same command,
    continues to the same losses as the run that was not stopped."""
    save = work / "ck_resume"
    save.mkdir()
    shutil.copy(snli_run["save"] / "checkpoint_1_4.pt", save / "checkpoint_last.pt")
    proc = run(snli_train_cmd(work, save), work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Loaded checkpoint" in proc.stdout + proc.stderr
    resumed = logged(proc.stdout + proc.stderr)
    assert sorted(resumed) == [5, 6]
    for update in (5, 6):
        for key in ("loss", "loss_layer1", "loss_layer2", "lr"):
            assert resumed[update][key] == snli_run["log"][update][key]


# ---------------------------------------------------------------------- bad inputs
def _bad_rows(kind):
    rows = [list(r) for r in snli_rows(4)]
    if kind == "corrupt image":
        rows[2][2] = "not*base64!"
        return rows, "row 3, column 2 (image)"
    if kind == "short row":
        rows[1] = rows[1][:3]
        return rows, "row 2"
    if kind == "unknown label":
        rows[3][5] = "banana"
        return rows, "row 4, column 5 (label)"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["corrupt image", "short row", "unknown label"])
def test_evaluate_bad_rows_name_file_row_column(work, snli_run, kind, capsys):
    from mue_fairseq.evaluate import cli_main

    rows, where = _bad_rows(kind)
    bad = write_tsv(work / f"bad_{kind.replace(' ', '_')}.tsv", rows)
    with pytest.raises(SystemExit) as exit_info:
        cli_main([bad, "--path", str(snli_run["save"] / "checkpoint_last.pt"), "--task", "snli_ve",
                  "--bpe-dir", str(work / "bpe"), "--selected-cols", "0,2,3,4,5", "--gen-subset", "test",
                  "--batch-size", "4", "--cpu", "--num-workers", "0", "--no-progress-bar"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"{bad}: {where}" in err, err


@pytest.mark.parametrize("missing", ["bpe file", "checkpoint"])
def test_evaluate_missing_files_are_named(work, snli_run, missing, capsys):
    from mue_fairseq.evaluate import cli_main

    path, bpe_dir = str(snli_run["save"] / "checkpoint_last.pt"), work / "bpe"
    if missing == "checkpoint":
        path, expected = str(work / "no_such.pt"), f"{work / 'no_such.pt'}: checkpoint not found (set by --path)"
    else:
        bpe_dir = work / "bpe_partial"
        bpe_dir.mkdir(exist_ok=True)
        shutil.copy(work / "bpe" / "dict.txt", bpe_dir / "dict.txt")
        expected = f"{bpe_dir / 'encoder.json'}: BPE file encoder.json not found (set by --bpe-dir)"
    with pytest.raises(SystemExit):
        cli_main(["snli_valid.tsv", "--path", path, "--task", "snli_ve", "--bpe-dir", str(bpe_dir),
                  "--selected-cols", "0,2,3,4,5", "--gen-subset", "test", "--batch-size", "4", "--cpu"])
    assert expected in capsys.readouterr().err


def test_fairseq_train_reports_bad_row(work):
    """The stock fairseq-train CLI surfaces the data error (file, row, column) too."""
    rows, where = _bad_rows("unknown label")
    bad = write_tsv(work / "train_bad_label.tsv", rows)
    cmd = snli_train_cmd(work, work / "ck_bad", data=os.path.basename(bad), extra=["--no-save"])
    cmd[cmd.index("--max-update") + 1] = "2"
    proc = run(cmd, work)
    assert proc.returncode != 0
    assert f"{os.path.basename(bad)}: {where}: unknown label 'banana'" in proc.stderr


# ---------------------------------------------------------------------- scoring with exits
def test_incremental_candidate_scoring_equals_teacher_forcing(work, snli_run):
    """With exits off, SNLI-VE candidate scores from the incremental (exit-capable) decoder
    equal OFA's one-pass teacher-forced scores; the exit records cover the scored tokens."""
    from fairseq import checkpoint_utils

    from mue_fairseq.exits.config import ExitConfig
    from mue_fairseq.tasks.ofa_task import new_exit_stats

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(snli_run["save"] / "checkpoint_last.pt")],
        arg_overrides={"data": str(work / "snli_valid.tsv"), "bpe_dir": str(work / "bpe")})
    model = models[0].eval()
    task.load_dataset("test")
    ds = task.dataset("test")
    sample = ds.collater([ds[i] for i in range(4)])
    plain = task.score_answers(model, sample, incremental=False)
    stats = new_exit_stats(model)
    incremental = task.score_answers(model, sample, exit_stats=stats)
    torch.testing.assert_close(incremental, plain, atol=1e-5, rtol=1e-5)
    assert [r.decoder_exit_layers for r in stats.records] == [[2] * 6] * 4
    assert stats.expected_time_reduction() == 0.0

    task.exit_cfg = ExitConfig(encoder_exit=True, image_exit_threshold=-0.5, text_exit_threshold=-0.5,
                               decoder_exit_policy="similarity", decoder_exit_threshold=-0.5)
    exited = task.score_answers(model, sample)
    assert exited.shape == plain.shape and torch.isfinite(exited).all()
    assert model.decoder.exit_policy is None and model.encoder.exit_thresholds is None  # switched off again


def test_task_generators_start_from_bos_and_follow_exit_options(work, caption_run):
    from argparse import Namespace

    from fairseq import checkpoint_utils, search
    from fairseq.sequence_generator import SequenceGenerator

    from mue_fairseq.exits.config import ExitConfig
    from mue_fairseq.generation.exit_generator import ExitAwareSequenceGenerator

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(caption_run["save"] / "checkpoint_last.pt")],
        arg_overrides={"data": str(work / "cap_valid.tsv"), "bpe_dir": str(work / "bpe"),
                       "selected_cols": "1,4,2", "eval_cider": False})
    model = models[0].eval()
    args = Namespace(beam=2, max_len_b=5)
    plain = task.build_generator([model], args)
    assert type(plain) is SequenceGenerator
    task.load_dataset("test")
    ds = task.dataset("test")
    sample = ds.collater([ds[i] for i in range(2)])
    hypos = task.inference_step(plain, [model], sample)
    from_bos = plain.generate([model], sample, bos_token=task.tgt_dict.bos())
    assert [h[0]["tokens"].tolist() for h in hypos] == [h[0]["tokens"].tolist() for h in from_bos]

    task.exit_cfg = ExitConfig(decoder_exit_policy="similarity")
    exiting = task.build_generator([model], args)
    assert isinstance(exiting, ExitAwareSequenceGenerator) and exiting.exit_cfg is task.exit_cfg
    task.inference_step(exiting, [model], sample)
    assert exiting.stats.num_tokens > 0 and len(exiting.stats.records) == 2
    assert [r.sample_id for r in exiting.stats.records] == [100, 101]

    task.cfg.constraint_range = f"4,{len(task.tgt_dict)}"
    constrained = task.build_generator([model], args, seq_gen_cls=SequenceGenerator)
    assert isinstance(constrained.search, search.PrefixConstrainedBeamSearch)
