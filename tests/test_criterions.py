"""Criterions: OFA's label-smoothed CE, the MuE layer-wise task loss, SCST, CIDEr-D."""
import argparse
import math
import pickle
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fairseq import metrics
from fairseq.dataclass.utils import gen_parser_from_dataclass
from pycocoevalcap.cider.cider_scorer import CiderScorer

from mue_fairseq import cider
from mue_fairseq.criterions.label_smoothed_cross_entropy import (
    AdjustLabelSmoothedCrossEntropyCriterion,
    AdjustLabelSmoothedCrossEntropyCriterionConfig,
    label_smoothed_nll_loss,
)
from mue_fairseq.criterions.scst_loss import ScstRewardCriterion
from mue_fairseq.testing import deterministic_fill_

from ofa_helpers import TINY_RELEASED, build_ofa, tiny_dictionary

PAD, EOS, BOS = 1, 2, 0
VOCAB = 104


def _model(decoder_layers=2):
    model = build_ofa({**TINY_RELEASED, "decoder_layers": decoder_layers}, dictionary=tiny_dictionary())
    return deterministic_fill_(model, 0).eval()


@pytest.fixture(scope="module")
def model3():
    return _model(decoder_layers=3)


def _task():
    return SimpleNamespace(target_dictionary=tiny_dictionary(), source_dictionary=tiny_dictionary())


def _batch(with_masks=True):
    g = torch.Generator().manual_seed(0)
    target = torch.tensor([[10, 11, 12, EOS], [20, 21, EOS, PAD]])
    prev = torch.tensor([[BOS, 10, 11, 12], [BOS, 20, 21, PAD]])
    sample = {
        "nsentences": 2,
        "ntokens": int(target.ne(PAD).sum()),
        "net_input": {
            "src_tokens": torch.tensor([[BOS, 5, 6, 7, EOS], [BOS, 8, 9, EOS, PAD]]),
            "src_lengths": torch.tensor([5, 4]),
            "patch_images": torch.randn(2, 3, 32, 32, generator=g),
            "patch_masks": torch.tensor([True, True]),
            "prev_output_tokens": prev,
        },
        "target": target,
    }
    if with_masks:
        masks = torch.rand(2, 4, VOCAB, generator=g) < 0.3
        masks.scatter_(2, target.unsqueeze(-1), True)  # targets allowed
        masks[1, 3] = True  # padded position: unconstrained, as the collater pads
        sample["constraint_masks"] = masks
    return sample


def _criterion(**kw):
    args = dict(sentence_avg=False, label_smoothing=0.0)
    args.update(kw)
    return AdjustLabelSmoothedCrossEntropyCriterion(_task(), **args)


def _hand_loss(logits, target, eps, masks=None, allowed_range=None, keep=None):
    """Label-smoothed NLL (OFA's formula) computed token by token in float64."""
    total, nll_total, n = 0.0, 0.0, 0
    for b in range(target.size(0)):
        for t in range(target.size(1)):
            y = int(target[b, t])
            if y == PAD or (keep is not None and not keep[b, t]):
                continue
            row = logits[b, t].double().clone()
            if masks is not None:
                allowed = masks[b, t].clone()
                row[~allowed] = -math.inf
                eps_i = eps / (int(allowed.sum()) - 1 + 1e-6)
            elif allowed_range is not None:
                start, end = allowed_range
                row[4:start] = -math.inf
                row[end:] = -math.inf
                allowed = torch.zeros(VOCAB, dtype=torch.bool)
                allowed[:4] = True
                allowed[start:end] = True
                eps_i = eps / (int(allowed.sum()) - 1 + 1e-6)
            else:
                allowed = torch.ones(VOCAB, dtype=torch.bool)
                eps_i = eps / (VOCAB - 1)
            lp = torch.log_softmax(row, -1)
            nll = -lp[y]
            smooth = -lp[allowed].sum()
            total += float(((1 - eps - eps_i) * nll + eps_i * smooth).detach())
            nll_total += float(nll.detach())
            n += 1
    return total, nll_total, n


