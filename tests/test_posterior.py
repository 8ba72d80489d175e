"""Posterior files: atomic save, validated load, exact re-prediction, ArviZ interop."""

from __future__ import annotations

import json
import warnings

import arviz as az
import matplotlib
import netCDF4
import numpy as np
import pytest
from fixtures.posteriors import cached_data, cached_mock

import calib
from calib.errors import CalibError
from calib.io import manifest
from calib.posterior import (
    CONSTANT_VARS,
    load_posterior,
    model_data_from_idata,
    posterior_manifest,
    predict_step_time_us,
    save_posterior,
)

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    idata = cached_mock()
    idata.attrs["manifest"] = manifest(
        kind="posterior", seed=1, diagnostics="pass", sampler={"chains": 2}
    )
    path = tmp_path_factory.mktemp("post") / "per-model.nc"
    save_posterior(idata, path)
    return idata, path


def test_save_load_repredict_is_exact(saved):
    idata, path = saved
    data, _, step_index, _ = cached_data()
    before = predict_step_time_us(idata)
    loaded = load_posterior(path)
    after = predict_step_time_us(loaded)
    assert before.shape == (300, 400)  # (chains x draws, steps)
    np.testing.assert_array_equal(before, after)
    assert np.all(np.isfinite(after)) and np.all(after > 0)
    # the rebuilt ModelData equals the original field by field, dtypes included
    rebuilt = model_data_from_idata(loaded)
    for field in data._fields:
        a, b = getattr(data, field), getattr(rebuilt, field)
        if isinstance(a, int):
            assert a == b, field
        else:
            assert np.asarray(a).dtype == np.asarray(b).dtype, field
            np.testing.assert_array_equal(a, b, err_msg=field)
    np.testing.assert_array_equal(loaded.constant_data["step"].values, step_index)
    # thinning: evenly spaced subset of the same predictions
    sub = predict_step_time_us(loaded, draws=7)
    assert sub.shape == (7, 400)
    np.testing.assert_array_equal(sub[0], after[0])
    np.testing.assert_array_equal(sub[-1], after[-1])


def test_prediction_matches_model_mean_function(saved):
    """Re-prediction equals exp(loc) of the model's likelihood for a draw (independent path)."""
    from calib.model import step_time_us

    idata, _ = saved
    data, *_ = cached_data()
    post = idata.posterior
    params = {
        k: post[k].values[1, 3]
        for k in ("b", "per_layer_us", "per_request_us", "per_step_us", "alpha")
    }
    expected = np.asarray(step_time_us(params, data))
    np.testing.assert_allclose(predict_step_time_us(idata)[150 + 3], expected, rtol=1e-12)


def test_attrs_are_json_strings(saved):
    _, path = saved
    with netCDF4.Dataset(path) as nc:
        root = {k: nc.getncattr(k) for k in nc.ncattrs()}
        assert int(root["calib_model_version"]) == calib.MODEL_VERSION
        m = json.loads(root["manifest"])
        assert m["kind"] == "posterior" and m["sampler"] == {"chains": 2}
        assert m["calib_version"] == calib.__version__
        for group in nc.groups.values():
            for k in group.ncattrs():
                v = group.getncattr(k)
                assert isinstance(v, str | int | float | np.number | np.ndarray), (k, v)
    loaded = load_posterior(path)
    assert posterior_manifest(loaded)["seed"] == 1


def test_file_stores_named_natural_parameters_only(saved):
    from calib.vocab import PARAMETER_SITES

    idata, path = saved
    raw = [v for v in idata.posterior.data_vars if v not in PARAMETER_SITES]
    assert raw, "the in-memory fit keeps the sampler's coordinates"
    loaded = load_posterior(path)
    assert set(loaded.posterior.data_vars) <= set(PARAMETER_SITES)
    assert {"b", "b_pop", "tau", "sigma", "alpha", "stall_prob", "mean_factor"} <= set(
        loaded.posterior.data_vars
    )
    assert set(idata.posterior.data_vars) >= set(raw)  # the caller's object is unchanged


def test_caller_idata_is_not_mutated(saved):
    idata, _ = saved
    assert isinstance(idata.attrs["manifest"], dict)


def test_arviz_works_on_saved_file(saved):
    _, path = saved
    idata = az.from_netcdf(path)  # plain ArviZ, default engine, no extra steps
    summ = az.summary(idata, var_names=["b"], kind="stats")
    assert "b[llama-2-7b, pf_compute]" in summ.index
    assert "b[qwen-7b, tp]" in summ.index and len(summ) == 12
    axes = az.plot_trace(idata, var_names=["b_pop", "alpha"])
    assert axes.shape == (2, 2)
    axes = az.plot_forest(idata, var_names=["b"], combined=True)
    assert len(axes) == 1
    matplotlib.pyplot.close("all")
    with warnings.catch_warnings():  # prior draws as a "posterior": Pareto k is poor
        warnings.simplefilter("ignore", UserWarning)
        loo = az.loo(idata, pointwise=True)
    assert np.isfinite(loo.elpd_loo) and loo.n_data_points == 400
    assert loo.pareto_k.shape == (400,)
    assert "prior" in idata.groups() and idata.prior.sizes["draw"] == 40


def test_other_model_version_is_refused(tmp_path, monkeypatch):
    idata = cached_mock()
    idata.attrs["manifest"] = manifest(kind="posterior")
    path = tmp_path / "old.nc"
    monkeypatch.setattr(calib, "MODEL_VERSION", calib.MODEL_VERSION + 1)
    save_posterior(idata, path)
    monkeypatch.undo()
    with pytest.raises(CalibError) as err:
        load_posterior(path)
    msg = str(err.value)
    assert str(path) in msg and f"model version {calib.MODEL_VERSION + 1}" in msg
    assert "re-fit" in msg


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CalibError, match="not found"):
        load_posterior(tmp_path / "nope.nc")
    bad = tmp_path / "bad.nc"
    bad.write_text("not netcdf")
    with pytest.raises(CalibError, match="cannot read"):
        load_posterior(bad)
    idata = cached_mock()
    other = az.InferenceData(posterior=idata.posterior, sample_stats=idata.sample_stats)
    other.to_netcdf(str(tmp_path / "foreign.nc"))
    with pytest.raises(CalibError, match="missing group"):
        load_posterior(tmp_path / "foreign.nc")


def test_save_is_atomic(tmp_path):
    idata = cached_mock()
    incomplete = az.InferenceData(posterior=idata.posterior)
    with pytest.raises(ValueError):
        save_posterior(incomplete, tmp_path / "x.nc", manifest={"kind": "posterior"})
    assert list(tmp_path.iterdir()) == []
    assert set(CONSTANT_VARS) <= set(idata.constant_data.data_vars)
