"""Structural discrepancy: ratios and their se, pooling, the conditional, bands in e2e."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures.posteriors import make_replay_dataset, mock_posterior

from calib import discrepancy as D
from calib.e2e import format_table, replay

MU, TAU = 0.004, 0.008


def _synthetic(seed: int, tau: float, n: int = 16):
    rng = np.random.default_rng(seed)
    se = rng.uniform(0.002, 0.02, n)
    return MU + tau * rng.standard_normal(n) + se * rng.standard_normal(n), se


def test_pool_recovers_a_known_tau_and_covers_mu():
    taus, mu_in = [], 0
    for s in range(40):
        r, se = _synthetic(s, TAU)
        p = D.pool(r, se, replicates=400, seed=s)
        assert p["tau_identified"] and p["n_experiments"] == 16
        taus.append(p["tau"])
        lo, hi = np.quantile(p["mu_draws"], [0.05, 0.95])
        mu_in += lo <= MU <= hi
    # the moment estimator is unbiased for tau² (tau itself is biased low at 16
    # experiments: E[sqrt] < sqrt E); the ratio's Monte-Carlo sd over 40 seeds is ~0.08
    assert abs(np.mean(np.square(taus)) / TAU**2 - 1.0) < 0.25
    # 90 % bootstrap interval of mu: P(Binomial(40, 0.9) <= 31) ~ 0.04
    assert mu_in >= 32


def test_pool_tau_is_consistent():
    taus = [D.pool(*_synthetic(s, TAU, n=400), replicates=10, seed=s)["tau"] for s in range(10)]
    assert abs(np.mean(taus) / TAU - 1.0) < 0.1


def test_pool_finds_no_tau_when_there_is_none():
    taus = []
    for s in range(40):
        rng = np.random.default_rng(s)
        r = MU + 0.01 * rng.standard_normal(16)
        taus.append(D.pool(r, np.full(16, 0.01), replicates=20, seed=s)["tau"])
    # equal se: tau = 0 exactly when 15·var(r)/se² <= 15: P(chi2_15 <= 15) = 0.55 under no
    # heterogeneity (binomial sd over 40 seeds 0.08)
    zero = np.mean(np.asarray(taus) == 0.0)
    assert 0.31 < zero < 0.79
    assert np.mean(taus) < 0.5 * TAU


def test_mean_is_unbiased_when_effects_grow_with_their_se():
    # the misfit is largest where r is noisiest (heavy mixed batches): precision weights
    # would pull mu towards the precise, well-fitted experiments
    mus = []
    for s in range(40):
        rng = np.random.default_rng(s)
        se = rng.uniform(0.002, 0.02, 16)
        delta = 1.5 * se + 0.004 * rng.standard_normal(16)  # mean effect 1.5·0.011
        mus.append(D.pool(delta + se * rng.standard_normal(16), se, replicates=20)["mu"])
    assert abs(np.mean(mus) / (1.5 * 0.011) - 1.0) < 0.1


def test_tau_is_not_identifiable_from_two_experiments():
    p = D.pool(np.array([0.01, -0.01]), np.array([0.002, 0.002]))
    assert p["tau_identified"] is False and p["tau"] is None and p["tau_draws"] == []
    assert p["mu"] == pytest.approx(0.0, abs=1e-12)


def test_delta_method_se_matches_a_bootstrap_over_steps():
    rng = np.random.default_rng(3)
    n = 600
    exp_idx = np.repeat([0, 1], n // 2)
    w = rng.uniform(0.0, 2.0, (n, 3))
    pred = rng.uniform(5e3, 3e4, n)
    obs = pred * np.exp(0.2 * rng.standard_normal(n)) * np.where(rng.random(n) < 0.02, 4.0, 1.0)
    r, se = D.log_ratios(exp_idx, w, obs, pred, 2)
    boot = np.empty((2000, 3, 2))
    for b in range(boot.shape[0]):
        i = np.concatenate([rng.integers(0, n // 2, n // 2), rng.integers(n // 2, n, n // 2)])
        boot[b] = D.log_ratios(exp_idx, w[i], obs[i], pred[i], 2)[0]
    np.testing.assert_allclose(se, boot.std(axis=0), rtol=0.1)
    np.testing.assert_allclose(
        r[0, 0], np.log((w[:300, 0] * obs[:300]).sum() / (w[:300, 0] * pred[:300]).sum())
    )


def _record(r: float, se: float, mu: float, tau: float, n_exp: int = 1) -> dict:
    pooled = {
        "mu": mu,
        "tau": tau,
        "n_experiments": 16,
        "tau_identified": True,
        "mu_draws": [mu] * 4000,
        "tau_draws": [tau] * 4000,
    }
    names = [f"e{i}" for i in range(n_exp)]
    return {
        "experiments": names,
        "log_ratio": {m: [r] * n_exp for m in ("e2e", "ttft", "itl")},
        "se": {m: [se] * n_exp for m in ("e2e", "ttft", "itl")},
        "pooled": {m: dict(pooled) for m in ("e2e", "ttft", "itl")},
    }


def test_conditional_is_the_normal_shrinkage_formula():
    r, se, mu, tau = 0.03, 0.01, 0.005, 0.01
    rec = _record(r, se, mu, tau)
    delta, kinds, notes = D.draws(rec, ["e0"], ["fitted"], 200_000, np.random.default_rng(0))
    s = tau**2 / (tau**2 + se**2)
    assert kinds == ["conditional"] and notes == []
    assert delta[:, 0, 0].mean() == pytest.approx(mu + s * (r - mu), abs=1e-4)
    assert delta[:, 0, 0].std() == pytest.approx(np.sqrt(s) * se, rel=0.01)
    # any other basis, or an experiment not in the record: a new experiment's N(mu, tau)
    new, kinds, _ = D.draws(
        rec, ["e0", "x"], ["population", "fitted"], 200_000, np.random.default_rng(1)
    )
    assert kinds == ["new", "new"]
    assert new[:, 1].mean() == pytest.approx(mu, abs=1e-4)
    assert new[:, 1].std() == pytest.approx(tau, rel=0.01)


def test_no_record_means_no_discrepancy_and_a_note():
    delta, kinds, notes = D.draws(None, ["a", "b"], ["fitted"] * 2, 5, np.random.default_rng(0))
    assert not delta.any() and kinds == ["none", "none"]
    assert len(notes) == 1 and "exclude the structural discrepancy" in notes[0]


@pytest.fixture(scope="module")
def replay_data():
    ds, features, truth = make_replay_dataset(seed=0, steps_per_exp=500, requests_per_exp=40)
    return ds, features, mock_posterior(ds, features, truth)


def test_bands_contain_the_discrepancy(replay_data):
    ds, features, idata = replay_data
    base = replay(idata, ds, features=features, draws=200, baselines=False)
    assert base.notes and "exclude" in base.notes[0]
    assert "note: bands exclude" in format_table(base)
    assert set(base.table.discrepancy) == {"none"}
    with_rec = idata.copy()
    names = [str(x) for x in ds["experiment"].values]
    rec = _record(0.1, 0.001, 0.0, 0.05, n_exp=len(names))
    rec["experiments"] = names
    with_rec.attrs[D.ATTR] = json.dumps(rec)
    new = replay(with_rec, ds, features=features, draws=400, baselines=False, new_experiments=True)
    e2e = new.table[new.table.metric == "e2e"]
    assert set(e2e.basis) == {"new-experiment"} and set(e2e.discrepancy) == {"new"}
    # N(0, 0.05) on the step part: half-width ~ 1.645·5 % (steps dominate the mean)
    assert 6.0 < new.coverage["e2e"]["median_half_width_pct"] < 10.0
    assert base.coverage["e2e"]["median_half_width_pct"] < 3.0
    assert "experiment discrepancy" in format_table(new)
    # fitted: conditional on r = 0.1 with a small se moves the point up ~10 %
    fit = replay(with_rec, ds, features=features, draws=200, baselines=False)
    ratio = (fit.table.predicted_us / base.table.predicted_us)[fit.table.metric == "e2e"]
    assert set(fit.table.discrepancy) == {"conditional"}
    assert np.all((ratio > 1.08) & (ratio < 1.11))


def test_record_from_a_fit_matches_the_replays_step_bias(replay_data):
    ds, features, idata = replay_data
    rec = D.from_fit(idata, D.step_inputs(ds))
    res = replay(idata, ds, features=features, draws=None, noise=False, baselines=False)
    for m in ("e2e", "ttft", "itl"):
        bias = res.table[res.table.metric == m].step_bias_pct.to_numpy()
        np.testing.assert_allclose(100 * np.expm1(-np.array(rec["log_ratio"][m])), bias, rtol=1e-6)
    assert rec["pooled"]["e2e"]["n_experiments"] == 4
    json.dumps(rec)  # JSON-safe


def test_export_summary_describes_mu_tau_and_the_new_workload_factor():
    rec = _record(0.0, 0.01, 0.004, 0.008)
    rec.update(method="m", seed=0)
    s = D.summary(rec, 0.9)
    assert s["available"] and s["e2e"]["mu"] == 0.004 and s["e2e"]["tau"] == 0.008
    lo, hi = s["e2e"]["new_workload_factor_interval"]
    assert lo == pytest.approx(np.exp(0.004 - 1.645 * 0.008), rel=2e-3)
    assert hi == pytest.approx(np.exp(0.004 + 1.645 * 0.008), rel=2e-3)
    assert D.summary(None)["available"] is False


def test_closed_loop_factors_are_a_new_experiments_discrepancy():
    from types import SimpleNamespace

    from calib.closed_loop import Coefficients, discrepancy_factors

    plans = [SimpleNamespace(name=n) for n in ("e0", "x")]
    rec = _record(0.5, 0.001, 0.004, 0.008)  # "e0" is in the record: still not conditioned
    f = discrepancy_factors(Coefficients(point={}, draws=[{}] * 20_000, discrepancy=rec), plans)
    assert f.shape == (20_000, 2)
    np.testing.assert_allclose(np.log(f).mean(axis=0), 0.004, atol=2e-4)
    np.testing.assert_allclose(np.log(f).std(axis=0), 0.008, rtol=0.03)
    none = discrepancy_factors(Coefficients(point={}, draws=[{}] * 3), plans)
    assert np.all(none == 1.0)
