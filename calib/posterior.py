"""Posterior files: save, load (validated), rebuild the model data, re-predict.

A posterior file is an ArviZ InferenceData written as NetCDF (netcdf4 engine)
with groups ``posterior``, ``sample_stats``, ``observed_data`` and
``constant_data`` (optionally ``log_likelihood`` and ``prior``). The
``constant_data`` group holds every :class:`calib.data.ModelData` array on named
dims (``step``, ``component``, ``model``, ``experiment``), with the dataset's
global step indices as the ``step`` coordinate, so a loaded file can re-predict
without the dataset. Root attributes (all NetCDF-safe scalars or JSON strings):

``calib_model_version``  :data:`calib.MODEL_VERSION` of the writer;
``manifest``             JSON provenance record (:func:`calib.io.manifest`);
``diagnostics``          JSON of :meth:`calib.diagnostics.GateResult.to_dict`;
``hierarchy``            the model hierarchy fitted;
``api_overheads``        JSON of :func:`calib.overheads.estimate` on the fitted dataset
                         (absent when fitted from model data alone);
``discrepancy``          JSON of the structural-discrepancy record
                         (:mod:`calib.discrepancy`; absent likewise).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

import calib
from calib.errors import CalibError
from calib.io import atomic_path
from calib.vocab import PARAMETER_SITES

__all__ = [
    "CONSTANT_VARS",
    "REQUIRED_GROUPS",
    "load_posterior",
    "model_data_from_idata",
    "modeldata_to_constant_data",
    "posterior_manifest",
    "predict_step_time_us",
    "save_posterior",
]

REQUIRED_GROUPS = ("posterior", "sample_stats", "observed_data", "constant_data")

#: ModelData array fields -> dims in ``constant_data``.
CONSTANT_VARS: dict[str, tuple[str, ...]] = {
    "components": ("step", "component"),
    "num_layers": ("step",),
    "batch_size": ("step",),
    "model_idx": ("step",),
    "experiment_idx": ("step",),
    "experiment_model": ("experiment",),
    "active": ("model", "component"),
    "active_exp": ("experiment", "component"),
}

MODEL_VERSION_ATTR = "calib_model_version"
#: Root attribute holding the API-overhead estimate (JSON, :mod:`calib.overheads`).
API_OVERHEADS_ATTR = "api_overheads"


# ------------------------------------------------------------------ model data <-> xarray
def modeldata_to_constant_data(
    data, coords: dict[str, list[str]], step_index: np.ndarray | None = None
):
    """``constant_data`` and ``observed_data`` Datasets of one ModelData.

    Parameters
    ----------
    data : calib.data.ModelData
    coords : ``model``, ``component``, ``experiment`` labels (from ``build_model_data``).
    step_index : global step indices into the source dataset (default ``0..n-1``).

    Returns
    -------
    (constant_data, observed_data) : xarray.Dataset pair; ``observed_data`` is None
    when ``data.duration_us`` is None.
    """
    import xarray as xr

    n = int(np.shape(data.components)[0])
    step_index = np.arange(n, dtype=np.int64) if step_index is None else np.asarray(step_index)
    if step_index.shape != (n,):
        raise ValueError(f"step_index has shape {step_index.shape}, expected ({n},)")
    xcoords: dict[str, list | np.ndarray] = {
        "step": step_index,
        "component": list(coords["component"]),
        "model": list(coords["model"]),
        "experiment": list(coords["experiment"]),
    }
    if len(xcoords["model"]) != data.n_models or len(xcoords["experiment"]) != data.n_experiments:
        raise ValueError("coords do not match ModelData.n_models / n_experiments")
    const = xr.Dataset(
        {name: (dims, np.asarray(getattr(data, name))) for name, dims in CONSTANT_VARS.items()},
        coords=xcoords,
    )
    obs = None
    if data.duration_us is not None:
        obs = xr.Dataset(
            {"duration_us": (("step",), np.asarray(data.duration_us))}, coords={"step": step_index}
        )
    return const, obs


def model_data_from_idata(idata):
    """Rebuild :class:`calib.data.ModelData` from a posterior's ``constant_data``.

    The round trip ``ModelData -> file -> ModelData`` is exact (values and dtypes).
    ``duration_us`` comes from ``observed_data`` when present.
    """
    from calib.data import ModelData

    cd = idata.constant_data
    fields = {name: np.asarray(cd[name].values) for name in CONSTANT_VARS}
    duration = log_duration = None
    if "observed_data" in idata.groups() and "duration_us" in idata.observed_data:
        duration = np.asarray(idata.observed_data["duration_us"].values)
        log_duration = np.log(duration)  # as calib.data.make_model_data computes it
    return ModelData(
        **fields,
        duration_us=duration,
        log_duration=log_duration,
        n_models=int(cd.sizes["model"]),
        n_experiments=int(cd.sizes["experiment"]),
    )


def model_coords(idata) -> dict[str, list[str]]:
    """``model``, ``component``, ``experiment`` labels of a posterior."""
    cd = idata.constant_data
    return {d: [str(v) for v in cd[d].values] for d in ("model", "component", "experiment")}


# ------------------------------------------------------------------------ prediction
def flat_draws(idata, draws: int | None = None) -> dict[str, np.ndarray]:
    """Posterior variables without a ``step`` dim, flattened to ``(sample, ...)`` float64.

    ``draws`` thins evenly over chain × draw (default all). Per-step deterministics are
    outputs, not parameters, and are left out.
    """
    post = idata.posterior
    total = post.sizes["chain"] * post.sizes["draw"]
    idx = None
    if draws is not None:
        if draws < 1:
            raise CalibError(f"draws must be at least 1, got {draws}", field="draws")
        if draws < total:
            idx = np.linspace(0, total - 1, draws).round().astype(int)
    out = {}
    for name, da in post.data_vars.items():
        if "step" in da.dims:
            continue
        v = np.asarray(da.values, dtype=np.float64)
        v = v.reshape((total, *v.shape[2:]))
        out[name] = v if idx is None else v[idx]
    return out


#: Scalar parameters shared by every model, whose posterior means a plug-in prediction uses.
SHARED_SCALARS = ("per_layer_us", "per_request_us", "per_step_us", "alpha")


def plugin_means(draws: dict) -> dict[str, float]:
    """Posterior means of :data:`SHARED_SCALARS` from flat draws (:func:`flat_draws`):
    the plug-in point the export and validation use beside a model's mean ``b``."""
    return {k: float(np.mean(draws[k])) for k in SHARED_SCALARS}


