"""Test helpers: a tiny GPT-2-format byte-level BPE and tiny OFA TSV files with real images.

``make_bpe_dir(folder)`` writes what OFA's ``--bpe-dir`` holds: ``encoder.json`` and
``vocab.bpe`` (GPT-2 format, trained with HuggingFace ``tokenizers``) and ``dict.txt`` in
OFA's convention (one ``<bpe id> <count>`` line per BPE token, most frequent first, so the
dictionary order differs from the BPE id order, as in OFA's real dict.txt).
"""
import base64
import io
import json
import os
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

SENTENCES = [
    " does the image describe a man riding a horse?",
    " can image and text1 imply text2?",
    " what does the image describe?",
    " yes no maybe yes no maybe",
    " two dogs play in the snow. a woman reads a book; a cat sleeps",
]

SNLI_ROWS = [
    # id, image_id, (image), hypothesis, premise, label
    ("0", "img0", "A man rides a horse.", "A man is outdoors-with a horse", "entailment"),
    ("1", "img1", "Two dogs sleep", "Two dogs play in the snow.", "contradiction"),
    ("2", "img2", "a woman reads", "A woman sits / reads a book", "neutral"),
]

CAPTION_ROWS = [
    # id, image_id, caption, object labels, (image)
    ("0", "100", "A cat, sleeping on a mat!", "cat"),
    ("1", "101", "Two dogs play in the snow.&&Dogs  in snow!", "dog"),
]


def make_bpe_dir(folder, sentences: Sequence[str] = SENTENCES, vocab_size: int = 300) -> str:
    """Train a byte-level BPE on ``sentences`` and write encoder.json, vocab.bpe, dict.txt."""
    from tokenizers import ByteLevelBPETokenizer

    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(list(sentences) * 3, vocab_size=vocab_size, min_frequency=1,
                                  show_progress=False)
    vocab_path, merges_path = tokenizer.save_model(folder)
    os.replace(vocab_path, os.path.join(folder, "encoder.json"))
    os.replace(merges_path, os.path.join(folder, "vocab.bpe"))
    with open(os.path.join(folder, "encoder.json")) as f:
        n_tokens = len(json.load(f))
    # most frequent first: here simply the BPE ids in reverse, with decreasing counts
    with open(os.path.join(folder, "dict.txt"), "w") as f:
        for rank, bpe_id in enumerate(reversed(range(n_tokens))):
            f.write(f"{bpe_id} {1000000 - rank}\n")
    return folder


def dict_symbol_count(bpe_dir) -> int:
    with open(os.path.join(str(bpe_dir), "dict.txt")) as f:
        return sum(1 for line in f if line.strip())


def make_image(seed: int = 0, size=(12, 9)) -> Image.Image:
    """A small random RGB image (width, height = size)."""
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


def image_b64(image: Image.Image, fmt: str = "PNG") -> str:
    """Image → OFA's column format: URL-safe base64 of the encoded file."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.urlsafe_b64encode(buf.getvalue()).decode("ascii")


def write_tsv(path, rows: List[Sequence[str]]) -> str:
    path = str(path)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write("\t".join(row) + "\n")
    return path


def snli_tsv(path, rows=SNLI_ROWS, images: Optional[List[str]] = None) -> str:
    """SNLI-VE TSV in OFA's layout: id, image_id, image, hypothesis, premise, label."""
    images = images or [image_b64(make_image(i)) for i in range(len(rows))]
    return write_tsv(path, [(r[0], r[1], img, r[2], r[3], r[4]) for r, img in zip(rows, images)])


def caption_tsv(path, rows=CAPTION_ROWS, images: Optional[List[str]] = None) -> str:
    """Caption TSV in OFA's layout: id, image_id, caption, object labels, image."""
    images = images or [image_b64(make_image(10 + i), "JPEG") for i in range(len(rows))]
    return write_tsv(path, [(r[0], r[1], r[2], r[3], img) for r, img in zip(rows, images)])
