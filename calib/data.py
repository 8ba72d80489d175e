"""The data layer: the arrays the step-time model reads (:class:`ModelData`), their
validation, and their layout from a canonical dataset. NumPy only (no JAX).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from calib.errors import CalibError
from calib.vocab import COMPONENTS, DC_C, DC_KV, PF_C, PF_KV, TP, WEIGHT, fittable_steps

Array = Any  # numpy or jax array


class ModelData(NamedTuple):
    """Everything the model functions read; arrays plus static sizes as Python ints.

    Attributes
    ----------
    components : (n, 6) float, µs
        Roofline terms in ``COMPONENTS`` order.
    num_layers, batch_size : (n,) float
        Layers of the model and requests in the batch of each step.
    model_idx, experiment_idx : (n,) int
        Index into the ``model`` / ``experiment`` coordinates.
    duration_us : (n,) float or None
        Observed step durations (µs); None for prior/posterior prediction.
    n_models, n_experiments : int
    experiment_model : (n_experiments,) int
        Model index of each experiment.
    active : (n_models, 6) bool
        Basis of the component is not identically zero in that model's steps.
    active_exp : (n_experiments, 6) bool
        Same per experiment (filled by :func:`make_model_data`).
    log_duration : (n,) float or None
        Precomputed ``log(duration_us)`` (filled by :func:`make_model_data`).
    """

    components: Array
    num_layers: Array
    batch_size: Array
    model_idx: Array
    experiment_idx: Array
    duration_us: Array | None
    n_models: int
    n_experiments: int
    experiment_model: Array
    active: Array
    active_exp: Array | None = None
    log_duration: Array | None = None


# ------------------------------------------------------------------ data building
def make_model_data(
    components: Array,
    num_layers: Array,
    batch_size: Array,
    model_idx: Array,
    experiment_idx: Array | None = None,
    duration_us: Array | None = None,
    *,
    n_models: int | None = None,
    n_experiments: int | None = None,
    experiment_model: Array | None = None,
) -> ModelData:
    """Validate arrays and precompute the static parts of :class:`ModelData`.

    ``experiment_idx`` defaults to ``model_idx`` (one experiment per model);
    ``experiment_model`` is derived from the steps when not given. Arrays are
    returned as NumPy (float64 / int32); JAX converts them on first use.

    Raises
    ------
    CalibError
        Shapes disagree, a term is negative or non-finite, or a duration is not
        a finite positive number.
    """
    comps = np.asarray(components, dtype=np.float64)
    if comps.ndim != 2 or comps.shape[1] != len(COMPONENTS):
        raise CalibError(
            f"components must have shape (n, {len(COMPONENTS)}), got {comps.shape}",
            field="components",
        )
    n = comps.shape[0]
    if not np.all(np.isfinite(comps)) or np.any(comps < 0):
        raise CalibError("roofline components must be finite and >= 0", field="components")
    L = np.asarray(num_layers, dtype=np.float64).reshape(-1)
    B = np.asarray(batch_size, dtype=np.float64).reshape(-1)
    midx = np.asarray(model_idx).astype(np.int32).reshape(-1)
    eidx = (
        midx.copy()
        if experiment_idx is None
        else np.asarray(experiment_idx).astype(np.int32).reshape(-1)
    )
    for name, arr in (
        ("num_layers", L),
        ("batch_size", B),
        ("model_idx", midx),
        ("experiment_idx", eidx),
    ):
        if arr.shape != (n,):
            raise CalibError(f"{name} must have shape ({n},), got {arr.shape}", field=name)
    M = int(n_models if n_models is not None else (midx.max() + 1 if n else 1))
    if n_experiments is None:
        n_experiments = int(eidx.max() + 1) if n else 1
    E = int(n_experiments)
    if n and (midx.min() < 0 or midx.max() >= M or eidx.min() < 0 or eidx.max() >= E):
        raise CalibError("model_idx / experiment_idx out of range", field="model_idx")
    if experiment_model is None:
        em = np.zeros(E, dtype=np.int32)
        em[eidx] = midx
    else:
        em = np.asarray(experiment_model).astype(np.int32).reshape(-1)
        if em.shape != (E,):
            raise CalibError(f"experiment_model must have shape ({E},)", field="experiment_model")
        if n and np.any(em[eidx] != midx):
            raise CalibError(
                "experiment_model disagrees with model_idx of the steps", field="experiment_model"
            )
    nz = comps > 0
    active = np.zeros((M, len(COMPONENTS)), dtype=bool)
    np.logical_or.at(active, midx, nz)
    active_exp = np.zeros((E, len(COMPONENTS)), dtype=bool)
    np.logical_or.at(active_exp, eidx, nz)
    dur = log_dur = None
    if duration_us is not None:
        dur = np.asarray(duration_us, dtype=np.float64).reshape(-1)
        if dur.shape != (n,):
            raise CalibError(
                f"duration_us must have shape ({n},), got {dur.shape}", field="duration_us"
            )
        bad = ~(np.isfinite(dur) & (dur > 0))
        if bad.any():
            raise CalibError(
                f"{int(bad.sum())} step duration(s) are not finite positive µs "
                f"(first at row {int(np.argmax(bad))})",
                field="duration_us",
                fix="select sampled steps with a measured duration",
            )
        if np.any(B <= 0):
            raise CalibError(
                f"{int((B <= 0).sum())} observed step(s) have an empty batch "
                "(their mean step time is 0)",
                field="batch_size",
                fix="fit only steps that scheduled at least one request",
            )
        log_dur = np.log(dur)
    return ModelData(comps, L, B, midx, eidx, dur, M, E, em, active, active_exp, log_dur)


def step_layout(
    step_exp: np.ndarray,
    exp_model: Sequence[str] | np.ndarray,
    steps: np.ndarray,
    *,
    present_only: bool = False,
) -> StepLayout:
    """The row order and indices of the model data of ``steps``.

    Rows are sorted by (model, experiment, step): one contiguous run per experiment,
    so the likelihood is cheap (:func:`calib.model._runs`). Models are numbered in
    order of first appearance among the experiments. With ``present_only`` only the
    experiments (and models) that have steps enter (a held-out model is then absent,
    and predicted from the population level).
    """
    exp_names = np.asarray(exp_model).astype(str)
    steps = np.asarray(steps, dtype=np.int64)
    exps = np.unique(step_exp[steps]) if present_only else np.arange(exp_names.size, dtype=np.int64)
    models = list(dict.fromkeys(exp_names[exps].tolist()))
    e_local = np.full(exp_names.size, -1, np.int64)
    e_local[exps] = np.arange(exps.size)
    em = np.array([models.index(m) for m in exp_names[exps]], np.int32)
    el = e_local[step_exp[steps]]
    order = np.lexsort((steps, el, em[el]))
    return StepLayout(steps[order], el[order].astype(np.int32), em, models, exps)


class StepLayout(NamedTuple):
    """Result of :func:`step_layout`."""

    steps: np.ndarray  # (n,) dataset step positions, in row order
    experiment_idx: np.ndarray  # (n,) int32 local experiment index per row
    experiment_model: np.ndarray  # (E,) int32 model index per local experiment
    models: list[str]
    experiments: np.ndarray  # (E,) dataset experiment positions


def layout_model_data(
    layout: StepLayout,
    components: Array,
    num_layers: Array,
    batch_size: Array,
    duration_us: Array | None,
) -> ModelData:
    """:class:`ModelData` of a :class:`StepLayout`; the arrays are given in its row order."""
    em = layout.experiment_model
    return make_model_data(
        components,
        num_layers,
        batch_size,
        em[layout.experiment_idx],
        layout.experiment_idx,
        duration_us,
        n_models=len(layout.models),
        n_experiments=int(em.size),
        experiment_model=em,
    )


def build_model_data(ds, steps: np.ndarray | None = None) -> tuple[ModelData, dict[str, list]]:
    """Model data and coordinates from a canonical dataset (``calib.traces.schema``).

    Parameters
    ----------
    ds : xr.Dataset
        Canonical step dataset.
    steps : array of int, optional
        Step positions to use; default: the fittable steps (:func:`calib.vocab.fittable`).

    Returns
    -------
    (ModelData, coords)
        ``coords`` has ``model`` (names from ``exp_model`` in order of first
        appearance), ``component`` (``COMPONENTS``), ``experiment``, ``active``
        and ``active_exp`` (``"<name>/<component>"`` labels of the sampled
        pairs) and ``step`` (the step positions, in the row order of
        :func:`step_layout`).
    """
    from calib.model import model_coords
    from calib.roofline import components_matrix, dataset_components

    for v in ("exp_model", "step_experiment", "duration_us", "sampled"):
        if v not in ds:
            raise CalibError(
                f"dataset lacks variable {v!r}", field=v, fix="import the traces with calib.traces"
            )
    steps = fittable_steps(ds) if steps is None else np.asarray(steps, dtype=np.int64)
    if steps.ndim != 1:
        raise CalibError("steps must be a 1-D array of step indices", field="steps")
    if steps.size == 0:
        raise CalibError(
            "no sampled steps with a measured duration",
            field="duration_us",
            fix="import traces with step.BATCH_SUMMARY events",
        )
    step_exp = np.asarray(ds["step_experiment"].values)
    if steps.min() < 0 or steps.max() >= step_exp.size:
        raise CalibError(f"step indices must lie in [0, {step_exp.size})", field="steps")
    exp_model = [str(x) for x in np.asarray(ds["exp_model"].values)]
    experiments = (
        [str(x) for x in np.asarray(ds["experiment"].values)]
        if "experiment" in ds.coords
        else [str(i) for i in range(len(exp_model))]
    )
    lay = step_layout(step_exp, exp_model, steps)
    comps = dataset_components(ds, lay.steps)
    dur = np.asarray(ds["duration_us"].values, dtype=np.float64)[lay.steps]
    data = layout_model_data(
        lay,
        components_matrix(comps),
        np.asarray(comps["num_layers"].values),
        np.asarray(comps["batch_size"].values),
        dur,
    )
    return data, model_coords(data, lay.models, experiments, lay.steps)


# ------------------------------------------------------------------ synthetic design
def synthetic_model_data(
    n_steps: int = 2000,
    n_models: int = 2,
    experiments_per_model: int = 2,
    *,
    seed: int = 0,
    mixed_fraction: float = 0.3,
    tp2_models: Sequence[int] = (1,),
) -> ModelData:
    """A synthetic design (components, layers, batch sizes) of realistic magnitude.

    For tests and ``bench/bench_geometry.py`` only (no durations: simulate them with
    :func:`calib.model.simulate_from_model`). Per model: weight 4000-14000 µs per step, prefill
    compute ~15 µs per token (≈30 ms for a 2048-token chunk), decode KV 0.02-0.16 µs
    per context token × Σ contexts of up to 128 decodes of length 500-2500, tp only for
    the models in ``tp2_models`` (TP=2; other models have an all-zero tp basis).
    ``mixed_fraction`` of steps mix a prefill chunk with decodes (0: no mixed batches).
    """
    rng = np.random.default_rng(seed)
    E = n_models * experiments_per_model
    em = np.repeat(np.arange(n_models, dtype=np.int32), experiments_per_model)
    eidx = np.sort(rng.integers(0, E, n_steps)).astype(np.int32)
    midx = em[eidx]
    layers = np.array([32, 40, 64, 80, 48, 28, 36, 60])[np.arange(n_models) % 8]
    w_us = np.linspace(4000.0, 14000.0, n_models) if n_models > 1 else np.array([8000.0])
    pf_rate = np.linspace(8.0, 15.0, n_models) if n_models > 1 else np.array([12.0])
    dc_rate = pf_rate * 1.0
    kv_rate = np.linspace(0.02, 0.16, n_models) if n_models > 1 else np.array([0.08])
    ctx_lo = rng.uniform(500, 1000, E)
    ctx_hi = ctx_lo + rng.uniform(500, 1500, E)
    max_dec = rng.integers(32, 129, E)
    u = rng.uniform(size=n_steps)
    mixed = u < mixed_fraction
    prefill_only = (u >= mixed_fraction) & (u < mixed_fraction + 0.1)
    has_pf = mixed | prefill_only
    has_dc = ~prefill_only
    n_dec = np.where(has_dc, rng.integers(1, max_dec[eidx] + 1), 0)
    mean_ctx = rng.uniform(ctx_lo[eidx], ctx_hi[eidx])
    sum_ctx = n_dec * mean_ctx
    pf_tok = np.where(has_pf, rng.integers(64, 2049, n_steps), 0)
    pf_prog = np.where(has_pf, rng.integers(0, 4000, n_steps), 0)
    comps = np.zeros((n_steps, 6))
    comps[:, PF_C] = pf_tok * pf_rate[midx] * (1.0 + pf_prog / 8000.0)
    comps[:, PF_KV] = pf_tok * (pf_prog + pf_tok / 2) * kv_rate[midx] * 1e-3
    comps[:, DC_C] = n_dec * dc_rate[midx]
    comps[:, DC_KV] = sum_ctx * kv_rate[midx]
    comps[:, WEIGHT] = w_us[midx]
    is_tp2 = np.isin(midx, np.asarray(tp2_models, dtype=int))
    comps[:, TP] = np.where(is_tp2, (pf_tok + n_dec) * 0.5 + 20.0, 0.0)
    B = (n_dec + has_pf).astype(np.float64)
    return make_model_data(
        comps,
        layers[midx].astype(np.float64),
        B,
        midx,
        eidx,
        n_models=n_models,
        n_experiments=E,
        experiment_model=em,
    )
