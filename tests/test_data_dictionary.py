"""OFA's unified dictionary (order and ids) and the GPT-2 BPE from --bpe-dir."""
import os

import pytest

from helpers_data import dict_symbol_count, make_bpe_dir
from mue_fairseq.data import DataError, MissingFileError, build_gpt2_bpe, build_ofa_dictionary
from mue_fairseq.data import decode_tokens, encode_text

OFA_DICT = "/work/ref/ofa/utils/BPE/dict.txt"


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return make_bpe_dir(tmp_path_factory.mktemp("bpe"))


def test_order_and_ids(bpe_dir):
    d = build_ofa_dictionary(bpe_dir, code_dict_size=5, num_bins=3)
    n = dict_symbol_count(bpe_dir)
    assert [d[i] for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (d.bos(), d.pad(), d.eos(), d.unk()) == (0, 1, 2, 3)
    with open(os.path.join(bpe_dir, "dict.txt")) as f:
        file_symbols = [line.split()[0] for line in f]
    assert [d[4 + i] for i in range(n)] == file_symbols
    assert d.index("<mask>") == 4 + n
    assert [d.index(f"<code_{i}>") for i in range(5)] == list(range(5 + n, 10 + n))
    assert [d.index(f"<bin_{i}>") for i in range(3)] == list(range(10 + n, 13 + n))
    assert len(d) == 4 + n + 1 + 5 + 3


@pytest.mark.skipif(not os.path.isfile(OFA_DICT), reason="OFA's dict.txt not available")
def test_size_with_ofa_dict_txt():
    d = build_ofa_dictionary(os.path.dirname(OFA_DICT))
    assert len(d) == 59457
    assert (d.index("<mask>"), d.index("<code_0>"), d.index("<bin_0>"), d.index("<bin_999>")) == (
        50264, 50265, 58457, 59456)
    bpe = build_gpt2_bpe(os.path.dirname(OFA_DICT))
    ids = [encode_text(a, bpe, d).tolist() for a in (" no", " yes", " maybe")]
    assert ids == [[117], [4420], [2085]]


def test_bpe_round_trip_and_single_token_answers(bpe_dir):
    bpe, d = build_gpt2_bpe(bpe_dir), build_ofa_dictionary(bpe_dir, 2, 2)
    text = ' does the image describe " two dogs "?'
    ids = encode_text(text, bpe, d)
    assert ids.dtype.is_floating_point is False and (ids > 3).all()
    assert decode_tokens(ids, bpe, d) == text
    for answer in (" yes", " no", " maybe"):
        assert encode_text(answer, bpe, d).numel() == 1
    # specials, codes and bins are not text
    assert decode_tokens([0] + ids.tolist() + [d.index("<code_1>"), 2, 1], bpe, d) == text


@pytest.mark.parametrize("name", ["dict.txt", "encoder.json", "vocab.bpe"])
def test_missing_bpe_file_names_file_and_option(tmp_path, name):
    folder = make_bpe_dir(tmp_path / "bpe")
    os.remove(os.path.join(folder, name))
    with pytest.raises(MissingFileError) as err:
        if name == "dict.txt":
            build_ofa_dictionary(folder)
        else:
            build_gpt2_bpe(folder)
    assert isinstance(err.value, DataError) and isinstance(err.value, FileNotFoundError)
    assert os.path.join(folder, name) in str(err.value) and "--bpe-dir" in str(err.value)


def test_unset_bpe_dir():
    with pytest.raises(ValueError, match="--bpe-dir is not set"):
        build_ofa_dictionary(None)
