"""The fairseq tasks snli_ve / caption: config, data paths, batching, validation metrics."""
import argparse
import dataclasses
import math
import os
import pickle
from collections import defaultdict

import numpy as np
import pytest
import torch
from fairseq import metrics
from omegaconf import OmegaConf

from helpers_data import caption_tsv, make_bpe_dir, snli_tsv
from mue_fairseq.data import TSVReader, encode_text
from mue_fairseq.tasks.caption import CaptionConfig, CaptionTask
from mue_fairseq.cider import CiderD
from mue_fairseq.tasks.ofa_task import OFAConfig
from mue_fairseq.tasks.snli_ve import SnliVeConfig, SnliVeTask

OFA_CIDERD = "/work/ref/ofa/utils/cider/pyciderevalcap/ciderD"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    make_bpe_dir(folder / "bpe")
    snli_tsv(folder / "snli.tsv")
    caption_tsv(folder / "cap.tsv")
    return folder


def snli_task(folder, **overrides):
    data = f"{folder}/snli.tsv,{folder}/snli.tsv"
    cfg = SnliVeConfig(data=data, bpe_dir=str(folder / "bpe"), selected_cols="0,2,3,4,5",
                       code_dict_size=4, num_bins=2, patch_image_size=8, **overrides)
    return SnliVeTask.setup_task(OmegaConf.structured(cfg))


class Criterion:
    def __call__(self, model, sample):
        return torch.tensor(0.0), 1, {"ntokens": sample["ntokens"], "nsentences": sample["nsentences"]}

    @classmethod
    def reduce_metrics(cls, logging_outputs):
        pass


class FakeModel(torch.nn.Module):
    """logits[b, t] = table[prev[b, t]] + image mean * bias: depends on input and image."""

    def __init__(self, vocab):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(vocab, vocab, generator=g)
        self.bias = torch.randn(vocab, generator=g)

    def forward(self, src_tokens, src_lengths, patch_images, patch_masks, prev_output_tokens):
        image = patch_images.mean(dim=(1, 2, 3))[:, None, None]
        return self.table[prev_output_tokens] + image * self.bias, {"attn": None}

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        return torch.log_softmax(net_output[0].float(), dim=-1)


def test_config_fields_defaults_and_cli_options():
    from fairseq.dataclass.utils import gen_parser_from_dataclass

    defaults = OFAConfig()
    assert (defaults.max_src_length, defaults.max_tgt_length, defaults.code_dict_size,
            defaults.patch_image_size, defaults.orig_patch_image_size, defaults.num_bins,
            defaults.bpe, defaults.max_source_positions) == (128, 30, 8192, 480, 256, 1000, "gpt2", 1024)
    assert SnliVeConfig().ans2label_dict == '{"no": 0, "yes":1, "maybe": 2}'
    for cls in (SnliVeConfig, CaptionConfig):
        for f in dataclasses.fields(cls):
            if not f.name.startswith("_"):
                assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    parser = argparse.ArgumentParser()
    gen_parser_from_dataclass(parser, SnliVeConfig())
    args = parser.parse_args(["--add-caption", "--prompt-type", "prev_output", "--encoder-exit",
                              "--decoder-exit-policy", "similarity", "--bpe-dir", "x", "data.tsv"])
    assert args.add_caption and args.prompt_type == "prev_output" and args.encoder_exit
    assert args.data == "data.tsv"  # positional, as in OFA's scripts
    parser = argparse.ArgumentParser()
    gen_parser_from_dataclass(parser, CaptionConfig())
    assert parser.parse_args(["d.tsv", "--eval-cider", "--scst"]).scst


def test_data_paths(folder):
    task = snli_task(folder, bpe=None)  # fairseq's top-level --bpe shadows the field: None = gpt2
    task.cfg.data = "t1.tsv,t2.tsv,v.tsv"
    assert [task.data_path("train", e) for e in (1, 2, 3)] == ["t1.tsv", "t2.tsv", "t1.tsv"]
    assert task.data_path("valid") == task.data_path("test") == "v.tsv"
    assert task.has_sharded_data("train")
    task.cfg.data = "only.tsv"
    assert task.data_path("valid") == "only.tsv"
    with pytest.raises(ValueError, match="training needs"):
        task.data_path("train")


