"""NumPyro and PyMC backends sample the same posterior (slow).

Run: ``/work/venv/bin/pytest -m slow tests/test_pymc_agree.py -q`` (a few minutes).

On a small per-model problem (2 models, one at TP=2) both backends sample 4 chains
× 1000 draws; every named parameter's posterior mean must agree within 3 combined
Monte-Carlo standard errors (ArviZ ``mcse_mean`` of each backend, added in quadrature).
"""

from __future__ import annotations

import arviz as az
import jax
import numpy as np
import pytest
from numpyro.infer import MCMC, NUTS, init_to_median

from calib.model import (
    SITE_DIMS,
    get_model,
    model_coords,
    simulate_from_model,
    synthetic_model_data,
)
from calib.priors import load_priors

pytestmark = pytest.mark.slow

PRIORS = load_priors()
NAMES = ["b_pop", "tau", "b", "per_layer_us", "per_request_us", "per_step_us", "alpha",
         "sigma", "nu"]


@pytest.mark.parametrize("hierarchy", ["per-model"])
def test_pymc_and_numpyro_agree(hierarchy):
    import pymc as pm

    from calib.model_pymc import build_pymc_model

    design = synthetic_model_data(400, 2, 2, seed=21, tp2_models=(1,))
    truth = dict(b=np.array([[1.8, 1.5, 2.5, 1.6, 1.15, 2.0], [1.6, 1.4, 2.2, 1.9, 1.3, 2.4]]),
                 per_layer_us=8.0, per_request_us=12.0, per_step_us=150.0, alpha=0.6,
                 sigma=np.array([0.1, 0.15]), nu=8.0)
    y, _ = simulate_from_model(hierarchy, design, params=truth, seed=22)
    data = design._replace(duration_us=y, log_duration=np.log(y))
    coords = model_coords(data, ["m0", "m1"], [f"e{i}" for i in range(4)])

    mcmc = MCMC(NUTS(get_model(hierarchy), dense_mass=True, target_accept_prob=0.9,
                     init_strategy=init_to_median),
                num_warmup=1000, num_samples=1000, num_chains=4, chain_method="sequential",
                progress_bar=False)
    mcmc.run(jax.random.key(0), data, PRIORS)
    s = mcmc.get_samples(group_by_chain=True)
    dims = {k: list(SITE_DIMS[k]) for k in NAMES}
    idata_np = az.from_dict(posterior={k: np.asarray(s[k]) for k in NAMES}, coords=coords,
                            dims=dims)
    with build_pymc_model(hierarchy, data, PRIORS, coords):
        idata_pm = pm.sample(1000, tune=1000, chains=4, cores=1, random_seed=1,
                             target_accept=0.9, progressbar=False, compute_convergence_checks=False)
    a = az.summary(idata_np, var_names=NAMES)
    b = az.summary(idata_pm, var_names=NAMES).loc[a.index]
    # the (m0, tp) entry is not a parameter (equals b_pop[tp]) but must agree too
    z = (a["mean"] - b["mean"]).abs() / np.sqrt(a["mcse_mean"] ** 2 + b["mcse_mean"] ** 2)
    bad = z[z > 3]
    assert bad.empty, f"posterior means disagree:\n{bad}"
    assert (a["r_hat"] <= 1.01).all() and (b["r_hat"] <= 1.01).all()  # summary rounds to 0.01
