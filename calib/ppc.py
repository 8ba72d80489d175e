"""Posterior predictive group of a fitted posterior (for ``az.plot_ppc``).

For ``draws`` posterior draws (thinned evenly over chain × draw) and every fitted step,
one simulated duration from the model's likelihood: the draw's body-median step time
(:func:`calib.posterior.predict_step_time_us`) times the model's step noise
(:func:`calib.noise.sample`: log-normal body, stall and fast components, the full
tails, no clipping). Stored as ``posterior_predictive.duration_us`` with dims
(chain=1, draw, step), the name and step coordinate of ``observed_data.duration_us``.
Size: draws × steps float64 (200 × 10^4 steps = 16 MB); ``draws=0`` adds nothing.
"""

from __future__ import annotations

import numpy as np

from calib import config

__all__ = ["add_posterior_predictive"]


def add_posterior_predictive(idata, *, draws: int = config.PPC_DRAWS, seed: int = config.E2E_SEED):
    """Add (or replace) ``idata.posterior_predictive``; returns ``idata``."""
    import arviz as az

    from calib import noise
    from calib.posterior import flat_draws, model_data_from_idata, predict_step_time_us

    if draws <= 0:
        return idata
    data = model_data_from_idata(idata)
    mu = predict_step_time_us(idata, draws, data=data)  # (d, steps)
    post = flat_draws(idata, draws)
    rows = np.asarray(data.model_idx)
    params = noise.posterior_params(post, data.n_models)  # each (d, models)
    y = noise.sample(np.random.default_rng(seed), mu, *(p[:, rows] for p in params))[None]
    step = idata.observed_data["duration_us"].coords["step"].values
    ds = az.dict_to_dataset(
        {"duration_us": y}, coords={"step": step}, dims={"duration_us": ["step"]}, library=None
    )
    if "posterior_predictive" in idata.groups():
        del idata.posterior_predictive
    idata.add_groups(posterior_predictive=ds)
    return idata