def test_load_dataset_and_batches_with_dummy_batch(folder):
    task = snli_task(folder, prompt_type="prev_output")
    task.load_dataset("valid")
    ds = task.dataset("valid")
    assert len(ds) == 3 and len(task.src_dict) == len(task.tgt_dict) == 4 + 300 + 1 + 4 + 2
    # rank 1 of 2 holds 1 of the 3 rows; rank 0 holds 2: with batch size 1 both need 2 batches
    ds.reader = TSVReader(ds.reader.path, "0,2,3,4,5", fields=ds.FIELDS, slice_id=1, slice_count=2)
    itr = task.get_batch_iterator(ds, max_sentences=1, num_shards=2, shard_id=1)
    batches = list(itr.next_epoch_itr(shuffle=False))
    assert len(batches) == 2 and sorted(len(b) for b in batches)[0] == 0
    assert [b["id"].tolist() for b in batches if b] == [["2"]]


@pytest.mark.parametrize("prompt_type,valid_batch_size", [("prev_output", 20), ("none", 2)])
def test_snli_score_matches_ofa_brute_force(folder, prompt_type, valid_batch_size):
    task = snli_task(folder, prompt_type=prompt_type, add_caption=True, valid_batch_size=valid_batch_size)
    task.load_dataset("valid")
    ds = task.dataset("valid")
    sample = ds.collater([ds[i] for i in range(3)])
    model = FakeModel(len(task.tgt_dict))
    scores = task.score_answers(model, sample)
    assert scores.shape == (3, 3)

    d, eos = task.tgt_dict, task.tgt_dict.eos()
    for b in range(3):
        item = ds[b]
        for k, answer in enumerate(task.answers):
            tokens = encode_text(" " + answer, task.bpe, d)
            prompt = item["decoder_prompt"]
            prev = torch.cat([prompt, tokens])[None]
            tgt = torch.cat([prompt[1:], tokens, torch.tensor([eos])])
            mask = torch.zeros(tgt.numel(), len(d), dtype=torch.bool)
            for i in range(prompt.numel() - 1, tgt.numel()):  # OFA: trie rows for answer + eos
                prefix = [d.bos()] + tgt[prompt.numel() - 1:i].tolist()
                mask[i, task.constraint_trie.next_tokens(prefix)] = True
            logits, _ = model(None, None, sample["net_input"]["patch_images"][b:b + 1], None, prev)
            lprobs = torch.log_softmax(logits[0].masked_fill(~mask, -math.inf), -1)
            token = lprobs.gather(-1, tgt[:, None]).squeeze(-1).masked_fill(~mask.any(1), 0)
            assert torch.allclose(scores[b, k], token.sum(), atol=1e-5)

    loss, _, log = task.valid_step(sample, model, Criterion())
    hits = sum(ref.get(task.answers[i], 0) for ref, i in zip(sample["ref_dict"], scores.argmax(1).tolist()))
    assert (log["_snli_score_sum"], log["_snli_cnt"]) == (hits, 3)
    with metrics.aggregate() as agg:
        task.reduce_metrics([log, log], Criterion())
    assert agg.get_smoothed_values()["snli_score"] == round(hits / 3, 4)


