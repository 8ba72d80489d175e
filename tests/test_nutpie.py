"""``--backend nutpie`` samples the same posterior as NumPyro (slow; needs ``calib[nutpie]``).

Run: ``python -m pytest -m slow tests/test_nutpie.py -q -s``.

The problem and the rule are those of tests/test_pymc_agree.py: a small per-model problem
(400 steps, 2 models, one at TP=2), the project's sampler settings (max tree depth, dense
mass -> nutpie's low-rank mass matrix, target_accept 0.99), 4 chains x 1000 draws per
backend; the posterior means of log(parameter) must agree within 3.5 combined Monte-Carlo
standard errors (31 comparisons: 3.5 leaves a ~1 % chance of a false alarm), both runs
converged (R-hat <= 1.01, at most 0.5 % divergent draws), and nutpie's sample statistics
must carry everything the diagnostics gate reads (its tree-depth check is not "not
recorded").
"""

from __future__ import annotations

import math
from dataclasses import replace

import arviz as az
import numpy as np
import pandas as pd
import pytest

from calib import diagnostics
from calib.fit import SamplerSettings, run_nuts, run_pymc
from calib.model import get_model, model_coords, simulate_from_model, synthetic_model_data
from calib.priors import load_priors

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:PyTensor could not link to a BLAS"),
]

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
SAMPLER = SamplerSettings(
    chains=4, warmup=1000, draws=1000, chain_method="parallel", target_accept=0.99
)
MAX_Z = 3.5
MAX_DIVERGENT_SHARE = 0.005


def test_nutpie_and_numpyro_agree():
    pytest.importorskip("nutpie")
    priors = load_priors()
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
    y, _ = simulate_from_model("per-model", design, params=truth, seed=22)
    data = design._replace(duration_us=y, log_duration=np.log(y))
    coords = model_coords(data, ["m0", "m1"], [f"e{i}" for i in range(4)])

    idata_np = run_nuts(
        get_model("per-model"),
        data,
        priors,
        coords=coords,
        settings=replace(SAMPLER, seed=0),
        progress=False,
    )
    idata_nt = run_pymc(
        get_model("per-model"),
        data,
        priors,
        coords=coords,
        settings=replace(SAMPLER, seed=1),
        progress=False,
        hierarchy="per-model",
        nuts_sampler="nutpie",
    )
    assert idata_nt.attrs["sampler"] == "nutpie-nuts"
    assert idata_nt.posterior.sizes["chain"] == 4 and idata_nt.posterior.sizes["draw"] == 1000
    gate = diagnostics.check(idata_nt, SAMPLER.max_tree_depth)
    rows = {r.name: r for r in gate.rows}
    for name in ("divergences", "ebfmi", "tree_depth"):
        assert math.isfinite(rows[name].value), rows[name]
    for idata in (idata_np, idata_nt):
        div = idata.sample_stats["diverging"].values
        print(f"{idata.attrs['sampler']}: {int(div.sum())} divergent of {div.size}")
        assert div.mean() <= MAX_DIVERGENT_SHARE, idata.attrs["sampler"]
    a = az.summary(np.log(idata_np.posterior[NAMES]), round_to="none")
    b = az.summary(np.log(idata_nt.posterior[NAMES]), round_to="none").loc[a.index]
    z = (a["mean"] - b["mean"]).abs() / np.sqrt(a["mcse_mean"] ** 2 + b["mcse_mean"] ** 2)
    table = pd.DataFrame(
        {
            "numpyro": a["mean"],
            "mcse": a["mcse_mean"],
            "nutpie": b["mean"],
            "mcse_nutpie": b["mcse_mean"],
            "z": z.round(2),
        }
    )
    print(table.to_string())
    assert z.notna().all() and len(z) == 31, table
    bad = z[z > MAX_Z]
    assert bad.empty, f"posterior means disagree:\n{bad}"
    for summ in (a, b):
        assert (summ["r_hat"].round(2) <= 1.01).all(), summ["r_hat"]
