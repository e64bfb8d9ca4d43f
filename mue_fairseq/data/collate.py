"""Batching of OFA samples (the ``collater`` of the SNLI-VE and caption datasets).

A sample (one dataset item) is a dict::

    id                 str                     the row's id column
    source             (S_i,)  long            bos + prompt + eos
    patch_image        (3, P, P) float32       normalised image
    patch_mask         (1,) bool               True: the image is real
    target             (T_i,)  long            pad where no loss is taken
    prev_output_tokens (T_i,)  long            decoder input (teacher forcing)
  SNLI-VE only:
    decoder_prompt     (D_i,)  long            the decoder prefix before the answer
    ref_dict           {answer: score}         e.g. {"yes": 1.0}
    constraint_mask    (T_i, V) bool           allowed next tokens at each target position

The batch (see :func:`collate`) has OFA's keys, so OFA-style criterions and tasks read it.
"""
from typing import Any, Dict, List, Sequence

import numpy as np
import torch


def pad_1d(values: Sequence[torch.Tensor], pad_value) -> torch.Tensor:
    """Right-pad 1-D tensors into (N, max_len)."""
    length = max(v.size(0) for v in values)
    out = values[0].new_full((len(values), length), pad_value)
    for i, v in enumerate(values):
        out[i, : v.size(0)] = v
    return out


def pad_2d_rows(values: Sequence[torch.Tensor], pad_value) -> torch.Tensor:
    """Right-pad (L_i, V) tensors along dim 0 into (N, max_L, V)."""
    length = max(v.size(0) for v in values)
    out = values[0].new_full((len(values), length, values[0].size(1)), pad_value)
    for i, v in enumerate(values):
        out[i, : v.size(0)] = v
    return out


def collate(samples: List[Dict[str, Any]], pad_idx: int) -> Dict[str, Any]:
    """Merge samples into OFA's batch; ``{}`` for no samples (fairseq's dummy batch).

    Returns, with B samples, S/T the longest source/target::

        id                 np.ndarray (B,) of the ids (as read, i.e. str)
        nsentences         B
        ntokens            non-pad target tokens (source tokens when there is no target)
        net_input:
          src_tokens         (B, S) long, right-padded with pad_idx
          src_lengths        (B,) long, non-pad source tokens
          patch_images       (B, 3, P, P) float32
          patch_masks        (B,) bool
          prev_output_tokens (B, T) long, right-padded (None without targets)
        target             (B, T) long, right-padded (None without targets)
      only when the samples carry them (SNLI-VE):
        decoder_prompts    list of B (D_i,) long tensors (ragged, so a list)
        ref_dict           list of B dicts {answer: score}
        constraint_masks   (B, T, V) bool; padded positions are True (unconstrained),
                           the prompt positions all False (their target is pad)
    """
    if len(samples) == 0:
        return {}
    first = samples[0]

    src_tokens = pad_1d([s["source"] for s in samples], pad_idx)
    src_lengths = torch.tensor([int(s["source"].ne(pad_idx).sum()) for s in samples], dtype=torch.long)
    patch_images = torch.stack([s["patch_image"] for s in samples], dim=0)
    patch_masks = torch.cat([s["patch_mask"].reshape(1) for s in samples]).bool()

    target = prev_output_tokens = None
    if first.get("target") is not None:
        target = pad_1d([s["target"] for s in samples], pad_idx)
        ntokens = int(target.ne(pad_idx).sum())
        if first.get("prev_output_tokens") is not None:
            prev_output_tokens = pad_1d([s["prev_output_tokens"] for s in samples], pad_idx)
    else:
        ntokens = int(src_lengths.sum())

    ids = np.empty(len(samples), dtype=object)
    ids[:] = [s["id"] for s in samples]

    batch = {
        "id": ids,
        "nsentences": len(samples),
        "ntokens": ntokens,
        "net_input": {
            "src_tokens": src_tokens,
            "src_lengths": src_lengths,
            "patch_images": patch_images,
            "patch_masks": patch_masks,
            "prev_output_tokens": prev_output_tokens,
        },
        "target": target,
    }
    if first.get("decoder_prompt") is not None:
        batch["decoder_prompts"] = [s["decoder_prompt"] for s in samples]
    if first.get("ref_dict") is not None:
        batch["ref_dict"] = [s["ref_dict"] for s in samples]
    if first.get("constraint_mask") is not None:
        batch["constraint_masks"] = pad_2d_rows([s["constraint_mask"] for s in samples], True)
    return batch
