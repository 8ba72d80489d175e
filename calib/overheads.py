"""The API-side overheads: BLIS's three ``alpha_coeffs``, estimated from the fit's data.

BLIS's trained-physics backend charges three costs outside the GPU step time (µs):

========  ===========================  ============================================
alpha     BLIS name                    what it is, and the data
========  ===========================  ============================================
α₀        QueueingTime                 ARRIVED → QUEUED per request (HTTP parsing,
                                       validation, tokenisation, queue insertion).
                                       Data: ``req_api_queue_us``.
α₁        PostDecodeFixedOverhead      FINISHED → DEPARTED once per request
                                       (detokenisation tail, serialisation).
                                       Data: ``req_api_depart_us``.
α₂        OutputTokenProcessingTime    host time per output token outside the GPU
                                       step; BLIS adds it to every inter-token
                                       latency. Data: the decode wall time per step
                                       not covered by measured step durations.
========  ===========================  ============================================

α₂ is the measured host gap between consecutive steps (``bs_ts_start_ns`` of step n+1
− ``bs_ts_end_ns`` of step n, over pairs inside request windows:
:func:`calib.e2e.measure_host_timing`): the time every decoding request waits between
two tokens beyond the step itself, which is what BLIS adds to each inter-token latency.
(The decode wall time per step minus the measured durations of a request's window is
not used: on the embedded default it is −435 µs for llama-2-70b and +168 µs for
llama-2-7b, i.e. it mixes client-side labels with the sampled steps' selection, while
the measured gap is 58–66 µs in all 16 experiments.)

Estimate (:func:`estimate`): BLIS adds each alpha to every request (token), so what
E2E needs is the **mean** per request (per token). Per quantity and model, the mean of
the observations (α₂: of the experiments' gaps, weighted by their step pairs); its
uncertainty from a bootstrap that resamples requests within each experiment (α₂: each
experiment's mean by its standard error). Models of one server share the API server, so they
are pooled as far as the data allow: a random-effects (DerSimonian–Laird) step
estimates the between-model spread ``tau`` from the per-model means and their
standard errors and shrinks each model's mean towards the precision-weighted mean by
``tau² / (tau² + se_m²)``; ``tau = 0`` (the models cannot be told apart) gives one
pooled value for all. The whole procedure runs on every bootstrap replicate, so the
bands include the pooling. A new model (the population export) gets the pooled mean
plus ``tau·z``. Exported values are the estimates clipped at 0 (BLIS rejects negative
coefficients; the clip is recorded).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from calib import config
from calib.errors import CalibError
from calib.pooling import random_effects

__all__ = ["QUANTITIES", "alphas", "estimate", "observations"]

#: Quantities in BLIS ``alpha_coeffs`` order.
QUANTITIES = ("queue", "depart", "per_token")
#: Dataset variables each quantity is read from (for error messages).
_FIELDS = {
    "queue": "req_api_queue_us",
    "depart": "req_api_depart_us",
    "per_token": "bs_ts_start_ns/bs_ts_end_ns",
}


def observations(ds) -> dict[str, Any]:
    """Per quantity: (values µs, weights, experiment index) of the usable requests
    (``queue``, ``depart``) or experiments (``per_token``: the experiment's mean host
    gap, weighted by its number of step pairs); ``per_token_se``: the standard error of
    each ``per_token`` value."""
    from calib.e2e import measure_host_timing

    missing = [
        v for v in ("req_experiment", "req_api_queue_us", "req_api_depart_us") if v not in ds
    ]
    if missing:
        raise CalibError(
            f"dataset lacks variable(s) {', '.join(missing)}",
            field=missing[0],
            fix="import traces that include the vllm.api span, or give the "
            "alphas explicitly (--alpha-coeffs a,b,c)",
        )
    req_exp = np.asarray(ds["req_experiment"].values)
    gap = measure_host_timing(ds)
    out: dict[str, Any] = {}
    for q, v in (
        ("queue", np.asarray(ds["req_api_queue_us"].values, np.float64)),
        ("depart", np.asarray(ds["req_api_depart_us"].values, np.float64)),
    ):
        ok = np.isfinite(v)
        out[q] = (v[ok], np.ones(int(ok.sum())), req_exp[ok])
    ok = np.asarray(gap.gap_pairs) > 0
    out["per_token"] = (
        gap.gap_us[ok],
        np.asarray(gap.gap_pairs, np.float64)[ok],
        np.flatnonzero(ok),
    )
    out["per_token_se"] = gap.gap_se_us[ok]
    return out


def estimate(
    ds,
    *,
    replicates: int = config.OVERHEAD_BOOTSTRAP,
    seed: int = config.OVERHEAD_SEED,
    prob: float = config.INTERVAL_PROB,
) -> dict:
    """API-overhead estimates per model and for a new model (see the module docstring).

    Returns
    -------
    dict (JSON-safe; stored in the posterior file's attrs by :func:`calib.fit.fit`):
    ``quantities``, ``models``, ``method``, ``replicates``, ``prob``, and per model
    name (and ``"population"``) a mapping quantity -> ``{mean, sd, lower, upper}`` (µs;
    ``mean`` unclipped), plus ``heterogeneity``: per quantity the between-model
    spread ``tau_us``, Cochran's ``Q``, its degrees of freedom and ``pooled``
    (``tau = 0``: one value for every model), and ``n_observations`` per quantity and
    model (requests; experiments for ``per_token``).

    Raises
    ------
    CalibError
        A quantity has no usable observation (e.g. traces without the ``vllm.api`` span).
    """
    exp_model = np.asarray(ds["exp_model"].values).astype(str)
    models = list(dict.fromkeys(exp_model.tolist()))
    obs = observations(ds)
    rng = np.random.default_rng(seed)
    out: dict = {
        "quantities": list(QUANTITIES),
        "models": models,
        "replicates": int(replicates),
        "prob": float(prob),
        "heterogeneity": {},
        "n_observations": {},
        "method": "mean per model (per_token: mean host gap between consecutive "
        "steps), DerSimonian-Laird pooling across models, bootstrap of "
        "requests within experiments (per_token: of experiment means by "
        "their standard errors)",
    }
    per: dict[str, dict] = {m: {} for m in [*models, "population"]}
    lo_q, hi_q = (1 - prob) / 2, (1 + prob) / 2
    for q in QUANTITIES:
        v, w, e = obs[q]
        if v.size == 0:
            raise CalibError(
                f"no usable observation of the API overhead {q!r}",
                field=_FIELDS[q],
                fix="import traces that include the vllm.api span and sampled "
                "steps, or give the alphas explicitly (--alpha-coeffs a,b,c)",
            )
        # sums of w·v and w per model: point (row 0) and bootstrap replicates
        sums = np.zeros((replicates + 1, len(models), 2))
        for ei in np.unique(e):
            sel = e == ei
            mi = models.index(exp_model[ei])
            wv, ww = w[sel] * v[sel], w[sel]
            sums[0, mi] += (wv.sum(), ww.sum())
            if q == "per_token":  # one mean per experiment: its standard error
                rep = v[sel] + obs["per_token_se"][sel] * rng.standard_normal(replicates)[:, None]
                sums[1:, mi, 0] += rep @ ww
                sums[1:, mi, 1] += ww.sum()
                continue
            counts = rng.multinomial(
                sel.sum(), np.full(sel.sum(), 1.0 / sel.sum()), size=replicates
            )
            sums[1:, mi, 0] += counts @ wv
            sums[1:, mi, 1] += counts @ ww
        present = sums[0, :, 1] > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            means = sums[..., 0] / sums[..., 1]  # (R+1, M)
        mp = means[:, present]
        se2 = np.var(mp[1:], axis=0, ddof=1)[None, :] * np.ones((replicates + 1, 1))
        if mp.shape[1] > 1:
            shrunk, pooled, tau, qstat = random_effects(mp, se2)
        else:
            shrunk, pooled, tau, qstat = (
                mp,
                mp[:, 0],
                np.zeros(replicates + 1),
                np.zeros(replicates + 1),
            )
        full = np.repeat(pooled[:, None], len(models), axis=1)  # a model without data: pooled
        full[:, present] = shrunk
        z = np.random.default_rng(seed + 1).standard_normal(replicates)
        new = pooled[1:] + tau[1:] * z
        for mi, m in enumerate(models):
            per[m][q] = _summary(full[0, mi], full[1:, mi], lo_q, hi_q)
        per["population"][q] = _summary(float(pooled[0]), new, lo_q, hi_q)
        out["heterogeneity"][q] = {
            "tau_us": float(tau[0]),
            "Q": float(qstat[0]),
            "df": int(present.sum() - 1),
            "pooled": bool(tau[0] == 0),
        }
        out["n_observations"][q] = {m: int(np.sum(exp_model[e] == m)) for m in models}
    out["estimates"] = per
    return out


def _summary(point: float, reps: np.ndarray, lo_q: float, hi_q: float) -> dict:
    return {
        "mean": float(point),
        "sd": float(np.std(reps, ddof=1)),
        "lower": float(np.quantile(reps, lo_q)),
        "upper": float(np.quantile(reps, hi_q)),
    }


def alphas(record: dict, model: str | None) -> dict:
    """The export's view of one model's alphas (None or an unknown model: ``population``).

    Returns ``mean`` (clipped at 0: the exported values), ``raw_mean``, ``sd``,
    ``lower``, ``upper`` (lists in :data:`QUANTITIES` order) and ``clipped``.
    """
    key = model if model in record["estimates"] and model is not None else "population"
    est = record["estimates"][key]
    raw = [est[q]["mean"] for q in QUANTITIES]
    return {
        "mean": [max(0.0, v) for v in raw],
        "raw_mean": raw,
        "sd": [est[q]["sd"] for q in QUANTITIES],
        "lower": [est[q]["lower"] for q in QUANTITIES],
        "upper": [est[q]["upper"] for q in QUANTITIES],
        "clipped": [q for q, v in zip(QUANTITIES, raw, strict=True) if v < 0],
        "set": key,
    }
