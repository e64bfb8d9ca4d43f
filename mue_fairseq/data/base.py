"""Shared base of OFA's image-text datasets: a TSV slice, BPE, dictionary, image transform."""
from typing import Any, Dict, List

import torch
from fairseq.data import Dictionary, FairseqDataset

from .collate import collate
from .dictionary import encode_text
from .images import PatchTransform, decode_base64_image
from .tsv import TSVReader, TSVRow


class OFAImageTextDataset(FairseqDataset):
    """Base class: subclasses define ``FIELDS`` (names of the selected columns, in order)
    and ``__getitem__``. Batches come from :func:`mue_fairseq.data.collate.collate`.

    Args:
        split: fairseq split name (``train``, ``valid``, ``test``...).
        reader: TSVReader over this split's file, its ``fields`` equal to ``FIELDS``.
        bpe: fairseq GPT-2 BPE (``encode(str) -> "id id ..."``).
        dictionary: OFA's unified dictionary (source and target share it).
        patch_image_size: side P of the (3, P, P) patch image.
        imagenet_default_mean_and_std: ImageNet normalisation instead of 0.5/0.5.
    """

    FIELDS: tuple = ()
    IMAGE_FIELD = "image"

    def __init__(
        self,
        split: str,
        reader: TSVReader,
        bpe,
        dictionary: Dictionary,
        patch_image_size: int = 480,
        imagenet_default_mean_and_std: bool = False,
    ):
        super().__init__()
        self.split = split
        self.reader = reader
        self.bpe = bpe
        self.dictionary = dictionary
        self.patch_image_size = patch_image_size
        self.transform = PatchTransform(patch_image_size, imagenet_default_mean_and_std)
        self.bos, self.eos, self.pad = dictionary.bos(), dictionary.eos(), dictionary.pad()
        self.bos_item = torch.tensor([self.bos], dtype=torch.long)
        self.eos_item = torch.tensor([self.eos], dtype=torch.long)

    # OFA's datasets expose the dictionaries under these names
    @property
    def src_dict(self) -> Dictionary:
        return self.dictionary

    @property
    def tgt_dict(self) -> Dictionary:
        return self.dictionary

    def __len__(self) -> int:
        return len(self.reader)

    def row(self, index: int) -> TSVRow:
        return self.reader[index]

    def encode(self, text: str) -> torch.Tensor:
        """Text → (L,) long ids, without bos/eos."""
        return encode_text(text, self.bpe, self.dictionary)

    def with_bos_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.bos_item, tokens, self.eos_item])

    def patch_image(self, row: TSVRow) -> torch.Tensor:
        """Decode and transform the row's image column → (3, P, P) float32."""
        pos = list(self.FIELDS).index(self.IMAGE_FIELD)
        image = decode_base64_image(row[pos], path=row.path, row=row.line, column=row.columns[pos])
        return self.transform(image)

    def collater(self, samples: List[Dict[str, Any]], pad_to_length=None) -> Dict[str, Any]:
        return collate(samples, pad_idx=self.pad)
