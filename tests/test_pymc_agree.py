"""NumPyro and PyMC backends sample the same posterior (slow).

Run: ``python -m pytest -m slow tests/test_pymc_agree.py -q`` (``-s`` prints the table
of log-scale means, MCSEs and z). A cold PyTensor cache compiles C code for minutes more.

On a small per-model problem (400 steps, 2 models, one at TP=2) both fit runners
(:func:`calib.fit.run_nuts` and :func:`calib.fit.run_pymc`, the project's sampler
settings (max_tree_depth, dense mass) but target_accept 0.99) sample 4 chains x 1000 draws;
the posterior mean of the log of every named parameter (all are positive) must agree
within 3 combined Monte-Carlo standard errors (ArviZ ``mcse_mean`` of each backend, added
in quadrature), and both runs must have converged (R-hat <= 1.01, at most 0.5 % divergent
transitions). Means on the log scale, because some marginals here are wide and skewed
(b_pop[pf_kv]: 90 % interval 0.29-5.5, prior-dominated): the natural-scale mean is then
carried by the upper tail, its sampling distribution is skewed, and a 3-MCSE rule fails
far more often than its nominal rate. Measured 2026-11-23 with this test's seeds: z 3.05
for b_pop[pf_kv] on the natural scale (the test failed), 0.93 on the log scale (passes,
4 min 6 s with a warm PyTensor cache); with seeds 2 and 3, 1.57 and 1.28.
"""

from __future__ import annotations

from dataclasses import replace

import arviz as az
import numpy as np
import pandas as pd
import pytest

from calib.fit import SamplerSettings, run_nuts, run_pymc
from calib.model import get_model, model_coords, simulate_from_model, synthetic_model_data
from calib.priors import load_priors

pytestmark = [
    pytest.mark.slow,
    # pip-installed PyTensor warns once per graph that it found no BLAS to link
    pytest.mark.filterwarnings("ignore:PyTensor could not link to a BLAS"),
]

PRIORS = load_priors()
NAMES = [
    "b_pop",
    "tau",
    "b",
    "per_layer_us",
    "per_request_us",
    "per_step_us",
    "alpha",
    "sigma",
    "stall_prob",
    "stall_log_mult",
    "stall_log_sd",
]
#: As in tests/test_recovery.py (now also the project default): small problems (wide
#: posteriors) leave a few divergent transitions at 0.95.
TARGET_ACCEPT = 0.99
#: Largest share of divergent transitions per run (as tests/test_recovery.py: 5 per 1000).
MAX_DIVERGENT_SHARE = 0.005
#: The project's max tree depth and mass matrix, one seed per backend.
SAMPLER = SamplerSettings(
    chains=4, warmup=1000, draws=1000, chain_method="sequential", target_accept=TARGET_ACCEPT
)


@pytest.mark.parametrize("hierarchy", ["per-model"])
def test_pymc_and_numpyro_agree(hierarchy):
    pytest.importorskip("pymc")
    design = synthetic_model_data(400, 2, 2, seed=21, tp2_models=(1,))
    truth = dict(
        b=np.array([[1.8, 1.5, 2.5, 1.6, 1.15, 2.0], [1.6, 1.4, 2.2, 1.9, 1.3, 2.4]]),
        per_layer_us=8.0,
        per_request_us=12.0,
        per_step_us=150.0,
        alpha=0.6,
        sigma=np.array([0.1, 0.15]),
        stall_prob=0.02,
        stall_log_mult=0.7,
        stall_log_sd=0.3,
    )
    y, _ = simulate_from_model(hierarchy, design, params=truth, seed=22)
    data = design._replace(duration_us=y, log_duration=np.log(y))
    coords = model_coords(data, ["m0", "m1"], [f"e{i}" for i in range(4)])

    idata_np = run_nuts(
        get_model(hierarchy),
        data,
        PRIORS,
        coords=coords,
        settings=replace(SAMPLER, seed=0),
        progress=False,
    )
    idata_pm = run_pymc(
        get_model(hierarchy),
        data,
        PRIORS,
        coords=coords,
        settings=replace(SAMPLER, seed=1),
        progress=False,
        hierarchy=hierarchy,
    )
    for idata in (idata_np, idata_pm):
        div = idata.sample_stats["diverging"].values
        print(f"{idata.attrs['sampler']}: {int(div.sum())} divergent of {div.size}")
        assert div.mean() <= MAX_DIVERGENT_SHARE, idata.attrs["sampler"]
    # log scale (see the module docstring); unrounded: ArviZ's default 3 decimals turn a
    # small MCSE into 0 and z into NaN
    a = az.summary(np.log(idata_np.posterior[NAMES]), round_to="none")
    b = az.summary(np.log(idata_pm.posterior[NAMES]), round_to="none").loc[a.index]
    # the (m0, tp) entry is not a parameter (equals b_pop[tp]) but must agree too
    z = (a["mean"] - b["mean"]).abs() / np.sqrt(a["mcse_mean"] ** 2 + b["mcse_mean"] ** 2)
    table = pd.DataFrame(
        {
            "numpyro": a["mean"],
            "mcse": a["mcse_mean"],
            "pymc": b["mean"],
            "mcse_pymc": b["mcse_mean"],
            "z": z.round(2),
        }
    )
    print(table.to_string())
    assert z.notna().all() and len(z) == 31, table
    bad = z[z > 3]
    assert bad.empty, f"posterior means disagree:\n{bad}"
    for summ in (a, b):  # R-hat to 2 decimals, as the gate reports it
        assert (summ["r_hat"].round(2) <= 1.01).all(), summ["r_hat"]
