"""Posterior of the API-side overheads: BLIS's three ``alpha_coeffs``.

BLIS's trained-physics backend charges three per-request costs outside the GPU
step time (µs):

========  ===========================  ============================================
alpha     BLIS name                    what it is, and what we fit it from
========  ===========================  ============================================
α₀        QueueingTime                 ARRIVED → QUEUED: HTTP parsing, validation,
                                       tokenisation, queue insertion. BLIS delays
                                       each request's entry into the scheduler
                                       queue by α₀. Data: ``req_api_queue_us``.
α₁        PostDecodeFixedOverhead      FINISHED → DEPARTED: detokenisation tail and
                                       response serialisation, charged once per
                                       request at completion. Data:
                                       ``req_api_depart_us``.
α₂        OutputTokenProcessingTime    host time per output token outside the GPU
                                       step (sampling output handling, incremental
                                       detokenisation, streaming, scheduling); BLIS
                                       adds α₂ to every inter-token latency. Data:
                                       the decode wall time per step not explained
                                       by measured step durations (below).
========  ===========================  ============================================

Per-output-token cost of request r (µs per token), from journey labels::

    n_r    = dataset steps with id in (first_token_step_r, finished_step_r]
    wall_r = (E2E_r − TTFT_r) / n_r                   (wall-clock time per decode step)
    exec_r = execution time per step over the same steps:
             with ``step_us`` given (export passes the posterior plug-in prediction):
               Σ (measured duration if sampled, else step_us) / n_r;
             else the mean measured duration of the sampled steps in the window
    cost_r = wall_r − exec_r

i.e. the wall-clock time per decode step (one output token per decode step) not
explained by GPU execution. With ``step_us`` from the posterior, α₂ is the part of
the observed decode interval the step-time model does not explain, which is what
BLIS adds per token. The sampled-only estimate is unbiased per window but noisy
and skewed when few, heterogeneous steps are sampled, which biases a robust
location; prefer ``step_us``. Requests with preemptions, fewer than 2 output
tokens, or (sampled-only) no sampled step in their window are left out.

The fit (:func:`fit_api_overheads`): for each quantity q (queue, depart,
per_token) and model m, observations are divided by a robust data scale
``s_q`` (the median absolute value over all models) and modelled independently::

    y / s_q ~ StudentT(nu[q, m], loc[q, m], scale[q, m])     (robust to hiccups)
    loc ~ Normal(1, 2), scale ~ HalfNormal(1), nu ~ Gamma(2, 0.1)

``loc`` is the typical (not the mean) overhead, robust to heavy tails; BLIS
charges one constant per request, and the location is that constant. The
quantities are API- and host-side, so models are not pooled: with a handful of
models a learned between-model spread is barely identified and its funnel
stalls the sampler. The population level (an unseen model) is, per draw, the
mean location over the fitted models (``loc_pop``) and, for a new model's draw,
``loc_pop + sd_between·z`` with ``sd_between`` the spread of the fitted models'
locations in that draw. A model without observations of a quantity takes the
population values. Exported alphas are posterior means of ``loc · s_q`` clipped at
0 (BLIS rejects negative coefficients; clipping is noted).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calib import config
from calib.errors import CalibError

__all__ = ["QUANTITIES", "ApiFit", "api_observations", "fit_api_overheads",
           "per_token_cost_us"]

#: Fitted quantities in BLIS ``alpha_coeffs`` order.
QUANTITIES = ("queue", "depart", "per_token")


def per_token_cost_us(ds, step_us: np.ndarray | None = None) -> np.ndarray:
    """Per-output-token host cost of every request (µs/token; NaN where undefined).

    Parameters
    ----------
    ds : canonical dataset.
    step_us : optional (n_steps,) estimated duration of every step (dataset order), e.g.
        the posterior plug-in prediction; sampled steps keep their measured duration.
        Without it the execution time per decode step is the mean measured duration
        of the sampled steps in the request's decode window (unbiased but noisy
        when few steps are sampled).

    See the module docstring. Vectorised per experiment: cumulative sums over steps
    sorted by step id, and ``searchsorted``.
    """
    n_req = ds.sizes["request"]
    out = np.full(n_req, np.nan)
    step_exp = np.asarray(ds["step_experiment"].values)
    step_id = np.asarray(ds["step_id"].values)
    sampled = np.asarray(ds["sampled"].values, bool)
    dur = np.asarray(ds["duration_us"].values, np.float64)
    measured = sampled & np.isfinite(dur)
    if step_us is not None:
        est = np.where(measured, dur, np.asarray(step_us, np.float64))
    req_exp = np.asarray(ds["req_experiment"].values)
    ft = np.asarray(ds["req_first_token_step"].values)
    fin = np.asarray(ds["req_finished_step"].values)
    e2e = np.asarray(ds["req_e2e_us"].values, np.float64)
    ttft = np.asarray(ds["req_ttft_us"].values, np.float64)
    ok_req = (~np.asarray(ds["req_failed"].values, bool) & (ft >= 0) & (fin > ft)
              & (np.asarray(ds["req_num_preemptions"].values) == 0)
              & (np.asarray(ds["req_output_len"].values) >= 2)
              & np.isfinite(e2e) & np.isfinite(ttft))
    for e in np.unique(req_exp):
        r = np.nonzero((req_exp == e) & ok_req)[0]
        steps = np.nonzero(step_exp == e)[0]
        if r.size == 0 or steps.size == 0:
            continue
        steps = steps[np.argsort(step_id[steps], kind="stable")]
        ids = step_id[steps]
        lo = np.searchsorted(ids, ft[r], side="right")   # decode window (ft, fin]
        hi = np.searchsorted(ids, fin[r], side="right")
        n_steps = hi - lo
        if step_us is not None:
            csum = np.concatenate([[0.0], np.cumsum(est[steps])])
            has = n_steps > 0
            exec_us = (csum[hi] - csum[lo]) / np.maximum(n_steps, 1)
        else:
            m = measured[steps]
            csum = np.concatenate([[0.0], np.cumsum(np.where(m, dur[steps], 0.0))])
            ccnt = np.concatenate([[0], np.cumsum(m)])
            cnt = ccnt[hi] - ccnt[lo]
            has = (cnt > 0) & (n_steps > 0)
            exec_us = (csum[hi] - csum[lo]) / np.maximum(cnt, 1)
        wall = (e2e[r] - ttft[r]) / np.maximum(n_steps, 1)
        out[r] = np.where(has, wall - exec_us, np.nan)
    return out


def api_observations(ds, step_us: np.ndarray | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Finite observations per quantity and model: ``{quantity: {model: values_us}}``.

    ``step_us``: see :func:`per_token_cost_us`.
    """
    exp_model = np.asarray(ds["exp_model"].values).astype(str)
    req_model = exp_model[np.asarray(ds["req_experiment"].values)]
    values = {"queue": np.asarray(ds["req_api_queue_us"].values, np.float64),
              "depart": np.asarray(ds["req_api_depart_us"].values, np.float64),
              "per_token": per_token_cost_us(ds, step_us)}
    return {q: {m: v[(req_model == m) & np.isfinite(v)] for m in np.unique(exp_model)}
            for q, v in values.items()}


