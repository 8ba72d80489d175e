"""BLIS's module contract for a step-time model, on the exported plug-in predictor.

The exported predictor is ``calib.predict.blis_step_time_us`` (the BLIS
trained-physics formula on the exported ``beta_coeffs``, what BLIS runs) and, for the
fitted form with the prefill/decode mixing ``alpha``, ``plugin_step_time_us``.

* INV-M-1  predicted time > 0 for every non-empty batch;
* INV-M-2  deterministic (bit-identical on repeated calls and on copies of the input);
* INV-M-3  side-effect free (inputs unchanged, read-only inputs accepted, NumPy's
  global random state untouched, nothing printed);
* INV-M-5  soft monotonicity: adding tokens or KV length to a random batch lowers the
  prediction in < 5 % of perturbations (hypothesis property test).

INV-M-4 (< 1 ms per prediction at batch 128) is ``bench/bench_predict.py``; INV-M-6
(|MSPE| < 5 % on held-out steps) is reported by ``scripts/validate.py``.

Coefficient sets: BLIS iter29 (``priors/blis-iter29.yaml``, 11 betas), a posterior-mean
set of the kind ``calib.export`` writes (10 betas, from per-model corrections), and
a 7-beta set (BLIS's max(compute, KV) forms).
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calib import config
from calib.arch import load_architecture
from calib.hardware import load_hardware
from calib.predict import StepFeatures, betas_from_params, blis_step_time_us, plugin_step_time_us
from calib.roofline import arch_consts, step_components

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
WIDTH = 128

#: BLIS iter29 trained-physics betas (11 values, BLIS order).
ITER29 = [
    0.152128,
    0.0,
    1.36252915,
    0.752037,
    32.09546717,
    4.41684444,
    126.024825,
    481.8613888,
    0.0,
    1.94710771,
    0.752037,
]
#: A posterior-mean set as calib.export writes it (corrections in COMPONENTS order).
POSTERIOR_MEAN = dict(
    b=[0.62, 0.35, 0.48, 1.21, 1.08, 0.83],
    per_layer_us=7.9,
    per_request_us=3.1,
    per_step_us=148.0,
    alpha=0.31,
)
BETA_SETS = {
    "iter29": ITER29,
    "posterior-mean": betas_from_params(
        POSTERIOR_MEAN["b"],
        POSTERIOR_MEAN["per_layer_us"],
        POSTERIOR_MEAN["per_request_us"],
        POSTERIOR_MEAN["per_step_us"],
    ),
    "seven-betas": ITER29[:7],
}
SETUPS = (("llama-2-7b", 1), ("llama-2-70b", 4), ("mixtral-8x7b", 2), ("codellama-34b", 2))


def test_iter29_matches_the_bundled_prior_file():
    raw = yaml.safe_load((ROOT / "priors" / "blis-iter29.yaml").read_text())
    assert raw["blis"]["beta_coeffs"] == pytest.approx(ITER29)


# ------------------------------------------------------------------------ batches
def _consts(name: str, tp: int):
    return arch_consts(load_architecture(name), load_hardware("H100-SXM"), tp)


def _padded(batches: list[dict]) -> tuple[np.ndarray, ...]:
    """Schema-shaped (n, WIDTH) arrays: decodes first, then prefills, then padding."""
    n = len(batches)
    new = np.zeros((n, WIDTH), np.int32)
    prog = np.zeros((n, WIDTH), np.int32)
    plen = np.zeros((n, WIDTH), np.int32)
    phase = np.zeros((n, WIDTH), np.int8)
    for i, b in enumerate(batches):
        k = 0
        for ctx, prompt in b["decodes"]:
            new[i, k], prog[i, k], plen[i, k], phase[i, k] = 1, ctx, prompt, 2
            k += 1
        for chunk, done, prompt in b["prefills"]:
            new[i, k], prog[i, k], plen[i, k], phase[i, k] = chunk, done, prompt, 1
            k += 1
    return new, prog, plen, phase, phase > 0


def features(batches: list[dict], name: str = "llama-2-7b", tp: int = 1) -> StepFeatures:
    c = step_components(_consts(name, tp), *_padded(batches), dtype=np.float64)
    return StepFeatures(
        np.stack([np.asarray(getattr(c, k)) for k in config.COMPONENTS], axis=1),
        np.asarray(c.num_layers),
        np.asarray(c.batch_size),
        np.asarray(c.num_moe_layers),
    )


def random_batch(rng: np.random.Generator, max_requests: int = 96) -> dict:
    n_dc = int(rng.integers(0, max_requests))
    n_pf = int(rng.integers(0 if n_dc else 1, 3))
    decodes = []
    for _ in range(n_dc):
        prompt = int(rng.integers(16, 3000))
        decodes.append((prompt + int(rng.integers(0, 1000)), prompt))
    prefills = []
    for _ in range(n_pf):
        prompt = int(rng.integers(16, 4000))
        done = int(rng.integers(0, prompt))
        prefills.append((int(rng.integers(1, prompt - done + 1)), done, prompt))
    return {"decodes": decodes, "prefills": prefills}


def perturb(rng: np.random.Generator, b: dict) -> dict:
    """Add work: a decode request, longer KV of a decode, a bigger prefill chunk, more
    prefix already in the cache before a chunk, or a new prefill request."""
    dec = list(b["decodes"])
    pf = list(b["prefills"])
    kind = int(rng.integers(0, 5))
    if kind == 1 and dec:
        i = int(rng.integers(0, len(dec)))
        dec[i] = (dec[i][0] + int(rng.integers(1, 2000)), dec[i][1])
    elif kind == 2 and pf:
        i = int(rng.integers(0, len(pf)))
        chunk, done, prompt = pf[i]
        extra = int(rng.integers(1, 1024))
        pf[i] = (chunk + extra, done, max(prompt, done + chunk + extra))
    elif kind == 3 and pf:
        i = int(rng.integers(0, len(pf)))
        chunk, done, prompt = pf[i]
        more = int(rng.integers(1, 2000))
        pf[i] = (chunk, done + more, prompt + more)
    elif kind == 4 and len(dec) + len(pf) < WIDTH:
        prompt = int(rng.integers(16, 4000))
        pf.append((int(rng.integers(1, prompt + 1)), 0, prompt))
    elif len(dec) + len(pf) < WIDTH:
        prompt = int(rng.integers(16, 3000))
        dec.append((prompt + int(rng.integers(0, 1000)), prompt))
    return {"decodes": dec, "prefills": pf}


# ------------------------------------------------------------------------ INV-M-1..3
@pytest.fixture(scope="module")
def batch_features():
    rng = np.random.default_rng(7)
    batches = [random_batch(rng) for _ in range(300)]
    batches += [
        {"decodes": [(1, 1)], "prefills": []},  # smallest decode
        {"decodes": [], "prefills": [(1, 0, 1)]},
    ]  # one-token prefill
    return {s: features(batches, *s) for s in SETUPS}


@pytest.mark.parametrize("beta_name", list(BETA_SETS))
def test_inv_m1_positive_for_non_empty_batches(batch_features, beta_name):
    for (name, _tp), f in batch_features.items():
        t = blis_step_time_us(BETA_SETS[beta_name], f, interleaved_moe=name.startswith("mixtral"))
        assert np.all(np.isfinite(t)) and np.all(t > 0), (name, beta_name, t.min())
        ti = blis_step_time_us(BETA_SETS[beta_name], f, integer=True)
        assert np.all(ti >= 1)
    p = POSTERIOR_MEAN
    for f in batch_features.values():
        t = plugin_step_time_us(
            p["b"], p["per_layer_us"], p["per_request_us"], p["per_step_us"], p["alpha"], f
        )
        assert np.all(t > 0)


@pytest.mark.parametrize("beta_name", list(BETA_SETS))
def test_inv_m2_deterministic(batch_features, beta_name):
    f = batch_features[("llama-2-70b", 4)]
    betas = BETA_SETS[beta_name]
    first = blis_step_time_us(betas, f)
    for _ in range(3):
        again = blis_step_time_us(list(betas), StepFeatures(*(np.array(a, copy=True) for a in f)))
        assert np.array_equal(first, again)  # bit-identical
    # one step alone gives the same value as inside a batch of steps (no cross-talk)
    for i in (0, 17, len(f) - 1):
        alone = blis_step_time_us(betas, f.take(np.array([i])))
        assert alone[0] == first[i]


def test_inv_m3_side_effect_free(batch_features, capsys):
    f = batch_features[("mixtral-8x7b", 2)]
    ro = StepFeatures(*(np.array(a, copy=True) for a in f))
    for a in ro:
        a.setflags(write=False)  # a write would raise
    snapshot = [np.array(a, copy=True) for a in f]
    betas = np.array(BETA_SETS["iter29"])
    betas_before = betas.copy()
    np.random.seed(123)  # noqa: NPY002 (the global state is what is checked)
    state = np.random.get_state()  # noqa: NPY002
    out1 = blis_step_time_us(betas, ro, interleaved_moe=True)
    p = POSTERIOR_MEAN
    plugin_step_time_us(
        np.array(p["b"]), p["per_layer_us"], p["per_request_us"], p["per_step_us"], p["alpha"], ro
    )
    after = np.random.get_state()  # noqa: NPY002
    assert after[0] == state[0] and np.array_equal(after[1], state[1]) and after[2:] == state[2:]
    assert np.array_equal(betas, betas_before)
    for a, b in zip(ro, snapshot, strict=True):
        assert np.array_equal(a, b)
    out1[:] = -1.0  # mutating the result does not change a later prediction
    assert np.all(blis_step_time_us(betas, ro, interleaved_moe=True) > 0)
    assert capsys.readouterr() == ("", "")


# ------------------------------------------------------------------------ INV-M-5
PERTURBATIONS = 40


@settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    seed=st.integers(0, 2**31 - 1),
    setup=st.sampled_from(SETUPS),
    beta_name=st.sampled_from(sorted(BETA_SETS)),
    max_requests=st.integers(1, 110),
)
def test_inv_m5_soft_monotonicity(seed, setup, beta_name, max_requests):
    rng = np.random.default_rng(seed)
    base = random_batch(rng, max_requests)
    batches = [base] + [perturb(rng, base) for _ in range(PERTURBATIONS)]
    f = features(batches, *setup)
    t = blis_step_time_us(BETA_SETS[beta_name], f)
    lowered = np.mean(t[1:] < t[0] * (1 - 1e-12))
    assert lowered < 0.05, (setup, beta_name, lowered)
    p = POSTERIOR_MEAN
    tp = plugin_step_time_us(
        p["b"], p["per_layer_us"], p["per_request_us"], p["per_step_us"], p["alpha"], f
    )
    assert np.mean(tp[1:] < tp[0] * (1 - 1e-12)) < 0.05
