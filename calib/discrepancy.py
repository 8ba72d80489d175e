"""Structural discrepancy: the experiment-level misfit of predicted sums of step times.

The step model cannot represent every batch exactly (e.g. large mixed batches run a
few % slower than the roofline form predicts). Over the 10^4–10^5 steps of an
experiment the per-step noise averages out, but such a misfit does not: it shifts the
experiment's E2E, TTFT and decode interval as a whole, by an amount that differs
between experiments (workload mix, model). Parameter uncertainty alone makes bands
far too narrow for that, so the misfit is learned across experiments and put in the
bands.

Per metric k (:data:`calib.e2e.METRICS`) and experiment e, on the experiment's
*sampled* steps s (the steps the fit saw)::

    r_ek = log( Σ_s w_sk·y_s / Σ_s w_sk·E[pred_s] )

with ``w_sk`` the replay design's metric weights (:func:`calib.e2e.replay_design`: how
much step s counts in the experiment mean of metric k), ``y_s`` the observed duration
and ``E[pred_s]`` the posterior predictive mean step time (``mean_factor·mu`` averaged
over draws). Its sampling standard error ``se_ek`` is the delta-method (linearisation)
se of a log ratio of two sums over the sampled steps, ``se² = n/(n−1)·Σ_s z_s²`` with
``z_s = w_sk·(y_s/Σw·y − E[pred_s]/Σw·E[pred])`` (what a bootstrap over the sampled
steps estimates, without its Monte-Carlo noise; ``tests/test_discrepancy.py`` checks
the agreement).

Across experiments, ``r_ek = δ_ek + ε_ek``, ``δ_ek ~ N(mu_k, tau_k)``,
``ε_ek ~ N(0, se_ek)``: a random-effects estimate of the mean ``mu_k`` and the
between-experiment sd ``tau_k`` (:func:`calib.pooling.unweighted_moments`:
``mu = mean(r)``, ``tau² = var(r) − mean(se²)``), with their uncertainty from a
bootstrap over experiments (the estimator rerun on every replicate: draws of
``(mu_k, tau_k)``). Unweighted, not DerSimonian–Laird: the experiments the step model
misfits most are those whose heavy mixed batches make ``r`` noisy (on the embedded
default ``corr(r, se) = 0.8`` for E2E), and precision weights, which assume effect and
precision independent, then put ``mu`` near the well-fitted experiments (0.37 % vs
0.72 %) and ``tau`` too small (0.78 % vs 1.05 %; BENCHMARKS.md). The record
(:func:`estimate`, JSON in the posterior's ``discrepancy`` attribute, written by
:func:`calib.fit.fit` from the fit's own dataset) holds ``r``, ``se``, the estimates
and the draws.

How predictions use it (:func:`draws`), per posterior draw, the step-time part of an
experiment's predicted metric is multiplied by ``exp(δ_ek)``:

* an experiment the record was estimated on (``fitted`` basis): ``δ`` from its
  conditional (shrinkage) distribution given its own ``r_ek``::

      δ | r ~ N(mu + s·(r − mu), sqrt(s)·se),   s = tau² / (tau² + se²)

  per bootstrap draw of ``(mu, tau)``. The point moves towards the observed by ``s``:
  it conditions on the experiment's own sampled steps (legitimate for a replay of
  data the model was fitted on, not a forecast);
* any other experiment (a new workload, a held-out split, a new model, and every
  experiment with ``new_experiments``): ``δ ~ N(mu, tau)`` per bootstrap draw. This is
  the basis BLIS predicts at: it never sees the workload's step times.

Fewer than :data:`calib.config.DISCREPANCY_MIN_EXPERIMENTS` experiments with a metric:
``tau`` is not identifiable and is recorded as ``null`` (``tau_identified: false``),
never as a silent 0. A fitted experiment then uses its own estimate,
``δ ~ N(r, se)`` (the ``tau → ∞`` limit of the conditional), and a new experiment gets
no discrepancy term, which the replay says in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from calib import config
from calib.pooling import unweighted_moments

__all__ = [
    "ATTR",
    "StepInputs",
    "draws",
    "estimate",
    "from_fit",
    "load",
    "log_ratios",
    "pool",
    "predicted_step_means",
    "step_inputs",
    "summary",
]

#: Root attribute of a posterior file holding the record (JSON).
ATTR = "discrepancy"
#: Metric order of every (3, E) array here (the replay's, :data:`calib.e2e.METRICS`).
_METRICS = ("e2e", "ttft", "itl")


def log_ratios(
    exp_idx: np.ndarray, weights: np.ndarray, obs: np.ndarray, pred: np.ndarray, n_exp: int
) -> tuple[np.ndarray, np.ndarray]:
    """``r`` and its delta-method ``se`` per (metric, experiment), each (3, E).

    ``exp_idx`` (n,) experiment of each sampled step; ``weights`` (n, 3) metric weights;
    ``obs``, ``pred`` (n,) observed and predicted (mean) durations. NaN where an
    experiment has no sampled step with positive weight (``se`` NaN also with one step).
    """
    exp_idx = np.asarray(exp_idx, np.int64)
    r = np.full((3, n_exp), np.nan)
    se = np.full((3, n_exp), np.nan)
    for k in range(3):
        w = np.asarray(weights[:, k], np.float64)
        num = np.bincount(exp_idx, weights=w * obs, minlength=n_exp)
        den = np.bincount(exp_idx, weights=w * pred, minlength=n_exp)
        cnt = np.bincount(exp_idx, weights=(w != 0).astype(float), minlength=n_exp)
        ok = (num > 0) & (den > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            r[k, ok] = np.log(num[ok] / den[ok])
            z = w * (obs / num[exp_idx] - pred / den[exp_idx])
            ss = np.bincount(exp_idx, weights=np.where(np.isfinite(z), z * z, 0.0), minlength=n_exp)
            fit = ok & (cnt >= 2)
            se[k, fit] = np.sqrt(cnt[fit] / (cnt[fit] - 1) * ss[fit])
    return r, se


def pool(
    r: np.ndarray,
    se: np.ndarray,
    *,
    replicates: int = config.DISCREPANCY_BOOTSTRAP,
    seed: int = config.DISCREPANCY_SEED,
    min_experiments: int = config.DISCREPANCY_MIN_EXPERIMENTS,
) -> dict:
    """Random-effects ``mu``, ``tau`` of one metric's ``r`` (E,) with ``se`` (E,), and
    bootstrap draws of both (experiments resampled with replacement).

    Returns a JSON-safe dict: ``mu``, ``tau`` (None when not identifiable),
    ``corr_r_se`` (correlation of the experiments' ``r`` with their ``se``: why the
    estimator is unweighted), ``n_experiments``, ``tau_identified``, ``mu_draws``,
    ``tau_draws`` (lists; the tau draws are empty when ``tau`` is not identifiable).
    """
    ok = np.isfinite(r) & np.isfinite(se)
    rv, s2 = np.asarray(r, float)[ok], np.asarray(se, float)[ok] ** 2
    n = int(rv.size)
    out: dict = {"n_experiments": n, "tau_identified": n >= max(min_experiments, 2)}
    if n == 0:
        return {**out, "mu": None, "tau": None, "corr_r_se": None, "mu_draws": [], "tau_draws": []}
    if not out["tau_identified"]:
        # between-experiment spread unknown: report the mean only
        mu = float(rv.mean())
        return {**out, "mu": mu, "tau": None, "corr_r_se": None, "mu_draws": [], "tau_draws": []}
    mu, tau = unweighted_moments(rv, s2)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(replicates, n))
    mu_b, tau_b = unweighted_moments(rv[idx], s2[idx])
    return {
        **out,
        "mu": float(mu),
        "tau": float(tau),
        "corr_r_se": (
            float(np.corrcoef(rv, np.sqrt(s2))[0, 1]) if np.ptp(s2) > 0 and np.ptp(rv) > 0 else None
        ),
        "mu_draws": [float(x) for x in mu_b],
        "tau_draws": [float(x) for x in tau_b],
    }


def estimate(
    exp_idx: np.ndarray,
    weights: np.ndarray,
    obs: np.ndarray,
    pred: np.ndarray,
    experiments,
    models,
    *,
    replicates: int = config.DISCREPANCY_BOOTSTRAP,
    seed: int = config.DISCREPANCY_SEED,
) -> dict:
    """The discrepancy record (JSON-safe) from the sampled steps (see the module docstring).

    Per metric under ``pooled``: what :func:`pool` returns (``mu``, ``tau`` on the log
    scale, the bootstrap draws; :func:`summary` gives their intervals); per metric under
    ``log_ratio``/``se``: one value per experiment (None: no data).
    """
    experiments, models = [str(x) for x in experiments], [str(x) for x in models]
    r, se = log_ratios(exp_idx, weights, obs, pred, len(experiments))
    pooled = {
        metric: pool(r[k], se[k], replicates=replicates, seed=seed + k)
        for k, metric in enumerate(_METRICS)
    }

    def _list(a):
        return [None if not np.isfinite(x) else float(x) for x in a]

    return {
        "metrics": list(_METRICS),
        "experiments": experiments,
        "models": models,
        "log_ratio": {m: _list(r[k]) for k, m in enumerate(_METRICS)},
        "se": {m: _list(se[k]) for k, m in enumerate(_METRICS)},
        "n_sampled_steps": [int(x) for x in np.bincount(exp_idx, minlength=len(experiments))],
        "pooled": pooled,
        "replicates": int(replicates),
        "seed": int(seed),
        "min_experiments": int(config.DISCREPANCY_MIN_EXPERIMENTS),
        "method": "r = log(sum w*observed / sum w*posterior predictive mean) over each "
        "experiment's sampled steps with the replay's metric weights, delta-method se; "
        "unweighted method of moments across experiments (mu = mean r, tau^2 = var r - "
        "mean se^2); bootstrap over experiments",
    }


@dataclass(frozen=True)
class StepInputs:
    """What the record needs from a dataset, kept small (the fit drops the dataset).

    step : (n,) global step indices of the sampled (fittable) steps.
    exp_idx : (n,) their experiment index; weights : (n, 3) metric weights;
    obs : (n,) observed durations (µs); experiments, models : names per experiment.
    """

    step: np.ndarray
    exp_idx: np.ndarray
    weights: np.ndarray
    obs: np.ndarray
    experiments: tuple[str, ...]
    models: tuple[str, ...]


def step_inputs(ds, design=None) -> StepInputs:
    """The sampled steps of ``ds`` with their replay weights (:func:`calib.e2e.replay_design`)."""
    from calib.e2e import replay_design
    from calib.vocab import fittable

    design = replay_design(ds) if design is None else design
    sp = np.flatnonzero(fittable(ds)[design.order])
    return StepInputs(
        step=np.asarray(design.order[sp], np.int64),
        exp_idx=design.step_exp[sp],
        weights=design.weights[sp],
        obs=np.asarray(ds["duration_us"].values, np.float64)[design.order[sp]],
        experiments=design.experiments,
        models=design.models,
    )


def predicted_step_means(idata, draws: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Posterior predictive mean duration (µs) of every step of the posterior's
    ``constant_data`` (``mean_factor·mu`` averaged over draws), and their global step
    indices. Draws are processed in chunks (memory bounded by
    :data:`calib.config.E2E_CHUNK_ELEMENTS`)."""
    from calib import noise as stepnoise
    from calib.posterior import flat_draws, model_data_from_idata
    from calib.predict import StepFeatures, step_time_draws_us

    data = model_data_from_idata(idata)
    p = flat_draws(idata, draws)
    feats = StepFeatures.from_model_data(data)
    midx = np.asarray(data.model_idx, np.int64)
    if "b_exp" in p:
        b, group = p["b_exp"], np.asarray(data.experiment_idx)
    else:
        b, group = p["b"], midx
    noise = stepnoise.posterior_params(p, int(np.asarray(p["b"]).shape[1]))
    d, n = b.shape[0], midx.size
    total = np.zeros(n)
    chunk = max(1, min(d, config.E2E_CHUNK_ELEMENTS // max(n, 1)))
    for a in range(0, d, chunk):
        sl = slice(a, min(d, a + chunk))
        mu = step_time_draws_us(
            b[sl],
            p["per_layer_us"][sl],
            p["per_request_us"][sl],
            p["per_step_us"][sl],
            p["alpha"][sl],
            feats,
            group,
        )
        mf = stepnoise.mean_factor(*(x[sl][:, midx] for x in noise))
        total += (mu * mf).sum(axis=0)
    step = np.asarray(idata.constant_data["step"].values, np.int64)
    return total / d, step


def from_fit(idata, inputs: StepInputs) -> dict:
    """The record of a fitted posterior on the dataset it was fitted on (the fit's hook)."""
    pred, step = predicted_step_means(idata)
    # the steps the posterior was fitted on (a validation fold: its train steps)
    srt = np.argsort(step, kind="stable")
    at = np.searchsorted(step[srt], inputs.step)
    keep = at < step.size
    keep[keep] = step[srt][at[keep]] == inputs.step[keep]
    where = srt[at[keep]]
    return estimate(
        inputs.exp_idx[keep],
        inputs.weights[keep],
        inputs.obs[keep],
        pred[where],
        inputs.experiments,
        inputs.models,
    )


def load(idata) -> dict | None:
    """The record stored in a posterior (None: a posterior from before the record)."""
    raw = idata.attrs.get(ATTR)
    if raw is None:
        return None
    rec = json.loads(raw) if isinstance(raw, str) else raw
    return rec if rec and "pooled" in rec else None


def draws(
    record: dict | None,
    experiments,
    basis,
    n_draws: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[str], list[str]]:
    """Per-draw log discrepancy ``δ`` (n_draws, 3, E) of each experiment to predict.

    ``basis`` per experiment as in :func:`calib.e2e.correction_draws`: ``"fitted"``
    experiments named in the record get the conditional distribution, everything else
    ``N(mu, tau)`` (module docstring). Returns ``delta``, the kind per experiment
    (``"conditional"``, ``"new"``, ``"none"``) and notes (one line each) on what the
    bands leave out.
    """
    E = len(experiments)
    delta = np.zeros((n_draws, 3, E))
    if record is None:
        return (
            delta,
            ["none"] * E,
            [
                "bands exclude the structural discrepancy (the posterior has no "
                "discrepancy record; refit to add it)"
            ],
        )
    known = {name: i for i, name in enumerate(record["experiments"])}
    kinds = []
    notes = []
    for e, (name, b) in enumerate(zip(experiments, basis, strict=True)):
        i = known.get(str(name))
        # conditional: a fitted experiment with sampled steps in the record (a held-out
        # workload of a per-model fit has none there: it is a new experiment)
        cond = (
            b == "fitted"
            and i is not None
            and record["log_ratio"]["e2e"][i] is not None
            and record["se"]["e2e"][i] is not None
        )
        kinds.append("conditional" if cond else "new")
        for k, metric in enumerate(_METRICS):
            p = record["pooled"][metric]
            if p["mu"] is None:
                continue
            z = rng.standard_normal(n_draws)
            if cond:
                r = record["log_ratio"][metric][i]
                se = record["se"][metric][i]
                if r is None or se is None:
                    continue
                if not p["tau_identified"]:
                    delta[:, k, e] = r + se * z
                    continue
                j = rng.integers(0, len(p["mu_draws"]), n_draws)
                mu = np.asarray(p["mu_draws"])[j]
                t2 = np.asarray(p["tau_draws"])[j] ** 2
                s = t2 / (t2 + se * se)
                delta[:, k, e] = mu + s * (r - mu) + np.sqrt(s) * se * z
            elif p["tau_identified"]:
                j = rng.integers(0, len(p["mu_draws"]), n_draws)
                delta[:, k, e] = np.asarray(p["mu_draws"])[j] + np.asarray(p["tau_draws"])[j] * z
    unident = [
        m
        for m in _METRICS
        if record["pooled"][m]["mu"] is not None and not record["pooled"][m]["tau_identified"]
    ]
    if unident and "new" in kinds:
        kinds = ["none" if k == "new" else k for k in kinds]
        notes.append(
            f"tau of the discrepancy is not identifiable from "
            f"{min(record['pooled'][m]['n_experiments'] for m in unident)} experiment(s) "
            f"(< {record.get('min_experiments', config.DISCREPANCY_MIN_EXPERIMENTS)}): "
            "bands of new experiments exclude it"
        )
    return delta, kinds, notes


def summary(record: dict | None, prob: float = config.INTERVAL_PROB) -> dict:
    """The export's description of the record (JSON/YAML-safe; ``prob`` intervals of the
    bootstrap draws)."""
    if record is None:
        return {
            "available": False,
            "meaning": "the posterior has no discrepancy record (fitted before it existed): "
            "predictions of a new workload carry parameter uncertainty and step noise only",
        }
    lo_q, hi_q = (1 - prob) / 2, (1 + prob) / 2
    out: dict = {
        "available": True,
        "scale": "log of observed / predicted step-time sums (0.01 ~ 1 %)",
        "meaning": "for a new workload, the observed step-time part of each metric's "
        "experiment mean is about the predicted one times exp(delta), delta ~ N(mu, tau) "
        "(tau: between-experiment sd learned across the fitted experiments; mu: the mean "
        "misfit, > 0: predictions low). The betas are not corrected by mu: it differs "
        "between metrics",
        "method": record["method"],
        "interval": {"kind": config.INTERVAL_KIND, "probability": prob},
    }
    for metric, p in record["pooled"].items():
        row: dict = {
            "n_experiments": p["n_experiments"],
            "mu": p["mu"],
            "tau": p["tau"],
            "tau_identified": p["tau_identified"],
        }
        for name in ("mu", "tau"):
            d = np.asarray(p[f"{name}_draws"], float)
            row[f"{name}_interval"] = (
                [float(np.quantile(d, lo_q)), float(np.quantile(d, hi_q))] if d.size else None
            )
        if p["tau_identified"] and p["mu_draws"]:
            z = np.random.default_rng(record.get("seed", 0)).standard_normal(len(p["mu_draws"]))
            new = np.asarray(p["mu_draws"]) + np.asarray(p["tau_draws"]) * z
            row["new_workload_factor_interval"] = [
                float(np.exp(np.quantile(new, lo_q))),
                float(np.exp(np.quantile(new, hi_q))),
            ]
        out[metric] = row
    return out
