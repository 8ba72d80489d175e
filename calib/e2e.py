"""Teacher-forced replay: per-experiment E2E, TTFT and decode-interval intervals.

Every step of the dataset keeps its observed batch (teacher forcing); only the
step durations are predicted. For request r of an experiment (steps sorted by
scheduler step id):

* predicted E2E  = Σ predicted durations of the steps with id in [QUEUED step, FINISHED step];
* predicted TTFT = Σ over [QUEUED step, FIRST_TOKEN step];

  the QUEUED step itself counts with the share of it that remains after the QUEUED
  event (see *Host timing*);
* predicted decode interval (``itl``) = (E2E − TTFT)/(output − 1), i.e. Σ over
  (FIRST_TOKEN step, FINISHED step] divided by output − 1 (requests with ≥ 2 tokens).

Host timing (:func:`measure_host_timing`). Wall time between two events is the sum
of the step durations in between *plus the host gaps between steps* (scheduling,
input processing, output handling: ``step.ts_start_ns`` of step n+1 −
``step.ts_end_ns`` of step n). FIRST_TOKEN and FINISHED are logged at the end of
their step, so a window holds one gap before each of its steps except the QUEUED
step: E2E and TTFT windows of k steps hold k − 1 gaps, a decode window of k steps
holds k (``ReplayDesign.gap_counts``). By default both quantities are measured from
the data, never assumed:

* the gap, per experiment, as the mean over pairs of consecutive sampled steps
  inside request windows (its standard error enters the bands as a per-draw normal
  perturbation); an experiment with fewer than ``E2E_GAP_MIN_PAIRS`` pairs uses the
  pooled estimate of the dataset; ``step_gap_us=<number>`` overrides it (e.g.
  BLIS's α₂ to see what the simulator would predict);
* the QUEUED step's share, pooled over requests whose QUEUED step is sampled, as
  the mean of ``(ts_end − QUEUED ts)/(ts_end − ts_start)`` clipped to [0, 1] (0.5 when
  requests arrive uniformly during steps; 0 or 1 when the engine logs QUEUED between
  steps); without such requests ``E2E_QUEUED_STEP_WEIGHT``.

Each experiment mean is linear in the step durations, so it is a weighted sum
``Σ_s w_s·d_s`` with weights built once from the windows (cumulative counts via
``searchsorted``); per posterior draw the whole table is a handful of
matrix-vector products (draws are processed in chunks to bound memory).

Step-level bias (column ``step_bias_pct``): on the experiment's *sampled* steps,
``Σ w_s·E[predicted d_s] / Σ w_s·observed d_s − 1`` with each metric's step weights
``w_s``, i.e. the step model's misfit on exactly the steps that dominate the
metric. When the E2E error matches it, the E2E miss is a step-time model misfit
(not a replay artefact); the 10 % step sample makes it a noisy estimate.

Observed values are the journey labels (``req_e2e_us``, ``req_ttft_us``, and
(E2E − TTFT)/(output − 1)) of the same requests: requests not failed, with
QUEUED, FIRST_TOKEN and FINISHED steps and finite labels.

Which corrections predict an experiment (column ``basis``):

``fitted``          the experiment's own posterior (``b_exp`` for per-experiment fits,
                    else its model's ``b``);
``new-experiment``  workload not in the posterior (or forced with
                    ``new_experiments=True``, any hierarchy): per-experiment fits draw
                    ``log b = log b[m] + tau_exp·z`` per draw, other fits use the model's
                    ``b``; the discrepancy is a new experiment's ``N(mu, tau)``;
``population``      model not in the posterior (or listed in ``population_models``):
                    ``log b = log b_pop + tau·z`` per draw (the predictive distribution
                    of a new model's corrections); its noise parameters are the per-draw
                    means of the fitted models' (the pooled stall component is shared).

With ``noise=True`` (default) every predicted step duration is a draw of the model's
noise (:func:`calib.noise.sample`: log-normal body, stall and fast components, the full
tail, no clipping), so the interval is a posterior *predictive* interval of the
experiment mean. Without noise, ``mu`` is the body *median* step time and sums of
medians sit below sums of durations by the mean factor (``mean_factor``, ~1-3 %).

Structural discrepancy (:mod:`calib.discrepancy`): per draw, the step part of every
experiment mean is multiplied by ``exp(δ)``, ``δ`` drawn per metric from the
posterior's discrepancy record: a ``fitted`` experiment (named in the record, with
sampled steps there) from its conditional distribution given its own sampled steps'
log ratio (the point moves towards the observed: a replay of fitted data, not a
forecast); every other experiment (``new-experiment``, ``population``, and all with
``new_experiments=True``) from a new experiment's ``N(mu, tau)``, the basis BLIS
predicts at. The band then holds parameter uncertainty, step noise (full tails) and
the experiment discrepancy (column ``discrepancy``: ``conditional``, ``new`` or
``none``); a posterior without the record gives bands without it and a note
(``E2EResult.notes``). Column ``half_width_pct`` is half the band's width over the
point; every table reports its median next to the coverage.

Point prediction (``predicted_us``): the *mean* of the experiment mean over posterior
draws (the posterior predictive mean, what a sum of step times is an estimate of; at the
population level it includes the ``≈ exp(tau²/2)`` of the log-normal corrections); the
interval is equal-tailed.

Verdict: for each metric in :data:`calib.config.E2E_CHECK_METRICS`, with n experiments
and k intervals containing the observed mean, the check fails when
``P(Binomial(n, prob) <= k) < E2E_COVERAGE_FAIL_TAIL`` (coverage implausibly low
for the nominal probability). With so few experiments that even ``k = 0`` would not
fail (``P(Binomial(n, prob) <= 0) >= E2E_COVERAGE_FAIL_TAIL``, e.g. n <= 2 at 90 %), the
verdict is INCONCLUSIVE, not PASS (``passed`` is False). A verdict on experiments
predicted at the population or new-experiment level names them. Baselines
(:mod:`calib.baselines`) are reported, not judged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from calib import config, discrepancy
from calib import noise as stepnoise
from calib.errors import CalibError
from calib.posterior import flat_draws
from calib.predict import StepFeatures, step_time_draws_us
from calib.vocab import fittable

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "METRICS",
    "E2EResult",
    "HostTiming",
    "ReplayDesign",
    "correction_draws",
    "experiment_means",
    "format_table",
    "means_with_host_time",
    "measure_host_timing",
    "replay",
    "replay_design",
]

#: Metrics in table order: end-to-end latency, time to first token, decode interval.
METRICS = ("e2e", "ttft", "itl")
_COMP = len(config.COMPONENTS)


@dataclass(frozen=True)
class HostTiming:
    """Host time between steps and the QUEUED step's share, measured from a dataset.

    Attributes
    ----------
    gap_us : (E,) mean host gap between consecutive steps per experiment (µs).
    gap_se_us : (E,) standard error of that mean (µs; 0 when given or absent).
    gap_pairs : (E,) pairs of consecutive sampled steps inside request windows.
    gap_source : per experiment "measured", "pooled" (too few pairs: the dataset's
        pooled estimate), "given" (a number passed by the user) or "none" (no step
        timestamps: 0).
    queued_step_weight : share of the QUEUED step counted in E2E and TTFT.
    queued_n : requests with a sampled QUEUED step behind the measured share.
    queued_source : "measured", "given" or "default (<why>)".
    """

    gap_us: np.ndarray
    gap_se_us: np.ndarray
    gap_pairs: np.ndarray
    gap_source: tuple[str, ...]
    queued_step_weight: float
    queued_n: int
    queued_source: str

    def describe(self) -> str:
        """One line: where the gap and the QUEUED share come from."""
        src = sorted(set(self.gap_source))
        if src == ["given"]:
            gap = f"host gap {float(self.gap_us[0]):.1f} µs per step (given)"
        elif src == ["none"]:
            gap = "host gap 0 µs (dataset has no step timestamps)"
        else:
            n_pool = sum(s == "pooled" for s in self.gap_source)
            gap = (
                f"host gap measured per experiment (mean {np.mean(self.gap_us):.1f} µs, "
                f"range {np.min(self.gap_us):.1f}-{np.max(self.gap_us):.1f}; "
                f"{int(np.sum(self.gap_pairs))} consecutive sampled step pairs"
                + (f"; {n_pool} experiment(s) use the pooled value" if n_pool else "")
                + ")"
            )
        q = f"QUEUED step share {self.queued_step_weight:.3f} ({self.queued_source}"
        q += f", {self.queued_n} requests)" if self.queued_source == "measured" else ")"
        return f"{gap}; {q}"


@dataclass(frozen=True)
class ReplayDesign:
    """Request windows of a dataset turned into per-step weights.

    Attributes
    ----------
    order : (n,) step positions of the dataset in replay order (by experiment, step id).
    step_exp : (n,) experiment index of each step in replay order.
    bounds : (E + 1,) block boundaries: experiment e is ``order[bounds[e]:bounds[e+1]]``.
    weights : (n, 3) weight of each step in each metric's experiment mean (METRICS order).
    observed_us : (3, E) observed experiment means (NaN without valid requests).
    n_requests : (3, E) requests behind each mean.
    experiments, models : names of the dataset experiments and of their models.
    gap_counts : (3, E) host gaps in each experiment mean (mean over requests of the
        gaps in the window): the mean's host time is ``gap_us · gap_counts``.
    timing : the measured :class:`HostTiming` (``queued_step_weight`` is the share used).
    """

    order: np.ndarray
    step_exp: np.ndarray
    bounds: np.ndarray
    weights: np.ndarray
    observed_us: np.ndarray
    n_requests: np.ndarray
    experiments: tuple[str, ...]
    models: tuple[str, ...]
    gap_counts: np.ndarray
    timing: HostTiming


def _names(ds, dim: str) -> list[str]:
    if dim in ds.coords:
        return [str(x) for x in np.asarray(ds[dim].values)]
    return [str(i) for i in range(ds.sizes[dim])]


def _share(value, field: str):
    """``"measured"`` or a number in [0, 1] (a user setting)."""
    if isinstance(value, str):
        if value == "measured":
            return value
        try:
            value = float(value)
        except ValueError:
            raise CalibError(
                f"{field} must be 'measured' or a number, got {value!r}", field=field
            ) from None
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise CalibError(
            f"queued-step weight must be in [0, 1], got {value}",
            field=field,
            fix="use a share in [0, 1] or 'measured'",
        )
    return value


def _measure(
    ds, step_exp, step_id, order, pos_q, lo_q, hi_fin, valid, n_exp: int, queued_step_weight
) -> HostTiming:
    """Host gap per experiment and the QUEUED share (see :func:`measure_host_timing`)."""
    n = order.size
    has_ts = all(v in ds for v in ("bs_ts_start_ns", "bs_ts_end_ns", "sampled"))
    gap = np.zeros(n_exp)
    se = np.zeros(n_exp)
    pairs = np.zeros(n_exp, np.int64)
    source = ["none"] * n_exp
    q_w, q_n, q_src = config.E2E_QUEUED_STEP_WEIGHT, 0, "default (no step timestamps)"
    if has_ts and n > 1:
        samp = np.asarray(ds["sampled"].values, bool)[order]
        t0 = np.asarray(ds["bs_ts_start_ns"].values).astype(np.int64)[order]
        t1 = np.asarray(ds["bs_ts_end_ns"].values).astype(np.int64)[order]
        timed = samp & (t0 >= 0) & (t1 >= t0)
        # boundaries (i, i+1) inside at least one request window [lo, hi): lo <= i < hi - 1
        cov = np.zeros(n + 1, np.int64)
        ok = valid & (hi_fin - lo_q >= 2)
        np.add.at(cov, lo_q[ok], 1)
        np.add.at(cov, hi_fin[ok] - 1, -1)
        inside = np.cumsum(cov)[: n - 1] > 0
        pair = (
            inside
            & timed[:-1]
            & timed[1:]
            & (step_exp[:-1] == step_exp[1:])
            & (step_id[1:] == step_id[:-1] + 1)
        )
        i = np.flatnonzero(pair)
        g = (t0[i + 1] - t1[i]) / 1e3
        ge = step_exp[i]
        pairs = np.bincount(ge, minlength=n_exp)
        means = []
        for e in range(n_exp):
            ge_e = g[ge == e]
            if ge_e.size >= max(config.E2E_GAP_MIN_PAIRS, 2):
                gap[e] = ge_e.mean()
                se[e] = ge_e.std(ddof=1) / np.sqrt(ge_e.size)
                source[e] = "measured"
                means.append(gap[e])
        if g.size >= 2:
            pooled = g.mean()
            # an experiment without its own estimate: the pooled mean, uncertain by its
            # standard error and by the spread between experiments
            pooled_se = np.sqrt(
                g.var(ddof=1) / g.size + (np.var(means, ddof=1) if len(means) >= 2 else 0.0)
            )
            for e in range(n_exp):
                if source[e] != "measured":
                    gap[e], se[e], source[e] = pooled, pooled_se, "pooled"
        # QUEUED share: requests whose QUEUED step is a sampled, timed step
        if "req_queued_ts_us" in ds:
            tq = np.asarray(ds["req_queued_ts_us"].values, np.float64)
            r = np.flatnonzero(valid & (pos_q >= 0) & np.isfinite(tq))
            r = r[timed[pos_q[r]] & (t1[pos_q[r]] > t0[pos_q[r]])]
            if r.size < config.E2E_QUEUED_MIN_REQUESTS:
                q_src = (
                    f"default ({r.size} requests with a sampled QUEUED step < "
                    f"{config.E2E_QUEUED_MIN_REQUESTS})"
                )
            else:
                end, start = t1[pos_q[r]] / 1e3, t0[pos_q[r]] / 1e3
                raw = (end - tq[r]) / (end - start)
                agree = float(np.mean((raw >= -0.5) & (raw <= 1.5)))
                if agree < config.E2E_QUEUED_CLOCK_AGREE:
                    q_src = (
                        f"default (QUEUED timestamps fall inside their step for only "
                        f"{100 * agree:.0f} % of {r.size} requests: clocks disagree?)"
                    )
                else:
                    q_w, q_n, q_src = (
                        float(np.mean(np.clip(raw, 0.0, 1.0))),
                        int(r.size),
                        "measured",
                    )
        else:
            q_src = "default (no QUEUED timestamps)"
    if queued_step_weight != "measured":
        q_w, q_n, q_src = float(queued_step_weight), 0, "given"
    return HostTiming(
        gap_us=gap,
        gap_se_us=se,
        gap_pairs=np.asarray(pairs, np.int64),
        gap_source=tuple(source),
        queued_step_weight=q_w,
        queued_n=q_n,
        queued_source=q_src,
    )


def replay_design(ds, queued_step_weight: float | str = "measured") -> ReplayDesign:
    """Weights, observed means and host timing of every experiment of a canonical dataset.

    ``queued_step_weight`` is the share of the QUEUED step counted in E2E and TTFT:
    ``"measured"`` (default: from the step and QUEUED timestamps, else
    :data:`calib.config.E2E_QUEUED_STEP_WEIGHT`) or a number in [0, 1].
    """
    queued_step_weight = _share(queued_step_weight, "--queued-step-weight")
    need = (
        "step_experiment",
        "step_id",
        "req_experiment",
        "req_queued_step",
        "req_first_token_step",
        "req_finished_step",
        "req_failed",
        "req_output_len",
        "req_e2e_us",
        "req_ttft_us",
        "exp_model",
    )
    missing = [v for v in need if v not in ds]
    if missing:
        raise CalibError(
            f"dataset lacks variable(s) {', '.join(missing)}",
            field=missing[0],
            fix="import the traces with calib.traces (schema.py)",
        )
    step_exp_raw = np.asarray(ds["step_experiment"].values).astype(np.int64)
    step_id_raw = np.asarray(ds["step_id"].values).astype(np.int64)
    order = np.lexsort((step_id_raw, step_exp_raw))
    step_exp = step_exp_raw[order]
    step_id = step_id_raw[order]
    n_exp = ds.sizes["experiment"]
    n = order.size
    bounds = np.searchsorted(step_exp, np.arange(n_exp + 1), side="left")

    r_exp = np.asarray(ds["req_experiment"].values).astype(np.int64)
    q = np.asarray(ds["req_queued_step"].values).astype(np.int64)
    ft = np.asarray(ds["req_first_token_step"].values).astype(np.int64)
    fin = np.asarray(ds["req_finished_step"].values).astype(np.int64)
    out_len = np.asarray(ds["req_output_len"].values).astype(np.int64)
    e2e = np.asarray(ds["req_e2e_us"].values, np.float64)
    ttft = np.asarray(ds["req_ttft_us"].values, np.float64)
    valid = (
        ~np.asarray(ds["req_failed"].values, bool)
        & (q >= 0)
        & (ft >= q)
        & (fin >= ft)
        & np.isfinite(e2e)
        & np.isfinite(ttft)
    )
    itl_valid = valid & (out_len >= 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        itl = np.where(itl_valid, (e2e - ttft) / (out_len - 1), np.nan)

    # global positions (replay order) of each window: searchsorted inside the experiment block
    lo_q = np.zeros(r_exp.size, np.int64)
    hi_ft = np.zeros(r_exp.size, np.int64)
    hi_fin = np.zeros(r_exp.size, np.int64)
    pos_q = np.full(r_exp.size, -1, np.int64)  # position of the QUEUED step itself
    for e in range(n_exp):
        r = np.nonzero(r_exp == e)[0]
        if r.size == 0:
            continue
        ids = step_id[bounds[e] : bounds[e + 1]]
        lo_q[r] = bounds[e] + np.searchsorted(ids, q[r], side="left")
        hi_ft[r] = bounds[e] + np.searchsorted(ids, ft[r], side="right")
        hi_fin[r] = bounds[e] + np.searchsorted(ids, fin[r], side="right")
        hit = (lo_q[r] < bounds[e + 1]) & (step_id[np.minimum(lo_q[r], max(n - 1, 0))] == q[r])
        pos_q[r[hit]] = lo_q[r[hit]]
    timing = _measure(
        ds, step_exp, step_id, order, pos_q, lo_q, hi_fin, valid, n_exp, queued_step_weight
    )
    share = timing.queued_step_weight

    observed = np.full((3, n_exp), np.nan)
    counts = np.zeros((3, n_exp), np.int64)
    gap_counts = np.zeros((3, n_exp))
    diff = np.zeros((n + 1, 3))
    for k, (ok, vals, lo, hi, per) in enumerate(
        (
            (valid, e2e, lo_q, hi_fin, np.ones(r_exp.size)),
            (valid, ttft, lo_q, hi_ft, np.ones(r_exp.size)),
            (itl_valid, itl, hi_ft, hi_fin, 1.0 / np.maximum(out_len - 1, 1)),
        )
    ):
        counts[k] = np.bincount(r_exp[ok], minlength=n_exp)
        sums = np.bincount(r_exp[ok], weights=vals[ok], minlength=n_exp)
        with np.errstate(divide="ignore", invalid="ignore"):
            observed[k] = np.where(counts[k] > 0, sums / counts[k], np.nan)
        v = per[ok] / np.maximum(counts[k][r_exp[ok]], 1)
        np.add.at(diff[:, k], lo[ok], v)
        np.add.at(diff[:, k], hi[ok], -v)
        # host gaps: one before each window step, except the QUEUED step (E2E, TTFT)
        n_gaps = np.maximum(hi[ok] - lo[ok] - (1 if k < 2 else 0), 0)
        gap_counts[k] = np.bincount(r_exp[ok], weights=v * n_gaps, minlength=n_exp)
        if k < 2 and share != 1.0:  # E2E, TTFT: the part of the QUEUED step left
            first = lo[ok][hi[ok] > lo[ok]]
            cut = (1.0 - share) * v[hi[ok] > lo[ok]]
            np.add.at(diff[:, k], first, -cut)
            np.add.at(diff[:, k], first + 1, cut)
    weights = np.cumsum(diff, axis=0)[:n]
    weights[np.abs(weights) < 1e-15] = 0.0
    return ReplayDesign(
        order=order,
        step_exp=step_exp,
        bounds=bounds,
        weights=weights,
        observed_us=observed,
        n_requests=counts,
        experiments=tuple(_names(ds, "experiment")),
        models=tuple(str(m) for m in np.asarray(ds["exp_model"].values)),
        gap_counts=gap_counts,
        timing=timing,
    )


def measure_host_timing(ds, queued_step_weight: float | str = "measured") -> HostTiming:
    """Host gap between steps (per experiment) and the QUEUED step's share, from the data.

    The gap is ``bs_ts_start_ns`` of step n+1 − ``bs_ts_end_ns`` of step n over pairs of
    consecutive (id n, n + 1) sampled steps that lie inside at least one request window
    (idle periods between requests are not gaps any request waits for); see the module
    docstring for the QUEUED share and the fallbacks.
    """
    return replay_design(ds, queued_step_weight).timing


def experiment_means(step_us: np.ndarray, design: ReplayDesign) -> np.ndarray:
    """Experiment means ``(draws, 3, E)`` from step durations ``(draws, n)`` in replay order."""
    step_us = np.atleast_2d(step_us)
    E = design.bounds.size - 1
    out = np.zeros((step_us.shape[0], 3, E))
    for e in range(E):
        a, b = design.bounds[e], design.bounds[e + 1]
        if b > a:
            out[:, :, e] = step_us[:, a:b] @ design.weights[a:b]
    out[:, design.n_requests == 0] = np.nan
    return out


@dataclass
class _Groups:
    b: np.ndarray  # (d, E, 6)
    noise: tuple  # calib.noise.NoiseParams order, each (d, E)
    basis: list[str]


def correction_draws(
    params: dict,
    post_models: list[str],
    post_experiments: list[str],
    experiments,
    models,
    *,
    new_experiments: bool = False,
    population_models=(),
    rng: np.random.Generator,
) -> tuple[np.ndarray, tuple, list[str]]:
    """Per-draw corrections and noise parameters of each experiment to predict (``basis`` rules).

    Parameters
    ----------
    params : flat posterior draws (:func:`calib.posterior.flat_draws`).
    post_models, post_experiments : model and experiment coordinates of the posterior.
    experiments, models : names of the experiments to predict and of their models.
    new_experiments : per-experiment fits: predict every experiment as a new workload.
    population_models : models predicted from the population level even when fitted.
    rng : source of the new-experiment and population effects (one standard normal
        (draws, components) block per such experiment, in experiment order).

    Returns
    -------
    b : (draws, E, components) corrections; noise : the noise parameters
    (:class:`calib.noise.NoiseParams` order), each (draws, E);
    basis : per experiment ``"fitted"``, ``"new-experiment"`` or ``"population"`` (module
    docstring).
    """
    post_models, post_experiments = list(post_models), list(post_experiments)
    d = params["b"].shape[0]
    E = len(experiments)
    has_exp = "b_exp" in params
    b = np.empty((d, E, _COMP))
    per_model = stepnoise.posterior_params(params, len(post_models))
    pars = tuple(np.empty((d, E)) for _ in per_model)
    basis = []
    forced_pop = set(population_models or ())
    for e, (name, model) in enumerate(zip(experiments, models, strict=True)):
        if model in post_models and model not in forced_pop:
            m = post_models.index(model)
            if has_exp and name in post_experiments and not new_experiments:
                b[:, e] = params["b_exp"][:, post_experiments.index(name)]
                basis.append("fitted")
            elif has_exp:
                tau_exp = params["tau_exp"]
                z = rng.standard_normal((d, _COMP))
                b[:, e] = params["b"][:, m] * np.exp(tau_exp * z)
                basis.append("new-experiment")
            else:  # per-model fit: no experiment effects; the basis still says which
                b[:, e] = params["b"][:, m]
                basis.append("new-experiment" if new_experiments else "fitted")
            for out, p in zip(pars, per_model, strict=True):
                out[:, e] = p[:, m]
        else:
            tau = params.get("tau", np.zeros((d, _COMP)))
            z = rng.standard_normal((d, _COMP))
            b[:, e] = params["b_pop"] * np.exp(tau * z)
            for out, p in zip(pars, per_model, strict=True):
                out[:, e] = p.mean(axis=1)
            basis.append("population")
    return b, pars, basis


def _correction_groups(
    params: dict,
    idata,
    design: ReplayDesign,
    *,
    new_experiments: bool,
    population_models,
    rng: np.random.Generator,
) -> _Groups:
    from calib.posterior import model_coords

    coords = model_coords(idata)
    forced_pop = set(population_models or ())
    unknown = forced_pop - set(design.models)
    if unknown:
        raise CalibError(
            f"--population-models names model(s) not in the dataset: {', '.join(sorted(unknown))}",
            field="--population-models",
            fix=f"use model names of the dataset: {', '.join(sorted(set(design.models)))}",
        )
    return _Groups(
        *correction_draws(
            params,
            coords["model"],
            coords["experiment"],
            design.experiments,
            design.models,
            new_experiments=new_experiments,
            population_models=forced_pop,
            rng=rng,
        )
    )


def means_with_host_time(
    step_us: np.ndarray,
    design: ReplayDesign,
    gap_us: np.ndarray | None = None,
    factor: np.ndarray | None = None,
) -> np.ndarray:
    """Predicted experiment means ``(draws, 3, E)``: step durations plus host gaps.

    ``step_us`` (draws, n) or (n,) in replay order (:func:`experiment_means`);
    ``gap_us`` the host gap per experiment, (E,) or per draw (draws, E) (default: the
    measured ``design.timing.gap_us``), counted ``design.gap_counts`` times in each
    mean. ``factor`` (draws, 3, E) multiplies the step part of each mean (the structural
    discrepancy ``exp(δ)``, :func:`calib.discrepancy.draws`). This is how :func:`replay`
    predicts every metric, the baselines included.
    """
    gap = design.timing.gap_us if gap_us is None else np.asarray(gap_us, np.float64)
    gap = np.atleast_2d(gap)
    steps = experiment_means(step_us, design)
    if factor is not None:
        steps = steps * factor
    return steps + gap[:, None, :] * design.gap_counts


@dataclass
class E2EResult:
    """Outcome of :func:`replay`.

    Attributes
    ----------
    table : pandas.DataFrame, one row per (metric, experiment): ``metric``, ``experiment``,
        ``model``, ``basis``, ``n_requests``, ``observed_us``, ``predicted_us`` (mean over
        draws, see the module docstring), ``lower_us``/``upper_us`` (equal-tailed
        ``prob`` interval), ``error_pct``
        ((predicted − observed)/observed·100), ``bias_us`` (predicted − observed),
        ``inside``, ``half_width_pct`` (half the band's width over the point, %),
        ``discrepancy`` (how the structural discrepancy entered the band:
        ``conditional``, ``new`` or ``none``; :func:`calib.discrepancy.draws`),
        ``gap_us`` (host gap per step used for the experiment),
        ``step_bias_pct`` (step-level bias on the experiment's sampled steps, weighted
        as in the metric; see the module docstring) and per baseline ``<name>_us`` and
        ``<name>_error_pct``.
    coverage : metric -> dict(n, inside, rate, p_low, checked, fails, median_half_width_pct).
    passed : whether every checked metric passes.
    message : one-line verdict.
    worst : (metric, experiment, error_pct) with the largest |error| on E2E.
    draws_us : (draws, 3, E) predicted experiment means per draw.
    prob, noise : settings used.
    timing : the :class:`HostTiming` used (gap per experiment, QUEUED share).
    settings : the settings as plain values (for manifests).
    notes : one line each on what the bands leave out (e.g. a posterior without a
        discrepancy record).
    """

    table: pd.DataFrame
    coverage: dict
    passed: bool
    message: str
    worst: tuple
    draws_us: np.ndarray
    prob: float
    noise: bool
    settings: dict = field(default_factory=dict)
    timing: HostTiming | None = None
    notes: list = field(default_factory=list)


def replay(
    idata,
    ds,
    *,
    features: StepFeatures | None = None,
    prob: float = config.INTERVAL_PROB,
    draws: int | None = config.E2E_DRAWS,
    noise: bool = True,
    new_experiments: bool = False,
    population_models=(),
    seed: int = config.E2E_SEED,
    baselines: bool = True,
    design: ReplayDesign | None = None,
    step_gap_us: float | str = "measured",
    queued_step_weight: float | str = "measured",
) -> E2EResult:
    """Teacher-forced replay of every experiment of ``ds`` under the posterior ``idata``.

    Parameters
    ----------
    idata : posterior (``calib.posterior.load_posterior``).
    ds : canonical dataset (every step, not only sampled ones).
    features : roofline terms of every step of ``ds`` in dataset order (default:
        ``calib.roofline.dataset_components(ds)``).
    prob : central interval probability.
    draws : posterior draws (thinned evenly; None: all).
    noise : include the step noise (:mod:`calib.noise`, full tails; posterior predictive).
    new_experiments : per-experiment fits: predict every experiment as a new workload.
    population_models : models predicted from the population level (held out).
    seed : seed of the thinning-independent randomness (effects, noise).
    baselines : also fit and report the blackbox and NNLS baselines.
    design : a precomputed :func:`replay_design` of ``ds``.
    step_gap_us : host time between consecutive steps (µs): ``"measured"`` (default: per
        experiment from the step timestamps, with its standard error as per-draw
        uncertainty; see :func:`measure_host_timing`) or a number (e.g. BLIS's α₂).
    queued_step_weight : share of the QUEUED step counted, ``"measured"`` or a number in
        [0, 1] (ignored with ``design``, which carries its own).
    """
    import pandas as pd
    from scipy.stats import binom

    if not 0.0 < prob < 1.0:
        raise CalibError(f"interval probability must be in (0, 1), got {prob}", field="--prob")
    design = replay_design(ds, queued_step_weight) if design is None else design
    E = design.bounds.size - 1
    timing = design.timing
    if not (isinstance(step_gap_us, str) and step_gap_us == "measured"):
        try:
            gap_value = float(step_gap_us)
        except (TypeError, ValueError):
            gap_value = float("nan")
        if not np.isfinite(gap_value):
            raise CalibError(
                f"step gap must be 'measured' or a finite number of µs, got {step_gap_us!r}",
                field="--step-gap-us",
            )
        timing = replace(
            timing, gap_us=np.full(E, gap_value), gap_se_us=np.zeros(E), gap_source=("given",) * E
        )
    if features is None:
        features = StepFeatures.from_dataset(ds)
    feats = features.take(design.order)
    rng = np.random.default_rng(seed)
    params = flat_draws(idata, draws)
    groups = _correction_groups(
        params,
        idata,
        design,
        new_experiments=new_experiments,
        population_models=population_models,
        rng=rng,
    )
    n = design.order.size
    d = params["b"].shape[0]
    # host gaps: the measured mean per experiment, uncertain by its standard error
    gap_draws = timing.gap_us[None, :] + timing.gap_se_us[None, :] * rng.standard_normal((d, E))
    # sampled steps (replay order): the step-level bias of the predictions
    if "sampled" in ds and "duration_us" in ds:
        obs_step = np.asarray(ds["duration_us"].values, np.float64)[design.order]
        sp = np.flatnonzero(fittable(ds)[design.order])
    else:
        obs_step, sp = np.zeros(n), np.zeros(0, np.int64)
    pred_sp = np.zeros(sp.size)
    # structural discrepancy (calib/discrepancy.py): per draw, exp(delta) on the step part
    delta, disc_kind, disc_notes = discrepancy.draws(
        discrepancy.load(idata),
        design.experiments,
        groups.basis,
        d,
        np.random.default_rng([seed, config.DISCREPANCY_SEED]),
    )
    chunk = max(1, min(d, config.E2E_CHUNK_ELEMENTS // max(n, 1)))
    pred = np.empty((d, 3, E))
    for a in range(0, d, chunk):
        sl = slice(a, min(d, a + chunk))
        D = step_time_draws_us(
            groups.b[sl],
            params["per_layer_us"][sl],
            params["per_request_us"][sl],
            params["per_step_us"][sl],
            params["alpha"][sl],
            feats,
            design.step_exp,
        )
        # exact predictive mean of the sampled steps (mean_factor·mu), for step_bias_pct
        mf = stepnoise.mean_factor(*(p[sl][:, design.step_exp[sp]] for p in groups.noise))
        pred_sp += (D[:, sp] * mf).sum(axis=0)
        if noise:
            D = stepnoise.sample(rng, D, *(p[sl][:, design.step_exp] for p in groups.noise))
        pred[sl] = means_with_host_time(D, design, gap_draws[sl], factor=np.exp(delta[sl]))
    pred_sp /= d
    r_sp, _ = discrepancy.log_ratios(
        design.step_exp[sp], design.weights[sp], obs_step[sp], pred_sp, E
    )
    step_bias = 100.0 * np.expm1(-r_sp)

    base = {}
    if baselines:
        from calib.baselines import baseline_step_predictions

        for name, step_us in baseline_step_predictions(ds, features).items():
            base[name] = means_with_host_time(step_us[design.order], design, timing.gap_us)[0]

    lo_q, hi_q = (1 - prob) / 2, (1 + prob) / 2
    rows = []
    for k, metric in enumerate(METRICS):
        for e, name in enumerate(design.experiments):
            obs = design.observed_us[k, e]
            col = pred[:, k, e]
            finite = np.isfinite(obs) and np.all(np.isfinite(col))
            lo, hi = np.quantile(col, [lo_q, hi_q]) if finite else (np.nan,) * 2
            point = float(np.mean(col)) if finite else np.nan
            row = {
                "metric": metric,
                "experiment": name,
                "model": design.models[e],
                "basis": groups.basis[e],
                "n_requests": int(design.n_requests[k, e]),
                "observed_us": obs,
                "predicted_us": float(point),
                "lower_us": float(lo),
                "upper_us": float(hi),
                "error_pct": 100.0 * (point - obs) / obs if finite else np.nan,
                "bias_us": float(point - obs) if finite else np.nan,
                "inside": bool(finite and lo <= obs <= hi),
                "half_width_pct": 50.0 * (hi - lo) / point if finite else np.nan,
                "discrepancy": disc_kind[e],
                "gap_us": float(timing.gap_us[e]),
                "step_bias_pct": float(step_bias[k, e]),
            }
            for bname, vals in base.items():
                v = float(vals[k, e])
                row[f"{bname}_us"] = v
                row[f"{bname}_error_pct"] = 100.0 * (v - obs) / obs if np.isfinite(obs) else np.nan
            rows.append(row)
    table = pd.DataFrame(rows)

    coverage = {}
    for metric in METRICS:
        sub = table[(table.metric == metric) & np.isfinite(table.observed_us)]
        n_e = int(len(sub))
        k_in = int(sub.inside.sum())
        p_low = float(binom.cdf(k_in, n_e, prob)) if n_e else float("nan")
        checked = metric in config.E2E_CHECK_METRICS
        fails = bool(checked and (n_e == 0 or p_low < config.E2E_COVERAGE_FAIL_TAIL))
        coverage[metric] = {
            "median_half_width_pct": (
                float(np.median(sub.half_width_pct)) if n_e else float("nan")
            ),
            "n": n_e,
            "inside": k_in,
            "rate": k_in / n_e if n_e else np.nan,
            "p_low": p_low,
            "checked": checked,
            "fails": fails,
        }
    e2e_rows = table[(table.metric == "e2e") & np.isfinite(table.error_pct)]
    if len(e2e_rows):
        w = e2e_rows.loc[e2e_rows.error_pct.abs().idxmax()]
        worst = ("e2e", str(w.experiment), float(w.error_pct))
    else:
        worst = ("e2e", "", float("nan"))
    failed = [m for m, c in coverage.items() if c["fails"]]
    parts = [
        f"{m} coverage {c['inside']}/{c['n']} ({100 * c['rate']:.0f} %, median half-width "
        f"{c['median_half_width_pct']:.1f} %)"
        for m, c in coverage.items()
        if c["n"]
    ]
    # A checked metric with too few experiments for the test to ever fail (even 0 inside
    # is plausible) cannot pass either: the verdict is INCONCLUSIVE (not a pass).
    powerless = [
        m
        for m, c in coverage.items()
        if c["checked"]
        and not c["fails"]
        and binom.cdf(0, c["n"], prob) >= config.E2E_COVERAGE_FAIL_TAIL
    ]
    passed = not failed and not powerless
    verdict = "FAIL" if failed else ("INCONCLUSIVE" if powerless else "PASS")
    msg = (
        verdict
        + f": nominal {100 * prob:.0f} % intervals; "
        + "; ".join(parts)
        + f"; worst E2E error {worst[2]:+.1f} % ({worst[1]})"
    )
    if failed:
        msg += (
            f"; failing: {', '.join(failed)} (P(Binomial(n, {prob}) <= inside) < "
            f"{config.E2E_COVERAGE_FAIL_TAIL})"
        )
    if powerless:
        msg += (
            f"; too few experiments to test {', '.join(powerless)} coverage (even 0 "
            f"inside has P >= {config.E2E_COVERAGE_FAIL_TAIL})"
        )
    levels = {
        b: sorted({design.models[e] for e, x in enumerate(groups.basis) if x == b})
        for b in ("population", "new-experiment")
    }
    if levels["population"]:
        msg += (
            f"; population-level prediction (not fitted per model) for "
            f"{', '.join(levels['population'])}"
        )
    if levels["new-experiment"]:
        msg += f"; new-experiment prediction for {', '.join(levels['new-experiment'])}"
    return E2EResult(
        table=table,
        coverage=coverage,
        passed=passed,
        message=msg,
        worst=worst,
        draws_us=pred,
        prob=prob,
        noise=noise,
        timing=timing,
        notes=disc_notes,
        settings={
            "draws": int(d),
            "noise": noise,
            "prob": prob,
            "seed": seed,
            "step_gap_us": (step_gap_us if isinstance(step_gap_us, str) else float(step_gap_us)),
            "gap_us": [round(float(g), 3) for g in timing.gap_us],
            "gap_se_us": [round(float(g), 3) for g in timing.gap_se_us],
            "gap_source": list(timing.gap_source),
            "queued_step_weight": round(timing.queued_step_weight, 4),
            "queued_step_weight_source": timing.queued_source,
            "new_experiments": new_experiments,
            "population_models": sorted(population_models or ()),
            "discrepancy": sorted(set(disc_kind)),
        },
    )


def format_table(result: E2EResult) -> str:
    """Plain-text per-experiment table (ms), one block per metric, then the verdict.

    Besides the interval columns: ``gap µs`` (host gap per step used) and ``step-bias%``
    (the step model's bias on the experiment's sampled steps, weighted as in the metric:
    an E2E error close to it is explained by step-time misfit).
    """
    t = result.table
    lines = []
    if result.timing is not None:
        lines += [f"settings: {result.timing.describe()}", ""]
    pct = f"{100 * result.prob:.0f}%"
    bnames = [c[:-3] for c in t.columns if c.endswith("_us") and c[:-3] in ("blackbox", "nnls")]
    has_extra = "step_bias_pct" in t and "gap_us" in t
    for metric in METRICS:
        sub = t[t.metric == metric]
        label = {
            "e2e": "E2E latency",
            "ttft": "time to first token",
            "itl": "decode interval (E2E−TTFT)/(output−1)",
        }[metric]
        has_disc = "discrepancy" in sub and (sub.discrepancy != "none").any()
        lines.append(
            f"== {label} (ms; {pct} band: parameters"
            f"{' + step noise' if result.noise else ''}"
            f"{' + experiment discrepancy' if has_disc else ''}) =="
        )
        head = (
            f"{'experiment':<44} {'basis':<14} {'observed':>10} {'predicted':>10} "
            f"{'lower':>10} {'upper':>10} {'±%':>5} {'err%':>7} {'bias':>9} {'in':>3}"
        )
        if has_extra:
            head += f" {'gap µs':>7} {'step-bias%':>10}"
        for b in bnames:
            head += f" {b + ' err%':>14}"
        lines.append(head)
        for _, r in sub.iterrows():
            line = (
                f"{str(r.experiment)[:44]:<44} {r.basis:<14} {r.observed_us / 1e3:>10.2f} "
                f"{r.predicted_us / 1e3:>10.2f} {r.lower_us / 1e3:>10.2f} "
                f"{r.upper_us / 1e3:>10.2f} {r.half_width_pct:>5.1f} {r.error_pct:>+7.1f} "
                f"{r.bias_us / 1e3:>+9.2f} "
                f"{'yes' if r.inside else 'NO':>3}"
            )
            if has_extra:
                line += f" {r.gap_us:>7.1f} {r.step_bias_pct:>+10.1f}"
            for b in bnames:
                line += f" {r[b + '_error_pct']:>+14.1f}"
            lines.append(line)
        c = result.coverage[metric]
        mean_abs = sub.error_pct.abs().mean()
        summary = (
            f"coverage {c['inside']}/{c['n']}; median half-width "
            f"{c['median_half_width_pct']:.1f} %; mean err {sub.error_pct.mean():+.1f} % "
            f"(|err| {mean_abs:.1f} %)"
        )
        if has_extra:
            summary += f"; mean step-bias {sub.step_bias_pct.mean():+.1f} %"
        for b in bnames:
            summary += f"; {b} mean |err| {sub[b + '_error_pct'].abs().mean():.1f} %"
        lines.append(summary + ("" if c["checked"] else " (reported, not checked)"))
        lines.append("")
    if has_extra:
        lines += [
            "step-bias%: predicted/observed − 1 of the step durations on each experiment's "
            "sampled steps, weighted as in the metric (the step model's own misfit; an "
            "err% close to it is explained by step-time misfit, not by the replay)",
            "",
        ]
    lines += [f"note: {n}" for n in result.notes]
    lines.append(result.message)
    return "\n".join(lines)
