"""The embedded procedural vision-language task (data only).

Real SNLI-VE / COCO cannot be downloaded here, so the project ships a small,
learnable task generated with Pillow, deterministic by seed, in OFA's TSV formats:

* :mod:`.scenes`     -- scenes of 1-4 shapes and their rendering;
* :mod:`.entailment` -- structured hypotheses, their labels and :func:`is_true`;
* :mod:`.captions`   -- reference captions (and the SNLI-VE premise);
* :mod:`.tokenizer`  -- a small byte-level BPE in GPT-2/fairseq file formats;
* :mod:`.build`      -- writes the TSVs, COCO references, metadata and BPE files.

Depends only on numpy, Pillow and HuggingFace ``tokenizers`` (no torch/fairseq).
"""