def _forward(model, sample):
    with torch.no_grad():
        return model(**sample["net_input"])


# ---------------------------------------------------------------- plain loss
def test_plain_loss_equals_hand_computation_with_constraint_masks(model3):
    sample = _batch()
    crit = _criterion(label_smoothing=0.1)
    with torch.no_grad():
        loss, sample_size, log = crit(model3, sample)
    logits, _ = _forward(model3, sample)
    want, want_nll, n = _hand_loss(logits, sample["target"], 0.1, masks=sample["constraint_masks"])
    assert sample_size == n == 7
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert log["nll_loss"].item() == pytest.approx(want_nll, rel=1e-5)
    assert {"loss", "nll_loss", "ntokens", "nsentences", "sample_size"} <= set(log)
    assert not any(k.startswith("loss_layer") for k in log)
    assert AdjustLabelSmoothedCrossEntropyCriterion.logging_outputs_can_be_summed()


def test_plain_loss_constraint_range_prefix_eos_and_sentence_avg(model3):
    sample = _batch(with_masks=False)
    logits, _ = _forward(model3, sample)
    crit = _criterion(label_smoothing=0.1, constraint_range="8,40")
    with torch.no_grad():
        loss, _, _ = crit(model3, sample)
    assert loss.item() == pytest.approx(_hand_loss(logits, sample["target"], 0.1, allowed_range=(8, 40))[0], rel=1e-5)

    keep = torch.ones_like(sample["target"], dtype=torch.bool)
    keep[:, :1] = False
    keep &= sample["target"].ne(EOS)
    crit = _criterion(label_smoothing=0.1, ignore_prefix_size=1, ignore_eos=True, sentence_avg=True)
    with torch.no_grad():
        loss, sample_size, _ = crit(model3, sample)
    want, _, n = _hand_loss(logits, sample["target"], 0.1, keep=keep)
    assert n == 3 and sample_size == 2  # sentence_avg: batch size
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_report_accuracy(model3):
    sample = _batch()
    with torch.no_grad():
        _, _, log = _criterion(report_accuracy=True)(model3, sample)
    logits, _ = _forward(model3, sample)
    masked = logits.masked_fill(~sample["constraint_masks"], -math.inf)
    keep = sample["target"].ne(PAD)
    assert log["total"] == 7
    assert log["n_correct"] == int(masked.argmax(-1)[keep].eq(sample["target"][keep]).sum())


def test_drop_worst_drops_the_highest_loss_tokens():
    lprobs = torch.log_softmax(torch.randn(10, 7, generator=torch.Generator().manual_seed(1)), -1)
    target = torch.arange(10) % 7
    per_token = -lprobs[torch.arange(10), target]
    loss, nll, n = label_smoothed_nll_loss(lprobs, target, 0.0, update_num=5, drop_worst_ratio=0.3, drop_worst_after=4)
    assert n == 7
    assert loss.item() == pytest.approx(per_token.sort().values[:7].sum().item(), rel=1e-6)
    assert nll.item() == pytest.approx(loss.item(), rel=1e-6)
    # not yet after drop_worst_after updates (strictly greater, as OFA)
    loss, _, n = label_smoothed_nll_loss(lprobs, target, 0.0, update_num=4, drop_worst_ratio=0.3, drop_worst_after=4)
    assert n == 10 and loss.item() == pytest.approx(per_token.sum().item(), rel=1e-6)


# ---------------------------------------------------------------- layer-wise loss
def test_last_layer_projection_equals_model_logits(model3):
    sample = _batch()
    logits, extra = _forward(model3, sample)
    states = extra["inner_states"]
    assert len(states) == model3.decoder.num_layers + 1 == 4
    torch.testing.assert_close(model3.decoder.project(states[-1].transpose(0, 1)), logits, rtol=0, atol=1e-5)


