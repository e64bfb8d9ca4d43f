"""Image captioning (COCO) as OFA frames it.

TSV columns: id, image_id, caption, object labels, image (base64). Stage 1 trains on
``--selected-cols=0,4,2``; stage 2 (SCST) and evaluation use ``1,4,2`` with the
references joined by ``&&``.
"""
from typing import Dict

import torch

from .base import OFAImageTextDataset
from .text import caption_references, caption_train_target

PROMPT = " what does the image describe?"
REFERENCE_SEPARATOR = "&&"


class CaptionDataset(OFAImageTextDataset):
    """Items (keys as in :mod:`mue_fairseq.data.collate`), with C = caption tokens::

        source       bos + tokens(" what does the image describe?") + eos
        target       C + eos
        prev_output  bos + C

    The caption text is, for ``split == "train"`` without ``scst``, the caption with
    punctuation removed and cut to ``max_tgt_length`` words; otherwise (validation, test,
    SCST training) the ``&&``-joined references, each with punctuation removed, joined
    again by ``&&`` so the task can split them after decoding.
    """

    FIELDS = ("id", "image", "caption")

    def __init__(
        self,
        split,
        reader,
        bpe,
        dictionary,
        max_src_length: int = 128,
        max_tgt_length: int = 30,
        patch_image_size: int = 480,
        imagenet_default_mean_and_std: bool = False,
        scst: bool = False,
    ):
        super().__init__(split, reader, bpe, dictionary, patch_image_size, imagenet_default_mean_and_std)
        self.max_src_length = max_src_length
        self.max_tgt_length = max_tgt_length
        self.scst = scst
        self.prompt = PROMPT
        self._source = self.with_bos_eos(self.encode(PROMPT))

    @property
    def uses_references(self) -> bool:
        """True when targets are the &&-joined references rather than one training caption."""
        return not (self.split == "train" and not self.scst)

    def target_text(self, caption: str) -> str:
        if self.uses_references:
            return REFERENCE_SEPARATOR.join(caption_references(caption))
        return caption_train_target(caption, self.max_tgt_length)

    def __getitem__(self, index: int) -> Dict:
        row = self.row(index)
        uniq_id, _, caption = row.values
        patch_image = self.patch_image(row)
        caption_tokens = self.encode(" " + self.target_text(caption))
        return {
            "id": uniq_id,
            "source": self._source.clone(),
            "patch_image": patch_image,
            "patch_mask": torch.tensor([True]),
            "target": torch.cat([caption_tokens, self.eos_item]),
            "prev_output_tokens": torch.cat([self.bos_item, caption_tokens]),
        }
