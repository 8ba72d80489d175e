"""Dataset building, schema conformance, save/load, concatenation, import_root and its cache."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import xarray as xr
from fixtures.trace_builder import (
    EXP_CONFIG,
    good_lines,
    simulate,
    two_experiment_root,
    write_experiment,
)

from calib import DATASET_SCHEMA_VERSION, config
from calib.errors import CalibError
from calib.io import manifest_from_attr
from calib.traces import (
    concat_experiments,
    import_experiment,
    import_root,
    load_dataset,
    read_traces,
    save_dataset,
)
from calib.traces.schema import SCHEMA

_KIND = {"int8": "i", "int32": "i", "int64": "i", "float64": "f", "bool": "b", "str": "U"}


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = two_experiment_root(tmp_path_factory.mktemp("root"), n_requests=60, seed=1)
    (r / "notes").mkdir()
    return r


def check_schema(ds: xr.Dataset) -> None:
    assert ds.attrs["schema_version"] == DATASET_SCHEMA_VERSION
    m = manifest_from_attr(ds.attrs["manifest"])
    assert m["kind"] == "dataset" and len(m["data_hash"]) == 64
    assert set(ds.data_vars) == set(SCHEMA)
    for name, var in SCHEMA.items():
        assert ds[name].dims == var.dims, name
        assert ds[name].dtype.kind == _KIND[var.dtype], (name, ds[name].dtype)
        if var.dtype not in ("str", "bool"):
            assert ds[name].dtype == np.dtype(var.dtype), name


def test_import_experiment_schema(root):
    ds = import_experiment(root / "20260101-000000-llama-2-7b-tp1-a")
    check_schema(ds)
    assert ds.sizes["experiment"] == 1
    assert ds["experiment"].values.tolist() == ["20260101-000000-llama-2-7b-tp1-a"]
    assert json.loads(ds["exp_profile_json"].values[0])["load"]["stages"][0]["rate"] == 1
    assert json.loads(ds["exp_arch_json"].values[0])["num_hidden_layers"] == 32
    assert json.loads(ds["exp_hardware_json"].values[0])["name"] == config.DEFAULT_HARDWARE
    assert ds["exp_client_metrics_json"].values[0] == "{}"
    assert ds["exp_hardware"].values[0] == config.DEFAULT_HARDWARE
    assert (np.diff(ds["step_id"].values) > 0).all()


def test_hardware_override(root):
    ds = import_experiment(root / "20260101-000000-llama-2-7b-tp1-a", hardware="L40S")
    assert ds["exp_hardware"].values[0] == "L40S"


def test_import_root_concat_save_load_and_cache(root, tmp_path):
    cache = tmp_path / "cache"
    ds = import_root(root, workers=2, progress=False, cache_dir=cache)
    check_schema(ds)
    assert ds.sizes["experiment"] == 2
    a = import_experiment(root / "20260101-000000-llama-2-7b-tp1-a")
    b = import_experiment(root / "20260101-000001-llama-2-7b-tp1-b")
    # re-indexing: the second experiment's requests follow the first's
    na = a.sizes["request"]
    sel = ds["step_experiment"].values == 1
    sr = ds["slot_request"].values[sel]
    np.testing.assert_array_equal(sr[sr >= 0] - na, b["slot_request"].values[b["slot_mask"].values])
    assert (ds["req_experiment"].values[na:] == 1).all()
    assert ds.sizes["slot"] == max(a.sizes["slot"], b.sizes["slot"])
    np.testing.assert_array_equal(ds["duration_us"].values[~sel], a["duration_us"].values)
    # the cache holds one file per experiment; a second import uses it (same content)
    files = sorted(cache.glob("*.nc"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = import_root(root, workers=1, progress=False, cache_dir=cache)
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    for name in SCHEMA:
        np.testing.assert_array_equal(again[name].values, ds[name].values, err_msg=name)
    # save -> load round trip (bools and strings restored)
    out = save_dataset(ds, tmp_path / "t.nc")
    back = load_dataset(out)
    check_schema(back)
    for name in SCHEMA:
        np.testing.assert_array_equal(back[name].values, ds[name].values, err_msg=name)
    assert back["sampled"].dtype == bool and back["req_id"].dtype.kind == "U"


def test_default_cache_dir_and_no_cache(tmp_path):
    r = tmp_path / "r"
    write_experiment(r / "exp", good_lines())
    import_root(r, progress=False)
    assert len(list((r / config.IMPORT_CACHE_DIRNAME).glob("*.nc"))) == 1
    r2 = tmp_path / "r2"
    write_experiment(r2 / "exp", good_lines())
    import_root(r2, progress=False, use_cache=False)
    assert not (r2 / config.IMPORT_CACHE_DIRNAME).exists()


def test_cache_invalidated_by_changed_input(tmp_path):
    r = tmp_path / "r"
    d = write_experiment(r / "exp", good_lines())
    first = import_root(r, progress=False)
    cfg = dict(EXP_CONFIG, app="changed")
    (d / "exp-config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    second = import_root(r, progress=False)
    assert first["exp_workload"].values[0] == "unit-test"
    assert second["exp_workload"].values[0] == "changed"
    assert len(list((r / config.IMPORT_CACHE_DIRNAME).glob("*.nc"))) == 2


def test_parallel_parse_equals_sequential(tmp_path, monkeypatch):
    d = tmp_path / "sim"
    simulate(
        d,
        n_requests=150,
        seed=5,
        rate_per_s=60.0,
        max_num_batched_tokens=128,
        max_num_seqs=8,
        spans_per_line=4,
        record_truth=False,
    )
    with open(d / "traces.json", "a") as f:  # a bad line in the second half
        f.write('{"resourceSpans": [\n')
    monkeypatch.setattr(config, "IMPORT_PARALLEL_MIN_BYTES", 1)
    with pytest.warns(Warning) as rec:
        seq = read_traces(d / "traces.json", workers=1)
    with pytest.warns(Warning) as rec2:
        par = read_traces(d / "traces.json", workers=2)
    assert [str(w.message) for w in rec] == [str(w.message) for w in rec2]
    assert seq.num_lines == par.num_lines and seq.num_bad_lines == par.num_bad_lines == 1
    assert f"traces.json:{seq.num_lines}:" in str(rec2[0].message)
    assert seq.request_ids == par.request_ids
    for n in (
        "j_req",
        "j_kind",
        "j_ts",
        "j_step",
        "j_pf_done",
        "j_dc_done",
        "b_int",
        "s_int",
        "a_ts",
    ):
        np.testing.assert_array_equal(getattr(seq, n), getattr(par, n), err_msg=n)
    assert seq.j_status == par.j_status and seq.a_id == par.a_id


def test_concat_rejects_duplicate_names(root):
    a = import_experiment(root / "20260101-000000-llama-2-7b-tp1-a")
    with pytest.raises(CalibError, match="not unique"):
        concat_experiments([a, a])
    with pytest.raises(CalibError):
        concat_experiments([])


def test_dask_scheduler_missing_is_calib_error(root):
    try:
        import dask  # noqa: F401
    except ImportError:
        with pytest.raises(CalibError, match=r"calib\[dask\]"):
            import_root(root, scheduler="dask", progress=False)
    else:  # pragma: no cover - dask not installed in the default venv
        ds = import_root(root, scheduler="dask", progress=False)
        check_schema(ds)


# --------------------------------------------------------------------- load validation
@pytest.fixture(scope="module")
def saved(root, tmp_path_factory):
    p = tmp_path_factory.mktemp("saved") / "ok.nc"
    save_dataset(import_experiment(root / "20260101-000000-llama-2-7b-tp1-a"), p)
    return p


def _rewrite(saved, tmp_path, fn):
    with xr.open_dataset(saved, engine="netcdf4") as f:
        ds = f.load()
    ds = fn(ds)
    p = tmp_path / "bad.nc"
    ds.to_netcdf(p, engine="netcdf4")
    return p


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda ds: ds.drop_vars("slot_progress"), "slot_progress"),
        (lambda ds: ds.assign_attrs(schema_version=0), "schema_version"),
        (
            lambda ds: (
                ds.drop_attrs() if hasattr(ds, "drop_attrs") else ds.assign_attrs(manifest=None)
            ),
            "manifest|schema_version",
        ),
        (lambda ds: ds.assign(duration_us=ds["duration_us"].astype(str)), "duration_us"),
        (lambda ds: ds.assign(slot_request=ds["slot_request"] + 100), "slot_request"),
        (lambda ds: ds.assign(step_experiment=ds["step_experiment"] + 1), "step_experiment"),
        (lambda ds: ds.assign(num_decode=(("x",), np.zeros(3, np.int32))), "num_decode"),
    ],
)
def test_load_rejects_wrong_files(saved, tmp_path, mutate, match):
    p = _rewrite(saved, tmp_path, mutate)
    with pytest.raises(CalibError, match=match) as exc:
        load_dataset(p)
    assert "import_traces.py" in str(exc.value)


def test_load_rejects_non_netcdf(tmp_path):
    p = tmp_path / "x.nc"
    p.write_text("hello")
    with pytest.raises(CalibError, match="x.nc"):
        load_dataset(p)
    with pytest.raises(CalibError, match="not found"):
        load_dataset(tmp_path / "missing.nc")


def test_save_is_atomic(root, tmp_path):
    ds = import_experiment(root / "20260101-000000-llama-2-7b-tp1-a")
    bad = ds.assign_attrs(manifest={"not": "serialisable"})  # netCDF attrs cannot hold dicts
    target = tmp_path / "out.nc"
    with pytest.raises((TypeError, ValueError)):
        save_dataset(bad, target)
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_model_config_for_unbundled_model(tmp_path):
    cfg = {
        "num_hidden_layers": 4,
        "hidden_size": 256,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 512,
        "vocab_size": 1000,
        "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    d = write_experiment(
        tmp_path / "exp",
        good_lines(),
        exp_config=dict(EXP_CONFIG, model="acme/Tiny-1b", tensor_parallelism=2),
    )
    ds = import_experiment(d, model_config=tmp_path / "config.json")
    assert ds["exp_model"].values[0] == "tiny-1b"
    assert json.loads(ds["exp_arch_json"].values[0])["num_key_value_heads"] == 2
    with pytest.raises(CalibError, match="tensor_parallelism"):
        import_experiment(
            write_experiment(
                tmp_path / "exp16",
                good_lines(),
                exp_config=dict(EXP_CONFIG, model="acme/Tiny-1b", tensor_parallelism=16),
            ),
            model_config=tmp_path / "config.json",
        )