def test_layerwise_with_weight_on_last_layer_equals_plain_loss_exactly(model3):
    sample = _batch()
    plain = _criterion(label_smoothing=0.1)
    last_only = _criterion(label_smoothing=0.1, layerwise_loss=True, layer_weights="0,0,1")
    loss_p, size_p, log_p = plain(model3, sample)
    loss_l, size_l, log_l = last_only(model3, sample)
    assert size_p == size_l
    assert torch.equal(loss_p, loss_l)
    assert torch.equal(log_p["nll_loss"], log_l["nll_loss"])
    assert torch.equal(log_l["loss_layer3"], loss_p.data)
    g_p = torch.autograd.grad(loss_p, model3.decoder.layers[-1].fc1.weight)[0]
    g_l = torch.autograd.grad(loss_l, model3.decoder.layers[-1].fc1.weight)[0]
    torch.testing.assert_close(g_p, g_l, rtol=0, atol=0)


def test_uniform_layerwise_is_mean_of_per_layer_losses(model3):
    sample = _batch()
    crit = _criterion(label_smoothing=0.1, layerwise_loss=True)
    with torch.no_grad():
        loss, sample_size, log = crit(model3, sample)
    _, extra = _forward(model3, sample)
    per_layer = []
    for i in range(1, 4):
        logits_i = model3.decoder.project(extra["inner_states"][i].transpose(0, 1))
        per_layer.append(_hand_loss(logits_i, sample["target"], 0.1, masks=sample["constraint_masks"])[0])
    assert loss.item() == pytest.approx(sum(per_layer) / 3, rel=1e-5)
    for i, want in enumerate(per_layer, 1):
        assert log[f"loss_layer{i}"].item() == pytest.approx(want, rel=1e-5)
    assert sample_size == 7
    # the layers differ, so the mean is not the last layer's loss
    assert abs(per_layer[0] - per_layer[2]) > 1e-3

    with metrics.aggregate() as agg:
        AdjustLabelSmoothedCrossEntropyCriterion.reduce_metrics([log, log])
    values = agg.get_smoothed_values()
    for key in ("loss", "nll_loss", "ppl", "loss_layer1", "loss_layer2", "loss_layer3", "sample_size"):
        assert key in values
    assert values["loss_layer2"] == pytest.approx(round(per_layer[1] / 7, 3), abs=1e-3)


def test_layerwise_with_drop_worst_drops_per_layer(model3):
    sample = _batch()
    crit = _criterion(layerwise_loss=True, drop_worst_ratio=0.5, drop_worst_after=0)
    with torch.no_grad():
        loss, sample_size, log = crit(model3, sample, update_num=1)
    assert sample_size == 3
    assert loss.item() == pytest.approx(sum(log[f"loss_layer{i}"].item() for i in (1, 2, 3)) / 3, rel=1e-6)


def test_option_errors_and_flags():
    with pytest.raises(ValueError, match="R-Drop"):
        _criterion(use_rdrop=True)
    with pytest.raises(ValueError, match="needs --layerwise-loss"):
        _criterion(layer_weights="0,1")
    with pytest.raises(ValueError, match="not all zero"):
        _criterion(layerwise_loss=True, layer_weights="0,0")
    with pytest.raises(ValueError, match="START,END"):
        _criterion(constraint_range="5")
    crit = _criterion(layerwise_loss=True, layer_weights="1,1")
    with pytest.raises(ValueError, match="2 values for 3 decoder layers"):
        crit(_model(decoder_layers=3), _batch())
    parser = argparse.ArgumentParser()
    gen_parser_from_dataclass(parser, AdjustLabelSmoothedCrossEntropyCriterionConfig())
    args = parser.parse_args(["--layerwise-loss", "--layer-weights", "0,0,1", "--constraint-range", "4,10",
                              "--drop-worst-ratio", "0.2", "--sample-patch-num", "3"])
    args.sentence_avg = False
    crit = AdjustLabelSmoothedCrossEntropyCriterion.build_criterion(args, _task())
    assert crit.layerwise_loss and crit.layer_weights == [0.0, 0.0, 1.0]
    assert (crit.constraint_start, crit.constraint_end) == (4, 10)


