"""NumPyro and PyMC backends sample the same posterior (slow).

Run: ``python -m pytest -m slow tests/test_pymc_agree.py -q`` (``-s`` prints the table
of log-scale means, MCSEs and z). A cold PyTensor cache compiles C code for minutes more.

On a small per-model problem (400 steps, 2 models, one at TP=2) both fit runners
(:func:`calib.fit.run_nuts` and :func:`calib.fit.run_pymc`, the project's sampler
settings (max_tree_depth, dense mass) but target_accept 0.99) sample 4 chains x 1000
draws; the posterior mean of the log of every named parameter (all are positive) must
agree within 3.5 combined Monte-Carlo standard errors (ArviZ ``mcse_mean`` of each
backend, added in quadrature; 33 comparisons: at 3.5 each has a two-sided normal tail of
4.7e-4, so ~1.5 % chance of a false alarm in all, where 3.0 gave 8.5 %), and both runs
must have converged (R-hat <= 1.01, at most 0.5 % divergent transitions). Means on the
log scale, because some marginals here are wide and skewed (b_pop[pf_kv]: 90 % interval
0.29-5.5, prior-dominated): the natural-scale mean is then carried by the upper tail,
its sampling distribution is skewed, and a 3-MCSE rule fails far more often than its
nominal rate. Measured 2026-11-23 with this test's seeds: z 3.05 for b_pop[pf_kv] on the
natural scale (the test failed), 0.93 on the log scale (passes, 4 min 6 s with a warm
PyTensor cache); with seeds 2 and 3, 1.57 and 1.28. On the finite-mean noise model
(2026-12-03): passed, 33 values, largest z 1.73 (b_pop[weight]), 1 divergent draw of
4000 per backend, R-hat <= 1.01; 71 min wall on the 2-core machine at load 8-12.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from fixtures.posteriors import assert_backends_agree, two_model_data

from calib.fit import SamplerSettings, run_nuts, run_pymc
from calib.model import get_model, model_coords
from calib.priors import load_priors

pytestmark = [
    pytest.mark.slow,
    # pip-installed PyTensor warns once per graph that it found no BLAS to link
    pytest.mark.filterwarnings("ignore:PyTensor could not link to a BLAS"),
]

PRIORS = load_priors()
#: As in tests/test_recovery.py (now also the project default): small problems (wide
#: posteriors) leave a few divergent transitions at 0.95.
TARGET_ACCEPT = 0.99
#: Largest share of divergent transitions per run (as tests/test_recovery.py: 5 per 1000).
MAX_DIVERGENT_SHARE = 0.005
#: Largest |z| of a log-scale posterior mean (see the module docstring; as tests/test_nutpie.py).
MAX_Z = 3.5
#: The project's max tree depth and mass matrix, one seed per backend.
SAMPLER = SamplerSettings(
    chains=4, warmup=1000, draws=1000, chain_method="sequential", target_accept=TARGET_ACCEPT
)


@pytest.mark.parametrize("hierarchy", ["per-model"])
def test_pymc_and_numpyro_agree(hierarchy):
    pytest.importorskip("pymc")
    data = two_model_data(400, seed=21, sim_seed=22, hierarchy=hierarchy)
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
    # log scale (see the module docstring)
    assert_backends_agree(idata_np, idata_pm, max_z=MAX_Z, max_divergent_share=MAX_DIVERGENT_SHARE)
