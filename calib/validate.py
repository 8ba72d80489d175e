"""Held-out validation of the step-time model against the BLIS baselines.

Splits (:func:`make_folds`), each a labelling of every step and every request of a
canonical dataset as ``train`` (0), ``val`` (1), ``test`` (2) or excluded (−1):

``temporal``
    Within each experiment, steps in scheduler-step-id order: the first 60 % train,
    the next 20 % val, the last 20 % test (:data:`calib.config.VALIDATE_TEMPORAL`). A
    request belongs to the part holding both its QUEUED and FINISHED steps; requests
    straddling a boundary (or without those steps) are excluded from the E2E tables.
``workload``
    Leave one workload out (``exp_workload``): one fold per workload; the held-out
    experiments are ``test``, all others ``train``. Models keep their other workloads
    in the fit; the held-out experiments are predicted as new workloads (basis
    ``new-experiment`` in every hierarchy: per-experiment fits draw new workload
    effects, and the discrepancy is a new experiment's ``N(mu, tau)``).
``model``
    Leave one model out (``exp_model``): the held-out model is predicted from the
    population level (``b = b_pop·exp(tau·z)`` per draw, as ``calib.e2e`` and the
    ``population`` export do).
``request-hash``
    ``int(SHA-256(req_id UTF-8), big-endian) mod 100``: < 70 train, < 85 val, else test
    (BLIS's training pipeline split; :data:`calib.config.VALIDATE_HASH_SPLIT`). A step
    goes to the part of its *lead request*: the slot computing the most tokens (the
    prefill chunk of a mixed batch), ties to the first slot (the oldest decode). Steps
    hold tens of requests, so "all requests in one part" would keep < 1 % of the steps
    and "majority of requests" would leave only small batches in the held-out parts; the
    lead-request rule keeps the 70/15/15 fractions and an unbiased batch mix. Requests
    are judged on their own hash (E2E/TTFT of held-out requests).

Per fold the model is fitted (:func:`calib.fit.fit_model_data`) on the sampled train
steps and judged on the sampled held-out steps and requests:

* per step: MAPE, median APE, Pearson r, signed MSPE (mean of 100·(pred − obs)/obs,
  the bias; contract INV-M-6 asks |MSPE| < 5 % of the exported plug-in predictor, so
  :func:`inv_m6_verdict` judges the ``blis`` column) and the coverage of the
  ``prob`` posterior-predictive interval of the step duration;
* per experiment: E2E, TTFT and decode-interval mean error and interval coverage from
  the teacher-forced replay (:func:`calib.e2e.replay`, held-out requests only), with the
  host gaps between steps and the QUEUED step's share measured from the timestamps of
  the held-out part exactly as ``check_e2e`` does (:func:`calib.e2e.measure_host_timing`).
  The baselines' step predictions go through the same replay weights and host gaps
  (:func:`calib.e2e.means_with_host_time`), so every predictor gets the same host time.
  The bands include the structural discrepancy (:mod:`calib.discrepancy`) estimated
  from the fold's TRAIN steps only: experiments with train steps (temporal and
  request-hash splits) use their conditional distribution, held-out workloads and
  models a new experiment's ``N(mu, tau)``.

Predictors (column ``predictor``):

``calib``     posterior predictive mean step time: the mean over draws of
              ``mean_factor·mu`` (``mu`` the body median; the point of :mod:`calib.e2e`);
``blis``      the exported BLIS block (``calib.export``: posterior-mean betas, prefill and
              decode added, i.e. alpha dropped) through ``calib.predict.blis_step_time_us``;
``blackbox``  BLIS's 3-coefficient blackbox (:mod:`calib.baselines`), OLS on the train
              steps of the same experiment; for an experiment without train steps
              (leave-one-out folds) on those of its model, and for an unseen model on all
              train steps;
``nnls``      NNLS of the roofline terms per model on the train steps; an unseen model
              gets the NNLS of all train steps pooled.

Baselines are fitted here on the train part only (``calib.baselines.
baseline_step_predictions`` fits on every sampled step, which would leak).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from calib import config
from calib.errors import CalibError
from calib.predict import StepFeatures
from calib.vocab import SPLITS, fittable

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd

__all__ = [
    "PARTS",
    "PREDICTORS",
    "SPLITS",
    "Fold",
    "FoldResult",
    "ValidationResult",
    "evaluate_fold",
    "fold_schedule",
    "inv_m6_line",
    "inv_m6_verdict",
    "make_folds",
    "markdown_report",
    "replace_results_section",
    "request_hash_bucket",
    "request_hash_split",
    "results_markdown",
    "run_validation",
    "step_metrics",
    "summary_table",
    "temporal_split",
    "write_reports",
    "write_results_section",
]

#: Split names accepted by ``--split`` (``all`` runs each).
#: Part codes: index into this tuple; −1 = excluded.
PARTS = ("train", "val", "test")
TRAIN, VAL, TEST, EXCLUDED = 0, 1, 2, -1
#: Step predictors in table order.
PREDICTORS = ("calib", "blis", "blackbox", "nnls")

#: Columns of the per-step table.
STEP_COLUMNS = (
    "split",
    "fold",
    "part",
    "predictor",
    "n_steps",
    "mape_pct",
    "median_ape_pct",
    "pearson_r",
    "mspe_pct",
    "coverage_pct",
)
#: Columns of the per-experiment table.
E2E_COLUMNS = (
    "split",
    "fold",
    "part",
    "experiment",
    "model",
    "workload",
    "basis",
    "metric",
    "n_requests",
    "observed_us",
    "predicted_us",
    "lower_us",
    "upper_us",
    "error_pct",
    "inside",
    "blis_error_pct",
    "blackbox_error_pct",
    "nnls_error_pct",
)


# ------------------------------------------------------------------------ splits
@dataclass(frozen=True)
class Fold:
    """One train/held-out labelling of a dataset.

    Attributes
    ----------
    split : split name (:data:`SPLITS`).
    name : fold label (``"temporal"``, ``"workload=codegen"``, ``"model=llama-2-7b"``, ...).
    step_part : (n_steps,) int8, part code of every step (:data:`PARTS` index, −1 excluded).
    request_part : (n_requests,) int8, part code of every request.
    held_out : the workload or model left out ("" for temporal / request-hash).
    """

    split: str
    name: str
    step_part: np.ndarray
    request_part: np.ndarray
    held_out: str = ""

    def steps(self, part: int, sampled: np.ndarray | None = None) -> np.ndarray:
        """Step positions of a part (only ``sampled`` ones when given)."""
        sel = self.step_part == part
        if sampled is not None:
            sel &= sampled
        return np.flatnonzero(sel)


def temporal_split(
    ds, fractions: Sequence[float] = config.VALIDATE_TEMPORAL
) -> tuple[np.ndarray, np.ndarray]:
    """``(step_part, request_part)`` of the temporal split (module docstring).

    ``fractions`` (train, val, test) must sum to 1. Boundaries are taken on the rank
    of every step (sampled or not) in step-id order within its experiment.
    """
    f = np.asarray(fractions, np.float64)
    if f.shape != (3,) or np.any(f < 0) or abs(f.sum() - 1) > 1e-9:
        raise CalibError(
            f"temporal fractions must be 3 non-negative numbers summing to 1, "
            f"got {list(fractions)}",
            field="fractions",
        )
    step_exp = np.asarray(ds["step_experiment"].values).astype(np.int64)
    step_id = np.asarray(ds["step_id"].values).astype(np.int64)
    n_exp = ds.sizes["experiment"]
    step_part = np.full(step_exp.size, EXCLUDED, np.int8)
    # per experiment: the largest step id of train and of val
    cut_train = np.full(n_exp, np.iinfo(np.int64).min)
    cut_val = np.full(n_exp, np.iinfo(np.int64).min)
    cum = np.cumsum(f)
    for e in range(n_exp):
        pos = np.flatnonzero(step_exp == e)
        if pos.size == 0:
            continue
        pos = pos[np.argsort(step_id[pos], kind="stable")]
        rank = np.arange(pos.size)
        part = np.where(
            rank < np.floor(cum[0] * pos.size),
            TRAIN,
            np.where(rank < np.floor(cum[1] * pos.size), VAL, TEST),
        )
        step_part[pos] = part
        ids = step_id[pos]
        if (part == TRAIN).any():
            cut_train[e] = ids[part == TRAIN].max()
        cut_val[e] = ids[part <= VAL].max() if (part <= VAL).any() else cut_train[e]

    r_exp = np.asarray(ds["req_experiment"].values).astype(np.int64)
    q = np.asarray(ds["req_queued_step"].values).astype(np.int64)
    fin = np.asarray(ds["req_finished_step"].values).astype(np.int64)

    def part_of(s):
        return np.where(s <= cut_train[r_exp], TRAIN, np.where(s <= cut_val[r_exp], VAL, TEST))

    pq, pf = part_of(q), part_of(fin)
    ok = (q >= 0) & (fin >= q) & (pq == pf)
    request_part = np.where(ok, pq, EXCLUDED).astype(np.int8)
    return step_part, request_part


def request_hash_bucket(req_ids: Iterable[str]) -> np.ndarray:
    """``int(SHA-256(id), big-endian) mod 100`` of each request id (UTF-8)."""
    return np.array(
        [
            int.from_bytes(hashlib.sha256(str(r).encode("utf-8")).digest(), "big") % 100
            for r in req_ids
        ],
        dtype=np.int64,
    )


def request_hash_split(
    ds, bounds: Sequence[int] = config.VALIDATE_HASH_SPLIT
) -> tuple[np.ndarray, np.ndarray]:
    """``(step_part, request_part)`` of the request-hash split (module docstring).

    ``bounds`` = (train end, val end) on the bucket scale 0..100: bucket < bounds[0]
    train, < bounds[1] val, else test. Steps without any request are excluded.
    """
    lo, hi = (int(b) for b in bounds)
    if not 0 <= lo <= hi <= 100:
        raise CalibError(
            f"hash bounds must satisfy 0 <= train <= val <= 100, got {list(bounds)}", field="bounds"
        )
    bucket = request_hash_bucket(np.asarray(ds["req_id"].values))
    request_part = np.where(bucket < lo, TRAIN, np.where(bucket < hi, VAL, TEST)).astype(np.int8)
    slot_req = np.asarray(ds["slot_request"].values)
    mask = np.asarray(ds["slot_mask"].values, bool) & (slot_req >= 0)
    tokens = np.where(mask, np.asarray(ds["slot_new_tokens"].values), -1)
    lead_slot = np.argmax(tokens, axis=1)  # first slot with the most tokens
    rows = np.arange(slot_req.shape[0])
    lead = slot_req[rows, lead_slot]
    has = mask[rows, lead_slot]
    step_part = np.full(rows.size, EXCLUDED, np.int8)
    step_part[has] = request_part[lead[has]]
    return step_part, request_part


def _leave_one_out(ds, key: str, split: str) -> list[Fold]:
    labels = np.asarray(ds[key].values).astype(str)
    step_exp = np.asarray(ds["step_experiment"].values).astype(np.int64)
    r_exp = np.asarray(ds["req_experiment"].values).astype(np.int64)
    folds = []
    for value in dict.fromkeys(labels.tolist()):
        held = labels == value
        if held.all():
            raise CalibError(
                f"leave-one-{split}-out needs at least two {split}s; the dataset "
                f"has only {value!r}",
                field=key,
                fix=f"use a dataset with several {split}s or another --split",
            )
        step_part = np.where(held[step_exp], TEST, TRAIN).astype(np.int8)
        request_part = np.where(held[r_exp], TEST, TRAIN).astype(np.int8)
        folds.append(Fold(split, f"{split}={value}", step_part, request_part, held_out=value))
    return folds


def make_folds(ds, split: str) -> list[Fold]:
    """Folds of one split (:data:`SPLITS`) of a canonical dataset."""
    if split == "temporal":
        return [Fold(split, split, *temporal_split(ds))]
    if split == "request-hash":
        return [Fold(split, split, *request_hash_split(ds))]
    if split == "workload":
        return _leave_one_out(ds, "exp_workload", "workload")
    if split == "model":
        return _leave_one_out(ds, "exp_model", "model")
    raise CalibError(
        f"unknown split {split!r}", field="--split", fix=f"use one of {', '.join(SPLITS)} or all"
    )


# ------------------------------------------------------------------------ metrics
def step_metrics(pred_us, obs_us) -> dict[str, float]:
    """MAPE, median APE, Pearson r and signed MSPE (all %, r unitless) of step predictions."""
    p = np.asarray(pred_us, np.float64)
    o = np.asarray(obs_us, np.float64)
    ok = np.isfinite(p) & np.isfinite(o) & (o > 0)
    p, o = p[ok], o[ok]
    if o.size == 0:
        return {
            "n_steps": 0,
            "mape_pct": np.nan,
            "median_ape_pct": np.nan,
            "pearson_r": np.nan,
            "mspe_pct": np.nan,
        }
    rel = 100.0 * (p - o) / o
    r = float(np.corrcoef(p, o)[0, 1]) if o.size > 1 and p.std() > 0 and o.std() > 0 else np.nan
    return {
        "n_steps": int(o.size),
        "mape_pct": float(np.mean(np.abs(rel))),
        "median_ape_pct": float(np.median(np.abs(rel))),
        "pearson_r": r,
        "mspe_pct": float(np.mean(rel)),
    }


# ------------------------------------------------------------------------ dataset facts
@dataclass(frozen=True)
class _Meta:
    experiments: tuple[str, ...]
    exp_model: np.ndarray  # (E,) str
    exp_workload: np.ndarray  # (E,) str
    step_exp: np.ndarray  # (n,) int64
    duration_us: np.ndarray  # (n,) float, NaN where not sampled
    sampled: np.ndarray  # (n,) bool
    prefill_tokens: np.ndarray
    decode_tokens: np.ndarray


def _meta(ds) -> _Meta:
    n_exp = ds.sizes["experiment"]
    exps = (
        tuple(str(x) for x in np.asarray(ds["experiment"].values))
        if "experiment" in ds.coords
        else tuple(str(i) for i in range(n_exp))
    )
    sampled = fittable(ds)
    dur = np.where(sampled, np.asarray(ds["duration_us"].values, np.float64), np.nan)
    return _Meta(
        exps,
        np.asarray(ds["exp_model"].values).astype(str),
        np.asarray(ds["exp_workload"].values).astype(str),
        np.asarray(ds["step_experiment"].values).astype(np.int64),
        dur,
        sampled,
        np.asarray(ds["prefill_tokens"].values, np.float64),
        np.asarray(ds["decode_tokens"].values, np.float64),
    )


def _fold_model_data(meta: _Meta, feats: StepFeatures, steps: np.ndarray):
    """(ModelData, coords, step order) of the train steps, as ``build_model_data`` lays it out.

    Only experiments (and models) with train steps enter the coordinates, so a held-out
    model is absent from the posterior (and predicted from the population level).
    """
    from calib.data import layout_model_data, step_layout
    from calib.model import model_coords

    lay = step_layout(meta.step_exp, meta.exp_model, steps, present_only=True)
    f = feats.take(lay.steps)
    data = layout_model_data(
        lay, f.components, f.num_layers, f.batch_size, meta.duration_us[lay.steps]
    )
    coords = model_coords(
        data, lay.models, [meta.experiments[e] for e in lay.experiments], lay.steps
    )
    return data, coords, lay.steps


def _subsample(steps: np.ndarray, max_steps: int | None, seed: int) -> np.ndarray:
    if max_steps is None or steps.size <= max_steps:
        return steps
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(steps, size=int(max_steps), replace=False))


# ------------------------------------------------------------------------ predictions
def _blis_betas(params: dict, post_models: list[str], meta: _Meta) -> list[list[float]]:
    """The exported BLIS betas (posterior means, ``calib.export``) for each experiment."""
    from calib.posterior import plugin_means
    from calib.predict import betas_from_params

    means = plugin_means(params)
    out = []
    for model in meta.exp_model:
        b = (
            params["b"][:, post_models.index(model)].mean(axis=0)
            if model in post_models
            else params["b_pop"].mean(axis=0)
        )
        out.append(
            betas_from_params(
                b, means["per_layer_us"], means["per_request_us"], means["per_step_us"]
            )
        )
    return out


def _calib_step_predictions(
    params: dict,
    b: np.ndarray,
    noise_params: tuple,
    feats: StepFeatures,
    steps: np.ndarray,
    meta: _Meta,
    prob: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior predictive mean step time (µs; ``mean_factor·mu`` averaged over draws, the
    point, as in :mod:`calib.e2e`) and inside-interval flags of the given steps.

    ``noise_params``: per experiment, (draws, E) each (:func:`calib.e2e.correction_draws`).
    """
    from calib import noise
    from calib.predict import step_time_draws_us

    d = b.shape[0]
    chunk = max(1, config.E2E_CHUNK_ELEMENTS // max(d, 1))
    point = np.empty(steps.size)
    inside = np.zeros(steps.size, bool)
    lo_q, hi_q = (1 - prob) / 2, (1 + prob) / 2
    for a in range(0, steps.size, chunk):
        idx = steps[a : a + chunk]
        group = meta.step_exp[idx]
        D = step_time_draws_us(
            b,
            params["per_layer_us"],
            params["per_request_us"],
            params["per_step_us"],
            params["alpha"],
            feats.take(idx),
            group,
        )
        rows = [p[:, group] for p in noise_params]
        point[a : a + idx.size] = np.mean(D * noise.mean_factor(*rows), axis=0)
        Y = noise.sample(rng, D, *rows)
        lo, hi = np.quantile(Y, [lo_q, hi_q], axis=0)
        obs = meta.duration_us[idx]
        inside[a : a + idx.size] = (lo <= obs) & (obs <= hi)
    return point, inside


def _baseline_predictions(
    meta: _Meta, feats: StepFeatures, train: np.ndarray, targets: np.ndarray
) -> dict[str, np.ndarray]:
    """Blackbox and NNLS predictions (µs) of every step (NaN outside the target experiments)."""
    from calib.baselines import blackbox_fit, blackbox_predict, nnls_fit, nnls_predict

    n = meta.step_exp.size
    out = {"blackbox": np.full(n, np.nan), "nnls": np.full(n, np.nan)}
    train_exp = meta.step_exp[train]
    train_model = meta.exp_model[train_exp]
    cache_bb: dict[str, np.ndarray] = {}
    cache_nn: dict[str, np.ndarray] = {}

    def bb_coef(sel: np.ndarray) -> np.ndarray:
        t = train[sel]
        return blackbox_fit(meta.prefill_tokens[t], meta.decode_tokens[t], meta.duration_us[t])

    for e in targets:
        pos = np.flatnonzero(meta.step_exp == e)
        model = meta.exp_model[e]
        own = train_exp == e
        if own.sum() >= 3:
            coef = bb_coef(own)
        else:
            key = model if (train_model == model).sum() >= 3 else "*"
            if key not in cache_bb:
                cache_bb[key] = bb_coef(
                    train_model == model if key != "*" else np.ones(train.size, bool)
                )
            coef = cache_bb[key]
        out["blackbox"][pos] = blackbox_predict(
            coef, meta.prefill_tokens[pos], meta.decode_tokens[pos]
        )
        key = model if (train_model == model).sum() >= 9 else "*"
        if key not in cache_nn:
            t = train[train_model == model] if key != "*" else train
            cache_nn[key] = nnls_fit(feats.take(t), meta.duration_us[t])
        out["nnls"][pos] = nnls_predict(cache_nn[key], feats.take(pos))
    return out


# ------------------------------------------------------------------------ one fold
@dataclass
class FoldResult:
    """Outcome of :func:`evaluate_fold`: table rows plus fit facts."""

    fold: Fold
    step_rows: list[dict]
    e2e_rows: list[dict]
    n_train_steps: int
    gate_verdict: str
    sampling_s: float
    wall_s: float


def evaluate_fold(
    ds,
    fold: Fold,
    *,
    features: StepFeatures,
    hierarchy: str = "per-model",
    priors=None,
    settings=None,
    draws: int = config.VALIDATE_DRAWS,
    prob: float = config.INTERVAL_PROB,
    seed: int = config.E2E_SEED,
    max_train_steps: int | None = config.VALIDATE_MAX_TRAIN_STEPS,
    noise: bool = True,
    progress: bool = False,
    fit_fn: Callable | None = None,
    _meta_cache: _Meta | None = None,
    _design_cache: dict | None = None,
) -> FoldResult:
    """Fit on the train part of ``fold`` and score every held-out part.

    Parameters
    ----------
    ds : canonical dataset.
    fold : from :func:`make_folds`.
    features : roofline terms of every step of ``ds`` (dataset order).
    hierarchy, priors, settings : passed to :func:`calib.fit.fit_model_data`
        (``settings`` a :class:`calib.fit.SamplerSettings`; default: validation settings).
    draws : posterior draws used for predictions and intervals (thinned evenly).
    prob : central interval probability.
    seed : seed of population/new-workload effects and predictive noise.
    max_train_steps : train steps fitted at most (a seeded random subset beyond; None: all).
    noise : intervals include the step noise (:mod:`calib.noise`).
    fit_fn : replaces ``calib.fit.fit_model_data`` (same signature; for I/O tests).
    """
    from calib import discrepancy
    from calib.e2e import correction_draws, means_with_host_time, replay, replay_design
    from calib.fit import fit_model_data
    from calib.posterior import flat_draws
    from calib.predict import blis_step_time_us

    t_wall = time.perf_counter()
    meta = _meta_cache or _meta(ds)
    if settings is None:
        settings = default_settings()
    train = fold.steps(TRAIN, meta.sampled)
    if train.size == 0:
        raise CalibError(
            f"fold {fold.name}: no sampled train steps",
            field="--split",
            fix="use a dataset with more sampled steps",
        )
    train_fit = _subsample(train, max_train_steps, settings.seed)
    data, coords, train_fit = _fold_model_data(meta, features, train_fit)
    fit = (fit_fn or fit_model_data)(
        data,
        coords,
        hierarchy=hierarchy,
        priors=priors,
        settings=settings,
        step_index=train_fit,
        progress=progress,
    )
    idata: Any = fit.idata
    # the structural discrepancy from the TRAIN steps only (from_fit keeps the steps the
    # fold's posterior was fitted on); held-out bands use it (calib.discrepancy.draws)
    if discrepancy.ATTR not in idata.attrs:
        idata.attrs[discrepancy.ATTR] = json.dumps(
            discrepancy.from_fit(idata, discrepancy.step_inputs(ds))
        )
    params = flat_draws(idata, draws)
    post_models = list(coords["model"])
    post_exps = list(coords["experiment"])
    rng = np.random.default_rng(seed)
    # a held-out workload is a new workload, whatever the hierarchy (module docstring)
    new_workloads = fold.split == "workload"
    b, noise_params, _ = correction_draws(
        params,
        post_models,
        post_exps,
        meta.experiments,
        meta.exp_model.tolist(),
        new_experiments=new_workloads,
        rng=rng,
    )
    betas = _blis_betas(params, post_models, meta)

    step_rows, e2e_rows = [], []
    parts = [
        p for p in (VAL, TEST) if (fold.step_part == p).any() or (fold.request_part == p).any()
    ]
    for part in parts:
        held = fold.steps(part, meta.sampled)
        targets = np.unique(
            meta.step_exp[
                np.flatnonzero(
                    (fold.step_part == part)
                    | np.isin(
                        meta.step_exp,
                        np.unique(
                            np.asarray(ds["req_experiment"].values)[fold.request_part == part]
                        ),
                    )
                )
            ]
        )
        base = _baseline_predictions(meta, features, train, targets)
        # per-step
        obs = meta.duration_us[held]
        point, inside = _calib_step_predictions(
            params, b, noise_params, features, held, meta, prob, rng
        )
        blis = np.empty(held.size)
        for e in np.unique(meta.step_exp[held]):
            sel = meta.step_exp[held] == e
            blis[sel] = blis_step_time_us(betas[e], features.take(held[sel]))
        preds = {
            "calib": point,
            "blis": blis,
            "blackbox": base["blackbox"][held],
            "nnls": base["nnls"][held],
        }
        for name in PREDICTORS:
            row = {
                "split": fold.split,
                "fold": fold.name,
                "part": PARTS[part],
                "predictor": name,
                **step_metrics(preds[name], obs),
                "coverage_pct": (
                    100.0 * float(inside.mean()) if name == "calib" and held.size else np.nan
                ),
            }
            step_rows.append(row)
        # per experiment (teacher-forced replay of held-out requests)
        reqs = np.flatnonzero(fold.request_part == part)
        if reqs.size == 0:
            continue
        key = (fold.name, part)
        sub = ds.isel(request=reqs)
        design = replay_design(sub)
        if _design_cache is not None:
            _design_cache[key] = design
        res = replay(
            idata,
            sub,
            features=features,
            prob=prob,
            draws=draws,
            noise=noise,
            seed=seed,
            baselines=False,
            design=design,
            new_experiments=new_workloads,
        )
        assert res.timing is not None  # replay() always measures the host timing
        step_all = {"blis": np.full(meta.step_exp.size, np.nan), **base}
        for e in targets:
            pos = np.flatnonzero(meta.step_exp == e)
            step_all["blis"][pos] = blis_step_time_us(betas[e], features.take(pos))
        base_means = {}  # same replay and host gaps as the model (calib.e2e.replay)
        for name, vals in step_all.items():
            v = vals[design.order]
            v = np.where(np.isfinite(v), v, 0.0)  # steps of other experiments carry no weight
            base_means[name] = means_with_host_time(v, design, res.timing.gap_us)[0]
        table = res.table
        metric_index = {m: k for k, m in enumerate(("e2e", "ttft", "itl"))}
        exp_index = {n: e for e, n in enumerate(design.experiments)}
        for r in table.itertuples(index=False):
            if r.n_requests == 0:
                continue
            e = exp_index[r.experiment]
            k = metric_index[r.metric]
            obs_e = r.observed_us
            row = {
                "split": fold.split,
                "fold": fold.name,
                "part": PARTS[part],
                "experiment": r.experiment,
                "model": r.model,
                "workload": meta.exp_workload[e],
                "basis": r.basis,
                "metric": r.metric,
                "n_requests": int(r.n_requests),
                "observed_us": obs_e,
                "predicted_us": r.predicted_us,
                "lower_us": r.lower_us,
                "upper_us": r.upper_us,
                "error_pct": r.error_pct,
                "inside": bool(r.inside),
            }
            for name in ("blis", "blackbox", "nnls"):
                v = base_means[name][k, e]
                row[f"{name}_error_pct"] = (
                    100.0 * (v - obs_e) / obs_e if np.isfinite(obs_e) and obs_e else np.nan
                )
            e2e_rows.append(row)
    return FoldResult(
        fold=fold,
        step_rows=step_rows,
        e2e_rows=e2e_rows,
        n_train_steps=int(train_fit.size),
        gate_verdict=str(fit.gate.verdict),
        sampling_s=float(fit.sampling_s),
        wall_s=time.perf_counter() - t_wall,
    )


def default_settings(**overrides):
    """:class:`calib.fit.SamplerSettings` with the validation defaults
    (:data:`calib.config.VALIDATE_SAMPLER`), overridden by ``overrides``."""
    from dataclasses import asdict

    from calib.fit import SamplerSettings

    base = {k: v for k, v in asdict(config.VALIDATE_SAMPLER).items()}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return SamplerSettings(**base)


# ------------------------------------------------------------------------ all folds
@dataclass
class ValidationResult:
    """Tables of :func:`run_validation` (pandas DataFrames) and per-fold facts."""

    steps: pd.DataFrame
    e2e: pd.DataFrame
    folds: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


def run_validation(
    ds,
    splits: Sequence[str] = SPLITS,
    *,
    hierarchy: str = "per-model",
    priors=None,
    settings=None,
    draws: int = config.VALIDATE_DRAWS,
    prob: float = config.INTERVAL_PROB,
    seed: int = config.E2E_SEED,
    max_train_steps: int | None = config.VALIDATE_MAX_TRAIN_STEPS,
    features: StepFeatures | None = None,
    progress: bool = True,
    fit_fn: Callable | None = None,
    on_fold: Callable[[ValidationResult], None] | None = None,
) -> ValidationResult:
    """Run every fold of ``splits`` (:func:`make_folds`, :func:`evaluate_fold`).

    ``progress`` shows a tqdm bar over folds. Returns the per-step and per-experiment
    tables (columns :data:`STEP_COLUMNS`, :data:`E2E_COLUMNS`), rows in split and fold
    order. The folds run in :func:`fold_schedule` order; after each, ``on_fold`` gets
    the result so far (``settings["folds_planned"]`` names every fold), so a long run
    can write partial reports.
    """
    import pandas as pd
    from tqdm import tqdm

    if not 0.0 < prob < 1.0:
        raise CalibError(f"interval probability must be in (0, 1), got {prob}", field="--prob")
    for s in splits:
        if s not in SPLITS:
            raise CalibError(
                f"unknown split {s!r}",
                field="--split",
                fix=f"use one of {', '.join(SPLITS)} or all",
            )
    if settings is None:
        settings = default_settings()
    if priors is None:
        from calib.priors import load_priors

        priors = load_priors()
    meta = _meta(ds)
    if not meta.sampled.any():
        raise CalibError(
            "the dataset has no sampled steps with a positive duration",
            field="duration_us",
            fix="import traces with step.BATCH_SUMMARY events",
        )
    if features is None:
        features = StepFeatures.from_dataset(ds)
    folds = [f for s in splits for f in make_folds(ds, s)]
    rank = {f.name: i for i, f in enumerate(folds)}
    step_rows: list[dict] = []
    e2e_rows: list[dict] = []
    facts: list[dict] = []
    from dataclasses import asdict

    run_settings = {
        "hierarchy": hierarchy,
        "sampler": asdict(settings),
        "draws": draws,
        "prob": prob,
        "seed": seed,
        "max_train_steps": max_train_steps,
        "splits": list(splits),
        "folds_planned": [f.name for f in folds],
    }

    def result() -> ValidationResult:
        def ordered(rows: list[dict]) -> list[dict]:
            return sorted(rows, key=lambda r: rank[r["fold"]])  # stable within a fold

        return ValidationResult(
            steps=pd.DataFrame(ordered(step_rows), columns=list(STEP_COLUMNS)),
            e2e=pd.DataFrame(ordered(e2e_rows), columns=list(E2E_COLUMNS)),
            folds=ordered(facts),
            settings=run_settings,
        )

    bar = tqdm(fold_schedule(folds), desc="validate", unit="fold", disable=not progress)
    for fold in bar:
        bar.set_postfix_str(fold.name[-40:])
        r = evaluate_fold(
            ds,
            fold,
            features=features,
            hierarchy=hierarchy,
            priors=priors,
            settings=settings,
            draws=draws,
            prob=prob,
            seed=seed,
            max_train_steps=max_train_steps,
            fit_fn=fit_fn,
            _meta_cache=meta,
        )
        step_rows += r.step_rows
        e2e_rows += r.e2e_rows
        facts.append(
            {
                "split": fold.split,
                "fold": fold.name,
                "held_out": fold.held_out,
                "run_order": len(facts) + 1,
                "n_train_steps": r.n_train_steps,
                "gate": r.gate_verdict,
                "sampling_s": round(r.sampling_s, 2),
                "wall_s": round(r.wall_s, 2),
                **{
                    f"n_{PARTS[p]}_sampled_steps": int(fold.steps(p, meta.sampled).size)
                    for p in (TRAIN, VAL, TEST)
                },
                **{
                    f"n_{PARTS[p]}_requests": int((fold.request_part == p).sum())
                    for p in (TRAIN, VAL, TEST)
                },
            }
        )
        if on_fold is not None:
            on_fold(result())
    return result()


def fold_schedule(folds: Sequence[Fold]) -> list[Fold]:
    """The order folds run in: every split's first fold, then every split's second, ...

    So a run stopped early (or read while it runs, ``run_validation(on_fold=...)``)
    has judged every split family; the tables keep split and fold order.
    """
    by_split: dict[str, list[Fold]] = {}
    for f in folds:
        by_split.setdefault(f.split, []).append(f)
    rounds = max((len(v) for v in by_split.values()), default=0)
    return [v[i] for i in range(rounds) for v in by_split.values() if i < len(v)]


# ------------------------------------------------------------------------ reports
def _lomo_table(lomo, *, basis: bool) -> list[str]:
    """Markdown rows of the leave-one-model-out E2E table (ms); ``basis`` adds its column."""
    head = "| held-out model | experiment |" + (" basis |" if basis else "")
    rows = [
        head + " observed | predicted | band | error % | inside | blackbox err % | nnls err % |",
        "|" + "---|" * (10 if basis else 9),
    ]
    for r in lomo.itertuples(index=False):
        rows.append(
            f"| {r.model} | {r.experiment} |"
            + (f" {r.basis} |" if basis else "")
            + f" {r.observed_us / 1e3:.1f} | {r.predicted_us / 1e3:.1f} | "
            f"[{r.lower_us / 1e3:.1f}, {r.upper_us / 1e3:.1f}] | {_fmt(r.error_pct, '+.1f')} | "
            f"{'yes' if r.inside else 'no'} | {_fmt(r.blackbox_error_pct, '+.1f')} | "
            f"{_fmt(r.nnls_error_pct, '+.1f')} |"
        )
    return rows


def _fmt(x, spec: str = ".1f") -> str:
    try:
        return "–" if x is None or not np.isfinite(x) else format(x, spec)
    except TypeError:
        return str(x)


def inv_m6_verdict(mspe_pct: float, bound_pct: float = config.VALIDATE_MSPE_BOUND_PCT) -> str:
    """Contract INV-M-6 on one held-out part: ``"pass"`` when |MSPE| < ``bound_pct``,
    ``"FAIL"`` otherwise, ``"–"`` without held-out steps."""
    try:
        ok = np.isfinite(mspe_pct)
    except TypeError:
        return "–"
    if not ok:
        return "–"
    return "pass" if abs(float(mspe_pct)) < bound_pct else "FAIL"


def inv_m6_line(summary, bound_pct: float = config.VALIDATE_MSPE_BOUND_PCT) -> str:
    """One line: INV-M-6 on the exported plug-in predictor (``blis``: the contract is
    checked on what BLIS runs) per held-out part, and the same count for ``calib``."""
    out = []
    for name, label in (
        ("blis", "exported BLIS predictor"),
        ("calib", "calib posterior predictive mean"),
    ):
        col = f"{name}_mspe_pct"
        m = summary[np.isfinite(summary[col].astype(float))]
        if not len(m):
            out.append(f"{label}: no held-out steps")
            continue
        ok = int((m[col].abs() < bound_pct).sum())
        w = m.loc[m[col].abs().idxmax()]
        verdict = ("PASS" if ok == len(m) else "FAIL") + ", " if name == "blis" else ""
        out.append(
            f"{label}: {verdict}{ok}/{len(m)} held-out parts within the bound, worst "
            f"{w[col]:+.2f} % ({w.fold}, {w.part})"
        )
    return f"INV-M-6 (|MSPE| < {bound_pct:g} % on held-out steps) — " + "; ".join(out) + "."


def _judged(e2e, metric: str):
    """Rows of ``e2e`` (table :data:`E2E_COLUMNS`) of one metric with an observed value."""
    m = e2e[e2e.metric == metric]
    return m[np.isfinite(m.observed_us.astype(float))]


def half_width_pct(rows) -> np.ndarray:
    """Half the band's width over the predicted mean, % (``calib.e2e``'s
    ``half_width_pct``), of rows of the per-experiment table."""
    up, lo = rows.upper_us.astype(float).values, rows.lower_us.astype(float).values
    return 100.0 * (up - lo) / (2.0 * rows.predicted_us.astype(float).values)


def family_table(e2e):
    """One row per split family: the held-out experiment means of all its folds and parts.

    Per metric (E2E, TTFT, ITL): experiments × held-out parts judged, how many
    intervals hold the observed mean (count and %), the mean signed error (bias) and
    the median band half-width (%); for E2E also the largest |error| and the bases
    the experiments were predicted at (``calib.e2e``: fitted, new-experiment,
    population).
    """
    import pandas as pd

    rows = []
    for split in dict.fromkeys(e2e.split.tolist()):
        f = e2e[e2e.split == split]
        row: dict[str, Any] = {"split": split, "folds": int(f.fold.nunique())}
        for metric in ("e2e", "ttft", "itl"):
            m = _judged(f, metric)
            n = len(m)
            row[f"{metric}_n"] = n
            row[f"{metric}_inside"] = int(m.inside.sum())
            row[f"{metric}_coverage_pct"] = 100.0 * m.inside.mean() if n else np.nan
            row[f"{metric}_mean_signed_err_pct"] = float(m.error_pct.mean()) if n else np.nan
            row[f"{metric}_median_half_width_pct"] = (
                float(np.median(half_width_pct(m))) if n else np.nan
            )
            if metric == "e2e":
                row["e2e_max_abs_err_pct"] = float(m.error_pct.abs().max()) if n else np.nan
                row["e2e_basis"] = ", ".join(
                    f"{b} {k}" for b, k in m.basis.value_counts(sort=False).items()
                )
        rows.append(row)
    return pd.DataFrame(rows)


def _family_markdown(fam, pct: str) -> list[str]:
    """Markdown rows of :func:`family_table`."""
    head = [
        "split family",
        "folds",
        f"E2E inside {pct}",
        "E2E signed %",
        "E2E ±%",
        "E2E max |err| %",
        f"TTFT inside {pct}",
        "TTFT signed %",
        "TTFT ±%",
        f"ITL inside {pct}",
        "ITL signed %",
        "ITL ±%",
        "E2E basis",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cov(r, metric: str) -> str:
        n = getattr(r, f"{metric}_n")
        c = getattr(r, f"{metric}_coverage_pct")
        return f"{getattr(r, f'{metric}_inside')}/{n} ({_fmt(c, '.0f')} %)" if n else "–"

    for r in fam.itertuples(index=False):
        cells = [str(r.split), str(r.folds)]
        for metric in ("e2e", "ttft", "itl"):
            cells += [
                cov(r, metric),
                _fmt(getattr(r, f"{metric}_mean_signed_err_pct"), "+.2f"),
                _fmt(getattr(r, f"{metric}_median_half_width_pct"), ".1f"),
            ]
            if metric == "e2e":
                cells.append(_fmt(r.e2e_max_abs_err_pct, ".1f"))
        cells.append(str(r.e2e_basis))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _family_intro(pct: str) -> str:
    return (
        "Per split family, over every fold and held-out part (val and test; an "
        "experiment counts once per part): experiment means inside the "
        f"{pct} posterior-predictive band, mean signed error 100·(pred − obs)/obs (bias), "
        "median band half-width ±% of the predicted mean, and the basis the experiments "
        "were predicted at."
    )


def _partial_line(folds: list[dict], settings: dict) -> list[str]:
    """A warning line when the run has not finished every planned fold (else nothing)."""
    planned = list(settings.get("folds_planned") or [])
    done = {str(f.get("fold")) for f in folds}
    missing = [f for f in planned if f not in done]
    if not missing:
        return []
    return [
        f"**Partial run: {len(planned) - len(missing)} of {len(planned)} folds done; "
        f"missing {', '.join(missing)}.**",
        "",
    ]


def summary_table(result: ValidationResult):
    """One row per (split, fold, part): step and E2E figures of every predictor."""
    import pandas as pd

    rows = []
    st, ee = result.steps, result.e2e
    keys = st[["split", "fold", "part"]].drop_duplicates().itertuples(index=False)
    for split, fold, part in keys:
        s = st[(st.fold == fold) & (st.part == part)].set_index("predictor")
        row = {
            "split": split,
            "fold": fold,
            "part": part,
            "n_steps": int(s.loc["calib", "n_steps"]),
        }
        for name in PREDICTORS:
            row[f"{name}_mape_pct"] = s.loc[name, "mape_pct"]
        row["calib_median_ape_pct"] = s.loc["calib", "median_ape_pct"]
        row["calib_r"] = s.loc["calib", "pearson_r"]
        row["calib_mspe_pct"] = s.loc["calib", "mspe_pct"]
        row["blis_mspe_pct"] = s.loc["blis", "mspe_pct"]
        row["step_coverage_pct"] = s.loc["calib", "coverage_pct"]
        row["inv_m6"] = inv_m6_verdict(row["blis_mspe_pct"])  # on the exported predictor
        e = ee[(ee.fold == fold) & (ee.part == part)]
        for metric in ("e2e", "ttft", "itl"):
            m = _judged(e, metric)
            row[f"{metric}_n_exp"] = int(len(m))
            row[f"{metric}_mean_abs_err_pct"] = (
                float(m.error_pct.abs().mean()) if len(m) else np.nan
            )
            row[f"{metric}_mean_signed_err_pct"] = float(m.error_pct.mean()) if len(m) else np.nan
            row[f"{metric}_coverage"] = f"{int(m.inside.sum())}/{len(m)}"
            row[f"{metric}_median_half_width_pct"] = (
                float(np.median(half_width_pct(m))) if len(m) else np.nan
            )
            for name in ("blis", "blackbox", "nnls"):
                row[f"{metric}_{name}_mean_abs_err_pct"] = (
                    float(m[f"{name}_error_pct"].abs().mean()) if len(m) else np.nan
                )
        rows.append(row)
    return pd.DataFrame(rows)


def _column_cell(column: str) -> Callable[[Any], str]:
    """The cell showing a row's ``column`` (formatted by ``_fmt``)."""
    return lambda r: _fmt(getattr(r, column))


# Cells of the summary tables, by column header (rows of :func:`summary_table`).
_SUMMARY_CELLS: dict[str, Callable[[Any], str]] = {
    "split": lambda r: str(r.split),
    "fold": lambda r: str(r.fold),
    "part": lambda r: str(r.part),
    "steps": lambda r: str(int(r.n_steps)),
    **{f"MAPE {p}": _column_cell(f"{p}_mape_pct") for p in PREDICTORS},
    "medAPE calib": lambda r: _fmt(r.calib_median_ape_pct),
    "r calib": lambda r: _fmt(r.calib_r, ".3f"),
    "MSPE calib": lambda r: _fmt(r.calib_mspe_pct, "+.2f"),
    "MSPE blis": lambda r: _fmt(r.blis_mspe_pct, "+.2f"),
    "INV-M-6": lambda r: inv_m6_verdict(r.blis_mspe_pct),
    "step cov": lambda r: _fmt(r.step_coverage_pct),
    "E2E calib": lambda r: _fmt(r.e2e_mean_abs_err_pct),
    **{f"E2E {p}": _column_cell(f"e2e_{p}_mean_abs_err_pct") for p in PREDICTORS[1:]},
    "E2E cov": lambda r: str(r.e2e_coverage),
    "E2E ±%": lambda r: _fmt(r.e2e_median_half_width_pct),
    "E2E signed": lambda r: _fmt(r.e2e_mean_signed_err_pct, "+.2f"),
    "TTFT calib": lambda r: _fmt(r.ttft_mean_abs_err_pct),
    "TTFT cov": lambda r: str(r.ttft_coverage),
    "TTFT ±%": lambda r: _fmt(r.ttft_median_half_width_pct),
    "ITL calib": lambda r: _fmt(r.itl_mean_abs_err_pct),
    "ITL cov": lambda r: str(r.itl_coverage),
    "ITL ±%": lambda r: _fmt(r.itl_median_half_width_pct),
}
# validation.md shows every column; the README's results block a shorter set.
REPORT_COLUMNS = (
    "split",
    "fold",
    "part",
    "steps",
    *(f"MAPE {p}" for p in PREDICTORS),
    "medAPE calib",
    "r calib",
    "MSPE calib",
    "MSPE blis",
    "step cov",
    *(f"E2E {p}" for p in PREDICTORS),
    "E2E signed",
    "E2E cov",
    "E2E ±%",
    "TTFT calib",
    "TTFT cov",
    "TTFT ±%",
    "ITL calib",
    "ITL cov",
    "ITL ±%",
)
README_COLUMNS = (
    "split",
    "fold",
    "part",
    "steps",
    *(f"MAPE {p}" for p in PREDICTORS),
    "MSPE calib",
    "MSPE blis",
    "INV-M-6",
    "step cov",
    *(f"E2E {p}" for p in PREDICTORS),
    "E2E signed",
    "E2E cov",
    "E2E ±%",
    "TTFT calib",
    "ITL calib",
)


def _summary_markdown(summary, columns: Sequence[str]) -> list[str]:
    """Markdown rows of ``summary`` (:func:`summary_table`) with the named columns."""
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    rows += [
        "| " + " | ".join(_SUMMARY_CELLS[c](r) for c in columns) + " |"
        for r in summary.itertuples(index=False)
    ]
    return rows


def markdown_report(result: ValidationResult, manifest: dict | None = None) -> str:
    """Markdown: summary per fold and part, E2E per experiment, leave-one-model-out bands."""
    sm = summary_table(result)
    pct = f"{100 * result.settings.get('prob', config.INTERVAL_PROB):.0f} %"
    lines = ["# calib validation", ""]
    if manifest:
        lines += [
            f"calib {manifest.get('calib_version')} (git {manifest.get('git_sha')}), "
            f"{manifest.get('created_utc')}; data {str(manifest.get('data_hash'))[:12]}; "
            f"hierarchy {result.settings.get('hierarchy')}; sampler "
            f"{result.settings.get('sampler')}",
            "",
        ]
    lines += _partial_line(result.folds, result.settings)
    lines += [
        "## Held-out experiment means per split family",
        "",
        _family_intro(pct),
        "",
        *_family_markdown(family_table(result.e2e), pct),
        "",
        "## Held-out step times (sampled steps) and experiment means",
        "",
        "MAPE / median APE / MSPE in %; MSPE = mean signed 100·(pred − obs)/obs (bias; "
        f"INV-M-6 wants |MSPE| < 5 %); step cov = share of steps inside the {pct} "
        "posterior-predictive interval; E2E/TTFT/ITL = mean |error| over experiments of "
        "the experiment-mean latency (teacher-forced), E2E signed = their mean signed "
        f"error, cov = experiments inside the {pct} interval, ±% = median band "
        "half-width over the predicted mean. calib = posterior predictive mean, blis = "
        "exported BLIS betas (plug-in, alpha dropped).",
        "",
        *_summary_markdown(sm, REPORT_COLUMNS),
    ]
    lines += ["", inv_m6_line(sm)]
    ee = result.e2e
    lomo = ee[(ee.split == "model") & (ee.metric == "e2e")]
    if len(lomo):
        lines += [
            "",
            "## Leave-one-model-out: held-out model's E2E mean from the population level",
            "",
            f"Predicted mean and {pct} band (ms) of each held-out experiment's mean E2E "
            "latency; the model's own coefficients were not fitted.",
            "",
            *_lomo_table(lomo, basis=True),
        ]
    lines += [
        "",
        "## Fits",
        "",
        "| fold | train steps fitted | sampling s | gate |",
        "|---|---|---|---|",
    ]
    for f in result.folds:
        lines.append(f"| {f['fold']} | {f['n_train_steps']} | {f['sampling_s']} | {f['gate']} |")
    lines += [
        "",
        "Per-experiment rows (E2E, TTFT, ITL; every predictor) are in e2e.csv; "
        "per-step metrics in steps.csv.",
    ]
    return "\n".join(lines) + "\n"


def write_reports(
    result: ValidationResult,
    out_dir,
    *,
    data_hash: str | None = None,
    command: list[str] | None = None,
) -> dict[str, Path]:
    """Write ``steps.csv``, ``e2e.csv``, ``summary.csv``, ``validation.md`` and
    ``manifest.json`` (atomically) into ``out_dir``; return their paths by name.

    The manifest (``calib.io.manifest``, kind ``validation``) records the settings, the
    per-fold facts and the SHA-256 of every other file written.
    """
    import json
    from pathlib import Path

    from calib.io import atomic_path, atomic_write_text, file_sha256, manifest

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    verdicts = sorted({f["gate"] for f in result.folds})
    m = manifest(
        kind="validation",
        seed=result.settings.get("seed"),
        data_hash=data_hash,
        command=command,
        diagnostics="pass" if verdicts == ["pass"] else "; ".join(verdicts)[:2000],
        settings=result.settings,
        folds=result.folds,
    )
    paths = {}
    for name, frame in (
        ("steps", result.steps),
        ("e2e", result.e2e),
        ("summary", summary_table(result)),
    ):
        p = out / f"{name}.csv"
        with atomic_path(p) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
        paths[name] = p
    p = out / "validation.md"
    atomic_write_text(p, markdown_report(result, m))
    paths["markdown"] = p
    m["files"] = {str(q.name): file_sha256(q) for q in paths.values()}
    p = out / "manifest.json"
    atomic_write_text(p, json.dumps(m, indent=2, sort_keys=True, default=str) + "\n")
    paths["manifest"] = p
    return paths


# ------------------------------------------------------------------------ README results
def results_markdown(
    summary, e2e, manifest: dict, *, source: str, generator: str, generated_utc: str | None = None
) -> str:
    """Markdown results block from validate's outputs (no hand-typed numbers).

    Parameters
    ----------
    summary, e2e : ``summary.csv`` and ``e2e.csv`` of :func:`write_reports` (DataFrames).
    manifest : ``manifest.json`` of the same run (command, time, git, data hash, settings).
    source : the folder the tables were read from (as shown to the reader).
    generator : the command that produced this block.
    generated_utc : time stamp of this block (default: now).
    """
    from datetime import UTC, datetime

    stamp = generated_utc or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    st = manifest.get("settings") or {}
    smp = st.get("sampler") or {}
    prob = float(st.get("prob", config.INTERVAL_PROB))
    pct = f"{100 * prob:.0f} %"
    folds = manifest.get("folds") or []
    bad = [str(f.get("fold")) for f in folds if f.get("gate") != "pass"]
    lines = [
        f"_Generated by `{generator}` at {stamp} from `{source}`, written by "
        f"`python scripts/{manifest.get('command', '?')}` at {manifest.get('created_utc')} "
        f"(calib {manifest.get('calib_version')}, git {str(manifest.get('git_sha'))[:12]}"
        f"{'-dirty' if str(manifest.get('git_sha')).endswith('-dirty') else ''}, data "
        f"{str(manifest.get('data_hash'))[:12]}; hierarchy {st.get('hierarchy')}, NUTS "
        f"{smp.get('chains')} chains × ({smp.get('warmup')} + {smp.get('draws')}), at most "
        f"{st.get('max_train_steps')} train steps per fold, {st.get('draws')} posterior draws "
        f"for predictions). Rerun both commands to refresh; do not edit by hand._",
        "",
        *_partial_line(folds, st),
        "Diagnostics gate of the fold fits: "
        + (
            "pass in all folds."
            if not bad
            else f"not passed in {len(bad)}/{len(folds)} folds ({', '.join(bad)}; reasons in "
            f"`{source}validation.md`)."
        ),
        "",
        _family_intro(pct),
        "",
        *_family_markdown(family_table(e2e), pct),
        "",
        "Held-out parts: MAPE and MSPE (signed mean of 100·(pred − obs)/obs) over sampled "
        f"steps; step cov = share inside the {pct} posterior-predictive interval; E2E/TTFT/ITL "
        "= mean |error| over experiments of the experiment-mean latency (teacher-forced "
        "replay with measured host gaps); E2E signed = their mean signed error; E2E cov = "
        f"experiments inside the {pct} interval; E2E ±% = median band half-width over the "
        "predicted mean. calib = posterior predictive mean, blis = exported BLIS betas, "
        "blackbox / nnls = baselines fitted on the same train steps. INV-M-6 (|MSPE| < "
        f"{config.VALIDATE_MSPE_BOUND_PCT:g} %) is judged on the exported predictor (blis).",
        "",
        *_summary_markdown(summary, README_COLUMNS),
    ]
    lines += ["", inv_m6_line(summary)]
    lomo = e2e[
        (e2e.split == "model") & (e2e.metric == "e2e") & np.isfinite(e2e.observed_us.astype(float))
    ]
    if len(lomo):
        lines += [
            "",
            f"Leave-one-model-out: each held-out model's mean E2E latency (ms) "
            f"predicted from the population level, with its {pct} band.",
            "",
            *_lomo_table(lomo, basis=False),
        ]
    return "\n".join(lines) + "\n"


def replace_results_section(
    text: str,
    block: str,
    markers: tuple[str, str] = config.RESULTS_MARKERS,
    heading: str = config.RESULTS_HEADING,
    before: str = "## Testing",
) -> str:
    """``text`` with ``block`` between the results markers (only that span changes).

    Without the markers, a section ``heading`` holding them is inserted just before the
    line ``before``; a README with neither, or with one marker only or out of order, is a
    :class:`CalibError`.
    """
    start, end = markers
    i, j = text.find(start), text.find(end)
    body = f"{start}\n{block.rstrip()}\n{end}"
    if i < 0 and j < 0:
        k = text.find(f"\n{before}\n")
        if k < 0 and not text.startswith(f"{before}\n"):
            raise CalibError(
                f"README has neither the results markers nor a '{before}' "
                f"heading to place them before",
                field="README.md",
                fix=f"add the lines {start} and {end} where the results go",
            )
        k = k + 1 if k >= 0 else 0
        return text[:k] + f"{heading}\n\n{body}\n\n" + text[k:]
    if i < 0 or j < 0 or j < i or text.count(start) != 1 or text.count(end) != 1:
        raise CalibError(
            f"README must hold exactly one {start} followed by one {end}",
            field="README.md",
            fix="repair or remove both markers",
        )
    return text[:i] + body + text[j + len(end) :]


def write_results_section(reports_dir, readme, *, generator: str) -> str:
    """Read ``steps.csv``, ``e2e.csv`` and ``manifest.json`` from ``reports_dir`` and
    write the results block into ``readme`` (atomically); return the block.

    The summary is recomputed from the two tables (:func:`summary_table`), so the block
    always has this version's columns."""
    import json
    from pathlib import Path

    import pandas as pd

    from calib.io import atomic_write_text

    rep, readme = Path(reports_dir), Path(readme)
    for name in ("steps.csv", "e2e.csv", "manifest.json"):
        if not (rep / name).is_file():
            raise CalibError(
                "validation output not found",
                path=rep / name,
                fix="run python scripts/validate.py --split all first (or pass "
                "--reports <its --out folder>)",
            )
    if not readme.is_file():
        raise CalibError("README not found", path=readme, fix="pass --readme <file>")
    try:
        m = json.loads((rep / "manifest.json").read_text())
    except json.JSONDecodeError as err:
        raise CalibError(
            f"manifest is not JSON ({err.msg}, line {err.lineno})",
            path=rep / "manifest.json",
            fix="rerun scripts/validate.py",
        ) from None
    tables = {}
    for name, columns in (("steps", STEP_COLUMNS), ("e2e", E2E_COLUMNS)):
        tables[name] = pd.read_csv(rep / f"{name}.csv")
        missing = [c for c in columns if c not in tables[name]]
        if missing:
            raise CalibError(
                f"{name}.csv lacks column(s) {', '.join(missing)}",
                path=rep / f"{name}.csv",
                field=missing[0],
                fix="rerun scripts/validate.py with this calib version",
            )
    e2e = tables["e2e"]
    summary = summary_table(
        ValidationResult(
            steps=tables["steps"],
            e2e=e2e,
            folds=list(m.get("folds") or []),
            settings=dict(m.get("settings") or {}),
        )
    )
    try:
        shown = rep.resolve().relative_to(readme.resolve().parent)
    except ValueError:
        shown = rep
    block = results_markdown(summary, e2e, m, source=f"{shown}/", generator=generator)
    atomic_write_text(readme, replace_results_section(readme.read_text(), block))
    return block