@dataclass(frozen=True)
class ApiFit:
    """Posterior of the API overheads.

    Attributes
    ----------
    models : fitted model names.
    loc_us : (draws, 3, n_models) location per quantity (``QUANTITIES`` order) and model, µs.
    loc_pop_us : (draws, 3) population location (mean over fitted models), µs.
    new_model_us : (draws, 3) a new model's location (``loc_pop + sd_between·z``), µs.
    scale_us : (draws, 3, n_models) Student-t scales, µs.
    nu : (draws, 3, n_models).
    n_obs : (3, n_models) observations used.
    max_rhat : largest rank-normalised R-hat of the fit.
    idata : the ArviZ InferenceData of the fit.
    """

    models: tuple[str, ...]
    loc_us: np.ndarray
    loc_pop_us: np.ndarray
    new_model_us: np.ndarray
    scale_us: np.ndarray
    nu: np.ndarray
    n_obs: np.ndarray
    max_rhat: float
    idata: object

    def alphas(self, model: str | None) -> dict:
        """Posterior summaries of the three alphas for ``model`` (None: a new model).

        Returns a dict with ``mean`` (clipped at 0, the exported values), ``raw_mean``,
        ``median``, ``sd``, ``lower``, ``upper`` (lists in ``QUANTITIES`` order) and
        ``clipped`` (quantities whose mean was negative).
        """
        draws = (self.new_model_us if model is None
                 else self.loc_us[:, :, self.models.index(model)])
        prob = config.INTERVAL_PROB
        mean = draws.mean(axis=0)
        return {
            "mean": [max(0.0, float(v)) for v in mean],
            "raw_mean": [float(v) for v in mean],
            "median": [float(v) for v in np.median(draws, axis=0)],
            "sd": [float(v) for v in draws.std(axis=0, ddof=1)],
            "lower": [float(v) for v in np.quantile(draws, (1 - prob) / 2, axis=0)],
            "upper": [float(v) for v in np.quantile(draws, (1 + prob) / 2, axis=0)],
            "clipped": [q for q, v in zip(QUANTITIES, mean, strict=True) if v < 0],
        }