def test_cider_cached_document_frequencies(tmp_path):
    hyps = ["a cat on a mat", "two dogs in the snow", "a man"]
    refs = [["a cat sits on a mat", "a cat on the mat"], ["two dogs play in snow"], ["a man rides a horse"]]
    corpus = CiderD().scores(hyps, refs)
    assert corpus.shape == (3,) and corpus[0] > corpus[2] >= 0
    df = defaultdict(float, {("a",): 3.0, ("cat",): 1.0, ("two",): 1.0, ("a", "cat"): 1.0})
    path = tmp_path / "words.p"
    with open(path, "wb") as f:
        pickle.dump({"document_frequency": df, "ref_len": 40.0}, f)
    cached = CiderD(str(path)).scores(hyps, refs)
    assert not np.allclose(cached, corpus)
    assert np.allclose(CiderD(str(path)).scores(hyps[:1], refs[:1]), cached[:1])  # batch-independent
    if os.path.isdir(OFA_CIDERD):  # same numbers as OFA's own CiderD
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location(
            "ofa_ciderd", os.path.join(OFA_CIDERD, "__init__.py"),
            submodule_search_locations=[OFA_CIDERD])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules["ofa_ciderd"] = pkg
        from ofa_ciderd.ciderD import CiderD as OFACiderD
        res = [{"image_id": i, "caption": [h]} for i, h in enumerate(hyps)]
        _, ofa_scores = OFACiderD(df=str(path)).compute_score(dict(enumerate(refs)), res)
        assert np.allclose(cached, ofa_scores)
        _, ofa_corpus = OFACiderD(df="corpus").compute_score(dict(enumerate(refs)), res)
        assert np.allclose(corpus, ofa_corpus)


def test_caption_validation_cider(folder):
    cfg = CaptionConfig(data=f"{folder}/cap.tsv,{folder}/cap.tsv", bpe_dir=str(folder / "bpe"),
                        selected_cols="1,4,2", code_dict_size=4, num_bins=2, patch_image_size=8,
                        eval_cider=True, eval_bleu=True)
    task = CaptionTask.setup_task(OmegaConf.structured(cfg))
    task.load_dataset("valid")
    ds = task.dataset("valid")
    sample = ds.collater([ds[0], ds[1]])
    d = task.tgt_dict
    outputs = [" a cat, on a mat!", " two dogs play in the snow"]

    class Generator:
        def generate(self, models, sample, **kwargs):
            return [[{"tokens": torch.cat([encode_text(t, task.bpe, d), torch.tensor([d.eos()])])}]
                    for t in outputs]

    task.sequence_generator = Generator()
    task.cider_scorer = CiderD()
    hyps, refs = task.generate_captions(task.sequence_generator, sample, None)
    assert hyps == ["a cat on a mat", "two dogs play in the snow"]
    assert refs == [["A cat sleeping on a mat"], ["Two dogs play in the snow", "Dogs in snow"]]
    model = torch.nn.Linear(1, 1)
    _, _, log = task.valid_step(sample, model, Criterion())
    assert log["_cider_cnt"] == 2
    assert np.isclose(log["_cider_score_sum"], CiderD().scores(hyps, refs).sum())
    with metrics.aggregate() as agg:
        task.reduce_metrics([log], Criterion())
    values = agg.get_smoothed_values()
    assert values["cider"] == round(log["_cider_score_sum"] / 2, 3) and values["bleu"] > 0


def test_train_step_passes_update_num_when_accepted(folder):
    task = snli_task(folder, prompt_type="prev_output")
    seen = {}

    class OFACriterion(torch.nn.Module):
        def forward(self, model, sample, update_num=0, reduce=True):
            seen["update_num"] = update_num
            return model.weight.sum(), 1, {}

    class Model(torch.nn.Linear):
        def set_num_updates(self, n):
            seen["model_updates"] = n

    class Optimizer:
        def backward(self, loss):
            loss.backward()

    model = Model(1, 1)
    task.train_step({}, model, OFACriterion(), Optimizer(), update_num=7)
    assert seen == {"update_num": 7, "model_updates": 7} and model.weight.grad is not None

    class FairseqCriterion(torch.nn.Module):  # no update_num parameter
        def forward(self, model, sample, reduce=True):
            return model.weight.sum(), 1, {}

    task.train_step({}, model, FairseqCriterion(), Optimizer(), update_num=8)