# ---------------------------------------------------------------- CIDEr-D
def _ngram_df(docs, path):
    df, n = cider.build_document_frequency(docs)
    cider.save_document_frequency(str(path), df, n)
    return str(path)


def test_cider_identical_high_disjoint_zero(tmp_path):
    docs = [["a man rides a horse <eos>"], ["a cat on a mat <eos>"], ["two dogs play <eos>"]]
    scorer = cider.CiderD(_ngram_df(docs, tmp_path / "w.p"))
    s = scorer.scores(["a man rides a horse <eos>", "blue green <eos>"],
                      [["a man rides a horse <eos>"] * 2, ["red yellow <eos>"]])
    assert s[0] == pytest.approx(10.0)
    assert s[1] == 0.0


def test_cider_corpus_mode_equals_pycocoevalcap():
    hyps = ["a man on a horse", "a dog", "two cats sit on a red mat", "the sky"]
    refs = [["a man riding a horse", "man on horse"], ["a brown dog runs", "dog"],
            ["two cats on a mat", "cats sitting on a red mat"], ["blue sky above a city"]]
    ref = CiderScorer()
    for h, r in zip(hyps, refs):
        ref += (h, r)
    _, want = ref.compute_score()
    np.testing.assert_allclose(cider.CiderD(None).scores(hyps, refs), want, rtol=0, atol=1e-12)


def test_cider_cached_scores_do_not_depend_on_the_batch(tmp_path):
    scorer = cider.CiderD(_ngram_df([["a man on a horse"], ["a dog runs"], ["cats"]], tmp_path / "w.p"))
    one = scorer.scores(["a man on a horse"], [["a man riding a horse"]])
    two = scorer.scores(["a dog", "a man on a horse"], [["a dog runs"], ["a man riding a horse"]])
    assert one[0] == pytest.approx(two[1]) and 0 < one[0] < 10


def test_leave_one_out_baseline_arithmetic():
    np.testing.assert_allclose(cider.leave_one_out_rewards(np.array([1.0, 2.0, 3.0, 0.0, 0.0, 6.0]), 3),
                               [-1.5, 0.0, 1.5, -3.0, -3.0, 6.0])
    with pytest.raises(ValueError, match="at least 2"):
        cider.leave_one_out_rewards(np.array([1.0]), 1)


def test_scst_text_normalisation():
    assert cider.scst_text(" A man, riding a horse. ") == "A man riding a horse <eos>"
    assert cider.scst_text("a dog.", eos=False) == "a dog"


