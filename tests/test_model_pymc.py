"""The PyMC mirror has the same sites and the same joint density as the NumPyro model.

Run: ``python -m pytest -m slow tests/test_model_pymc.py -q``.
"""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.posteriors import two_model_data
from numpyro import handlers
from numpyro.infer.util import log_density

from calib.geometry import SHARE_COMPONENTS, active_pairs
from calib.model import PARAMETER_SITES, get_model, model_coords
from calib.priors import load_priors

PRIORS = load_priors()


@pytest.mark.slow  # PyTensor compiles C code: minutes on a cold cache
@pytest.mark.parametrize("hierarchy", ["per-model", "per-experiment"])
def test_pymc_joint_density_equals_numpyro(hierarchy):
    pytest.importorskip("pymc")
    from calib.model_pymc import build_pymc_model

    data = two_model_data(200, seed=4, sim_seed=5, hierarchy=hierarchy, b=np.full((2, 6), 1.5))
    model = get_model(hierarchy)
    with handlers.seed(rng_seed=2):
        tr = handlers.trace(model).get_trace(data, PRIORS)
    latent = {
        k: np.asarray(s["value"])
        for k, s in tr.items()
        if s["type"] == "sample" and not s["is_observed"]
    }
    coords = model_coords(data, ["m0", "m1"], [f"e{i}" for i in range(4)])
    pmod = build_pymc_model(hierarchy, data, PRIORS, coords)
    assert {rv.name for rv in pmod.free_RVs} == set(latent)
    named = {v.name for v in pmod.deterministics} | {rv.name for rv in pmod.free_RVs}
    assert {n for n in PARAMETER_SITES if n in tr} <= named
    logp = pmod.compile_logp(jacobian=False)
    # the prior draw, and the same with the collinear corrections (pf_kv, tp) grown far
    # into the room of their pinned constants (calib.geometry.bounded_share)
    _, ak = active_pairs(data)
    grown = dict(latent, log_b_active=latent["log_b_active"] + 12.0 * np.isin(ak, SHARE_COMPONENTS))
    for values in (latent, grown):
        lp_np = float(log_density(model, (data, PRIORS), {}, values)[0])
        point = {}
        for rv in pmod.free_RVs:
            value = values[rv.name]
            tf = pmod.rvs_to_transforms[rv]
            if tf is not None:
                value = tf.forward(value, *rv.owner.inputs).eval()
            point[pmod.rvs_to_values[rv].name] = value
        assert float(logp(point)) == pytest.approx(lp_np, rel=1e-9, abs=1e-6)
