"""Synthetic canonical datasets and quick real posteriors for the posterior-product tests.

:func:`make_replay_dataset` builds a small dataset in the canonical schema's
variable names (only those the replay, baselines and API-overhead code read)
whose step durations come from the model itself (``calib.model.step_time_us`` plus
its Student-t noise) for a fixed step composition, and whose journey labels are
the teacher-forced sums of those durations plus the host gaps between steps, with
step and QUEUED timestamps consistent with them (as an engine logs them).
:func:`quick_posterior` fits it with the real sampler (few draws).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from calib import config
from calib.predict import StepFeatures

TRUTH = {
    "b": np.array([[1.6, 1.2, 2.5, 1.4, 1.15, 1.0],
                   [1.3, 1.5, 2.0, 1.8, 1.25, 1.8]]),
    "per_layer_us": 8.0, "per_request_us": 3.0, "per_step_us": 150.0, "alpha": 0.3,
    "sigma": np.array([0.08, 0.1]), "nu": 6.0,
}


def make_replay_dataset(*, seed: int = 0, n_models: int = 2, exps_per_model: int = 2,
                        steps_per_exp: int = 600, requests_per_exp: int = 60,
                        sample_rate: float = 0.1, gap_us: float = 0.0, truth=None,
                        api: bool = True, queued_fraction: float | None = None,
                        noise_seed: int | None = None, gap_sd_us: float = 0.0):
    """(ds, features, truth): a dataset, the roofline terms of all its steps, the truth.

    Step ids are consecutive from 10. Steps run back to back with a host gap between
    them (``gap_us``, normal with sd ``gap_sd_us``, at least 0): step s starts
    ``gap`` after step s − 1 ends (``bs_ts_start_ns``/``bs_ts_end_ns`` of sampled steps,
    integer ns). Each request is queued a uniform fraction into its QUEUED step
    (``queued_fraction`` fixes the remaining share of that step, e.g. 1.0: the whole
    step counts; ``req_queued_ts_us`` is that instant); FIRST_TOKEN and FINISHED
    happen at the end of their steps. Labels are differences of these instants.
    ``seed`` fixes the composition and request windows; ``noise_seed`` (default ``seed``)
    the model's step-time draws, the gaps and the sampled-step mask.
    """
    from calib.model import make_model_data, simulate_from_model

    truth = dict(TRUTH if truth is None else truth)
    truth["b"] = np.asarray(truth["b"])[:n_models]
    truth["sigma"] = np.asarray(truth["sigma"])[:n_models]
    rng = np.random.default_rng(seed)
    E = n_models * exps_per_model
    exp_model_idx = np.repeat(np.arange(n_models), exps_per_model)
    S = steps_per_exp
    step_exp = np.repeat(np.arange(E), S)
    step_id = np.tile(np.arange(S) + 10, E)
    midx = exp_model_idx[step_exp]
    layers = np.array([32.0, 80.0, 40.0])[midx]
    # composition: decodes in every step, a prefill chunk in ~40 %
    n_dec = rng.integers(4, 64, step_exp.size)
    has_pf = rng.uniform(size=step_exp.size) < 0.4
    pf_tok = np.where(has_pf, rng.integers(64, 1024, step_exp.size), 0)
    ctx = n_dec * rng.uniform(300, 1500, step_exp.size)
    rate = np.array([10.0, 14.0, 12.0])[midx]
    kv = np.array([0.04, 0.1, 0.07])[midx]
    comps = np.zeros((step_exp.size, 6))
    comps[:, 0] = pf_tok * rate
    comps[:, 1] = pf_tok * 0.3 * kv * 10
    comps[:, 2] = n_dec * rate
    comps[:, 3] = ctx * kv
    comps[:, 4] = np.array([4000.0, 9000.0, 6000.0])[midx]
    comps[:, 5] = np.where(midx == 1, (pf_tok + n_dec) * 0.4 + 10.0, 0.0)
    B = (n_dec + has_pf).astype(float)
    features = StepFeatures(comps, layers, B, np.zeros(step_exp.size))
    data = make_model_data(comps, layers, B, midx, step_exp, n_models=n_models,
                           n_experiments=E, experiment_model=exp_model_idx)
    noise_seed = seed if noise_seed is None else noise_seed
    dur, _ = simulate_from_model("per-model", data, params=truth, seed=noise_seed)
    sampled = np.random.default_rng([noise_seed, 1]).uniform(size=dur.size) < sample_rate

    gap = np.full(dur.size, float(gap_us))
    if gap_sd_us:
        gap = np.maximum(gap + gap_sd_us * np.random.default_rng([noise_seed, 2]).standard_normal(
            dur.size), 0.0)
    # wall clock: each experiment's first step starts at 1e9·(e+1) µs; gap before each step
    gap_before = gap.copy()
    gap_before[::S] = 0.0
    t_start = np.empty(dur.size)
    t_end = np.empty(dur.size)
    for e in range(E):
        sl = slice(e * S, (e + 1) * S)
        run = np.cumsum(gap_before[sl] + dur[sl])      # end of each step
        t_end[sl] = 1e9 * (e + 1) + run
        t_start[sl] = t_end[sl] - dur[sl]

    # requests: windows inside each experiment's step range; labels = teacher-forced sums
    R = requests_per_exp
    req_exp = np.repeat(np.arange(E), R)
    q = np.empty(R * E, np.int64)
    ft = np.empty(R * E, np.int64)
    fin = np.empty(R * E, np.int64)
    out_len = rng.integers(2, 200, R * E)
    for e in range(E):
        sl = slice(e * R, (e + 1) * R)
        qi = rng.integers(0, S - 260, R)
        fti = qi + rng.integers(0, 40, R)
        q[sl], ft[sl], fin[sl] = qi, fti, fti + out_len[sl] - 1
    base = req_exp * S
    share = (rng.uniform(size=R * E) if queued_fraction is None
             else np.full(R * E, float(queued_fraction)))
    # QUEUED: the last `share` of step q remains; labels = sums of durations and gaps
    wall = dur + gap_before                              # a step and the gap before it
    csum = np.concatenate([[0.0], np.cumsum(wall)])
    first = share * dur[base + q]
    e2e = first + csum[base + fin + 1] - csum[base + q + 1]
    ttft = first + csum[base + ft + 1] - csum[base + q + 1]
    queued_ts = t_end[base + q] - share * dur[base + q]
    ids = lambda pos: pos + 10  # noqa: E731 - step id of a position
    models = [f"model-{m}" for m in range(n_models)]
    experiments = [f"exp-{e}-{models[exp_model_idx[e]]}" for e in range(E)]
    n_req = R * E
    t_noise = rng.standard_t(4, size=(2, n_req))
    ds = xr.Dataset(
        {
            "exp_model": (("experiment",), np.array([models[m] for m in exp_model_idx])),
            "exp_arch_json": (("experiment",), np.array([json.dumps({})] * E)),
            "step_experiment": (("step",), step_exp.astype(np.int32)),
            "step_id": (("step",), step_id.astype(np.int64)),
            "duration_us": (("step",), np.where(sampled, dur, np.nan)),
            "sampled": (("step",), sampled),
            "bs_ts_start_ns": (("step",), np.where(sampled, np.round(t_start * 1e3), -1)
                               .astype(np.int64)),
            "bs_ts_end_ns": (("step",), np.where(sampled, np.round(t_end * 1e3), -1)
                             .astype(np.int64)),
            "prefill_tokens": (("step",), pf_tok.astype(np.int32)),
            "decode_tokens": (("step",), n_dec.astype(np.int32)),
            "num_prefill": (("step",), has_pf.astype(np.int32)),
            "num_decode": (("step",), n_dec.astype(np.int32)),
            "req_experiment": (("request",), req_exp.astype(np.int32)),
            "req_queued_step": (("request",), ids(q)),
            "req_scheduled_step": (("request",), ids(q)),
            "req_first_token_step": (("request",), ids(ft)),
            "req_finished_step": (("request",), ids(fin)),
            "req_failed": (("request",), np.zeros(n_req, bool)),
            "req_num_preemptions": (("request",), np.zeros(n_req, np.int32)),
            "req_output_len": (("request",), out_len.astype(np.int32)),
            "req_e2e_us": (("request",), e2e),
            "req_ttft_us": (("request",), ttft),
            "req_queued_ts_us": (("request",), queued_ts),
            "req_api_queue_us": (("request",), 15000.0 + 500.0 * t_noise[0] if api
                                 else np.full(n_req, np.nan)),
            "req_api_depart_us": (("request",), 800.0 + 40.0 * t_noise[1] if api
                                  else np.full(n_req, np.nan)),
        },
        coords={"experiment": experiments},
    )
    truth["true_step_us"] = dur
    truth["gap_us"] = gap_before
    return ds, features, truth


def quick_posterior(ds, features, *, hierarchy: str = "per-model", draws: int = 150,
                    warmup: int = 200, chains: int = 2, seed: int = 0):
    """A real (short) NUTS posterior of the sampled steps of ``ds``."""
    from calib.fit import SamplerSettings, fit_model_data
    from calib.model import make_model_data, model_coords

    steps = np.flatnonzero(np.asarray(ds["sampled"].values))
    step_exp = np.asarray(ds["step_experiment"].values)
    models = list(dict.fromkeys(str(m) for m in ds["exp_model"].values))
    em = np.array([models.index(str(m)) for m in ds["exp_model"].values])
    f = features.take(steps)
    data = make_model_data(f.components, f.num_layers, f.batch_size, em[step_exp[steps]],
                           step_exp[steps], np.asarray(ds["duration_us"].values)[steps],
                           n_models=len(models), n_experiments=ds.sizes["experiment"],
                           experiment_model=em)
    coords = model_coords(data, models, [str(x) for x in ds["experiment"].values], steps)
    res = fit_model_data(data, coords, hierarchy=hierarchy, progress=False,
                         settings=SamplerSettings(chains=chains, warmup=warmup, draws=draws,
                                                  seed=seed, chain_method="sequential"),
                         step_index=steps, data_hash="synthetic", command=["test"])
    return res.idata


def test_replay_dataset_labels_are_teacher_forced_sums():
    ds, features, truth = make_replay_dataset(steps_per_exp=300, requests_per_exp=10,
                                              queued_fraction=1.0)
    dur = truth["true_step_us"]
    step_exp = np.asarray(ds["step_experiment"].values)
    ids = np.asarray(ds["step_id"].values)
    r = 3
    e = int(ds["req_experiment"].values[r])
    sel = ((step_exp == e) & (ids >= int(ds["req_queued_step"].values[r]))
           & (ids <= int(ds["req_finished_step"].values[r])))
    assert float(ds["req_e2e_us"].values[r]) == pytest.approx(dur[sel].sum(), rel=1e-12)
    assert len(features) == ds.sizes["step"]
    assert 0.05 < float(np.mean(ds["sampled"].values)) < 0.15
    assert config.COMPONENTS[0] == "pf_compute"


def mock_posterior(ds, features, truth, *, draws: int = 200, chains: int = 2,
                   jitter: float = 0.02, hierarchy: str = "per-model", seed: int = 0):
    """A "mock sampler" InferenceData of the real posterior structure (no sampling).

    Draws scatter log-normally (sd ``jitter``) around ``truth``; ``constant_data`` and
    ``observed_data`` are the sampled steps of ``ds`` as ``calib.fit`` stores them.
    """
    import arviz as az
    import xarray as xr

    from calib.io import manifest
    from calib.model import make_model_data, model_coords
    from calib.posterior import modeldata_to_constant_data

    rng = np.random.default_rng(seed)
    steps = np.flatnonzero(np.asarray(ds["sampled"].values))
    step_exp = np.asarray(ds["step_experiment"].values)
    models = list(dict.fromkeys(str(m) for m in ds["exp_model"].values))
    experiments = [str(x) for x in ds["experiment"].values]
    em = np.array([models.index(str(m)) for m in ds["exp_model"].values])
    f = features.take(steps)
    data = make_model_data(f.components, f.num_layers, f.batch_size, em[step_exp[steps]],
                           step_exp[steps], np.asarray(ds["duration_us"].values)[steps],
                           n_models=len(models), n_experiments=len(experiments),
                           experiment_model=em)
    coords = model_coords(data, models, experiments, steps)
    M, E, K = len(models), len(experiments), 6
    shape = (chains, draws)

    def ln(center, extra=()):
        c = np.asarray(center, float)
        return c * np.exp(jitter * rng.standard_normal(shape + tuple(extra) + c.shape[len(extra):]))

    b = ln(np.asarray(truth["b"])[:M])
    post = {
        "b": (("chain", "draw", "model", "component"), b),
        "b_pop": (("chain", "draw", "component"), np.exp(np.log(b).mean(axis=2))),
        "tau": (("chain", "draw", "component"), np.abs(0.2 + 0.02 * rng.standard_normal(shape + (K,)))),
        "per_layer_us": (("chain", "draw"), ln(truth["per_layer_us"])),
        "per_request_us": (("chain", "draw"), ln(truth["per_request_us"])),
        "per_step_us": (("chain", "draw"), ln(truth["per_step_us"])),
        "alpha": (("chain", "draw"), np.clip(truth["alpha"] + jitter * rng.standard_normal(shape), 0, 1)),
        "sigma": (("chain", "draw", "model"), ln(np.asarray(truth["sigma"])[:M])),
        "nu": (("chain", "draw"), ln(truth["nu"])),
    }
    if hierarchy == "per-experiment":
        post["tau_exp"] = (("chain", "draw", "component"),
                           np.abs(0.05 + 0.01 * rng.standard_normal(shape + (K,))))
        post["b_exp"] = (("chain", "draw", "experiment", "component"),
                         b[:, :, em, :] * np.exp(0.01 * rng.standard_normal(shape + (E, K))))
    posterior = xr.Dataset(post, coords={"chain": np.arange(chains), "draw": np.arange(draws),
                                         "model": models, "experiment": experiments,
                                         "component": list(config.COMPONENTS)})
    stats = xr.Dataset({"diverging": (("chain", "draw"), np.zeros(shape, bool))},
                       coords={"chain": np.arange(chains), "draw": np.arange(draws)})
    const, obs = modeldata_to_constant_data(data, coords, steps)
    idata = az.InferenceData(posterior=posterior, sample_stats=stats, observed_data=obs,
                             constant_data=const)
    idata.attrs["manifest"] = manifest(kind="posterior", seed=seed, data_hash="synthetic",
                                       command=["mock-sampler"], diagnostics="pass (mock sampler)",
                                       hierarchy=hierarchy)
    idata.attrs["diagnostics"] = json.dumps({"verdict": "pass (mock sampler)",
                                             "passed": True, "rows": []})
    idata.attrs["hierarchy"] = hierarchy
    return idata