def _model(q_idx, m_idx, n_q, n_m, y=None):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    shape = (n_q, n_m)
    loc = numpyro.sample("loc", dist.Normal(jnp.ones(shape), 2.0).to_event(2))
    scale = numpyro.sample("scale", dist.HalfNormal(jnp.ones(shape)).to_event(2))
    nu = numpyro.sample("nu", dist.Gamma(2.0 * jnp.ones(shape), 0.1).to_event(2))
    with numpyro.plate("obs", q_idx.shape[0]):
        numpyro.sample("y", dist.StudentT(nu[q_idx, m_idx], loc[q_idx, m_idx],
                                          scale[q_idx, m_idx]), obs=y)


def fit_api_overheads(ds, *, step_us: np.ndarray | None = None,
                      sampler: config.ApiOverheadSampler = config.API_SAMPLER,
                      progress_bar: bool = False) -> ApiFit:
    """Fit the API-overhead posterior from a canonical dataset (see module docstring).

    Raises
    ------
    CalibError
        If a quantity has no finite observation in any model (e.g. traces without
        the ``vllm.api`` span): pass the alphas explicitly instead.
    """
    import jax
    import jax.numpy as jnp
    from numpyro.infer import MCMC, NUTS

    obs = api_observations(ds, step_us)
    models = tuple(sorted(next(iter(obs.values()))))
    rng = np.random.default_rng(sampler.seed)
    q_idx, m_idx, ys = [], [], []
    n_obs = np.zeros((len(QUANTITIES), len(models)), dtype=np.int64)
    scales = np.ones(len(QUANTITIES))
    for qi, q in enumerate(QUANTITIES):
        allv = np.concatenate([obs[q][m] for m in models])
        if allv.size == 0:
            field = {"queue": "req_api_queue_us", "depart": "req_api_depart_us",
                     "per_token": "req_e2e_us/req_ttft_us/duration_us"}[q]
            raise CalibError(f"no finite observation of the API overhead {q!r} in any model",
                             field=field,
                             fix="import traces that include the vllm.api span and sampled "
                                 "steps, or give the alphas explicitly (--alpha-coeffs a,b,c)")
        scales[qi] = max(float(np.median(np.abs(allv))), 1.0)
        for mi, m in enumerate(models):
            v = obs[q][m]
            if v.size > sampler.max_obs:
                v = rng.choice(v, sampler.max_obs, replace=False)
            n_obs[qi, mi] = v.size
            q_idx.append(np.full(v.size, qi))
            m_idx.append(np.full(v.size, mi))
            ys.append(v / scales[qi])
    q_idx = jnp.asarray(np.concatenate(q_idx))
    m_idx = jnp.asarray(np.concatenate(m_idx))
    y = jnp.asarray(np.concatenate(ys))
    from calib.fit import release_compiled_near_map_limit

    release_compiled_near_map_limit()  # as run_nuts: compiled programs pile up per process
    kernel = NUTS(_model, target_accept_prob=sampler.target_accept)
    mcmc = MCMC(kernel, num_warmup=sampler.warmup, num_samples=sampler.draws,
                num_chains=sampler.chains, chain_method="sequential",
                progress_bar=progress_bar)
    mcmc.run(jax.random.key(sampler.seed), q_idx, m_idx, len(QUANTITIES), len(models), y=y)

    import arviz as az

    idata = az.from_numpyro(mcmc, coords={"quantity": list(QUANTITIES), "model": list(models)},
                            dims={"loc": ["quantity", "model"], "scale": ["quantity", "model"],
                                  "nu": ["quantity", "model"]})
    post = mcmc.get_samples()
    s = scales[None, :, None]
    loc = np.asarray(post["loc"]) * s                                   # (d, 3, M)
    has = n_obs > 0                                                     # (3, M)
    masked = np.where(has[None], loc, np.nan)
    with np.errstate(invalid="ignore"):
        loc_pop = np.nanmean(masked, axis=2)                            # (d, 3)
        spread = (np.nanstd(masked, axis=2, ddof=1) if len(models) > 1
                  else np.zeros_like(loc_pop))
    spread = np.nan_to_num(spread)
    z_new = np.random.default_rng(sampler.seed + 1).standard_normal(loc_pop.shape)
    loc = np.where(has[None], loc, loc_pop[:, :, None])  # no data: population value
    rhat = az.rhat(idata, var_names=["loc", "scale", "nu"], method="rank")
    max_rhat = float(np.nanmax([float(np.nanmax(rhat[v].values)) for v in rhat.data_vars]))
    return ApiFit(models=models, loc_us=loc, loc_pop_us=loc_pop,
                  new_model_us=loc_pop + spread * z_new,
                  scale_us=np.asarray(post["scale"]) * s, nu=np.asarray(post["nu"]),
                  n_obs=n_obs, max_rhat=max_rhat, idata=idata)
