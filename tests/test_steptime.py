"""The one mean step-time function gives the same numbers in every array namespace."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from calib.steptime import step_time_us


def _case(n=50, seed=0):
    rng = np.random.default_rng(seed)
    terms = rng.uniform(0, 500, (6, n))
    terms[:2, rng.uniform(size=n) < 0.5] = 0.0  # decode-only steps
    L = np.full(n, 32.0)
    B = rng.integers(1, 64, n).astype(float)
    B[::7] = 0.0  # some empty batches
    return terms, L, B


def test_formula_by_hand():
    terms, L, B = _case()
    pf, dc = terms[0] + terms[1], terms[2] + terms[3]
    want = pf + dc - 0.4 * np.minimum(pf, dc) + terms[4] + terms[5] + 2.0 * L + 3.0 * B + 100.0
    want[B == 0] = 0.0
    got = step_time_us(np, terms, L, B, 2.0, 3.0, 100.0, 0.4)
    np.testing.assert_allclose(got, want, rtol=1e-15)
    assert (B == 0).any() and (got[B == 0] == 0).all()


def test_namespaces_agree():
    pytensor = pytest.importorskip("pytensor")
    import pytensor.tensor as pt

    terms, L, B = _case(seed=1)
    ref = step_time_us(np, terms, L, B, 2.0, 3.0, 100.0, 0.4)
    j = np.asarray(
        step_time_us(
            jnp,
            [jnp.asarray(t) for t in terms],
            jnp.asarray(L),
            jnp.asarray(B),
            2.0,
            3.0,
            100.0,
            0.4,
        )
    )
    np.testing.assert_allclose(j, ref, rtol=1e-12)
    tt = [pt.as_tensor(t) for t in terms]
    p = step_time_us(pt, tt, L, B, 2.0, 3.0, 100.0, 0.4).eval()
    np.testing.assert_allclose(p, ref, rtol=1e-12)
    del pytensor
