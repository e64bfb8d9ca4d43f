"""A small byte-level BPE in GPT-2 / fairseq / OFA file formats.

:func:`train_bpe` trains a byte-level BPE with HuggingFace ``tokenizers`` and writes
into ``out_dir``:

* ``encoder.json`` -- token (GPT-2 byte-to-unicode string) -> id; all 256 bytes are
  tokens, so any text encodes;
* ``vocab.bpe``    -- a ``#version`` header line, then one ``a b`` merge per line in
  rank order, ending with a newline (fairseq's ``get_encoder`` drops the first and
  the last line of ``split("\\n")``);
* ``dict.txt``     -- the fairseq dictionary in OFA's convention: the *symbols* are
  BPE ids (fairseq's ``gpt2`` BPE turns text into space-separated ids, which the
  ``Dictionary`` then maps), one ``"<id> <count>"`` line per id in id order.

These load with fairseq's own ``gpt2_bpe_utils.get_encoder(encoder.json, vocab.bpe)``.
``REQUIRED_SINGLE_TOKENS`` (OFA's answers " yes", " no", " maybe") are made single
tokens, adding merges at the lowest priority if training did not learn them.

CLI: ``python -m mue_fairseq.procedural.tokenizer --texts corpus.txt --out BPE_DIR``
(one text per line).
"""

import argparse
import json
import os
from collections import Counter
from typing import Dict, Iterable, List, Sequence, Tuple

from tokenizers import ByteLevelBPETokenizer

REQUIRED_SINGLE_TOKENS: Tuple[str, ...] = (" yes", " no", " maybe")
DEFAULT_VOCAB_SIZE = 512
VOCAB_BPE_HEADER = "#version: 0.2"


def _merge_list(raw) -> List[Tuple[str, str]]:
    """HF serialises merges as 'a b' strings (old) or [a, b] pairs (new)."""
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in raw]


def _bpe_pieces(word: str, ranks: Dict[Tuple[str, str], int]) -> List[str]:
    """GPT-2's greedy lowest-rank merging of one pre-token (byte-unicode string)."""
    pieces = list(word)
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, first = min(pairs)
        if rank == float("inf"):
            break
        pair = (pieces[first], pieces[first + 1])
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def _byte_unicode(text: str) -> str:
    """``text``'s UTF-8 bytes in GPT-2's printable byte alphabet."""
    table = _bytes_to_unicode_chars()
    return "".join(table[b] for b in text.encode("utf-8"))


def _bytes_to_unicode_chars() -> List[str]:
    """GPT-2's byte -> printable unicode table, as a list indexed by byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def _ensure_single_tokens(vocab: Dict[str, int], merges: List[Tuple[str, str]], words: Sequence[str]) -> None:
    """Append merges (lowest priority) so each pre-token in ``words`` becomes one token."""
    for word in words:
        ranks = {m: i for i, m in enumerate(merges)}
        pieces = _bpe_pieces(_byte_unicode(word), ranks)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], max(vocab.values()) + 1)


def write_bpe_files(out_dir: str, vocab: Dict[str, int], merges: Sequence[Tuple[str, str]]) -> None:
    """Write ``encoder.json`` and ``vocab.bpe`` in GPT-2's format."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "encoder.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "vocab.bpe"), "w", encoding="utf-8") as f:
        f.write(VOCAB_BPE_HEADER + "\n" + "".join(f"{a} {b}\n" for a, b in merges))


def load_hf_tokenizer(bpe_dir: str) -> ByteLevelBPETokenizer:
    """The written files as a (fast) HF tokenizer, GPT-2 style (no prefix space)."""
    return ByteLevelBPETokenizer(os.path.join(bpe_dir, "encoder.json"), os.path.join(bpe_dir, "vocab.bpe"),
                                 add_prefix_space=False)


def write_dict(out_dir: str, vocab: Dict[str, int], texts: Iterable[str]) -> None:
    """``dict.txt``: one ``"<id> <count>"`` line per BPE id, counts over ``texts``."""
    counts: Counter = Counter()
    for enc in load_hf_tokenizer(out_dir).encode_batch(list(texts)):
        counts.update(enc.ids)
    with open(os.path.join(out_dir, "dict.txt"), "w", encoding="utf-8") as f:
        for i in sorted(vocab.values()):
            f.write(f"{i} {counts.get(i, 0)}\n")


def train_bpe(texts: Sequence[str], out_dir: str, vocab_size: int = DEFAULT_VOCAB_SIZE,
              required_single_tokens: Sequence[str] = REQUIRED_SINGLE_TOKENS, min_frequency: int = 2) -> dict:
    """Train on ``texts`` and write encoder.json, vocab.bpe and dict.txt; returns a summary."""
    texts = list(texts)
    hf = ByteLevelBPETokenizer(add_prefix_space=False)
    hf.train_from_iterator(texts + list(required_single_tokens) * 10, vocab_size=vocab_size,
                           min_frequency=min_frequency, show_progress=False, special_tokens=[])
    model = json.loads(hf.to_str())["model"]
    vocab: Dict[str, int] = dict(model["vocab"])
    merges = _merge_list(model["merges"])
    n_learned = len(merges)
    _ensure_single_tokens(vocab, merges, required_single_tokens)
    write_bpe_files(out_dir, vocab, merges)
    write_dict(out_dir, vocab, texts)
    return {"vocab_size": len(vocab), "merges": len(merges), "added_merges": len(merges) - n_learned}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--texts", nargs="+", required=True, help="text files, one training text per line")
    p.add_argument("--out", required=True, help="directory for encoder.json, vocab.bpe, dict.txt")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = p.parse_args(argv)
    texts: List[str] = []
    for path in args.texts:
        with open(path, encoding="utf-8") as f:
            texts.extend(line.rstrip("\n") for line in f)
    print(json.dumps(train_bpe(texts, args.out, args.vocab_size)))


if __name__ == "__main__":
    main()
