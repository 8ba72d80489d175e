"""Sampler coordinates (calib.geometry): the sampler's density is the natural one plus log|J|."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures.posteriors import model_design, model_trace
from numpyro import handlers
from numpyro.infer.util import log_density

from calib import config
from calib.geometry import (
    SHARE_COMPONENTS,
    bounded_overheads,
    noncentered_columns,
    pinned,
    pinned_base_loc,
    pinned_sets,
)
from calib.model import get_model
from calib.priors import load_priors
from calib.vocab import PF_C

PRIORS = load_priors()


@pytest.fixture(scope="module")
def design():
    return model_design()


def _raw(trace) -> dict[str, np.ndarray]:
    return {
        k: np.asarray(v["value"])
        for k, v in trace.items()
        if v["type"] == "sample" and not v.get("is_observed", False)
    }


def _share_entries(design) -> np.ndarray:
    """Positions in ``log_b_active`` of the collinear corrections the pinned constants
    carry a share of (the bounded shares of calib.geometry.pinned_log_b)."""
    from calib.geometry import active_pairs

    am, ak = active_pairs(design)
    pins = pinned_sets(design).values()
    return np.flatnonzero(
        [
            k in SHARE_COMPONENTS and any(pin.shares[pin.models == m, k].sum() > 0 for pin in pins)
            for m, k in zip(am, ak, strict=True)
        ]
    )


def _own_share_of_pf_constant(design, trace) -> np.ndarray:
    """``b[m, pf_compute]·scale / c`` per pinned model: how much of its pinned prefill
    constant the model's own term is (the rest: collinear shares)."""
    pin = pinned_sets(design)[PF_C]
    c = np.exp(pinned_base_loc(pin, PF_C, PRIORS) + np.asarray(trace["z_c_pf_compute"]["value"]))
    return np.asarray(trace["b"]["value"])[pin.models, PF_C] * pin.scale / c


@pytest.mark.parametrize("hierarchy", ["per-model", "per-experiment"])
def test_pinned_coordinates_carry_the_natural_density(design, hierarchy, monkeypatch):
    """log p_raw(θ) = log p_natural(T θ) + log |det ∂T/∂θ| at random raw points, one of
    them with the collinear shares taking most of the pinned prefill constant.

    T maps the sampled coordinates (``z_c_<pinned component>``, the bounded
    ``z_per_layer_us``, ``z_per_step_us``, ``z_per_request_us``, ``z_b_pop`` with the
    pinned and other centred components' entries relative to their models' mean,
    ``log_b_active`` with the collinear shares below their room) to the natural ones
    (``log_b_active``: centred log b, non-centred (log b − log b_pop)/tau, the pinned
    pairs' log b among them; the softplus coordinates of the overheads; the prior's
    standardised log b_pop); every other site maps to itself.
    """
    model = get_model(hierarchy)
    tr = model_trace(hierarchy, design, True)
    raw = _raw(tr)
    pinned_cols = list(pinned())
    assert len(pinned_cols) >= 2
    bounded = bounded_overheads(design)
    assert set(bounded) == {"per_layer_us", "per_step_us", "per_request_us"}
    shares = _share_entries(design)
    assert shares.size >= 2  # pf_kv of both models, tp of the TP=2 one
    changed = (
        list(pinned().values()) + [f"z_{site}" for site in bounded] + ["z_b_pop", "log_b_active"]
    )
    assert all(k in raw for k in changed)
    monkeypatch.setattr(config, "PINNED_COMPONENTS", ())
    monkeypatch.setattr(config, "RECENTRED_POPULATION", False)
    nat_names = list(_raw(model_trace(hierarchy, design, True)))
    monkeypatch.undo()
    # natural model's ``log_b_active``: every active pair, pinned ones included
    act = np.asarray(design.active)
    am, ak = np.nonzero(act)
    nc = noncentered_columns(ak)

    def trace_at(flat_changed, rest):
        p = dict(rest)
        off = 0
        for k in changed:
            n = int(np.size(raw[k]))
            p[k] = flat_changed[off : off + n].reshape(np.shape(raw[k]))
            off += n
        return handlers.trace(handlers.substitute(model, data=p)).get_trace(
            design, PRIORS, centered=True
        )

    def to_natural(flat_changed, rest):
        t = trace_at(flat_changed, rest)
        log_b = jnp.log(t["b"]["value"])[am, ak]
        log_b_pop = jnp.log(t["b_pop"]["value"])[ak]
        full = jnp.where(nc, (log_b - log_b_pop) / t["tau"]["value"][ak], log_b)
        z_r = []
        for site in bounded:  # softplus coordinates of the natural model
            y = t[site]["value"] / PRIORS[site]["median"]
            z_r.append(y + jnp.log(-jnp.expm1(-y)))
        loc, scale = PRIORS.lognormal_loc_scale("b_pop")  # natural z_b_pop
        z_pop = (jnp.log(t["b_pop"]["value"]) - jnp.asarray(loc)) / jnp.asarray(scale)
        return full, jnp.concatenate([jnp.stack(z_r), z_pop])

    rng = np.random.default_rng(5)
    for i in range(4):
        point = {k: np.asarray(v) for k, v in raw.items()}
        for k in changed:
            point[k] = point[k] + rng.normal(0.0, 0.2, np.shape(point[k]))
        if i == 3:  # the collinear corrections grown far into their room
            point["log_b_active"] = point["log_b_active"].copy()
            point["log_b_active"][shares] += 12.0
        flat = jnp.concatenate([jnp.ravel(jnp.asarray(point[k])) for k in changed])
        rest = {k: v for k, v in point.items() if k not in changed}
        if i == 3:
            assert _own_share_of_pf_constant(design, trace_at(flat, rest)).min() < 0.2
        lp_raw, _ = log_density(model, (design, PRIORS), {"centered": True}, point)

        def out(f, rest=rest):
            return jnp.concatenate(to_natural(f, rest))

        _, logdet = np.linalg.slogdet(np.asarray(jax.jacfwd(out)(flat)))
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


@pytest.mark.parametrize("hierarchy", ["per-model", "per-experiment"])
def test_no_wall_inside_the_raw_space(design, hierarchy):
    """The log density and its gradient are finite at extreme raw values of every
    coordinate that builds the pinned constants: the collinear shares far above their
    room, the bounded overheads at either end, the pinned constants far out. (Before the
    shares were bounded, ``c − shares ≤ 0`` was a −∞ wall inside the raw space.)"""
    model = get_model(hierarchy)
    raw = _raw(model_trace(hierarchy, design, True))
    shares = _share_entries(design)
    pinned_sites = list(pinned().values())
    overheads = [f"z_{site}" for site in bounded_overheads(design)]
    for share, over, pin in [
        (40, 40, 0),
        (40, -40, 0),
        (300, 40, 0),
        (40, 40, 30),
        (-40, -40, -30),
    ]:
        point = {k: jnp.asarray(v) for k, v in raw.items()}
        point["log_b_active"] = point["log_b_active"].at[shares].set(float(share))
        for k in overheads:
            point[k] = jnp.asarray(float(over))
        for k in pinned_sites:
            point[k] = point[k] + pin
        lp, _ = log_density(model, (design, PRIORS), {"centered": True}, point)
        assert np.isfinite(float(lp)), (share, over, pin)
        grad = jax.grad(lambda p: log_density(model, (design, PRIORS), {"centered": True}, p)[0])(
            point
        )
        assert all(np.isfinite(np.asarray(g)).all() for g in grad.values()), (share, over, pin)
