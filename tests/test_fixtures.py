"""The shared test fixtures (tests/fixtures/posteriors.py) are what they claim to be."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.posteriors import cached_data, cached_mock, make_replay_dataset

from calib import config


def test_replay_dataset_labels_are_teacher_forced_sums():
    ds, features, truth = make_replay_dataset(
        steps_per_exp=300, requests_per_exp=10, queued_fraction=1.0
    )
    dur = truth["true_step_us"]
    step_exp = np.asarray(ds["step_experiment"].values)
    ids = np.asarray(ds["step_id"].values)
    r = 3
    e = int(ds["req_experiment"].values[r])
    sel = (
        (step_exp == e)
        & (ids >= int(ds["req_queued_step"].values[r]))
        & (ids <= int(ds["req_finished_step"].values[r]))
    )
    assert float(ds["req_e2e_us"].values[r]) == pytest.approx(dur[sel].sum(), rel=1e-12)
    assert len(features) == ds.sizes["step"]
    assert 0.05 < float(np.mean(ds["sampled"].values)) < 0.15
    assert config.COMPONENTS[0] == "pf_compute"


def test_mock_sampler_shapes():
    data, coords, step_index, _ = cached_data()
    idata = cached_mock()
    assert idata.posterior.sizes["chain"] == 2 and idata.posterior.sizes["draw"] == 150
    assert idata.posterior["b"].dims == ("chain", "draw", "model", "component")
    assert "log_duration" not in idata.posterior
    np.testing.assert_array_equal(idata.constant_data["step"].values, step_index)
