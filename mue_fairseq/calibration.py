"""Exit-threshold calibration with a statistical guarantee (Learn then Test).

The paper tunes the exit thresholds by hand per task. Here, given a trained model's
per-sample results on a calibration split for candidate thresholds
λ = (image θ_I, text θ_T, decoder θ_D), :func:`calibrate_thresholds` picks the λ with the
largest expected time reduction (ETR, Eq. 14) among those *certified* to lose at most an
allowed amount of quality against full depth — Learn then Test (Angelopoulos, Bates, Candès,
Jordan, Lei 2021), with Hoeffding–Bentkus p-values and fixed-sequence testing.

Procedure (exactly what the code does)
--------------------------------------
Inputs: per-sample quality at full depth ``q_full`` (n,) and at each λ, ``q[λ]`` (n,)
(SNLI-VE: 1/0 correct; captioning: per-sample CIDEr), and a label-free efficiency score
``etr[λ]`` (Eq. 14 ETR, or the compute-weighted reduction; higher = faster).

1. Per-sample risk ``r_i(λ) = max(0, q_full_i - q_i(λ)) / B`` in [0, 1]. ``B`` bounds the
   per-sample quality: 1 for accuracy; 10 for per-sample CIDEr-D on pycocoevalcap's scale
   (each n-gram term is a clipped cosine times a Gaussian length penalty, both <= 1, times 10;
   pass ``bound=1000`` for CIDEr reported x100 as in the paper). Gains are not netted against
   losses, so ``E[r]·B`` bounds the expected quality drop ``E[q_full - q(λ)]`` from above.
2. Allowed drop ``α = ε · mean(q_full)`` in metric units with ``relative=True`` (the mean is
   the calibration split's full-depth quality, a plug-in), or ``α = ε`` with
   ``relative=False`` (a drop fixed a priori: the guarantee is then exact).
   Null hypothesis per λ: ``H_λ: E[r(λ)] > α / B``.
3. p-value of ``H_λ`` from the n_test test samples with mean risk R̂:
   exact binomial ``P(Bin(n, α/B) <= n R̂)`` when every risk is 0 or 1 (accuracy), else
   Hoeffding–Bentkus ``min(exp(-n h(min(R̂, a), a)), e · P(Bin(n, a) <= ceil(n R̂)))`` with
   ``a = α/B`` and ``h(x, y) = x log(x/y) + (1-x) log((1-x)/(1-y))``. Both are valid
   (super-uniform) under ``H_λ`` for i.i.d. samples.
4. Order (``ordering="split"``, default): the split is shuffled (``seed``) and divided; on the
   first ``split_fraction`` (the ordering half) the empirical risk of every λ is measured and
   the λ on the Pareto front of (ETR high, risk low) are sorted by ETR ascending — from most
   conservative to most aggressive, with risk non-decreasing. Only the other half is used
   for p-values. Dominated λ are never tested. ``ordering="given"`` tests a sequence fixed a
   priori (e.g. :func:`monotone_path`) on all samples.
5. Fixed-sequence testing: walk the order, reject ``H_λ`` while ``p <= δ``, stop at the first
   non-rejection. This controls the family-wise error rate at δ, so with probability
   >= 1 - δ *every* certified λ has ``E[r(λ)] <= α/B`` — including the one chosen among them.
6. Choose the certified λ with the largest ETR (ties: the earlier, more conservative one).
   If none is certified, ``thresholds`` is None: run at full depth.

Guarantee: for test data i.i.d. from the calibration distribution, with probability at least
1 - δ over the calibration data, the expected per-sample quality drop at the chosen thresholds
(losses only, gains not netted) is at most α. ``ETR`` used for ordering and choice is a
function of the inputs only (exit decisions never see labels); with a scalar ETR measured on
the whole split the ordering sees the test half's inputs but not its labels, standard practice.
"""

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

try:  # scipy's binomial CDF when available; an exact log-space fallback otherwise
    from scipy.stats import binom as _scipy_binom
except ImportError:  # pragma: no cover - exercised only without scipy
    _scipy_binom = None


