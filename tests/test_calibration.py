"""Threshold calibration (Learn then Test): selection rules, stopping rule, p-value validity."""
import json

import numpy as np
import pytest

from mue_fairseq import calibration as cal
from mue_fairseq.calibration import Thresholds, calibrate_thresholds

FULL = Thresholds(1.0, 1.0, 1.0)
MILD = Thresholds(0.9, 0.95, 0.95)
MID = Thresholds(0.85, 0.9, 0.9)
AGGR = Thresholds(0.7, 0.7, 0.8)


def _accuracy_case(flip_rates, n=4000, acc=0.9, seed=0):
    """Full-depth 0/1 correctness and, per λ, a copy where a fraction of the correct
    samples turn wrong."""
    rng = np.random.default_rng(seed)
    q_full = (rng.random(n) < acc).astype(float)
    quality = {}
    for lam, rate in flip_rates.items():
        q = q_full.copy()
        q[(q_full == 1) & (rng.random(n) < rate)] = 0.0
        quality[lam] = q
    return q_full, quality


def test_aggressive_config_over_budget_is_not_chosen():
    q_full, quality = _accuracy_case({FULL: 0.0, MILD: 0.001, AGGR: 0.1})
    etr = {FULL: 0.0, MILD: 0.3, AGGR: 0.6}
    res = calibrate_thresholds(q_full, quality, etr, epsilon=0.01, delta=0.1)
    assert res.thresholds == MILD
    assert AGGR not in res.valid and res.tested[-1][0] == AGGR and res.tested[-1][1] > 0.1
    assert res.p_value <= 0.1 and res.etr == 0.3
    assert res.alpha == pytest.approx(0.01 * q_full.mean())
    assert res.n_order + res.n_test == q_full.size
    assert "With probability >= 90%" in res.statement and "accuracy" in res.statement


def test_all_pass_chooses_max_etr():
    q_full, quality = _accuracy_case({FULL: 0.0, MILD: 0.003, MID: 0.006, AGGR: 0.009})
    etr = {FULL: 0.0, MILD: 0.2, MID: 0.35, AGGR: 0.5}
    res = calibrate_thresholds(q_full, quality, etr, epsilon=0.02, delta=0.1)
    assert res.thresholds == AGGR and res.etr == 0.5
    assert res.valid == [FULL, MILD, MID, AGGR]  # Pareto order: ETR ascending
    # equal risk: the slower candidates are dominated and not even tested
    same = {lam: quality[FULL] for lam in quality}
    res = calibrate_thresholds(q_full, same, etr, epsilon=0.02, delta=0.1)
    assert res.thresholds == AGGR and res.valid == [AGGR]


def test_fixed_sequence_stops_at_first_failure():
    q_full, quality = _accuracy_case({FULL: 0.0, AGGR: 0.2, MILD: 0.0})
    etr = {FULL: 0.0, AGGR: 0.3, MILD: 0.6}  # MILD would pass and is fastest
    res = calibrate_thresholds(
        q_full, quality, etr, ordering="given", order=[FULL, AGGR, MILD]
    )
    assert [t for t, _ in res.tested] == [FULL, AGGR]
    assert res.valid == [FULL] and res.thresholds == FULL
    # tested alone, MILD passes: it was excluded only by the stopping rule
    alone = calibrate_thresholds(q_full, quality, etr, ordering="given", order=[MILD])
    assert alone.thresholds == MILD
    assert res.n_test == q_full.size  # a given order tests on all samples


def test_pareto_order_skips_dominated():
    etr = {FULL: 0.0, MILD: 0.3, MID: 0.2, AGGR: 0.5}
    risk = {FULL: 0.0, MILD: 0.01, MID: 0.02, AGGR: 0.05}  # MID: slower and riskier than MILD
    assert cal._pareto_order(etr, risk) == [FULL, MILD, AGGR]


def test_nothing_certified_and_plain_tuple_keys():
    q_full, quality = _accuracy_case({FULL: 0.05, AGGR: 0.3}, n=400)
    quality = {tuple(k): v for k, v in quality.items()}
    res = calibrate_thresholds(q_full, quality, {(1, 1, 1): 0.0, (0.7, 0.7, 0.8): 0.5})
    assert res.thresholds is None and res.valid == [] and len(res.tested) == 1
    assert res.statement.startswith("No thresholds could be certified")
    json.dumps(res.to_dict())


