"""Step-time predictions: plug-in = model mean function, BLIS formula rules, module contract."""

from __future__ import annotations

import numpy as np
import pytest

from calib.predict import (
    StepFeatures,
    betas_from_params,
    blis_step_time_us,
    plugin_step_time_us,
    step_time_draws_us,
)


def _features(n=200, seed=0):
    rng = np.random.default_rng(seed)
    comps = rng.uniform(0, 3000, (n, 6))
    comps[::3, 0:2] = 0.0  # decode-only
    comps[1::3, 2:4] = 0.0  # prefill-only
    return StepFeatures(comps, np.full(n, 32.0), rng.integers(1, 128, n).astype(float), np.zeros(n))


B = np.array([1.5, 1.1, 2.0, 1.4, 1.2, 0.7])


def test_plugin_matches_model_step_time():
    from calib.model import make_model_data, step_time_us

    f = _features()
    data = make_model_data(f.components, f.num_layers, f.batch_size, np.zeros(len(f), int))
    params = {
        "b": B[None, :],
        "per_layer_us": 9.0,
        "per_request_us": 4.0,
        "per_step_us": 120.0,
        "alpha": 0.35,
    }
    ref = np.asarray(step_time_us(params, data))
    got = plugin_step_time_us(B, 9.0, 4.0, 120.0, 0.35, f)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    draws = step_time_draws_us(
        np.tile(B, (3, 1, 1)),
        np.full(3, 9.0),
        np.full(3, 4.0),
        np.full(3, 120.0),
        np.full(3, 0.35),
        f,
        np.zeros(len(f), int),
    )
    np.testing.assert_allclose(draws, np.tile(ref, (3, 1)), rtol=1e-12)


def test_blis_formula_rules():
    f = _features()
    betas = betas_from_params(B, 9.0, 4.0, 120.0)
    assert len(betas) == 10 and betas[7] == 0.0
    np.testing.assert_allclose(
        blis_step_time_us(betas, f), plugin_step_time_us(B, 9.0, 4.0, 120.0, 0.0, f), rtol=1e-12
    )
    # 8 betas: prefill and decode terms use max(compute, kv)
    b8 = betas[:8]
    c = f.components
    want = (
        b8[0] * np.maximum(c[:, 0], c[:, 1])
        + b8[1] * np.maximum(c[:, 2], c[:, 3])
        + b8[2] * c[:, 4]
        + b8[3] * c[:, 5]
        + b8[4] * 32
        + b8[5] * f.batch_size
        + b8[6]
    )
    np.testing.assert_allclose(blis_step_time_us(b8, f), want, rtol=1e-12)
    ints = blis_step_time_us(betas, f, integer=True)
    assert ints.dtype == np.int64 and (ints >= 1).all()
    np.testing.assert_array_equal(ints, np.maximum(1, np.trunc(blis_step_time_us(betas, f))))
    with pytest.raises(ValueError):
        blis_step_time_us(betas[:6], f)


def test_exported_module_contract_positive_and_deterministic():
    """(Its latency budget, < 1 ms at batch size 128, is bench/bench_predict.py's.)"""
    rng = np.random.default_rng(5)
    betas = betas_from_params(B, 9.0, 4.0, 120.0)
    for _ in range(20):  # any non-empty batch: positive
        f = _features(n=1, seed=int(rng.integers(1e6)))
        assert blis_step_time_us(betas, f)[0] > 0
    zero = StepFeatures(np.zeros((1, 6)), np.array([32.0]), np.array([1.0]), np.zeros(1))
    assert blis_step_time_us(betas, zero)[0] > 0
    f = _features(n=1)
    a = blis_step_time_us(betas, f)
    snapshot = f.components.copy()
    assert np.array_equal(a, blis_step_time_us(betas, f))
    assert np.array_equal(snapshot, f.components)  # no side effects on inputs
    # an empty batch costs nothing (BLIS: StepTime returns its 1 µs floor)
    empty = StepFeatures(
        np.array([[0, 0, 0, 0, 4000.0, 0]]), np.array([32.0]), np.zeros(1), np.zeros(1)
    )
    assert blis_step_time_us(betas, empty)[0] == 0.0
    assert blis_step_time_us(betas, empty, integer=True)[0] == 1
    assert plugin_step_time_us(B, 9.0, 4.0, 120.0, 0.3, empty)[0] == 0.0
