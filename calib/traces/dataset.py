"""Experiment directories -> the canonical step dataset (``calib.traces.schema``), and back.

Public API
----------
``import_experiment(path, *, hardware=None, model_config=None)``  one directory, pure.
``import_root(root, *, hardware=None, model_config=None, workers=None, progress=True,
cache_dir=None, use_cache=True, scheduler="processes")``  many directories, parallel, cached.
``concat_experiments(datasets)``  ``save_dataset(ds, path)``  ``load_dataset(path)``.

Cache
-----
``import_root`` stores each experiment's dataset as ``<cache_dir>/<key>.nc`` where
``cache_dir`` defaults to ``<root>/.calib-cache/`` and ``key`` is the SHA-256 of the
experiment's inputs (traces + exp-config.yaml + profile.yaml + client metrics),
the ``hardware`` / ``model_config`` arguments, the schema version and the calib
version. Unchanged input is loaded from there instead of re-parsed. Delete the
directory (or pass ``use_cache=False`` / ``--no-cache``) to force a re-import.

Bad input: what happens (every case is tested in ``tests/test_traces_bad_inputs.py``)
-----------------------------------------------------------------------------------------
=================================================  =============================================
input                                              outcome
=================================================  =============================================
path missing / not a directory                     CalibError naming the path
path or a file in it unreadable (permissions)      CalibError naming the path
experiment directories that are symbolic links     imported like copies (link cycles skipped)
cache folder not writable (read-only input)        TraceWarning, imported without the cache
empty directory / no experiment under a root       CalibError ("no experiment directories")
exp-config.yaml missing                            CalibError naming the file
exp-config.yaml not YAML / not a mapping           CalibError naming the file (and line)
exp-config key missing / wrong type                CalibError naming the file and the field
unknown model                                      CalibError naming exp-config.yaml, ``model``
TP impossible for the model                        CalibError naming ``tensor_parallelism``
unknown hardware                                   CalibError naming ``hardware``
no traces.json / traces.json.gz                    CalibError naming the directory
both traces.json and traces.json.gz                CalibError (ambiguous: keep one)
profile.yaml / results json unparsable             CalibError naming the file
traces with no journey events (all lines bad)      CalibError naming traces.json
truncated / invalid JSON line                      TraceWarning file:line, line skipped, counted
wrong structure, ``intValue`` not a string,        TraceWarning file:line, line skipped, counted
value not a typed form, wrong type for a used key  (``exp_num_bad_lines``)
truncated gzip stream                              TraceWarning, lines read so far kept, counted
request missing QUEUED/SCHEDULED/FIRST_TOKEN/      request failed (labels NaN, known steps kept),
FINISHED (incl. PREEMPTED without RESUME)          counted in ``exp_num_failed``
journey inconsistencies (e.g. SCHEDULED twice,    TraceWarning with counts, handled per
absurd step values)                                ``calib.traces.reconstruct``
prefill does not fit max_num_batched_tokens        TraceWarning (steps / tokens over budget)
duplicate BATCH_SUMMARY step ids                   TraceWarning, first kept
BATCH_SUMMARY step not in any journey              TraceWarning, dropped, counts as disagreement
``step.duration_us`` <= 0                          TraceWarning, step kept but not sampled
``step.duration_us`` > 1 hour (physical bound,     TraceWarning stating the largest value,
``IMPORT_MAX_STEP_DURATION_US``; any size, no      step kept but not sampled, counted
64-bit wrap-around)
another used intValue outside 64-bit integers      malformed line (TraceWarning, skipped)
impossible event order / negative queueing, TTFT,  TraceWarning naming file:line and request,
E2E (e.g. FINISHED before QUEUED)                  labels dropped (failed), steps kept, counted
``step.duration_us`` NaN / not an integer string   malformed line (TraceWarning, skipped)
cross-check rate > CROSSCHECK_WARN_RATE            TraceWarning with the rate
saved file of another schema / damaged             CalibError naming the variable and the fix
=================================================  =============================================
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import yaml

from calib import DATASET_SCHEMA_VERSION, __version__, config
from calib.arch import load_architecture
from calib.errors import CalibError
from calib.hardware import load_hardware
from calib.io import (
    atomic_path,
    file_sha256,
    manifest,
    manifest_to_attr,
    text_sha256,
    worker_signals,
)
from calib.traces.otlp import TraceWarning, mp_context, read_traces
from calib.traces.reconstruct import reconstruct
from calib.traces.schema import PHASE_DECODE, REQUIRED_ATTRS, SCHEMA

FIX_REIMPORT = "re-import with scripts/import_traces.py"
REQUIRED_KEYS = {
    "model": str,
    "tensor_parallelism": int,
    "max_model_len": int,
    "max_num_batched_tokens": int,
    "max_num_seqs": int,
    "app": str,
}
_NP_DTYPES = {
    "int8": np.int8,
    "int32": np.int32,
    "int64": np.int64,
    "float64": np.float64,
    "bool": np.bool_,
    "str": str,
}
_PAD = {"slot_request": -1}


# ------------------------------------------------------------------ experiment inputs
def find_experiments(root: str | Path) -> list[Path]:
    """Experiment directories under ``root`` (``root`` itself if it is one), sorted."""
    root = Path(root)
    if not root.exists():
        raise CalibError(
            "path does not exist",
            path=root,
            fix="give an experiment directory or a folder of experiment directories",
        )
    if not root.is_dir():
        raise CalibError("not a directory", path=root)
    _check_readable(root)

    def is_exp(d: Path) -> bool:
        return any((d / n).is_file() for n in ("exp-config.yaml", "traces.json", "traces.json.gz"))

    if is_exp(root):
        return [root]
    found = []
    seen = {os.path.realpath(root)}
    # followlinks: experiment directories linked into a root import like copies; a
    # directory reached twice (a link cycle or two links to one folder) is walked once.
    for dirpath, dirnames, _ in os.walk(root, followlinks=True, onerror=_walk_error):
        keep = []
        for n in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, n))
            if n.startswith(".") or real in seen:
                continue
            seen.add(real)
            keep.append(n)
        dirnames[:] = keep
        d = Path(dirpath)
        if d != root and is_exp(d):
            found.append(d)
            dirnames[:] = []
    if not found:
        raise CalibError(
            "no experiment directories (none holds exp-config.yaml or traces.json)",
            path=root,
            fix="point at an experiment directory or a folder of them",
        )
    return sorted(found)


def _walk_error(err: OSError) -> None:
    raise CalibError(
        f"cannot list the folder ({err.strerror or err})",
        path=err.filename,
        fix="fix its permissions",
    ) from None


def _check_readable(path: Path) -> None:
    """A folder must be listable and a file readable by this user (else CalibError)."""
    mode = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if not os.access(path, mode):
        raise CalibError(
            "not readable (permission denied)",
            path=path,
            fix="fix its permissions or copy it somewhere readable",
        )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise CalibError(
            f"cannot read ({err.strerror or err})", path=path, fix="fix its permissions"
        ) from None


def _read_exp_config(d: Path) -> tuple[dict, Path]:
    p = d / "exp-config.yaml"
    if not p.is_file():
        raise CalibError(
            "exp-config.yaml is missing",
            path=d,
            fix="add exp-config.yaml with model, tensor_parallelism, max_model_len,"
            " max_num_batched_tokens, max_num_seqs, app",
        )
    try:
        cfg = yaml.safe_load(_read_bytes(p).decode("utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise CalibError(
            "not valid YAML",
            path=p,
            line=None if mark is None else mark.line + 1,
            fix="write flat `key: value` YAML",
        ) from None
    except UnicodeDecodeError:
        raise CalibError("not UTF-8 text", path=p) from None
    if not isinstance(cfg, dict):
        raise CalibError(
            "must be a YAML mapping of key: value", path=p, fix="write flat `key: value` YAML"
        )
    for key, typ in REQUIRED_KEYS.items():
        if key not in cfg:
            raise CalibError(
                "required key missing",
                path=p,
                field=key,
                fix=f"add `{key}: ...` to exp-config.yaml",
            )
        v = cfg[key]
        if typ is int and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise CalibError(f"must be a positive integer, got {v!r}", path=p, field=key)
        if typ is str and (not isinstance(v, str) or not v.strip()):
            raise CalibError(f"must be a non-empty string, got {v!r}", path=p, field=key)
    if "hardware" in cfg and not isinstance(cfg["hardware"], str):
        raise CalibError(f"must be a string, got {cfg['hardware']!r}", path=p, field="hardware")
    return cfg, p


def _read_optional(path: Path, kind: str) -> tuple[str, bytes]:
    """JSON text of an optional YAML/JSON file ('{}' if absent) and its raw bytes."""
    if not path.is_file():
        return "{}", b""
    raw = _read_bytes(path)
    try:
        obj = yaml.safe_load(raw) if kind == "yaml" else json.loads(raw)
    except (yaml.YAMLError, ValueError) as exc:
        raise CalibError(
            f"cannot parse ({str(exc).splitlines()[0][:100]})",
            path=path,
            fix="fix or remove the file (it is optional)",
        ) from None
    return json.dumps(obj, sort_keys=True, default=str), raw


def _trace_file(d: Path) -> Path:
    plain, gz = d / "traces.json", d / "traces.json.gz"
    if plain.is_file() and gz.is_file():
        raise CalibError(
            "both traces.json and traces.json.gz are present", path=d, fix="keep only one of them"
        )
    if plain.is_file():
        return plain
    if gz.is_file():
        return gz
    raise CalibError(
        "no traces.json (or traces.json.gz) in the experiment directory",
        path=d,
        fix="copy the OTLP trace export there as traces.json",
    )


def source_sha256(d: str | Path, *, with_metrics: bool = False) -> str:
    """SHA-256 over the experiment's inputs: traces, exp-config.yaml, profile.yaml.

    ``with_metrics`` adds results/summary_lifecycle_metrics.json (used for the cache key).
    """
    d = Path(d)
    parts = [file_sha256(_trace_file(d))]
    names = ["exp-config.yaml", "profile.yaml"]
    if with_metrics:
        names.append("results/summary_lifecycle_metrics.json")
    for name in names:
        p = d / name
        parts.append(file_sha256(p) if p.is_file() else "-")
    return text_sha256("|".join(parts))


# ---------------------------------------------------------------------- import one
def import_experiment(
    path: str | Path,
    *,
    hardware: str | None = None,
    model_config: str | Path | None = None,
    parse_workers: int = 1,
) -> xr.Dataset:
    """Import one experiment directory into a dataset with an experiment dim of length 1.

    Pure function of its inputs (files and arguments): safe to run in worker
    processes or hand to Dask. Malformed trace lines and journey anomalies are
    reported with :class:`~calib.traces.otlp.TraceWarning`; user errors raise
    :class:`~calib.errors.CalibError`.

    Parameters
    ----------
    path : the experiment directory (holding exp-config.yaml and traces.json[.gz]).
    hardware : accelerator name or YAML path; overrides exp-config ``hardware`` and
        ``calib.config.DEFAULT_HARDWARE``.
    model_config : a Hugging Face ``config.json`` for a model calib does not bundle.
    parse_workers : processes parsing one large traces.json (see
        :func:`calib.traces.otlp.read_traces`); the result does not depend on it.
    """
    d = Path(path)
    if not d.is_dir():
        raise CalibError("experiment directory does not exist", path=d)
    _check_readable(d)
    cfg, cfg_path = _read_exp_config(d)
    trace_path = _trace_file(d)
    try:
        arch = load_architecture(cfg["model"], model_config)
    except CalibError as exc:
        raise CalibError(
            str(exc).removeprefix("field 'model': "), path=cfg_path, field="model"
        ) from None
    arch.check_tp(cfg["tensor_parallelism"], source=cfg_path)
    hw_name = hardware or cfg.get("hardware") or config.DEFAULT_HARDWARE
    try:
        hw = load_hardware(hw_name)
    except CalibError as exc:
        where = "--hardware" if hardware else cfg_path
        raise CalibError(
            str(exc).removeprefix("field 'hardware': "), path=where, field="hardware"
        ) from None
    profile_json, _ = _read_optional(d / "profile.yaml", "yaml")
    metrics_json, _ = _read_optional(d / "results" / "summary_lifecycle_metrics.json", "json")
    sha = source_sha256(d)

    cols = read_traces(trace_path, workers=parse_workers)
    if len(cols.j_req) == 0:
        raise CalibError(
            f"no vllm.scheduler journey events ({cols.num_lines} lines, "
            f"{cols.num_bad_lines} malformed)",
            path=trace_path,
            fix="export traces with journey tracing on (scope vllm.scheduler, span llm_core)",
        )
    rec = reconstruct(cols, cfg["max_num_batched_tokens"], source=trace_path)
    if rec.step_id.size == 0:
        raise CalibError(
            "no scheduler step could be reconstructed (no request was scheduled)", path=trace_path
        )

    n_steps = rec.step_id.size
    n_req = rec.req["req_id"].size
    data = {
        "exp_model": [arch.name],
        "exp_model_id": [cfg["model"]],
        "exp_tp": [cfg["tensor_parallelism"]],
        "exp_max_num_batched_tokens": [cfg["max_num_batched_tokens"]],
        "exp_max_num_seqs": [cfg["max_num_seqs"]],
        "exp_max_model_len": [cfg["max_model_len"]],
        "exp_hardware": [hw.name],
        "exp_workload": [cfg["app"]],
        "exp_arch_json": [json.dumps(arch.to_dict(), sort_keys=True)],
        "exp_hardware_json": [json.dumps(hw.to_dict(), sort_keys=True)],
        "exp_profile_json": [profile_json],
        "exp_client_metrics_json": [metrics_json],
        "exp_source_sha256": [sha],
        "exp_num_steps": [n_steps],
        "exp_num_sampled": [int(rec.bs["sampled"].sum())],
        "exp_num_requests": [n_req],
        "exp_num_failed": [int(rec.req["req_failed"].sum())],
        "exp_num_bad_lines": [cols.num_bad_lines],
        "exp_xcheck_batch_rate": [rec.xcheck_batch_rate],
        "exp_xcheck_snapshot_rate": [rec.xcheck_snapshot_rate],
        "step_experiment": np.zeros(n_steps),
        "step_id": rec.step_id,
        "num_prefill": rec.num_prefill,
        "num_decode": rec.num_decode,
        "prefill_tokens": rec.prefill_tokens,
        "decode_tokens": rec.decode_tokens,
        "slot_request": rec.slot_request,
        "slot_phase": rec.slot_phase,
        "slot_new_tokens": rec.slot_new_tokens,
        "slot_progress": rec.slot_progress,
        "slot_prompt_len": rec.slot_prompt_len,
        "slot_mask": rec.slot_mask,
        "req_experiment": np.zeros(n_req),
        **rec.bs,
        **rec.req,
    }
    stats = {k: v for k, v in rec.stats.items()}
    stats["lines"] = cols.num_lines
    stats["bad_lines"] = cols.num_bad_lines
    ds = _build(data, [d.name], sha)
    ds.attrs["import_stats"] = json.dumps({d.name: stats}, sort_keys=True, default=int)
    return ds


def _build(data: dict, experiments: list[str], data_hash: str) -> xr.Dataset:
    missing = set(SCHEMA) - set(data)
    extra = set(data) - set(SCHEMA)
    if missing or extra:  # a bug, not a user error
        raise AssertionError(f"schema mismatch: missing {missing}, extra {extra}")
    dvars = {}
    for name, var in SCHEMA.items():
        arr = np.asarray(data[name])
        arr = arr.astype(_NP_DTYPES[var.dtype], copy=False)
        dvars[name] = (var.dims, arr)
    ds = xr.Dataset(dvars, coords={"experiment": np.asarray(experiments, dtype=str)})
    ds.attrs["schema_version"] = DATASET_SCHEMA_VERSION
    ds.attrs["manifest"] = manifest_to_attr(manifest(kind="dataset", data_hash=data_hash))
    return ds


# ---------------------------------------------------------------------- concatenate
def concat_experiments(datasets: Sequence[xr.Dataset]) -> xr.Dataset:
    """Concatenate per-experiment datasets, re-indexing experiments and requests.

    The slot dimension is padded to the widest batch. Experiment names must be unique.
    """
    datasets = list(datasets)
    if not datasets:
        raise CalibError("no datasets to concatenate")
    if len(datasets) == 1:
        return datasets[0]
    names = np.concatenate([ds["experiment"].values for ds in datasets]).astype(str)
    if len(set(names.tolist())) != names.size:
        dup = sorted({n for n in names.tolist() if (names == n).sum() > 1})
        raise CalibError(
            f"experiment names are not unique: {dup}",
            field="experiment",
            fix="give every experiment directory a distinct name",
        )
    width = max(ds.sizes.get("slot", 0) for ds in datasets)
    e_off = np.cumsum([0] + [ds.sizes["experiment"] for ds in datasets])
    r_off = np.cumsum([0] + [ds.sizes["request"] for ds in datasets])
    n_step = sum(ds.sizes["step"] for ds in datasets)
    data = {}
    for name, var in SCHEMA.items():
        if var.dims == ("step", "slot"):
            # One output buffer filled slice by slice (no padded intermediate copies).
            first = datasets[0][name].values
            out = np.full((n_step, width), _PAD.get(name, 0), dtype=first.dtype)
            row = 0
            for i, ds in enumerate(datasets):
                a = ds[name].values
                if name == "slot_request":
                    a = np.where(a >= 0, a + r_off[i], -1)
                out[row : row + a.shape[0], : a.shape[1]] = a
                row += a.shape[0]
            data[name] = out
            continue
        parts = []
        for i, ds in enumerate(datasets):
            a = ds[name].values
            if name in ("step_experiment", "req_experiment"):
                a = a + e_off[i]
            parts.append(a)
        data[name] = np.concatenate(parts)
    hashes = [str(h) for h in data["exp_source_sha256"].tolist()]
    ds = _build(data, names.tolist(), text_sha256("|".join(hashes)))
    stats = {}
    for d in datasets:
        stats.update(json.loads(d.attrs.get("import_stats", "{}")))
    ds.attrs["import_stats"] = json.dumps(stats, sort_keys=True)
    return ds


# ------------------------------------------------------------------------ save / load
def save_dataset(ds: xr.Dataset, path: str | Path, *, record: bool = True) -> Path:
    """Write ``ds`` atomically as NetCDF-4 (bools as int8, zlib on step x slot variables).

    ``record=False`` for caches (see :func:`calib.io.atomic_path`).
    """
    path = Path(path)
    out = ds.copy()
    enc: dict[str, dict[str, Any]] = {}
    for name, var in SCHEMA.items():
        if name not in out:
            continue
        if var.dtype == "bool":
            out[name] = out[name].astype(np.int8)
            out[name].attrs["calib_dtype"] = "bool"
        if var.dtype == "str":
            out[name] = out[name].astype(str)
            enc[name] = {"dtype": str}
        if var.dims == ("step", "slot"):
            enc[name] = {"zlib": True, "complevel": config.DATASET_ZLIB_LEVEL, "shuffle": True}
    out["experiment"] = out["experiment"].astype(str)
    enc["experiment"] = {"dtype": str}
    with atomic_path(path, record=record) as tmp:
        out.to_netcdf(tmp, engine="netcdf4", encoding=enc)
    return path


def dataset_hash(ds: xr.Dataset) -> str:
    """Content hash of a canonical dataset: SHA-256 over its experiments' source hashes.

    Stable across re-imports of the same trace files (unlike the NetCDF file's bytes,
    whose manifest records the import time); used as the ``data_hash`` of manifests.
    """
    names = [str(n) for n in ds["experiment"].values]
    sources = [str(h) for h in ds["exp_source_sha256"].values]
    text = "\n".join(f"{n}:{h}" for n, h in zip(names, sources, strict=True))
    return text_sha256(f"schema={DATASET_SCHEMA_VERSION}\n{text}")


def load_dataset(path: str | Path, *, progress: bool = True) -> xr.Dataset:
    """Open a canonical dataset and validate it against ``calib.traces.schema``.

    ``path`` is either a saved dataset (NetCDF, from ``scripts/import_traces.py``) or a
    folder of experiment directories in the trace format, which is imported here with
    :func:`import_root` (cached per experiment under ``<path>/.calib-cache``, so only
    the first call pays for parsing).
    """
    path = Path(path)
    if path.is_dir():
        return import_root(path, progress=progress)
    if not path.is_file():
        raise CalibError("dataset file not found", path=path, fix=FIX_REIMPORT)
    try:
        with xr.open_dataset(path, engine="netcdf4") as f:
            ds = f.load()
    except (OSError, ValueError, RuntimeError) as exc:
        raise CalibError(
            f"not a readable NetCDF dataset ({exc})", path=path, fix=FIX_REIMPORT
        ) from None
    for key in REQUIRED_ATTRS:
        if key not in ds.attrs:
            raise CalibError(f"attribute {key!r} missing", path=path, field=key, fix=FIX_REIMPORT)
    if int(ds.attrs["schema_version"]) != DATASET_SCHEMA_VERSION:
        raise CalibError(
            f"schema_version {ds.attrs['schema_version']} but this calib reads "
            f"{DATASET_SCHEMA_VERSION}",
            path=path,
            field="schema_version",
            fix=FIX_REIMPORT,
        )
    for name, var in SCHEMA.items():
        if name not in ds:
            raise CalibError("variable missing", path=path, field=name, fix=FIX_REIMPORT)
        if ds[name].dims != var.dims:
            raise CalibError(
                f"dims {ds[name].dims}, expected {var.dims}",
                path=path,
                field=name,
                fix=FIX_REIMPORT,
            )
        kind = ds[name].dtype.kind
        want = {"bool": "biu", "str": "USO", "float64": "f"}.get(var.dtype, "iu")
        if kind not in want:
            raise CalibError(
                f"dtype {ds[name].dtype}, expected {var.dtype}",
                path=path,
                field=name,
                fix=FIX_REIMPORT,
            )
        if var.dtype == "bool":
            ds[name] = ds[name].astype(bool)
        elif var.dtype == "str":
            ds[name] = ds[name].astype(str)
        else:
            ds[name] = ds[name].astype(_NP_DTYPES[var.dtype])
        ds[name].attrs.pop("calib_dtype", None)
    if "experiment" in ds.coords:
        ds["experiment"] = ds["experiment"].astype(str)
    n_exp, n_req = ds.sizes["experiment"], ds.sizes["request"]

    def check(name: str, ok: bool, what: str) -> None:
        if not ok:
            raise CalibError(f"invalid values: {what}", path=path, field=name, fix=FIX_REIMPORT)

    se, re_ = ds["step_experiment"].values, ds["req_experiment"].values
    check(
        "step_experiment",
        se.size == 0 or (se.min() >= 0 and se.max() < n_exp),
        "index outside the experiment dimension",
    )
    check(
        "req_experiment",
        re_.size == 0 or (re_.min() >= 0 and re_.max() < n_exp),
        "index outside the experiment dimension",
    )
    sr = ds["slot_request"].values
    check(
        "slot_request",
        sr.size == 0 or (sr.min() >= -1 and sr.max() < n_req),
        "index outside the request dimension",
    )
    ph = ds["slot_phase"].values
    check("slot_phase", bool(np.isin(ph, (0, 1, PHASE_DECODE)).all()), "phase not in {0,1,2}")
    check(
        "slot_mask",
        bool(np.array_equal(ds["slot_mask"].values, sr >= 0)),
        "mask disagrees with slot_request >= 0",
    )
    return ds


# ------------------------------------------------------------------------ import root
def _cache_key(src_sha: str, hardware, model_config) -> str:
    mc = file_sha256(model_config) if model_config and Path(model_config).is_file() else ""
    hw = str(hardware or "")
    if hw and Path(hw).is_file():
        hw += ":" + file_sha256(hw)
    return text_sha256(
        json.dumps([src_sha, hw, str(model_config or ""), mc, DATASET_SCHEMA_VERSION, __version__])
    )


def _import_one(d: str, hardware, model_config, cache_file: str | None, parse_workers: int = 1):
    """Worker: import one directory; returns (dataset or cache path, warning texts)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TraceWarning)
        ds = import_experiment(
            d, hardware=hardware, model_config=model_config, parse_workers=parse_workers
        )
        if cache_file is not None:
            save_dataset(ds, cache_file, record=False)
        result = ds
    msgs = [str(w.message) for w in caught if issubclass(w.category, TraceWarning)]
    return result, msgs


