"""Sampler coordinates (calib.geometry): the sampler's density is the natural one plus log|J|."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures.posteriors import model_design, model_trace
from numpyro import handlers

from calib import config
from calib.model import get_model
from calib.priors import load_priors

PRIORS = load_priors()


@pytest.fixture(scope="module")
def design():
    return model_design()


@pytest.mark.parametrize("hierarchy", ["per-model", "per-experiment"])
def test_pinned_coordinates_carry_the_natural_density(design, hierarchy, monkeypatch):
    """log p_raw(θ) = log p_natural(T θ) + log |det ∂T/∂θ| at random raw points.

    T maps the sampled coordinates (``z_c_<pinned component>``, the bounded
    ``z_per_layer_us``, ``z_per_step_us``, ``z_per_request_us``, ``z_b_pop`` with the
    pinned and other centred components' entries relative to their models' mean) to the
    natural ones (centred log b of those pairs, the softplus coordinates of the overheads,
    the prior's standardised log b_pop); every other site maps to itself (the centred
    entries of ``log_b_active`` are log b in both).
    """
    from numpyro.infer.util import log_density

    model = get_model(hierarchy)
    tr = model_trace(hierarchy, design, True)
    raw = {
        k: v["value"]
        for k, v in tr.items()
        if v["type"] == "sample" and not v.get("is_observed", False)
    }
    from calib.geometry import bounded_overheads, pinned

    pinned_cols = list(pinned())
    assert len(pinned_cols) >= 2
    bounded = bounded_overheads(design)
    assert set(bounded) == {"per_layer_us", "per_step_us", "per_request_us"}
    changed = list(pinned().values()) + [f"z_{site}" for site in bounded] + ["z_b_pop"]
    assert all(k in raw for k in changed)
    monkeypatch.setattr(config, "PINNED_COMPONENTS", ())
    monkeypatch.setattr(config, "RECENTRED_POPULATION", False)
    nat_names = [
        k
        for k, v in model_trace(hierarchy, design, True).items()
        if v["type"] == "sample" and not v.get("is_observed", False)
    ]
    monkeypatch.undo()
    # positions of the pinned pairs inside the natural model's ``log_b_active``
    act = np.asarray(design.active)
    am, ak = np.nonzero(act)

    def to_natural(flat_changed, rest):
        p = dict(rest)
        off = 0
        for k in changed:
            n = int(np.size(raw[k]))
            p[k] = flat_changed[off : off + n].reshape(np.shape(raw[k]))
            off += n
        t = handlers.trace(handlers.substitute(model, data=p)).get_trace(
            design, PRIORS, centered=True
        )
        log_b = jnp.log(t["b"]["value"])
        tail = t["log_b_active"]["value"]
        full = jnp.zeros(am.size)
        keep = ~np.isin(ak, pinned_cols)
        full = full.at[np.flatnonzero(keep)].set(tail)
        pin = np.flatnonzero(~keep)
        full = full.at[pin].set(log_b[am[pin], ak[pin]])
        z_r = []
        for site in bounded:  # softplus coordinates of the natural model
            y = t[site]["value"] / PRIORS[site]["median"]
            z_r.append(y + jnp.log(-jnp.expm1(-y)))
        loc, scale = PRIORS.lognormal_loc_scale("b_pop")  # natural z_b_pop
        z_pop = (jnp.log(t["b_pop"]["value"]) - jnp.asarray(loc)) / jnp.asarray(scale)
        return full, jnp.concatenate([jnp.stack(z_r), z_pop])

    rng = np.random.default_rng(5)
    for _ in range(3):
        point = {k: np.asarray(v) for k, v in raw.items()}
        for k in changed:
            point[k] = point[k] + rng.normal(0.0, 0.2, np.shape(point[k]))
        flat = jnp.concatenate([jnp.ravel(jnp.asarray(point[k])) for k in changed])
        rest = {k: v for k, v in point.items() if k not in changed}
        lp_raw, _ = log_density(model, (design, PRIORS), {"centered": True}, point)

        def out(f, rest=rest):
            full, z_r = to_natural(f, rest)
            return jnp.concatenate([full, z_r])

        J = jax.jacfwd(out)(flat)
        # rows that change: the pinned pairs of log_b_active, the bounded overheads'
        # coordinates and z_b_pop (re-centred for the pinned components)
        pinned_rows = np.flatnonzero(np.isin(ak, pinned_cols))
        rows = np.concatenate([pinned_rows, am.size + np.arange(len(bounded) + 6)])
        _, logdet = np.linalg.slogdet(np.asarray(J)[rows])
        full, z_r = to_natural(flat, rest)
        nat = dict(
            rest,
            log_b_active=full,
            z_b_pop=z_r[len(bounded) :],
            **{f"z_{site}": z_r[i] for i, site in enumerate(bounded)},
        )
        monkeypatch.setattr(config, "PINNED_COMPONENTS", ())
        monkeypatch.setattr(config, "RECENTRED_POPULATION", False)
        assert sorted(nat) == sorted(nat_names)
        lp_nat, _ = log_density(model, (design, PRIORS), {"centered": True}, nat)
        monkeypatch.undo()
        np.testing.assert_allclose(float(lp_raw), float(lp_nat) + logdet, rtol=0, atol=1e-6)
