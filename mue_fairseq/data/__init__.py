"""OFA data: TSV reading, images, dictionary/BPE, SNLI-VE and caption datasets."""
from .caption import CaptionDataset
from .collate import collate
from .dictionary import build_bpe, build_gpt2_bpe, build_ofa_dictionary, decode_tokens, encode_text
from .errors import DataError, MissingFileError
from .images import PatchTransform, decode_base64_image
from .snli_ve import LABEL_TO_ANSWER, SnliVeDataset, build_answer_trie
from .text import pre_caption
from .trie import Trie
from .tsv import TSVReader, TSVRow

__all__ = [
    "CaptionDataset",
    "DataError",
    "LABEL_TO_ANSWER",
    "MissingFileError",
    "PatchTransform",
    "SnliVeDataset",
    "TSVReader",
    "TSVRow",
    "Trie",
    "build_answer_trie",
    "build_bpe",
    "build_gpt2_bpe",
    "build_ofa_dictionary",
    "collate",
    "decode_base64_image",
    "decode_tokens",
    "encode_text",
    "pre_caption",
]
