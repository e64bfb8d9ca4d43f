"""SNLI-VE (visual entailment) as OFA frames it: answer yes / no / maybe to a text prompt.

TSV columns, selected with ``--selected-cols=0,2,3,4,5``: id, image (base64), hypothesis,
premise (the text caption), label (entailment / contradiction / neutral).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .base import OFAImageTextDataset
from .dictionary import encode_text
from .text import pre_caption
from .trie import Trie

LABEL_TO_ANSWER = {"contradiction": "no", "entailment": "yes", "neutral": "maybe"}
PROMPT = ' does the image describe " {hypothesis} "?'
PROMPT_WITH_CAPTION = ' can image and text1 " {caption} " imply text2 " {hypothesis} "?'
PROMPT_TYPES = ("none", "src", "prev_output")


def build_answer_trie(answers: Sequence[str], bpe, dictionary) -> Tuple[Trie, List[torch.Tensor]]:
    """Trie over ``[bos] + tokens(" " + answer) + [eos]`` for each answer, and the answer
    token tensors (no bos/eos) in the given order."""
    trie = Trie(dictionary.eos())
    tokens = []
    for answer in answers:
        ids = encode_text(" " + answer, bpe, dictionary)
        tokens.append(ids)
        trie.insert([dictionary.bos()] + ids.tolist() + [dictionary.eos()])
    return trie, tokens


def answer_constraint_mask(
    trie: Trie, answer_with_eos: Sequence[int], bos: int, vocab_size: int
) -> torch.Tensor:
    """(len(answer_with_eos), V) bool: row i allows the tokens the trie permits after
    ``[bos] + answer_with_eos[:i]``."""
    answer_with_eos = list(answer_with_eos)
    rows = [trie.allowed_mask([bos] + answer_with_eos[:i], vocab_size) for i in range(len(answer_with_eos))]
    return torch.stack(rows, dim=0)


class SnliVeDataset(OFAImageTextDataset):
    """Items (see :mod:`mue_fairseq.data.collate` for the keys), with A = answer tokens::

        source          bos + prompt + eos                                    (S,)
        prompt_type "prev_output" (the released checkpoints):
          decoder_prompt  source[:-1]                                         (S-1,)
          prev_output     source[:-1] + A                                     (S-1+|A|,)
          target          [pad] * (S-2) + A + eos                             (S-1+|A|,)
        prompt_type "src": decoder_prompt = source, prev_output = source + A
        prompt_type "none" (or None): decoder_prompt = bos, prev_output = bos + A
        (in every case target = prev_output[1:] + eos with the prompt part set to pad)
        constraint_mask  all False on prompt rows; on the |A|+1 answer rows the trie's
                         allowed tokens after [bos] + the answer so far (eos at the end)
        ref_dict         {answer: 1.0}

    Args (beyond the base class): ``max_src_length`` caps the words of the hypothesis and
    of the caption (``pre_caption``); ``add_caption`` puts the premise into the prompt;
    ``constraint_trie`` (from :func:`build_answer_trie`) adds ``constraint_mask``;
    ``prompt_type`` is one of ``none``, ``src``, ``prev_output`` (None means ``none``).
    """

    FIELDS = ("id", "image", "hypothesis", "premise", "label")

    def __init__(
        self,
        split,
        reader,
        bpe,
        dictionary,
        max_src_length: int = 128,
        max_tgt_length: int = 30,
        patch_image_size: int = 480,
        add_caption: bool = False,
        constraint_trie: Optional[Trie] = None,
        imagenet_default_mean_and_std: bool = False,
        prompt_type: Optional[str] = "none",
    ):
        super().__init__(split, reader, bpe, dictionary, patch_image_size, imagenet_default_mean_and_std)
        prompt_type = "none" if prompt_type is None else prompt_type
        if prompt_type not in PROMPT_TYPES:
            raise ValueError(f"--prompt-type must be one of {', '.join(PROMPT_TYPES)}; got {prompt_type!r}")
        self.max_src_length = max_src_length
        self.max_tgt_length = max_tgt_length
        self.add_caption = add_caption
        self.constraint_trie = constraint_trie
        self.prompt_type = prompt_type

    def prompt_text(self, hypothesis: str, premise: str) -> str:
        hypothesis = pre_caption(hypothesis, self.max_src_length)
        if self.add_caption:
            caption = pre_caption(premise, self.max_src_length)
            return PROMPT_WITH_CAPTION.format(caption=caption, hypothesis=hypothesis)
        return PROMPT.format(hypothesis=hypothesis)

    def answer_of(self, row) -> str:
        pos = self.FIELDS.index("label")
        label = row[pos]
        if label not in LABEL_TO_ANSWER:
            raise row.error(pos, f"unknown label {label!r}; expected one of {', '.join(LABEL_TO_ANSWER)}")
        return LABEL_TO_ANSWER[label]

    def __getitem__(self, index: int) -> Dict:
        row = self.row(index)
        uniq_id, _, hypothesis, premise, _ = row.values
        answer = self.answer_of(row)
        patch_image = self.patch_image(row)

        source = self.with_bos_eos(self.encode(self.prompt_text(hypothesis, premise)))
        answer_tokens = self.encode(" " + answer)
        if self.prompt_type == "none":
            decoder_prompt = self.bos_item
        elif self.prompt_type == "src":
            decoder_prompt = source
        else:  # prev_output
            decoder_prompt = source[:-1]
        prev_output = torch.cat([decoder_prompt, answer_tokens])
        target = torch.cat([prev_output[1:], self.eos_item])
        n_answer = answer_tokens.numel() + 1  # answer + eos
        target[: target.numel() - n_answer] = self.pad

        item = {
            "id": uniq_id,
            "source": source,
            "patch_image": patch_image,
            "patch_mask": torch.tensor([True]),
            "target": target,
            "prev_output_tokens": prev_output,
            "decoder_prompt": decoder_prompt,
            "ref_dict": {answer: 1.0},
        }
        if self.constraint_trie is not None:
            mask = torch.zeros(target.numel(), len(self.dictionary), dtype=torch.bool)
            mask[target.numel() - n_answer:] = answer_constraint_mask(
                self.constraint_trie, target[-n_answer:].tolist(), self.bos, len(self.dictionary)
            )
            item["constraint_mask"] = mask
        return item