class Thresholds(NamedTuple):
    """One candidate λ. A plain ``(image, text, decoder)`` tuple compares and hashes equal."""

    image: float
    text: float
    decoder: float

    def as_exit_overrides(self) -> Dict[str, float]:
        """The matching :class:`mue_fairseq.exits.config.ExitConfig` field values."""
        return {
            "image_exit_threshold": self.image,
            "text_exit_threshold": self.text,
            "decoder_exit_threshold": self.decoder,
        }

    def __str__(self) -> str:
        return f"(image {self.image:g}, text {self.text:g}, decoder {self.decoder:g})"


DEFAULT_IMAGE = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
DEFAULT_TEXT = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
DEFAULT_DECODER = (1.0, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8)

# Per-sample quality bounds B by metric name (lower-cased); see the module docstring.
METRIC_BOUNDS = {"accuracy": 1.0, "acc": 1.0, "cider": 10.0}


def default_grid(
    image: Sequence[float] = DEFAULT_IMAGE,
    text: Sequence[float] = DEFAULT_TEXT,
    decoder: Sequence[float] = DEFAULT_DECODER,
) -> List[Thresholds]:
    """Cartesian product of the axes (threshold 1.0 = never exit), most conservative first
    (sorted by descending threshold sum). Default: 6 x 6 x 7 = 252 candidates."""
    grid = [Thresholds(*map(float, t)) for t in itertools.product(image, text, decoder)]
    return sorted(grid, key=lambda t: -(t.image + t.text + t.decoder))


def monotone_path(grid: Iterable[Sequence[float]]) -> List[Thresholds]:
    """An a-priori chain through ``grid`` for ``ordering="given"``: step k takes, on each axis,
    the value at the proportional position ``round(k (len_axis - 1) / (K - 1))`` of that axis's
    distinct values sorted descending (K = the longest axis). Every coordinate is
    non-increasing along the path; points missing from ``grid`` are skipped."""
    pts = {Thresholds(*map(float, t)) for t in grid}
    if not pts:
        return []
    axes = [sorted({p[a] for p in pts}, reverse=True) for a in range(3)]
    k_max = max(len(ax) for ax in axes)
    path: List[Thresholds] = []
    for k in range(k_max):
        idx = [round(k * (len(ax) - 1) / max(1, k_max - 1)) for ax in axes]
        p = Thresholds(*(ax[i] for ax, i in zip(axes, idx)))
        if p in pts and (not path or path[-1] != p):
            path.append(p)
    return path


# ---------------------------------------------------------------------------- p-values


def binom_cdf(k: float, n: int, p: float) -> float:
    """``P(Bin(n, p) <= k)``; scipy when available, else an exact log-space sum."""
    k = math.floor(k + 1e-9)
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if _scipy_binom is not None:
        return float(_scipy_binom.cdf(k, n, p))
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    j = np.arange(k + 1)
    lg = np.vectorize(math.lgamma)
    logpmf = lg(n + 1) - lg(j + 1) - lg(n - j + 1) + j * math.log(p) + (n - j) * math.log1p(-p)
    m = logpmf.max()
    return float(min(1.0, math.exp(m) * np.exp(logpmf - m).sum()))


def binomial_pvalue(risks: np.ndarray, alpha: float) -> float:
    """Exact p-value of ``H: E[r] > alpha`` for 0/1 risks: ``P(Bin(n, alpha) <= sum r)``."""
    r = np.asarray(risks, dtype=float)
    if not np.all((r == 0) | (r == 1)):
        raise ValueError("binomial p-value needs 0/1 risks; use hoeffding_bentkus_pvalue")
    return binom_cdf(r.sum(), r.size, alpha)


def hoeffding_bentkus_pvalue(risks: np.ndarray, alpha: float) -> float:
    """Hoeffding–Bentkus p-value of ``H: E[r] > alpha`` for i.i.d. risks in [0, 1]
    (Bates et al. 2021, RCPS; Angelopoulos et al. 2021, LTT)."""
    r = np.asarray(risks, dtype=float)
    n = r.size
    if n == 0:
        return 1.0
    if not 0.0 < alpha < 1.0:
        return 1.0 if alpha <= 0.0 else 0.0
    mean = float(r.mean())
    a = min(mean, alpha)
    h = (a * math.log(a / alpha) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - alpha))
    hoeffding = math.exp(-n * h)
    bentkus = math.e * binom_cdf(math.ceil(n * mean - 1e-9), n, alpha)
    return min(1.0, hoeffding, bentkus)


