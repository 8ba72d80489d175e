"""Closed loop (calib/closed_loop.py): exported coefficients through calib's scheduler.

The "observed" experiment is simulated by the same scheduler with a step-time hook that
evaluates BLIS's formula directly (``blis_step_time_us`` of ``step_components``, JAX, per
step), and its latencies are computed here with BLIS's accounting, independently of
``calib.closed_loop``. The closed loop replaying it with the right coefficients must
reproduce it; with two betas swapped or one alpha dropped it must not.
"""

from __future__ import annotations

import numpy as np
import pytest

from calib import config
from calib.arch import load_architecture
from calib.closed_loop import (
    Coefficients,
    ExperimentPlan,
    LinearStepTime,
    judge,
    probe_features,
    replay_experiment,
    step_time_weights,
)
from calib.hardware import load_hardware
from calib.predict import StepFeatures, betas_from_params, blis_step_time_us
from calib.roofline import arch_consts, step_components
from calib.simulate import ExperimentSpec, RequestPlan, simulate_experiment

MODEL = "meta-llama/Llama-2-7b-hf"
# corrections in config.COMPONENTS order (pf_compute, pf_kv, dc_compute, dc_kv, weight, tp):
# distinct enough that a swap of two betas changes the step times
B = [0.6, 3.0, 2.2, 1.4, 1.3, 0.9]
BETAS = betas_from_params(B, per_layer_us=40.0, per_request_us=6.0, per_step_us=300.0)
ALPHAS = [20_000.0, 300_000.0, 1_500.0]  # queueing, post-decode, per output token (µs)


class DirectBlis:
    """BLIS's step time evaluated directly on each batch (the reference, not the weights)."""

    def __call__(self, batch, arch, hw, tp, rng):
        c = step_components(
            arch_consts(arch, hw, tp),
            batch.new_tokens,
            batch.progress,
            batch.prompt_len,
            batch.phase,
            batch.mask,
        )
        f = StepFeatures(
            np.column_stack([np.asarray(getattr(c, k)) for k in config.COMPONENTS]),
            np.asarray(c.num_layers),
            np.asarray(c.batch_size),
            np.asarray(c.num_moe_layers),
        )
        return np.maximum(1.0, np.trunc(blis_step_time_us(BETAS, f)))


@pytest.fixture(scope="module")
def observed():
    rng = np.random.default_rng(3)
    n = 40
    arrived = np.sort(rng.uniform(0, 4e6, n))  # µs: ~10 req/s
    prompt = rng.integers(200, 900, n)
    out = rng.integers(20, 120, n)
    group = rng.integers(0, 3, n)
    spec = ExperimentSpec(
        model=MODEL,
        tp=1,
        workload="test",
        shared_prefix={
            "num_unique_system_prompts": 3,
            "num_users_per_system_prompt": 1,
            "system_prompt_len": 64,
            "question_len": 1,
            "output_len": 1,
        },
        stages=((10.0, 4.0),),
        max_num_seqs=16,
    )
    res = simulate_experiment(
        spec,
        seed=0,
        step_time=DirectBlis(),
        requests=RequestPlan(
            queued_us=arrived + ALPHAS[0],
            prompt_len=prompt,
            output_len=out,
            prefix_group=group,
            prefix_len=64,
        ),
        batch_summary_rate=0.0,
        snapshot_rate=0.0,
    )
    rq = res.requests
    q, ft, fin = (rq[k] / 1e3 for k in ("queued_ns", "first_token_ns", "finished_ns"))
    a0, a1, a2 = ALPHAS
    # BLIS (sim/simulator.go): TTFT = first-token step end + α₂ − arrival;
    # ITL = step + α₂ per token; E2E = TTFT + Σ ITL + α₁
    ttft = a0 + (ft - q) + a2
    e2e = ttft + (fin - ft) + (out - 1) * a2 + a1
    itl = (fin - ft) / (out - 1) + a2
    obs = {"e2e": float(e2e.mean()), "ttft": float(ttft.mean()), "itl": float(itl.mean())}
    plan = ExperimentPlan(
        name="exp",
        model="llama-2-7b",
        spec=spec,
        arrived_us=arrived,
        has_api=np.ones(n, bool),
        prompt_len=prompt,
        output_len=out,
        prefix_group=group,
        prefix_len=64,
        kv_blocks_total=None,
        compared=np.ones(n, bool),
        observed_us=obs,
    )
    return plan, res


def _probes():
    return probe_features(load_architecture(MODEL), load_hardware("H100-SXM"), 1)


def _errors(plan, betas, alphas):
    means = replay_experiment(plan, step_time_weights(betas, _probes()), alphas)
    return {m: 100.0 * (means[m] - plan.observed_us[m]) / plan.observed_us[m] for m in means}


