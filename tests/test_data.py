"""The data layer (calib.data, calib.vocab.fittable): layout and validation of ModelData."""

from __future__ import annotations

import numpy as np
import pytest

from calib.data import step_layout
from calib.errors import CalibError
from calib.vocab import COMPONENTS


def test_step_layout_sorts_and_keeps_present_experiments():
    step_exp = np.array([2, 0, 1, 2, 0, 3, 1])
    exp_model = ["a", "b", "a", "c"]
    lay = step_layout(step_exp, exp_model, np.array([6, 5, 4, 3, 2, 1, 0]))
    assert lay.models == ["a", "b", "c"]
    # rows by (model, experiment, step): a/0 (1, 4), a/2 (0, 3), b/1 (2, 6), c/3 (5)
    np.testing.assert_array_equal(lay.steps, [1, 4, 0, 3, 2, 6, 5])
    np.testing.assert_array_equal(lay.experiment_idx, [0, 0, 2, 2, 1, 1, 3])
    np.testing.assert_array_equal(lay.experiment_model, [0, 1, 0, 2])
    held = step_layout(step_exp, exp_model, np.array([0, 3, 5]), present_only=True)
    assert held.models == ["a", "c"]  # model b has no steps: absent (population level)
    np.testing.assert_array_equal(held.experiments, [2, 3])
    np.testing.assert_array_equal(held.experiment_idx, [0, 0, 1])


def test_empty_observed_batch_is_rejected():
    from calib.data import make_model_data

    comps = np.ones((3, len(COMPONENTS)))
    with pytest.raises(CalibError, match="empty batch"):
        make_model_data(
            comps,
            np.full(3, 32.0),
            np.array([1.0, 0.0, 2.0]),
            np.zeros(3),
            duration_us=np.full(3, 100.0),
        )
    # without observations (prediction) an empty batch is allowed
    make_model_data(comps, np.full(3, 32.0), np.array([1.0, 0.0, 2.0]), np.zeros(3))


def test_build_model_data_from_dataset():
    """From the embedded default traces: sampled steps, sorted rows, tp inactive at TP=1."""
    from calib.config import PROJECT_ROOT
    from calib.data import build_model_data
    from calib.traces.dataset import concat_experiments, find_experiments, import_experiment

    exps = find_experiments(PROJECT_ROOT / "traces" / "default")
    tp1 = [e for e in exps if "tp1" in e.name][:1]
    tp2 = [e for e in exps if "tp2" in e.name][:1]
    if not tp1 or not tp2:
        pytest.skip("embedded default traces not present")
    ds = concat_experiments([import_experiment(e) for e in tp1 + tp2])
    data, coords = build_model_data(ds)
    from calib.vocab import fittable

    sampled = fittable(ds)
    assert data.components.shape == (int(sampled.sum()), len(COMPONENTS))
    assert coords["component"] == list(COMPONENTS)
    assert len(coords["model"]) == data.n_models == 2
    assert len(coords["step"]) == data.components.shape[0]
    assert np.all(np.diff(data.model_idx) >= 0)  # sorted by model: one run per experiment
    np.testing.assert_allclose(
        data.duration_us, np.asarray(ds["duration_us"].values)[coords["step"]]
    )
    m_tp1 = coords["model"].index(str(ds["exp_model"].values[0]))
    assert not data.active[m_tp1, COMPONENTS.index("tp")]
    assert data.active[1 - m_tp1, COMPONENTS.index("tp")]
    assert np.all(data.components[:, COMPONENTS.index("weight")] > 0)
    with pytest.raises(CalibError):
        build_model_data(ds, steps=np.array([10**9]))
