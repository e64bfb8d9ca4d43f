"""CIDEr-D for caption validation, on top of pycocoevalcap's scorer.

pycocoevalcap's ``CiderScorer`` already computes CIDEr-D (clipped counts, Gaussian length
penalty with sigma 6, x10) but always takes document frequencies from the references it
is given. OFA validates with document frequencies cached over the whole validation set
(``--eval-cider-cached-tokens``, e.g. ``coco-valid-words.p``: a latin-1 pickle with
``document_frequency`` and ``ref_len``), so per-batch scores do not depend on the batch.
:class:`CiderD` supports both: cached frequencies when a file is given, otherwise the
references of each call (pycocoevalcap's behaviour).
"""
import os
import pickle
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np
from pycocoevalcap.cider.cider_scorer import CiderScorer


class _CachedDfScorer(CiderScorer):
    """CiderScorer with fixed document frequencies and log reference-corpus size."""

    def __init__(self, document_frequency, log_ref_len: float, n: int = 4, sigma: float = 6.0):
        self._log_ref_len = log_ref_len
        super().__init__(n=n, sigma=sigma)
        self.document_frequency = document_frequency

    # compute_cider() assigns ref_len from the batch size; keep the cached corpus value
    @property
    def ref_len(self):
        return self._log_ref_len

    @ref_len.setter
    def ref_len(self, value):
        pass

    def compute_score(self, option=None, verbose=0):
        scores = np.array(self.compute_cider())
        return float(np.mean(scores)), scores


def load_cached_tokens(path: str):
    """(document_frequency, log ref_len) from OFA's cider cached-tokens pickle."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: CIDEr cached tokens file not found (set by --eval-cider-cached-tokens)")
    with open(path, "rb") as f:
        data = pickle.load(f, encoding="latin1")
    return defaultdict(float, data["document_frequency"]), float(np.log(float(data["ref_len"])))


class CiderD:
    """``CiderD(cached_tokens=None).scores(hyps, refs)`` → (N,) CIDEr-D per hypothesis.

    ``hyps``: N strings; ``refs``: N lists of reference strings. Texts are split on
    whitespace (callers strip punctuation first, as OFA does).
    """

    def __init__(self, cached_tokens: Optional[str] = None, n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        self.cached = load_cached_tokens(cached_tokens) if cached_tokens else None

    def scores(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> np.ndarray:
        if len(hyps) != len(refs):
            raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference lists")
        if not hyps:
            return np.zeros(0)
        if self.cached is not None:
            scorer = _CachedDfScorer(*self.cached, n=self.n, sigma=self.sigma)
        else:
            scorer = CiderScorer(n=self.n, sigma=self.sigma)
        for hyp, ref in zip(hyps, refs):
            scorer += (hyp.strip(), [r.strip() for r in ref])
        _, scores = scorer.compute_score()
        return np.asarray(scores, dtype=np.float64)

    def mean(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
        s = self.scores(hyps, refs)
        return float(s.mean()) if s.size else 0.0