def test_cider_uses_bound_and_hoeffding_bentkus():
    rng = np.random.default_rng(1)
    n = 3000
    q_full = rng.uniform(0.2, 3.0, n)  # per-sample CIDEr-D, pycocoevalcap scale
    quality = {FULL: q_full.copy(), MILD: np.maximum(0, q_full - rng.uniform(0, 0.01, n))}
    quality[AGGR] = np.maximum(0, q_full - rng.uniform(0, 1.0, n))
    etr = {FULL: 0.0, MILD: 0.25, AGGR: 0.5}
    res = calibrate_thresholds(q_full, quality, etr, epsilon=0.02, metric_name="CIDEr")
    assert res.bound == 10.0 and res.thresholds == MILD
    assert 0 < res.empirical_risk < res.alpha
    d = res.to_dict()
    assert d["thresholds"] == list(MILD) and json.loads(json.dumps(d)) == d
    with pytest.raises(ValueError, match="bound"):
        calibrate_thresholds(q_full * 100, quality, etr, metric_name="CIDEr")
    with pytest.raises(ValueError, match="bound"):
        calibrate_thresholds(q_full, quality, etr, metric_name="BLEU-4")


def test_binomial_pvalue_valid_at_null_boundary():
    alpha, delta, n, sims = 0.05, 0.1, 200, 3000
    rng = np.random.default_rng(0)
    draws = (rng.random((sims, n)) < alpha).astype(float)
    p = np.array([cal.binomial_pvalue(d, alpha) for d in draws])
    assert (p <= delta).mean() <= delta + 0.015
    assert (p <= delta).mean() > 0.03  # exact test: not trivially conservative


def test_hoeffding_bentkus_pvalue_valid_at_null_boundary():
    alpha, delta, n, sims = 0.1, 0.1, 200, 2000
    rng = np.random.default_rng(0)
    draws = rng.uniform(0, 2 * alpha, (sims, n))  # bounded, mean exactly alpha
    p = np.array([cal.hoeffding_bentkus_pvalue(d, alpha) for d in draws])
    assert (p <= delta).mean() <= delta + 0.015
    # and it does reject when the risk is well below alpha
    assert cal.hoeffding_bentkus_pvalue(rng.uniform(0, 0.05, n), alpha) < 1e-3


def test_procedure_fwer_when_every_candidate_is_at_the_null():
    """All candidates lose exactly α: certifying any of them is an error; rate <= δ."""
    delta, n, sims, a = 0.1, 400, 300, 0.05
    rng = np.random.default_rng(3)
    cands = [FULL, MILD, MID, AGGR]
    etr = {lam: 0.1 * i for i, lam in enumerate(cands)}
    errors = 0
    for s in range(sims):
        q_full = np.ones(n)
        quality = {lam: (rng.random(n) >= a).astype(float) for lam in cands}
        res = calibrate_thresholds(
            q_full, quality, etr, epsilon=a, relative=False, delta=delta, seed=s
        )
        errors += res.thresholds is not None
    assert errors / sims <= delta + 0.04


def test_binom_cdf_fallback_matches_scipy(monkeypatch):
    pytest.importorskip("scipy")
    cases = [(3, 100, 0.05), (0, 50, 0.01), (120, 1000, 0.1), (7.0, 7, 0.5), (-1, 5, 0.2)]
    want = [cal.binom_cdf(*c) for c in cases]
    monkeypatch.setattr(cal, "_scipy_binom", None)
    assert [cal.binom_cdf(*c) for c in cases] == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_grid_and_monotone_path():
    grid = cal.default_grid()
    assert len(grid) == 6 * 6 * 7 and grid[0] == FULL
    assert grid[-1] == Thresholds(0.7, 0.7, 0.8)
    path = cal.monotone_path(grid)
    assert path[0] == FULL and path[-1] == Thresholds(0.7, 0.7, 0.8)
    for a, b in zip(path, path[1:]):
        assert all(y <= x for x, y in zip(a, b)) and a != b
    assert set(path) <= set(grid)
    assert MILD.as_exit_overrides() == {
        "image_exit_threshold": 0.9, "text_exit_threshold": 0.95, "decoder_exit_threshold": 0.95,
    }
