"""CIDEr-D with cached document frequencies (SCST rewards, caption validation) and the
``build-df`` command that makes the cache.

What is reused and what is written here
---------------------------------------
pycocoevalcap 1.2's ``cider/cider_scorer.py`` already scores CIDEr-D (clipped tf-idf
products, Gaussian length penalty with sigma 6, mean over n = 1..4, x10), but it always
takes the document frequencies from the references handed to that call and sets
``ref_len`` to log(number of those entries). OFA's SCST reward (and its CIDEr validation
with ``--eval-cider-cached-tokens``) instead uses frequencies cached over a whole corpus
(``coco-train-words.p``: a latin-1 pickle ``{"document_frequency": {ngram tuple: count},
"ref_len": number of images}``), so a caption's score does not depend on the batch.

So: n-gram counting is pycocoevalcap's (``cook_test`` / ``cook_refs``); the scoring below
(:meth:`CiderD._vector`, :meth:`CiderD._similarity`, :meth:`CiderD.scores`) is written here
only so that the document frequencies and ``ref_len`` can come from a cache. It follows
the CIDEr-D reference code exactly, including two quirks that change scores:

* the "length" used by the length penalty counts *bigrams* (words - 1), as the reference
  code does (``if n == 1: length += term_freq`` with n the 0-based n-gram order);
* an n-gram missing from the cache gets document frequency 1 (log 1 = 0), i.e. full idf.

Without a cache (``CiderD(None)``) frequencies come from the references of each call, one
document per scored entry, which is exactly pycocoevalcap's ``CiderScorer`` (tested).

Text normalisation (:func:`scst_text`) is OFA's SCST one: strip, remove every
``string.punctuation`` character, strip, drop a trailing ``.``, append `` <eos>`` (the
cache ``coco-train-words.p`` was built with ``<eos>`` ending every reference; the
validation cache ``coco-valid-words.p`` without).

Command::

    python -m mue_fairseq.cider build-df --captions train.tsv --cols 1,2 --out words.p

``--cols IMAGE_ID,CAPTION`` (0-based TSV columns) groups rows by image id, one document
per image holding all its references (a caption cell may hold several joined by ``&&``);
``--cols CAPTION`` makes every row its own document. ``--no-eos`` omits ``<eos>``.
"""
import argparse
import os
import pickle
import string
import sys
from collections import OrderedDict, defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from pycocoevalcap.cider.cider_scorer import cook_refs, cook_test

_PUNCT_TABLE = str.maketrans({c: None for c in string.punctuation})
EOS_WORD = "<eos>"
REFERENCE_SEPARATOR = "&&"

Ngram = Tuple[str, ...]


def scst_text(text: str, eos: bool = True) -> str:
    """OFA's SCST text normalisation of a hypothesis or reference (see module docstring)."""
    r = text.strip().translate(_PUNCT_TABLE).strip()
    if r.endswith("."):
        r = r[:-1]
    return r + " " + EOS_WORD if eos else r


# ---------------------------------------------------------------- document frequencies
def build_document_frequency(documents: Iterable[Sequence[str]], n: int = 4):
    """Document frequency of every 1..n-gram over ``documents`` (each a list of already
    normalised reference strings; an n-gram counts once per document).

    Returns ``(defaultdict(float) {ngram: count}, number of documents)`` — OFA's cache
    holds a ``defaultdict(float)`` (its scorer indexes it with unseen n-grams)."""
    df = defaultdict(float)
    count = 0
    for refs in documents:
        count += 1
        for ngram in {g for ref in cook_refs(list(refs), n) for g in ref}:
            df[ngram] += 1
    return df, count


def save_document_frequency(path: str, document_frequency, ref_len: int) -> None:
    """Write OFA's cache pickle ``{"document_frequency": ..., "ref_len": ...}``."""
    df = document_frequency if isinstance(document_frequency, defaultdict) else defaultdict(
        float, document_frequency
    )
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"document_frequency": df, "ref_len": ref_len}, f, protocol=2)