def test_weights_equal_blis_formula_on_random_batches():
    rng = np.random.default_rng(0)
    n, w = 50, 12
    phase = rng.integers(0, 3, (n, w)).astype(np.int8)
    mask = phase > 0
    new = np.where(phase == 1, rng.integers(1, 600, (n, w)), 1)
    prog = rng.integers(0, 3000, (n, w))
    plen = prog + new + rng.integers(0, 50, (n, w))
    from calib.simulate.truth import StepBatch

    batch = StepBatch(phase, new, prog, plen, mask)
    arch, hw = load_architecture(MODEL), load_hardware("H100-SXM")
    ref = DirectBlis()(batch, arch, hw, 1, None)
    got = LinearStepTime(step_time_weights(BETAS, _probes()))(batch, arch, hw, 1, None)
    np.testing.assert_allclose(got, ref, atol=1.0)  # both truncated to whole µs
    assert np.mean(got == ref) > 0.9


def test_nonlinear_betas_are_refused():
    with pytest.raises(ValueError, match="not linear"):
        step_time_weights(BETAS[:8], _probes())  # < 9 betas: BLIS takes max(compute, kv)


def test_exported_coefficients_reproduce_the_experiment(observed):
    plan, res = observed
    assert res.stats["preemptions"] == 0 and res.stats["cached_tokens"] > 0
    err = _errors(plan, BETAS, ALPHAS)
    for m, e in err.items():
        assert abs(e) < 0.5, (m, e)


@pytest.mark.parametrize("i,j", [(0, 1), (8, 9), (0, 8), (2, 3)])
def test_swapped_betas_are_caught(observed, i, j):
    plan, _ = observed
    swapped = list(BETAS)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    err = _errors(plan, swapped, ALPHAS)
    assert max(abs(e) for e in err.values()) > 2.0, err


@pytest.mark.parametrize("k", [0, 1, 2])
def test_dropped_alpha_is_caught(observed, k):
    plan, _ = observed
    alphas = list(ALPHAS)
    alphas[k] = 0.0
    err = _errors(plan, BETAS, alphas)
    assert max(abs(e) for e in err.values()) > 2.0, err


def test_judge_fails_outside_band_and_over_target(observed):
    plan, _ = observed
    obs = plan.observed_us
    point = [obs["e2e"] * 1.01, obs["ttft"], obs["itl"]]
    ok = np.array([point, [v * 0.97 for v in point], [v * 1.02 for v in point]])[:, None, :]
    res = judge([plan], ok, ["fitted"], prob=0.9)
    assert res.passed, res.table
    far = ok * 1.2  # 20 % over: E2E target 10 %
    res = judge([plan], far, ["fitted"], prob=0.9)
    assert not res.passed and "over the target" in res.message
    narrow = np.array([point, point, point])[:, None, :]  # band excludes observed E2E
    res = judge([plan], narrow, ["fitted"], prob=0.9)
    assert not res.passed and "outside the band" in res.message
    assert Coefficients(point={}, draws=[]).draws == []


def test_per_draw_betas_average_to_the_exported_point():
    """Commit 2c60bfe: each draw's betas are mean_factor·coefficients, as the export's point.

    With every posterior draw replayed, the mean over draws of a fitted model's per-draw
    betas is the exported point (the posterior mean of mean_factor·coefficient) to float
    precision. The posterior's mean factor is ≥ 1 % away from 1 here, so per-draw betas
    without it (the body median, as before the fix) would miss by ~100x the tolerance;
    the population set draws b_pop·exp(tau·z) and agrees within its Monte Carlo error.
    """
    from fixtures.posteriors import make_replay_dataset, mock_posterior

    from calib import noise
    from calib.closed_loop import exported_coefficients
    from calib.export import population_name
    from calib.posterior import flat_draws, model_coords

    ds, features, truth = make_replay_dataset(seed=1, steps_per_exp=300, requests_per_exp=20)
    idata = mock_posterior(ds, features, truth)
    post = flat_draws(idata)
    models = model_coords(idata)["model"]
    n = post["b"].shape[0]
    factor = noise.mean_factor(*noise.posterior_params(post, len(models)))
    assert np.all(np.abs(factor.mean(axis=0) - 1.0) > 0.01), factor.mean(axis=0)

    coeffs, _ = exported_coefficients(idata, draws=n, alpha_coeffs=ALPHAS)
    assert len(coeffs.draws) == n
    for name in models:
        point = np.array(coeffs.point[name][1])
        per_draw = np.array([d[name][1] for d in coeffs.draws])
        np.testing.assert_allclose(per_draw.mean(axis=0), point, rtol=1e-9, atol=1e-12)
        assert all(d[name][0] == ALPHAS for d in coeffs.draws)
    pop = population_name()
    point = np.array(coeffs.point[pop][1])
    per_draw = np.array([d[pop][1] for d in coeffs.draws]).mean(axis=0)
    on = point > 0
    np.testing.assert_allclose(per_draw[on], point[on], rtol=0.05)