def risk_pvalue(risks: np.ndarray, alpha: float, method: str = "auto") -> float:
    """``method``: "binomial", "hb" (Hoeffding–Bentkus), or "auto" (binomial for 0/1 risks)."""
    r = np.asarray(risks, dtype=float)
    if method == "auto":
        method = "binomial" if np.all((r == 0) | (r == 1)) else "hb"
    if method == "binomial":
        return binomial_pvalue(r, alpha)
    if method == "hb":
        return hoeffding_bentkus_pvalue(r, alpha)
    raise ValueError(f"unknown p-value method {method!r}")


def per_sample_risk(quality_full: np.ndarray, quality: np.ndarray, bound: float) -> np.ndarray:
    """``max(0, q_full - q) / bound``; raises if a quality lies outside ``[0, bound]``."""
    qf, q = np.asarray(quality_full, dtype=float), np.asarray(quality, dtype=float)
    if qf.shape != q.shape or qf.ndim != 1:
        raise ValueError(f"quality arrays must be (n,) and equal: {qf.shape} vs {q.shape}")
    for x in (qf, q):
        if x.size and (x.min() < 0 or x.max() > bound):
            raise ValueError(f"per-sample quality outside [0, {bound}]: pass the right bound")
    return np.maximum(0.0, qf - q) / bound


# ---------------------------------------------------------------------------- calibration


@dataclass
class CalibrationResult:
    """Outcome of :func:`calibrate_thresholds` (see the module docstring for the procedure).

    thresholds: chosen λ (None: nothing certified, use full depth); p_value / etr /
    empirical_risk: its test p-value, efficiency score and test-half mean risk (metric
    units). valid: certified λ in test order. tested: ``(λ, p-value)`` for each λ tested
    (the last one failed unless all passed). alpha: allowed drop in metric units.
    """

    thresholds: Optional[Thresholds]
    p_value: Optional[float]
    etr: Optional[float]
    empirical_risk: Optional[float]
    valid: List[Thresholds]
    tested: List[Tuple[Thresholds, float]]
    alpha: float
    epsilon: float
    delta: float
    bound: float
    relative: bool
    full_quality: float
    metric_name: str
    n_order: int
    n_test: int
    pvalue_method: str
    statement: str = ""
    extra: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> Dict:
        """JSON-serialisable dict (λ as ``[image, text, decoder]`` lists)."""
        d = asdict(self)
        d["thresholds"] = list(self.thresholds) if self.thresholds else None
        d["valid"] = [list(t) for t in self.valid]
        d["tested"] = [[list(t), p] for t, p in self.tested]
        return d


def _pareto_order(etr: Mapping[Thresholds, float], risk: Mapping[Thresholds, float]):
    """λ on the (ETR high, risk low) front, by ETR ascending (risk non-decreasing)."""
    front, best = [], math.inf
    for lam in sorted(etr, key=lambda t: (-etr[t], risk[t])):
        if risk[lam] < best:
            front.append(lam)
            best = risk[lam]
    return front[::-1]