def api_overheads(idata) -> dict | None:
    """The API-overhead estimate stored by the fit (:func:`calib.overheads.estimate`),
    or None when the posterior was fitted without the dataset's request labels."""
    raw = idata.attrs.get(API_OVERHEADS_ATTR)
    if raw is None:
        return None
    rec = json.loads(raw) if isinstance(raw, str) else raw
    return rec if rec and "estimates" in rec else None


def predict_step_time_us(idata, draws: int | None = None, *, data=None) -> np.ndarray:
    """Per-draw mean step time (µs) of every step, re-computed from a posterior.

    Parameters
    ----------
    idata : az.InferenceData from :func:`load_posterior` or the fit.
    draws : number of posterior draws to use, thinned evenly over chain x draw
        (default: all).
    data : ModelData to predict for (default: the file's own ``constant_data``).

    Returns
    -------
    np.ndarray of shape (draw, step): the model's mean step time ``mu`` of each draw
    (:func:`calib.predict.step_time_draws_us`), not a noisy draw of y.
    """
    from calib.predict import StepFeatures, step_time_draws_us

    data = model_data_from_idata(idata) if data is None else data
    p = flat_draws(idata, draws)
    if "b_exp" in p:
        b, group = p["b_exp"], np.asarray(data.experiment_idx)
    else:
        b, group = p["b"], np.asarray(data.model_idx)
    return step_time_draws_us(
        b,
        p["per_layer_us"],
        p["per_request_us"],
        p["per_step_us"],
        p["alpha"],
        StepFeatures.from_model_data(data),
        group,
    )


# ------------------------------------------------------------------------ save / load
def _json_safe_attrs(attrs: dict) -> dict:
    """NetCDF attrs hold str / numbers / arrays only: JSON-encode the rest."""
    out = {}
    for k, v in attrs.items():
        if isinstance(v, bool) or v is None or isinstance(v, (dict, list, tuple)):
            out[k] = json.dumps(v, sort_keys=True, default=str)
        elif isinstance(v, float) and not math.isfinite(v):
            out[k] = json.dumps(None)
        else:
            out[k] = v
    return out


