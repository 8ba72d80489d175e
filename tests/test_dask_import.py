"""import_root(..., scheduler="dask") on a distributed LocalCluster equals the local import.

Needs ``dask[distributed]`` (in the ``dev`` and ``dask`` extras of pyproject.toml).
"""

from __future__ import annotations

import warnings

import pytest
import xarray as xr
from fixtures.trace_builder import two_experiment_root

from calib.traces import import_root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return two_experiment_root(tmp_path_factory.mktemp("dask-root"), n_requests=40, seed=2)


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
