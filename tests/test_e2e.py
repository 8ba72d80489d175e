"""Teacher-forced replay: windows, weights, intervals, verdict, options, CLI errors."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.posteriors import make_replay_dataset, mock_posterior

from calib import config, noise
from calib.e2e import (
    METRICS,
    experiment_means,
    format_table,
    means_with_host_time,
    measure_host_timing,
    replay,
    replay_design,
)
from calib.errors import CalibError
from calib.posterior import flat_draws
from calib.predict import plugin_step_time_us


@pytest.fixture(scope="module")
def data():
    ds, features, truth = make_replay_dataset(seed=0, steps_per_exp=500, requests_per_exp=40)
    return ds, features, truth


@pytest.fixture(scope="module")
def idata(data):
    return mock_posterior(*data)


@pytest.mark.parametrize("share", [1.0, 0.5, 0.0])
def test_weights_and_gap_counts_reproduce_observed_means_from_true_durations(share):
    ds, _, truth = make_replay_dataset(
        seed=7, steps_per_exp=300, requests_per_exp=15, queued_fraction=share, gap_us=25.0
    )
    design = replay_design(ds, queued_step_weight=share)
    got = (
        experiment_means(truth["true_step_us"][design.order][None, :], design)[0]
        + 25.0 * design.gap_counts
    )
    np.testing.assert_allclose(got, design.observed_us, rtol=1e-10)
    assert design.n_requests[0].tolist() == [15, 15, 15, 15]
    # leaving the gaps out misses them: E2E windows of k steps hold k - 1 gaps
    short = experiment_means(truth["true_step_us"][design.order][None, :], design)[0]
    assert np.all(design.observed_us[0] - short[0] > 25.0 * 5)


def test_means_with_host_time_adds_gaps_per_experiment_and_per_draw():
    ds, _, truth = make_replay_dataset(
        seed=7, steps_per_exp=300, requests_per_exp=15, queued_fraction=0.5, gap_us=25.0
    )
    design = replay_design(ds, queued_step_weight=0.5)
    step = truth["true_step_us"][design.order]
    E = design.bounds.size - 1
    np.testing.assert_allclose(
        means_with_host_time(step, design, np.full(E, 25.0))[0], design.observed_us, rtol=1e-10
    )
    # default: the measured gap of the design; per-draw gaps broadcast over draws
    want = experiment_means(step, design)[0] + design.timing.gap_us * design.gap_counts
    np.testing.assert_allclose(means_with_host_time(step, design)[0], want, rtol=1e-12)
    two = means_with_host_time(
        np.stack([step, step]), design, np.array([np.zeros(E), np.full(E, 25.0)])
    )
    np.testing.assert_allclose(two[0], experiment_means(step, design)[0], rtol=1e-12)
    np.testing.assert_allclose(two[1], design.observed_us, rtol=1e-10)


def test_gap_counts_match_brute_force_window_counts(data):
    ds, _, _ = data
    design = replay_design(ds, queued_step_weight=0.5)
    r_exp = np.asarray(ds["req_experiment"].values)
    ids = {
        v: np.asarray(ds[v].values)
        for v in ("req_queued_step", "req_first_token_step", "req_finished_step", "req_output_len")
    }
    for e in range(ds.sizes["experiment"]):
        r = r_exp == e
        q, ft, fin = (
            ids["req_queued_step"][r],
            ids["req_first_token_step"][r],
            ids["req_finished_step"][r],
        )
        out = ids["req_output_len"][r]
        # consecutive step ids: a window [a, b] holds b - a + 1 steps
        assert design.gap_counts[0, e] == pytest.approx(np.mean(fin - q), rel=1e-12)
        assert design.gap_counts[1, e] == pytest.approx(np.mean(ft - q), rel=1e-12)
        assert design.gap_counts[2, e] == pytest.approx(np.mean((fin - ft) / (out - 1)), rel=1e-12)


def test_host_timing_is_measured_from_step_and_queued_timestamps():
    ds, _, truth = make_replay_dataset(
        seed=3,
        steps_per_exp=1500,
        requests_per_exp=300,
        gap_us=60.0,
        gap_sd_us=15.0,
        queued_fraction=0.3,
    )
    t = measure_host_timing(ds)
    assert set(t.gap_source) == {"measured"} and (t.gap_pairs >= 10).all()
    # the estimate is the mean over consecutive sampled pairs: within 4 standard errors
    assert np.all(np.abs(t.gap_us - 60.0) < 4 * t.gap_se_us + 0.01), (t.gap_us, t.gap_se_us)
    # standard error of a mean of n pairs with sd 15 µs
    np.testing.assert_allclose(t.gap_se_us, 15.0 / np.sqrt(t.gap_pairs), rtol=0.6)
    assert t.queued_source == "measured" and t.queued_n >= 20
    assert t.queued_step_weight == pytest.approx(0.3, abs=1e-6)
    assert "host gap measured per experiment" in t.describe()
    # a number overrides the measured share; the design uses it
    assert replay_design(ds, queued_step_weight=0.8).timing.queued_step_weight == 0.8


def test_host_timing_fallbacks():
    ds, _, _ = make_replay_dataset(seed=3, steps_per_exp=300, requests_per_exp=10, gap_us=40.0)
    # no step timestamps at all: gap 0, default share
    bare = ds.drop_vars(["bs_ts_start_ns", "bs_ts_end_ns"])
    t = measure_host_timing(bare)
    assert set(t.gap_source) == {"none"} and np.all(t.gap_us == 0.0)
    assert t.queued_step_weight == config.E2E_QUEUED_STEP_WEIGHT
    assert t.queued_source.startswith("default")
    # one experiment without timestamps: it takes the pooled estimate of the others
    start = ds["bs_ts_start_ns"].values.copy()
    start[np.asarray(ds["step_experiment"].values) == 0] = -1
    t = measure_host_timing(ds.assign(bs_ts_start_ns=(("step",), start)))
    assert t.gap_source[0] == "pooled" and t.gap_pairs[0] == 0
    assert t.gap_us[0] == pytest.approx(40.0, abs=0.01) and t.gap_se_us[0] >= 0
    # QUEUED timestamps on another clock: the default share, and why
    shifted = ds.assign(req_queued_ts_us=ds["req_queued_ts_us"] + 5e6)
    big, _, _ = make_replay_dataset(seed=3, steps_per_exp=900, requests_per_exp=300)
    big = big.assign(req_queued_ts_us=big["req_queued_ts_us"] + 5e6)
    t = measure_host_timing(big)
    assert t.queued_source.startswith("default (QUEUED timestamps")
    assert t.queued_step_weight == config.E2E_QUEUED_STEP_WEIGHT
    assert measure_host_timing(shifted).queued_source.startswith("default (")


def test_replay_adds_measured_gaps_and_reports_them():
    ds, features, truth = make_replay_dataset(
        seed=8, steps_per_exp=600, requests_per_exp=60, gap_us=80.0
    )
    idata = mock_posterior(ds, features, truth, jitter=0.0, draws=20)
    meas = replay(idata, ds, features=features, draws=20, noise=False, baselines=True)
    none = replay(
        idata, ds, features=features, draws=20, noise=False, baselines=True, step_gap_us=0.0
    )
    t, t0 = meas.table, none.table
    design = replay_design(ds)
    assert np.allclose(t.gap_us, 80.0, atol=0.01) and np.all(t0.gap_us == 0.0)
    k = np.repeat(np.arange(3), ds.sizes["experiment"])
    e = np.tile(np.arange(ds.sizes["experiment"]), 3)
    added = (t.predicted_us - t0.predicted_us).to_numpy()
    np.testing.assert_allclose(added, 80.0 * design.gap_counts[k, e], rtol=1e-3)
    np.testing.assert_allclose((t.nnls_us - t0.nnls_us).to_numpy(), added, rtol=1e-3)
    assert meas.settings["step_gap_us"] == "measured" and none.settings["step_gap_us"] == 0.0
    assert set(meas.settings["gap_source"]) <= {"measured", "pooled"}  # few pairs: pooled
    text = format_table(meas)
    assert text.startswith("settings: host gap measured") and "step-bias%" in text
    with pytest.raises(CalibError, match="step gap"):
        replay(idata, ds, features=features, draws=5, step_gap_us=float("nan"))
    with pytest.raises(CalibError, match="queued-step weight"):
        replay(idata, ds, features=features, draws=5, queued_step_weight=1.5)


def test_step_bias_column_matches_brute_force(data, idata):
    ds, features, _ = data
    res = replay(idata, ds, features=features, draws=3, noise=False, baselines=False)
    design = replay_design(ds)
    post = idata.posterior.stack(s=("chain", "draw"))
    idx = np.linspace(0, post.sizes["s"] - 1, 3).round().astype(int)
    em = np.repeat(np.arange(2), 2)[np.asarray(ds["step_experiment"].values)]
    # the predictive mean step time: mean_factor·mu per draw (with or without noise)
    pars = noise.posterior_params(flat_draws(idata, 3), 2)
    mu = np.mean(
        [
            noise.mean_factor(*(p[j][em] for p in pars))
            * plugin_step_time_us(
                post["b"].values[..., i][em],
                float(post["per_layer_us"].values[i]),
                float(post["per_request_us"].values[i]),
                float(post["per_step_us"].values[i]),
                float(post["alpha"].values[i]),
                features,
            )
            for j, i in enumerate(idx)
        ],
        axis=0,
    )
    dur = np.asarray(ds["duration_us"].values)
    samp = np.asarray(ds["sampled"].values)
    inv = np.empty_like(design.order)
    inv[design.order] = np.arange(design.order.size)
    step_exp = np.asarray(ds["step_experiment"].values)
    for k, metric in enumerate(METRICS):
        for e, name in enumerate(design.experiments):
            s = np.flatnonzero(samp & (step_exp == e))
            w = design.weights[inv[s], k]
            want = 100 * (np.sum(w * mu[s]) / np.sum(w * dur[s]) - 1)
            got = res.table[(res.table.metric == metric) & (res.table.experiment == name)]
            assert float(got.step_bias_pct.iloc[0]) == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_predicted_means_match_brute_force_per_request_sums(data, idata):
    ds, features, _ = data
    res = replay(
        idata,
        ds,
        features=features,
        draws=1,
        noise=False,
        baselines=False,
        queued_step_weight=1.0,
        step_gap_us=0.0,
    )
    post = idata.posterior.isel(chain=0, draw=0)
    em = np.repeat(np.arange(2), 2)[np.asarray(ds["step_experiment"].values)]
    mu = plugin_step_time_us(
        post["b"].values[em],
        float(post["per_layer_us"]),
        float(post["per_request_us"]),
        float(post["per_step_us"]),
        float(post["alpha"]),
        features,
    )
    ids = np.asarray(ds["step_id"].values)
    step_exp = np.asarray(ds["step_experiment"].values)
    for e in range(ds.sizes["experiment"]):
        reqs = np.nonzero(np.asarray(ds["req_experiment"].values) == e)[0]
        e2e, ttft, itl = [], [], []
        for r in reqs:
            q, ft, fin = (
                int(ds[v].values[r])
                for v in ("req_queued_step", "req_first_token_step", "req_finished_step")
            )
            in_e = step_exp == e
            e2e.append(mu[in_e & (ids >= q) & (ids <= fin)].sum())
            ttft.append(mu[in_e & (ids >= q) & (ids <= ft)].sum())
            itl.append((e2e[-1] - ttft[-1]) / (int(ds["req_output_len"].values[r]) - 1))
        t = res.table
        for metric, vals in zip(METRICS, (e2e, ttft, itl), strict=True):
            row = t[(t.metric == metric) & (t.experiment == str(ds["experiment"].values[e]))]
            assert float(row.predicted_us.iloc[0]) == pytest.approx(np.mean(vals), rel=1e-10)


def test_replay_table_verdict_and_baselines(data, idata):
    ds, features, _ = data
    res = replay(idata, ds, features=features, draws=200)
    t = res.table
    assert len(t) == 3 * ds.sizes["experiment"]
    for col in (
        "observed_us",
        "predicted_us",
        "lower_us",
        "upper_us",
        "error_pct",
        "bias_us",
        "inside",
        "blackbox_us",
        "blackbox_error_pct",
        "nnls_us",
        "nnls_error_pct",
    ):
        assert col in t
    assert (t.lower_us <= t.predicted_us).all() and (t.predicted_us <= t.upper_us).all()
    # the point is the posterior predictive MEAN over draws (it was the median: sums of
    # step times estimate a mean, and the median of a right-skewed predictive sits below
    # it; issue 16); the band is equal-tailed
    for k, metric in enumerate(METRICS):
        for e, name in enumerate(ds["experiment"].values):
            row = t[(t.metric == metric) & (t.experiment == str(name))]
            col = res.draws_us[:, k, e]
            assert float(row.predicted_us.iloc[0]) == pytest.approx(np.mean(col), rel=1e-12)
            lo = np.quantile(col, (1 - config.INTERVAL_PROB) / 2)
            assert float(row.lower_us.iloc[0]) == pytest.approx(lo, rel=1e-12)
    assert res.passed and res.coverage["e2e"]["inside"] >= 3
    assert t[t.metric == "e2e"].error_pct.abs().max() < 3.0
    assert t.blackbox_error_pct.notna().all() and t.nnls_error_pct.notna().all()
    text = format_table(res)
    assert "blackbox err%" in text and "nnls err%" in text
    assert text.splitlines()[-1].startswith("PASS")


def test_biased_posterior_fails_the_coverage_check(data, idata):
    ds, features, _ = data
    biased = idata.copy()
    biased.posterior["b"] = biased.posterior["b"] * 1.3
    res = replay(biased, ds, features=features, draws=100, baselines=False)
    assert not res.passed
    assert res.coverage["e2e"]["inside"] == 0
    assert res.message.startswith("FAIL") and "e2e" in res.message
    assert res.worst[2] > 10.0


def test_chunking_does_not_change_results(data, idata, monkeypatch):
    ds, features, _ = data
    a = replay(idata, ds, features=features, draws=50, noise=False, baselines=False)
    monkeypatch.setattr(config, "E2E_CHUNK_ELEMENTS", 3 * ds.sizes["step"])
    b = replay(idata, ds, features=features, draws=50, noise=False, baselines=False)
    np.testing.assert_allclose(a.draws_us, b.draws_us, rtol=1e-12)


def test_population_and_new_experiment_bases(data):
    ds, features, truth = data
    per_exp = mock_posterior(ds, features, truth, hierarchy="per-experiment")
    fitted = replay(per_exp, ds, features=features, draws=100, baselines=False)
    assert set(fitted.table.basis) == {"fitted"}
    new = replay(per_exp, ds, features=features, draws=100, baselines=False, new_experiments=True)
    assert set(new.table.basis) == {"new-experiment"}
    width = lambda r: (r.table.upper_us - r.table.lower_us).mean()  # noqa: E731
    assert width(new) > width(fitted)
    pop = replay(
        per_exp, ds, features=features, draws=100, baselines=False, population_models=["model-1"]
    )
    basis = dict(zip(pop.table.experiment, pop.table.basis, strict=False))
    assert basis["exp-2-model-1"] == "population" and basis["exp-0-model-0"] == "fitted"
    with pytest.raises(CalibError, match="not in the dataset"):
        replay(per_exp, ds, features=features, draws=10, population_models=["nope"])


def test_bad_probability_is_a_user_error(data, idata):
    ds, features, _ = data
    with pytest.raises(CalibError, match="interval probability"):
        replay(idata, ds, features=features, prob=1.5)


def test_check_e2e_cli_user_error(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_e2e_cli", "scripts/check_e2e.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    rc = cli.main([str(tmp_path / "missing.nc"), "--traces", str(tmp_path / "none.nc")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1


DEFAULT_POSTERIOR = config.POSTERIORS_DIR / "per-model.nc"
DEFAULT_POSTERIOR_REASON = (
    "needs the embedded default dataset and posteriors/per-model.nc "
    "(make it with: python scripts/fit.py --hierarchy per-model)"
)


@pytest.mark.skipif(
    not config.DEFAULT_TRACES.exists() or not DEFAULT_POSTERIOR.exists(),
    reason=DEFAULT_POSTERIOR_REASON,
)
def test_check_e2e_on_default_data(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_e2e_cli", "scripts/check_e2e.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    rc = cli.main([str(DEFAULT_POSTERIOR), "--draws", "200", "--no-noise"])
    out = capsys.readouterr().out
    assert rc in (0, 1)
    assert "== E2E latency" in out and "blackbox err%" in out and "nnls err%" in out
    assert "step-bias%" in out and out.startswith("settings: host gap measured per experiment")
    assert out.strip().splitlines()[-1].startswith(("PASS", "FAIL"))
    lines = [ln for ln in out.splitlines() if ln.startswith("2026")][:16]
    assert len(lines) == 16  # one E2E row per experiment of the default data
    # the measured host gap is tens of µs on the default data (a real share of step time)
    gaps = [float(ln.split()[10]) for ln in lines]
    assert all(20.0 < g < 200.0 for g in gaps), gaps


def _run_script(script: str, *args: str):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, f"scripts/{script}", *args], capture_output=True, text=True, timeout=600
    )


def test_cli_chain_on_simulated_traces(tmp_path):
    """simulate -> import -> (mock-sampler posterior) -> check_e2e, export, report CLIs."""
    import yaml

    from calib.posterior import save_posterior
    from calib.predict import StepFeatures
    from calib.roofline import dataset_components
    from calib.traces import load_dataset

    recipe = yaml.safe_load(config.DEFAULT_RECIPE.read_text(encoding="utf-8"))
    recipe["models"] = recipe["models"][:1]
    recipe["workloads"] = {"general": recipe["workloads"]["general"]}
    recipe["workloads"]["general"]["stages"] = [{"rate": 8, "duration": 8}]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    r = _run_script(
        "simulate.py",
        "--recipe",
        str(tmp_path / "recipe.yaml"),
        "--out",
        str(tmp_path / "root"),
        "--workers",
        "1",
    )
    assert r.returncode == 0, r.stderr
    r = _run_script(
        "import_traces.py",
        str(tmp_path / "root"),
        "--out",
        str(tmp_path / "ds.nc"),
        "--workers",
        "1",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    ds = load_dataset(tmp_path / "ds.nc")
    features = StepFeatures.from_components(dataset_components(ds))
    truth = {
        "b": np.array([[1.2, 1.5, 2.0, 1.5, 1.2, 1.0]]),
        "per_layer_us": 5.0,
        "per_request_us": 5.0,
        "per_step_us": 100.0,
        "alpha": 0.2,
        "sigma": np.array([0.05]),
        "stall_prob": 0.02,
        "stall_log_mult": 0.7,
        "stall_log_sd": 0.3,
    }
    post = save_posterior(mock_posterior(ds, features, truth, draws=50), tmp_path / "p.nc")

    r = _run_script(
        "check_e2e.py",
        str(post),
        "--traces",
        str(tmp_path / "ds.nc"),
        "--draws",
        "50",
        "--csv",
        str(tmp_path / "e2e.csv"),
    )
    assert r.returncode == 1, r.stderr  # one experiment: the coverage test cannot fail
    assert "== E2E latency" in r.stdout and "nnls err%" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("INCONCLUSIVE")
    assert (tmp_path / "e2e.csv").read_text(encoding="utf-8").startswith("# manifest: {")

    r = _run_script(
        "export.py", str(post), "--out", str(tmp_path / "blis"), "--alpha-coeffs", "15000,800,50"
    )
    assert r.returncode == 0, r.stderr
    from blis_rules import load_defaults_text

    load_defaults_text((tmp_path / "blis" / "llama-2-7b.defaults.yaml").read_text("utf-8"))

    r = _run_script(
        "report.py",
        str(post),
        "--traces",
        str(tmp_path / "ds.nc"),
        "--out",
        str(tmp_path / "rep"),
        "--draws",
        "50",
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rep" / "e2e.png").stat().st_size > 20_000
