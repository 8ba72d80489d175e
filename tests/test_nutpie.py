"""``--backend nutpie`` samples the same posterior as NumPyro (slow; needs ``calib[nutpie]``).

Run: ``python -m pytest -m slow tests/test_nutpie.py -q -s``.

The problem and the rule are those of tests/test_pymc_agree.py: a small per-model problem
(400 steps, 2 models, one at TP=2), the project's sampler settings (max tree depth, dense
mass -> nutpie's low-rank mass matrix, target_accept 0.99), 4 chains x 1000 draws per
backend; the posterior means of log(parameter) must agree within 3.5 combined Monte-Carlo
standard errors (33 comparisons, counted by ``assert_backends_agree``: at 3.5 each has a
two-sided normal tail of 4.7e-4, so ~1.5 % chance of a false alarm in all), both runs
converged (R-hat <= 1.01, at most 0.5 % divergent draws), and nutpie's sample statistics
must carry everything the diagnostics gate reads (its tree-depth check is not "not
recorded").
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from fixtures.posteriors import assert_backends_agree, two_model_data

from calib import diagnostics
from calib.fit import SamplerSettings, run_nuts, run_pymc
from calib.model import get_model, model_coords
from calib.priors import load_priors

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:PyTensor could not link to a BLAS"),
]

SAMPLER = SamplerSettings(
    chains=4, warmup=1000, draws=1000, chain_method="parallel", target_accept=0.99
)
MAX_Z = 3.5
MAX_DIVERGENT_SHARE = 0.005


def test_nutpie_and_numpyro_agree():
    pytest.importorskip("nutpie")
    priors = load_priors()
    data = two_model_data(400, seed=21, sim_seed=22)
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
    assert_backends_agree(idata_np, idata_nt, max_z=MAX_Z, max_divergent_share=MAX_DIVERGENT_SHARE)