def import_root(
    root: str | Path,
    *,
    hardware: str | None = None,
    model_config: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    scheduler: str = "processes",
) -> xr.Dataset:
    """Import every experiment directory under ``root`` (or ``root`` itself) and concatenate.

    Parameters
    ----------
    root : an experiment directory or a folder holding many (searched recursively for
        directories with ``exp-config.yaml`` or ``traces.json[.gz]``; hidden folders skipped).
    hardware, model_config : as in :func:`import_experiment`.
    workers : parallel processes (default ``calib.config.IMPORT_WORKERS`` or the CPU count).
    progress : show a tqdm progress bar.
    cache_dir : per-experiment cache (default ``<root>/.calib-cache``; see module doc).
    use_cache : read and write the cache.
    scheduler : ``"processes"`` (concurrent.futures) or ``"dask"`` (needs ``calib[dask]``;
        runs :func:`import_experiment` as ``dask.delayed`` tasks on the active Dask
        scheduler and does not use the cache).

    Worker processes use ``fork`` unless JAX is already imported, then ``forkserver``
    (see :func:`calib.traces.otlp.mp_context`): scripts that import JAX first must
    guard their entry point with ``if __name__ == "__main__":``. When a single
    experiment is left to import, its traces.json is parsed by ``workers`` processes.
    Errors in any experiment fail the whole import (no partial dataset).
    """
    dirs = find_experiments(root)
    root = Path(root)
    names = [d.name for d in dirs]
    if len(set(names)) != len(names):  # same leaf name in different sub-folders
        names = [str(d.relative_to(root)) if d != root else d.name for d in dirs]
    if scheduler not in ("processes", "dask"):
        raise CalibError(
            f"unknown scheduler {scheduler!r}", field="scheduler", fix="use 'processes' or 'dask'"
        )
    if scheduler == "dask":
        try:
            import dask
        except ImportError:
            raise CalibError(
                "scheduler='dask' needs the optional dask dependency",
                field="scheduler",
                fix="pip install 'calib[dask]' or use scheduler='processes'",
            ) from None
        tasks = [
            dask.delayed(import_experiment)(str(d), hardware=hardware, model_config=model_config)
            for d in dirs
        ]
        return concat_experiments(_rename(list(dask.compute(*tasks)), names))

    cache_path = None
    if use_cache:
        cache_path = (
            Path(cache_dir)
            if cache_dir
            else ((root if root.is_dir() else root.parent) / config.IMPORT_CACHE_DIRNAME)
        )
        try:
            cache_path.mkdir(parents=True, exist_ok=True)
            writable = os.access(cache_path, os.W_OK | os.X_OK)
        except OSError:
            writable = False
        if not writable:
            if cache_dir:
                raise CalibError(
                    "cache folder cannot be created or written",
                    path=cache_path,
                    fix="pass a writable --cache-dir, or --no-cache",
                )
            warnings.warn(
                TraceWarning(
                    f"{cache_path}: cannot create or write the import cache "
                    "(read-only input?); importing without it"
                ),
                stacklevel=2,
            )
            cache_path = None
    jobs = []
    results: list = [None] * len(dirs)
    for i, d in enumerate(dirs):
        cfile = None
        if cache_path is not None:
            key = _cache_key(
                source_sha256(d, with_metrics=True) if _has_traces(d) else "",
                hardware,
                model_config,
            )
            cfile = cache_path / f"{key}.nc"
            if cfile.is_file():
                try:
                    results[i] = load_dataset(cfile)
                    _rewarn_cached(results[i], d)
                    continue
                except CalibError:
                    cfile.unlink(missing_ok=True)
        jobs.append((i, str(d), None if cfile is None else str(cfile)))
    n_workers = workers or config.IMPORT_WORKERS or os.cpu_count() or 1
    n_workers = max(1, min(n_workers, len(jobs)))
    bar = _progress(len(dirs), progress, initial=len(dirs) - len(jobs))
    try:
        if n_workers == 1 or len(jobs) == 1:
            # One experiment left: parse its (possibly large) file with all workers.
            parse_workers = workers or config.IMPORT_WORKERS or os.cpu_count() or 1
            for i, src, cache_file in jobs:
                results[i] = _finish_job(
                    _import_one(src, hardware, model_config, cache_file, parse_workers)
                )
                bar.update(1)
        elif jobs:
            ctx = mp_context()
            with ProcessPoolExecutor(
                max_workers=n_workers, mp_context=ctx, initializer=worker_signals
            ) as pool:
                futs = {
                    pool.submit(_import_one, src, hardware, model_config, cache_file): i
                    for i, src, cache_file in jobs
                }
                for fut in as_completed(futs):
                    results[futs[fut]] = _finish_job(fut.result())
                    bar.update(1)
    finally:
        bar.close()
    return concat_experiments(_rename(results, names))


def _has_traces(d: Path) -> bool:
    return (d / "traces.json").is_file() or (d / "traces.json.gz").is_file()


def _finish_job(res) -> xr.Dataset:
    result, msgs = res
    for m in msgs:
        warnings.warn(TraceWarning(m), stacklevel=3)
    return result


def _rewarn_cached(ds: xr.Dataset, d: Path) -> None:
    nbad = int(ds["exp_num_bad_lines"].values[0])
    if nbad:
        warnings.warn(
            TraceWarning(f"{d}: cached import; {nbad} malformed traces.json lines were skipped"),
            stacklevel=3,
        )


def _rename(results: list, names: list[str]) -> list:
    out = []
    for ds, n in zip(results, names, strict=True):
        if str(ds["experiment"].values[0]) != n:
            ds = ds.assign_coords(experiment=np.asarray([n], dtype=str))
        out.append(ds)
    return out


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    # disable=None: shown on a terminal only (a piped stderr keeps the CLI's one line).
    return tqdm(
        total=total,
        initial=initial,
        disable=True if not enabled or total <= 1 else None,
        desc="import",
        unit="exp",
        leave=False,
    )
