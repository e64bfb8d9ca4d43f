"""Caption items: prompt, training vs evaluation targets, collate."""
import pytest
import torch

from helpers_data import caption_tsv, make_bpe_dir
from mue_fairseq.data import (CaptionDataset, TSVReader, build_gpt2_bpe, build_ofa_dictionary,
                              decode_tokens, encode_text)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cap")
    bpe_dir = make_bpe_dir(folder / "bpe")
    bpe, d = build_gpt2_bpe(bpe_dir), build_ofa_dictionary(bpe_dir, code_dict_size=4, num_bins=2)
    reader = TSVReader(caption_tsv(folder / "c.tsv"), "0,4,2", fields=CaptionDataset.FIELDS)
    return bpe, d, reader


def test_train_item(env):
    bpe, d, reader = env
    ds = CaptionDataset("train", reader, bpe, d, max_tgt_length=3, patch_image_size=8)
    item = ds[0]
    assert decode_tokens(item["source"], bpe, d) == " what does the image describe?"
    assert item["source"][0] == d.bos() and item["source"][-1] == d.eos()
    caption = encode_text(" A cat sleeping", bpe, d)  # punctuation removed, 3 words kept
    assert torch.equal(item["target"], torch.cat([caption, torch.tensor([d.eos()])]))
    assert torch.equal(item["prev_output_tokens"], torch.cat([torch.tensor([d.bos()]), caption]))
    assert item["patch_image"].shape == (3, 8, 8) and item["id"] == "0"


@pytest.mark.parametrize("split,scst", [("valid", False), ("train", True)])
def test_reference_items(env, split, scst):
    bpe, d, reader = env
    ds = CaptionDataset(split, reader, bpe, d, max_tgt_length=3, patch_image_size=8, scst=scst)
    assert decode_tokens(ds[0]["target"], bpe, d) == " A cat sleeping on a mat"
    assert decode_tokens(ds[1]["target"], bpe, d) == " Two dogs play in the snow&&Dogs in snow"


def test_collate(env):
    bpe, d, reader = env
    ds = CaptionDataset("train", reader, bpe, d, patch_image_size=8)
    items = [ds[0], ds[1]]
    batch = ds.collater(items)
    T = max(i["target"].numel() for i in items)
    assert batch["net_input"]["src_tokens"].shape == (2, items[0]["source"].numel())
    assert batch["net_input"]["prev_output_tokens"].shape == (2, T) and batch["target"].shape == (2, T)
    assert batch["ntokens"] == sum(i["target"].numel() for i in items)
    assert "constraint_masks" not in batch and "decoder_prompts" not in batch
    short = min(range(2), key=lambda b: items[b]["target"].numel())
    assert batch["target"][short, -1] == d.pad()