def save_posterior(idata, path: str | Path, *, manifest: dict | None = None) -> Path:
    """Write a posterior file atomically (netcdf4 engine).

    Parameters
    ----------
    idata : az.InferenceData with at least the groups in :data:`REQUIRED_GROUPS`.
    path : destination; written to a temporary name, then renamed into place.
    manifest : provenance record; stored as the JSON string root attr ``manifest``
        (default: keep the one already in ``idata.attrs``).

    Only the named parameters in natural coordinates (:data:`calib.vocab.PARAMETER_SITES`)
    and per-step deterministics are written; the sampler's raw coordinates stay in memory.

    Returns
    -------
    Path : ``path``.
    """
    path = Path(path)
    missing = [g for g in REQUIRED_GROUPS if g not in idata.groups()]
    if missing:
        raise ValueError(f"InferenceData lacks group(s) {missing}; cannot save a posterior")
    attrs = dict(idata.attrs)
    if manifest is not None:
        attrs["manifest"] = manifest
    if "manifest" not in attrs:
        raise ValueError("a posterior needs a manifest (calib.io.manifest) in its attrs")
    attrs[MODEL_VERSION_ATTR] = calib.MODEL_VERSION
    if isinstance(attrs["manifest"], dict):
        attrs["manifest"] = json.dumps(attrs["manifest"], sort_keys=True, default=str)
    import arviz as az

    groups = {}
    for g in idata.groups():  # shallow copies: the caller's object keeps its attrs
        ds = getattr(idata, g).copy(deep=False)
        ds.attrs = _json_safe_attrs(ds.attrs)
        groups[g] = ds
    post = groups["posterior"]
    groups["posterior"] = post[
        [v for v in post.data_vars if v in PARAMETER_SITES or "step" in post[v].dims]
    ]
    out = az.InferenceData(attrs=_json_safe_attrs(attrs), **groups)
    with atomic_path(path) as tmp:
        out.to_netcdf(str(tmp), engine="netcdf4")
    return path


def load_posterior(path: str | Path):
    """Load and validate a posterior file written by :func:`save_posterior`.

    Raises
    ------
    CalibError
        The file is missing or unreadable, lacks a required group or variable,
        or was written by a different model version (re-fit with ``scripts/fit.py``).
    """
    import arviz as az

    path = Path(path)
    if not path.is_file():
        raise CalibError(
            "posterior file not found",
            path=path,
            fix="run scripts/fit.py to create it, or pass the right --posterior",
        )
    try:
        with az.rc_context({"data.load": "eager"}):
            idata = az.from_netcdf(str(path), engine="netcdf4")
    except (OSError, ValueError, KeyError) as err:
        raise CalibError(
            f"cannot read as a NetCDF posterior ({type(err).__name__}: {err})",
            path=path,
            fix="pass a file written by scripts/fit.py",
        ) from None
    missing = [g for g in REQUIRED_GROUPS if g not in idata.groups()]
    if missing:
        raise CalibError(
            f"not a calib posterior: missing group(s) {', '.join(missing)}",
            path=path,
            fix="pass a file written by scripts/fit.py",
        )
    attrs = idata.attrs
    version = attrs.get(MODEL_VERSION_ATTR)
    if version is None:
        raise CalibError(
            f"not a calib posterior: no {MODEL_VERSION_ATTR} attribute",
            path=path,
            fix="pass a file written by scripts/fit.py",
        )
    if int(version) != calib.MODEL_VERSION:
        raise CalibError(
            f"written by model version {int(version)}, this calib has model version "
            f"{calib.MODEL_VERSION}",
            path=path,
            field=MODEL_VERSION_ATTR,
            fix="re-fit with scripts/fit.py using this calib version",
        )
    try:
        json.loads(attrs["manifest"])
    except (KeyError, TypeError, ValueError):
        raise CalibError(
            "manifest attribute missing or not JSON",
            path=path,
            field="manifest",
            fix="re-fit with scripts/fit.py",
        ) from None
    cd = idata.constant_data
    for name, dims in CONSTANT_VARS.items():
        if name not in cd:
            raise CalibError(
                f"constant_data lacks variable {name!r}",
                path=path,
                field=f"constant_data.{name}",
                fix="re-fit with scripts/fit.py",
            )
        if tuple(cd[name].dims) != dims:
            raise CalibError(
                f"constant_data.{name} has dims {tuple(cd[name].dims)}, expected {dims}",
                path=path,
                field=f"constant_data.{name}",
                fix="re-fit with scripts/fit.py",
            )
    if "duration_us" not in idata.observed_data:
        raise CalibError(
            "observed_data lacks duration_us",
            path=path,
            field="observed_data.duration_us",
            fix="re-fit with scripts/fit.py",
        )
    if len(idata.posterior.data_vars) == 0:
        raise CalibError("posterior group is empty", path=path, fix="re-fit with scripts/fit.py")
    return idata


def posterior_manifest(idata) -> dict:
    """The manifest dict stored in a posterior's attrs."""
    m = idata.attrs.get("manifest")
    return json.loads(m) if isinstance(m, str) else dict(m or {})
