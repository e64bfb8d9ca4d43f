"""SNLI-VE items (prompts, target layout, constraint masks), collate, bad rows."""
import pytest
import torch

from helpers_data import SNLI_ROWS, image_b64, make_bpe_dir, make_image, snli_tsv, write_tsv
from mue_fairseq.data import (DataError, SnliVeDataset, TSVReader, build_answer_trie,
                              build_gpt2_bpe, build_ofa_dictionary, decode_tokens, encode_text)

COLS = "0,2,3,4,5"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("snli")
    bpe_dir = make_bpe_dir(folder / "bpe")
    bpe, d = build_gpt2_bpe(bpe_dir), build_ofa_dictionary(bpe_dir, code_dict_size=4, num_bins=2)
    trie, answers = build_answer_trie(["no", "yes", "maybe"], bpe, d)
    return folder, bpe, d, trie, answers


def make(env, tsv, **kwargs):
    folder, bpe, d, trie, _ = env
    reader = TSVReader(tsv, COLS, fields=SnliVeDataset.FIELDS)
    kwargs.setdefault("constraint_trie", trie)
    return SnliVeDataset("train", reader, bpe, d, patch_image_size=8, **kwargs)


@pytest.mark.parametrize("add_caption,expected", [
    (False, ' does the image describe " a man rides a horse. "?'),
    (True, ' can image and text1 " a man is outdoors with a horse " imply text2 " a man rides a horse. "?'),
])
def test_prompt_text(env, add_caption, expected):
    folder, bpe, d, _, _ = env
    ds = make(env, snli_tsv(folder / "a.tsv"), add_caption=add_caption, prompt_type="prev_output")
    item = ds[0]
    assert item["source"][0] == d.bos() and item["source"][-1] == d.eos()
    assert decode_tokens(item["source"], bpe, d) == expected
    assert item["patch_image"].shape == (3, 8, 8) and item["patch_mask"].tolist() == [True]


def test_prev_output_layout_and_constraint_mask(env):
    folder, bpe, d, _, answers = env
    ds = make(env, snli_tsv(folder / "b.tsv"), prompt_type="prev_output")
    labels = {"entailment": "yes", "contradiction": "no", "neutral": "maybe"}
    for index, row in enumerate(SNLI_ROWS):
        item = ds[index]
        answer = encode_text(" " + labels[row[4]], bpe, d)
        src, prev, tgt = item["source"], item["prev_output_tokens"], item["target"]
        assert torch.equal(item["decoder_prompt"], src[:-1])
        assert torch.equal(prev, torch.cat([src[:-1], answer]))
        n = answer.numel() + 1
        assert torch.equal(tgt[-n:], torch.cat([answer, torch.tensor([d.eos()])]))
        assert (tgt[:-n] == d.pad()).all() and tgt.numel() == prev.numel()
        assert item["ref_dict"] == {labels[row[4]]: 1.0}

        mask = item["constraint_mask"]
        assert mask.shape == (tgt.numel(), len(d))
        assert not mask[:-n].any()  # prompt positions: no loss, nothing allowed
        first_tokens = {a[0].item() for a in answers}
        assert set(mask[-n].nonzero().flatten().tolist()) == first_tokens
        assert mask[-1].nonzero().flatten().tolist() == [d.eos()]


@pytest.mark.parametrize("prompt_type", ["none", None, "src"])
def test_other_prompt_types(env, prompt_type):
    folder, bpe, d, _, _ = env
    item = make(env, snli_tsv(folder / "c.tsv"), prompt_type=prompt_type)[1]
    answer = encode_text(" no", bpe, d)
    prompt = item["source"] if prompt_type == "src" else torch.tensor([d.bos()])
    assert torch.equal(item["decoder_prompt"], prompt)
    assert torch.equal(item["prev_output_tokens"], torch.cat([prompt, answer]))
    assert item["target"][-2:].tolist() == [answer.item(), d.eos()]


def test_bad_prompt_type(env):
    folder = env[0]
    with pytest.raises(ValueError, match="prompt-type"):
        make(env, snli_tsv(folder / "d.tsv"), prompt_type="question")


def test_collate_shapes_and_padding(env):
    folder, bpe, d, _, _ = env
    ds = make(env, snli_tsv(folder / "e.tsv"), add_caption=True, prompt_type="prev_output")
    items = [ds[i] for i in range(3)]
    batch = ds.collater(items)
    S = max(i["source"].numel() for i in items)
    T = max(i["target"].numel() for i in items)
    net = batch["net_input"]
    assert net["src_tokens"].shape == (3, S) and net["prev_output_tokens"].shape == (3, T)
    assert net["patch_images"].shape == (3, 3, 8, 8) and net["patch_masks"].tolist() == [True] * 3
    assert net["src_lengths"].tolist() == [i["source"].numel() for i in items]
    assert batch["target"].shape == (3, T) and batch["constraint_masks"].shape == (3, T, len(d))
    assert batch["ntokens"] == sum(int(i["target"].ne(d.pad()).sum()) for i in items) == 6
    assert batch["nsentences"] == 3 and batch["id"].tolist() == ["0", "1", "2"]
    assert [p.tolist() for p in batch["decoder_prompts"]] == [i["decoder_prompt"].tolist() for i in items]
    assert batch["ref_dict"] == [{"yes": 1.0}, {"no": 1.0}, {"maybe": 1.0}]
    for b, item in enumerate(items):
        n = item["source"].numel()
        assert (net["src_tokens"][b, n:] == d.pad()).all()
        t = item["target"].numel()
        assert (batch["target"][b, t:] == d.pad()).all()
        assert batch["constraint_masks"][b, t:].all()  # padding: unconstrained, as in OFA
    assert ds.collater([]) == {}


def test_unknown_label(env):
    folder = env[0]
    rows = list(SNLI_ROWS)
    rows[2] = rows[2][:4] + ("Neutral",)
    path = snli_tsv(folder / "f.tsv", rows)
    ds = make(env, path)
    ds[1]
    with pytest.raises(DataError, match="unknown label 'Neutral'") as err:
        ds[2]
    assert (err.value.path, err.value.row, err.value.column, err.value.field) == (path, 3, 5, "label")


def test_corrupt_image_and_short_row(env):
    folder = env[0]
    images = [image_b64(make_image(0)), "%%%not-base64", image_b64(make_image(2))]
    path = snli_tsv(folder / "g.tsv", images=images)
    ds = make(env, path)
    with pytest.raises(DataError, match="base64") as err:
        ds[1]
    assert (err.value.path, err.value.row, err.value.column) == (path, 2, 2)

    short = write_tsv(folder / "h.tsv", [("0", "img", image_b64(make_image(0)), "a dog", "a dog")])
    with pytest.raises(DataError, match="short row") as err:
        make(env, short)[0]
    assert (err.value.path, err.value.row, err.value.column, err.value.field) == (short, 1, 5, "label")