def calibrate_thresholds(
    quality_full: Sequence[float],
    quality: Mapping[Sequence[float], Sequence[float]],
    etr: Mapping[Sequence[float], float],
    epsilon: float = 0.01,
    delta: float = 0.1,
    *,
    metric_name: str = "accuracy",
    relative: bool = True,
    bound: Optional[float] = None,
    ordering: str = "split",
    order: Optional[Sequence[Sequence[float]]] = None,
    split_fraction: float = 0.5,
    seed: int = 0,
    pvalue: str = "auto",
) -> CalibrationResult:
    """Pick max-ETR exit thresholds whose quality drop against full depth is certified.

    quality_full: (n,) per-sample quality at full depth (accuracy 0/1, per-sample CIDEr...).
    quality: λ -> (n,) per-sample quality at λ, same samples and order. etr: λ -> ETR (or any
    label-free efficiency score, higher = faster). epsilon: allowed drop, relative to the
    full-depth mean (``relative=True``) or in metric units. delta: risk level. bound: per-
    sample quality bound B (default from ``metric_name``: accuracy 1, cider 10; otherwise 1
    if all quality lies in [0, 1]). ordering: "split" (learn the order on a shuffled
    ``split_fraction`` of the samples, test on the rest) or "given" (test ``order`` on all).
    pvalue: "auto" | "binomial" | "hb". See the module docstring for the exact procedure.
    """
    qf = np.asarray(quality_full, dtype=float)
    q = {Thresholds(*map(float, k)): np.asarray(v, dtype=float) for k, v in quality.items()}
    e = {Thresholds(*map(float, k)): float(v) for k, v in etr.items()}
    if set(q) != set(e):
        raise ValueError("quality and etr must have the same thresholds as keys")
    if not q or qf.size < 2:
        raise ValueError("need at least one candidate and two calibration samples")
    if not (0 < delta < 1 and epsilon >= 0):
        raise ValueError("need 0 < delta < 1 and epsilon >= 0")
    if bound is None:
        bound = METRIC_BOUNDS.get(metric_name.lower())
        if bound is None:
            if qf.min() < 0 or qf.max() > 1 or any(v.min() < 0 or v.max() > 1 for v in q.values()):
                raise ValueError(f"no default quality bound for {metric_name!r}: pass bound=")
            bound = 1.0
    risks = {lam: per_sample_risk(qf, v, bound) for lam, v in q.items()}
    full_quality = float(qf.mean())
    alpha = epsilon * full_quality if relative else float(epsilon)
    a = alpha / bound

    n = qf.size
    if ordering == "split":
        perm = np.random.default_rng(seed).permutation(n)
        n1 = int(round(n * split_fraction))
        if not 0 < n1 < n:
            raise ValueError("split_fraction leaves an empty half")
        idx1, idx2 = perm[:n1], perm[n1:]
        seq = _pareto_order(e, {lam: float(r[idx1].mean()) for lam, r in risks.items()})
    elif ordering == "given":
        if order is None:
            raise ValueError('ordering="given" needs order=')
        seq = [Thresholds(*map(float, t)) for t in order]
        missing = [t for t in seq if t not in q]
        if missing:
            raise ValueError(f"order has thresholds without results: {missing[:3]}")
        n1, idx2 = 0, np.arange(n)
    else:
        raise ValueError(f"unknown ordering {ordering!r}")

    valid: List[Thresholds] = []
    tested: List[Tuple[Thresholds, float]] = []
    for lam in seq:
        p = risk_pvalue(risks[lam][idx2], a, pvalue)
        tested.append((lam, p))
        if p > delta:
            break
        valid.append(lam)

    chosen = max(valid, key=lambda t: e[t]) if valid else None  # max keeps the first on ties
    pvals = dict(tested)
    result = CalibrationResult(
        thresholds=chosen,
        p_value=pvals[chosen] if chosen else None,
        etr=e[chosen] if chosen else None,
        empirical_risk=float(risks[chosen][idx2].mean() * bound) if chosen else None,
        valid=valid,
        tested=tested,
        alpha=alpha,
        epsilon=epsilon,
        delta=delta,
        bound=float(bound),
        relative=relative,
        full_quality=full_quality,
        metric_name=metric_name,
        n_order=n1,
        n_test=int(idx2.size),
        pvalue_method=pvalue,
    )
    result.statement = guarantee_statement(result)
    return result


def guarantee_statement(res: CalibrationResult) -> str:
    """Human-readable guarantee of a :class:`CalibrationResult`."""
    conf = f"{1 - res.delta:.0%}"
    name = res.metric_name
    if res.relative:
        budget = (
            f"{res.alpha:.4g} ({res.epsilon:.2%} of the full-depth {name} "
            f"{res.full_quality:.4g} measured on the calibration split)"
        )
    else:
        budget = f"{res.alpha:.4g} {name}"
    if res.thresholds is None:
        return (
            f"No thresholds could be certified: none keeps the expected {name} drop <= "
            f"{budget} at confidence {conf} (n_test={res.n_test}). Run at full depth."
        )
    return (
        f"With probability >= {conf}, the expected {name} drop against full depth at "
        f"thresholds {res.thresholds} is <= {budget}; per-sample losses are not offset by "
        f"gains, and test data must come from the calibration distribution. "
        f"ETR {res.etr:.1%}, p-value {res.p_value:.3g}, "
        f"{len(res.valid)} certified of {len(res.tested)} tested (n_test={res.n_test})."
    )
