"""OFA's unified token dictionary and its GPT-2 BPE.

Token ids (they must match the released checkpoints' embedding rows):

======================  ===========================================  with OFA's dict.txt
``<s> <pad> </s> <unk>``  0, 1, 2, 3 (fairseq's specials)
dict.txt symbols          4 .. 4+N-1, in file order (GPT-2 BPE ids       N = 50260
                          written as strings, e.g. ``"13"``)
``<mask>``                4+N                                           50264
``<code_0..K-1>``         image codes, K = ``--code-dict-size``         50265 .. 58456
``<bin_0..B-1>``          location bins, B = ``--num-bins``             58457 .. 59456
======================  ===========================================  size 59457

Text is encoded as ``dictionary.encode_line(bpe.encode(text))``: the BPE turns text into
space-separated GPT-2 ids, the dictionary maps each id-string to its row.
"""
import os
from typing import Optional

import torch
from fairseq.data import Dictionary

from .errors import MissingFileError

BPE_DIR_OPTION = "--bpe-dir"


def bpe_file(bpe_dir: Optional[str], name: str) -> str:
    """Path of ``name`` inside ``bpe_dir``; MissingFileError naming the file and --bpe-dir."""
    if not bpe_dir:
        raise ValueError(f"{BPE_DIR_OPTION} is not set; it must name the folder that holds {name}")
    path = os.path.join(bpe_dir, name)
    if not os.path.isfile(path):
        raise MissingFileError(path, BPE_DIR_OPTION, what=f"BPE file {name}")
    return path


def build_ofa_dictionary(bpe_dir: str, code_dict_size: int = 8192, num_bins: int = 1000) -> Dictionary:
    """fairseq ``Dictionary`` of ``bpe_dir/dict.txt`` plus ``<mask>``, image codes and bins."""
    dictionary = Dictionary.load(bpe_file(bpe_dir, "dict.txt"))
    dictionary.add_symbol("<mask>")
    for i in range(code_dict_size):
        dictionary.add_symbol(f"<code_{i}>")
    for i in range(num_bins):
        dictionary.add_symbol(f"<bin_{i}>")
    return dictionary


def build_gpt2_bpe(bpe_dir: str):
    """fairseq's ``gpt2`` BPE over ``bpe_dir/encoder.json`` and ``bpe_dir/vocab.bpe``."""
    from fairseq.data import encoders
    from omegaconf import DictConfig

    cfg = DictConfig(
        {
            "_name": "gpt2",
            "gpt2_encoder_json": bpe_file(bpe_dir, "encoder.json"),
            "gpt2_vocab_bpe": bpe_file(bpe_dir, "vocab.bpe"),
        }
    )
    return encoders.build_bpe(cfg)


def build_bpe(bpe: Optional[str], bpe_dir: str):
    """The task's ``--bpe``: ``gpt2`` (OFA's English models). Unset (None) also means gpt2,
    as in OFA: fairseq's own top-level ``--bpe`` option shadows the task field on the
    command line, so it usually arrives as None."""
    if bpe not in (None, "gpt2"):
        raise NotImplementedError(
            f"--bpe={bpe!r} is not supported; OFA's English checkpoints use --bpe=gpt2"
        )
    return build_gpt2_bpe(bpe_dir)


def encode_text(text: str, bpe, dictionary: Dictionary) -> torch.Tensor:
    """Text → 1-D LongTensor of dictionary ids (no bos/eos)."""
    return dictionary.encode_line(
        line=bpe.encode(text), add_if_not_exist=False, append_eos=False
    ).long()


def decode_tokens(tokens, bpe, dictionary: Dictionary) -> str:
    """Ids → text (inverse of :func:`encode_text`). Only BPE tokens are decoded: specials
    (bos, eos, pad, unk, ``<mask>``), image codes and bins are dropped."""
    if torch.is_tensor(tokens):
        tokens = tokens.tolist()
    symbols = [dictionary[int(t)] for t in tokens]
    return bpe.decode(" ".join(s for s in symbols if s.isascii() and s.isdigit()))