def load_document_frequency(path: str) -> Tuple[Dict[Ngram, float], float]:
    """(document_frequency, ref_len) from an OFA cache pickle (loaded with latin1, as OFA)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: CIDEr cached-tokens file not found (make one with "
            f"`python -m mue_fairseq.cider build-df --captions TSV --cols IMAGE_ID,CAPTION --out {path}`)"
        )
    with open(path, "rb") as f:
        data = pickle.load(f, encoding="latin1")
    if not isinstance(data, dict) or "document_frequency" not in data or "ref_len" not in data:
        raise ValueError(f"{path}: not a CIDEr cache (needs keys 'document_frequency' and 'ref_len')")
    return data["document_frequency"], float(data["ref_len"])


# ---------------------------------------------------------------- scoring
class CiderD:
    """``CiderD(cached_tokens=None).scores(hyps, refs)`` → (N,) CIDEr-D of each hypothesis.

    ``hyps``: N strings; ``refs``: N lists of reference strings; text is split on
    whitespace, so normalise first (:func:`scst_text`). ``cached_tokens``: path of an OFA
    cache pickle, or None for frequencies from each call's references.
    """

    def __init__(self, cached_tokens: Optional[str] = None, n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        self.document_frequency = None
        self.log_ref_len = None
        if cached_tokens is not None:
            df, ref_len = load_document_frequency(cached_tokens)
            self.set_document_frequency(df, ref_len)

    def set_document_frequency(self, document_frequency, ref_len: float) -> "CiderD":
        if ref_len <= 0:
            raise ValueError(f"ref_len must be positive, got {ref_len}")
        self.document_frequency = document_frequency
        self.log_ref_len = float(np.log(float(ref_len)))
        return self

    # the pieces of the reference scorer that depend on df / ref_len
    def _vector(self, counts, df, log_ref_len):
        vec = [dict() for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for ngram, term_freq in counts.items():
            k = len(ngram) - 1
            weight = float(term_freq) * (log_ref_len - np.log(max(1.0, df.get(ngram, 0.0))))
            vec[k][ngram] = weight
            norm[k] += weight ** 2
            if k == 1:  # the reference code's "length" counts bigrams
                length += term_freq
        return vec, [np.sqrt(v) for v in norm], length

    def _similarity(self, hyp, ref):
        vec_h, norm_h, len_h = hyp
        vec_r, norm_r, len_r = ref
        delta = float(len_h - len_r)
        val = np.zeros(self.n)
        for k in range(self.n):
            for ngram, weight in vec_h[k].items():
                ref_weight = vec_r[k].get(ngram, 0.0)
                val[k] += min(weight, ref_weight) * ref_weight  # clipping
            if norm_h[k] != 0 and norm_r[k] != 0:
                val[k] /= norm_h[k] * norm_r[k]
            val[k] *= np.e ** (-(delta ** 2) / (2 * self.sigma ** 2))  # length penalty
        return val

    def scores(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> np.ndarray:
        if len(hyps) != len(refs):
            raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference lists")
        if len(hyps) == 0:
            return np.zeros(0)
        for i, r in enumerate(refs):
            if isinstance(r, str) or len(r) == 0:
                raise ValueError(f"refs[{i}] must be a non-empty list of strings, got {r!r}")
        tests = [cook_test(h.strip(), self.n) for h in hyps]
        crefs = [cook_refs([r.strip() for r in rs], self.n) for rs in refs]
        if self.document_frequency is None:
            df, count = build_document_frequency(refs, self.n)
            log_ref_len = float(np.log(float(count)))
        else:
            df, log_ref_len = self.document_frequency, self.log_ref_len
        out = np.zeros(len(hyps))
        for i, (test, cref) in enumerate(zip(tests, crefs)):
            hyp_vec = self._vector(test, df, log_ref_len)
            total = np.zeros(self.n)
            for ref in cref:
                total += self._similarity(hyp_vec, self._vector(ref, df, log_ref_len))
            out[i] = np.mean(total) / len(cref) * 10.0
        return out

    def mean(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
        s = self.scores(hyps, refs)
        return float(s.mean()) if s.size else 0.0

    def compute_score(self, gts, res):
        """OFA/pycocoevalcap calling convention: ``gts`` {id: [refs]}, ``res`` [{"image_id",
        "caption": [hyp]}] → (mean, per-entry scores)."""
        hyps = [r["caption"][0] for r in res]
        refs = [gts[r["image_id"]] for r in res]
        s = self.scores(hyps, refs)
        return (float(s.mean()) if s.size else 0.0), s


def leave_one_out_rewards(scores: np.ndarray, per_group: int) -> np.ndarray:
    """SCST reward: each score minus the mean of the other ``per_group - 1`` scores of its
    group (consecutive runs of ``per_group`` entries, e.g. the beam of one image)."""
    scores = np.asarray(scores, dtype=np.float64)
    if per_group < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 candidates per image (beam >= 2)")
    if scores.size % per_group:
        raise ValueError(f"{scores.size} scores do not split into groups of {per_group}")
    grouped = scores.reshape(-1, per_group)
    baseline = (grouped.sum(1, keepdims=True) - grouped) / (per_group - 1)
    return (grouped - baseline).reshape(-1)


# ---------------------------------------------------------------- build-df command
def read_documents(paths: Sequence[str], cols: Sequence[int], separator: str = REFERENCE_SEPARATOR,
                   eos: bool = True) -> List[List[str]]:
    """Documents (lists of normalised references) from TSV files; see module docstring."""
    if len(cols) not in (1, 2):
        raise ValueError(f"--cols takes CAPTION or IMAGE_ID,CAPTION, got {list(cols)}")
    grouped = OrderedDict()
    row_docs = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: caption TSV not found")
        with open(path, "r", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line:
                    continue
                fields = line.split("\t")
                if max(cols) >= len(fields):
                    raise ValueError(
                        f"{path}:{line_no}: has {len(fields)} columns, --cols asks for column {max(cols)}"
                    )
                refs = [scst_text(c, eos) for c in fields[cols[-1]].split(separator) if c.strip()]
                if len(cols) == 1:
                    row_docs.append(refs)
                else:
                    grouped.setdefault(fields[cols[0]], []).extend(refs)
    return row_docs if len(cols) == 1 else list(grouped.values())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mue_fairseq.cider", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build-df", help="document frequencies (CIDEr cache pickle) from caption TSVs")
    p.add_argument("--captions", nargs="+", required=True, help="caption TSV file(s)")
    p.add_argument("--cols", required=True,
                   help="0-based columns IMAGE_ID,CAPTION (group rows by image) or CAPTION (a row is a document)")
    p.add_argument("--out", required=True, help="output pickle, e.g. coco-train-words.p")
    p.add_argument("--separator", default=REFERENCE_SEPARATOR, help="separator of references in a cell")
    p.add_argument("--no-eos", action="store_true", help="do not append <eos> (validation caches)")
    p.add_argument("--n", type=int, default=4, help="largest n-gram order")
    args = parser.parse_args(argv)
    try:
        cols = [int(c) for c in args.cols.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--cols must be comma-separated column numbers, got {args.cols!r}")
    documents = read_documents(args.captions, cols, args.separator, eos=not args.no_eos)
    if not documents:
        parser.error("no captions read")
    df, ref_len = build_document_frequency(documents, args.n)
    save_document_frequency(args.out, df, ref_len)
    print(f"{args.out}: {ref_len} documents, {len(df)} n-grams")
    return 0


if __name__ == "__main__":
    sys.exit(main())
