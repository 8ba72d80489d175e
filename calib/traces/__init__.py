"""Trace import: vLLM OTLP journey + step traces -> the canonical step dataset.

``calib.traces.otlp`` streams traces.json, ``calib.traces.reconstruct`` rebuilds the
per-step batches and labels, ``calib.traces.dataset`` builds, saves and validates the
xarray dataset described by ``calib.traces.schema``.
"""

from calib.traces.dataset import (
    concat_experiments,
    dataset_hash,
    find_experiments,
    import_experiment,
    import_root,
    load_dataset,
    save_dataset,
)
from calib.traces.otlp import TraceWarning, iter_records, read_traces
from calib.traces.reconstruct import reconstruct

__all__ = [
    "TraceWarning",
    "concat_experiments",
    "dataset_hash",
    "find_experiments",
    "import_experiment",
    "import_root",
    "iter_records",
    "load_dataset",
    "read_traces",
    "reconstruct",
    "save_dataset",
]
