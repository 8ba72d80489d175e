"""posterior_predictive group (calib/ppc.py): az.plot_ppc runs on a small fitted posterior."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import arviz as az  # noqa: E402
import numpy as np  # noqa: E402
from fixtures.posteriors import make_replay_dataset, quick_posterior  # noqa: E402

from calib.posterior import load_posterior, save_posterior  # noqa: E402


def test_fit_adds_posterior_predictive_and_plot_ppc_runs(tmp_path):
    ds, feats, _ = make_replay_dataset(
        seed=0, n_models=2, exps_per_model=1, steps_per_exp=400, requests_per_exp=30
    )
    idata = quick_posterior(ds, feats, draws=60, warmup=100)
    pp = idata.posterior_predictive["duration_us"]
    obs = idata.observed_data["duration_us"]
    assert pp.dims == ("chain", "draw", "step") and pp.sizes["chain"] == 1
    assert pp.sizes["draw"] == min(
        200, idata.posterior.sizes["chain"] * idata.posterior.sizes["draw"]
    )
    np.testing.assert_array_equal(pp["step"].values, obs["step"].values)
    # the simulated durations look like the data: medians within 10 % per step on average
    ratio = np.median(pp.values[0], axis=0) / obs.values
    assert 0.9 < np.median(ratio) < 1.1
    path = save_posterior(idata, tmp_path / "p.nc")
    back = load_posterior(path)
    assert "posterior_predictive" in back.groups()
    axes = az.plot_ppc(back, num_pp_samples=20)
    assert np.size(axes) >= 1