def test_build_df_command(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text("0\timg1\ta dog runs.\tx\n1\timg1\ta dog sits\tx\n2\timg2\ta cat&&the cat!\tx\n")
    out = tmp_path / "sub" / "words.p"
    assert cider.main(["build-df", "--captions", str(tsv), "--cols", "1,2", "--out", str(out)]) == 0
    with open(out, "rb") as f:
        data = pickle.load(f, encoding="latin1")
    df = data["document_frequency"]
    assert data["ref_len"] == 2 and isinstance(df, defaultdict)
    assert df[("a",)] == 2 and df[("dog",)] == 1 and df[("cat",)] == 1 and df[("<eos>",)] == 2
    assert df[("runs", "<eos>")] == 1 and ("runs.",) not in df
    cider.main(["build-df", "--captions", str(tsv), "--cols", "2", "--out", str(out), "--no-eos"])
    with open(out, "rb") as f:
        data = pickle.load(f, encoding="latin1")
    assert data["ref_len"] == 3 and ("<eos>",) not in data["document_frequency"]
    with pytest.raises(FileNotFoundError, match="build-df"):
        cider.CiderD(str(tmp_path / "missing.p"))


# ---------------------------------------------------------------- SCST
WORDS = {i: f"w{i}" for i in range(4, 99)}
WORDS[99] = "&&"


class _StubGenerator:
    def __init__(self, hypos):
        self.hypos = hypos
        self.seen_training = None

    def generate(self, models, sample, **kwargs):
        self.seen_training = models[0].training
        return [[{"tokens": torch.tensor(h)} for h in per_image] for per_image in self.hypos]


def _scst_task(generator):
    task = _task()
    task.scst_generator = generator
    task.decode = lambda tokens: " ".join(WORDS[int(t)] for t in tokens if int(t) in WORDS)
    return task


def test_scst_reward_baseline_and_loss(tmp_path, model3):
    hypos = [
        [[10, 11, 12, EOS], [10, 11, EOS], [30, EOS]],
        [[20, 21, EOS], [20, 22, 23, EOS], [20, 21, 22, EOS]],
    ]
    df = _ngram_df([["w10 w11 w12 <eos>", "w10 w11 <eos>"], ["w20 w21 <eos>"], ["w40 <eos>"]], tmp_path / "w.p")
    gen = _StubGenerator(hypos)
    crit = ScstRewardCriterion(_scst_task(gen), df, sentence_avg=False)
    sample = _batch(with_masks=False)
    sample["target"] = torch.tensor([[10, 11, 12, 99, 10, 11, EOS], [20, 21, EOS, PAD, PAD, PAD, PAD]])
    model3.train()  # generated in eval mode, loss in the caller's (train) mode
    crit(model3, sample)
    assert gen.seen_training is False and model3.training
    model3.eval()  # values: eval mode (train-mode batch norm would use the batch's statistics)
    gen.seen_training = None
    loss, sample_size, log = crit(model3, sample)
    assert gen.seen_training is False and not model3.training

    refs = [["w10 w11 w12 <eos>", "w10 w11 <eos>"], ["w20 w21 <eos>"]]
    texts = [" ".join(f"w{t}" for t in h if t != EOS) + " <eos>" for per in hypos for h in per]
    scores = cider.CiderD(df).scores(texts, [refs[i // 3] for i in range(6)])
    assert scores[0] > scores[2] == 0.0 and scores[3] > 0
    assert log["score"] == pytest.approx(scores.sum())
    reward = scores.reshape(2, 3) - (scores.reshape(2, 3).sum(1, keepdims=True) - scores.reshape(2, 3)) / 2
    np.testing.assert_allclose(reward.sum(1), 0.0, atol=1e-12)  # leave-one-out rewards sum to 0 per image
    reward = reward.reshape(-1)

    # hand: teacher-force each candidate alone
    want, ntok = 0.0, 0
    with torch.no_grad():
        for i, h in enumerate(sum(hypos, [])):
            img = i // 3
            net = {k: v[img : img + 1] for k, v in sample["net_input"].items() if k != "prev_output_tokens"}
            prev = torch.tensor([[BOS] + h[:-1]])
            logits, _ = model3(prev_output_tokens=prev, **net)
            lp = torch.log_softmax(logits[0].double(), -1)
            want -= float(reward[i] * lp[torch.arange(len(h)), torch.tensor(h)].sum())
            ntok += len(h)
    assert sample_size == ntok == log["ntokens"] and log["nsentences"] == 6
    assert loss.item() == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_scst_rewards_helper_and_errors(tmp_path):
    df = _ngram_df([["a b <eos>"], ["c d <eos>"]], tmp_path / "w.p")
    crit = ScstRewardCriterion(_scst_task(None), df, sentence_avg=False)
    reward, scores = crit.get_reward_and_scores(["a b", "a b.", "x"], [["a b", "a b c"]], device="cpu")
    assert scores[0] == pytest.approx(scores[1]) and scores[2] == 0.0
    torch.testing.assert_close(
        reward, torch.tensor(cider.leave_one_out_rewards(scores, 3), dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="at least 2"):
        crit.get_reward_and_scores(["a b"], [["a b"]], device="cpu")
