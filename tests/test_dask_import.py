"""import_root(..., scheduler="dask") on a distributed LocalCluster equals the local import.

Needs ``dask[distributed]`` (in the ``dev`` and ``dask`` extras of pyproject.toml).
"""

from __future__ import annotations

import warnings

import pytest
import xarray as xr
from fixtures.trace_builder import good_lines, simulate, write_experiment

from calib.traces import import_root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("dask-root")
    write_experiment(
        r / "20260101-000000-llama-2-7b-tp1-a",
        good_lines(),
        profile={"load": {"stages": [{"rate": 1, "duration": 10}]}},
    )
    simulate(
        r / "20260101-000001-llama-2-7b-tp1-b",
        n_requests=40,
        seed=2,
        rate_per_s=50.0,
        max_num_batched_tokens=128,
        max_num_seqs=8,
    )
    return r


def test_dask_local_cluster_import_equals_local_import(root):
    from distributed import Client, LocalCluster

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        local = import_root(root, workers=1, progress=False, use_cache=False)
        with (
            LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            assert len(client.scheduler_info()["workers"]) == 2
            remote = import_root(root, scheduler="dask", progress=False)
    assert list(remote.experiment.values) == list(local.experiment.values)
    xr.testing.assert_equal(remote, local)  # every variable and coordinate, values and dims
    assert remote.attrs["import_stats"] == local.attrs["import_stats"]
