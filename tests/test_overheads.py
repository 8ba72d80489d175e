"""API-side overheads (calib.overheads): means, bootstrap bands, pooling across models."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.posteriors import make_replay_dataset

from calib import overheads


@pytest.fixture(scope="module")
def data():
    # two models of one server: queue 15000 ± 500·t, depart 800 ± 40·t, host gap 40 ± 8 µs
    ds, _, _ = make_replay_dataset(
        seed=2, steps_per_exp=600, requests_per_exp=150, gap_us=40.0, gap_sd_us=8.0, sample_rate=0.3
    )
    return ds


def test_estimates_cover_the_server_overheads(data):
    est = overheads.estimate(data, replicates=300)
    truth = {"queue": 15000.0, "depart": 800.0, "per_token": 40.0}
    for m in [*est["models"], "population"]:
        for q, want in truth.items():
            e = est["estimates"][m][q]
            assert e["lower"] < want < e["upper"], (m, q, e)
            assert e["upper"] - e["lower"] < 0.1 * want, (m, q, e)  # informative, not wide
    for q in truth:  # one server, same truth: the models cannot be told apart
        assert est["heterogeneity"][q]["pooled"], est["heterogeneity"][q]
        vals = {est["estimates"][m][q]["mean"] for m in est["models"]}
        assert len(vals) == 1


def test_models_that_differ_are_not_pooled(data):
    ds = data.copy()
    req_model = np.asarray(ds["exp_model"].values).astype(str)[
        np.asarray(ds["req_experiment"].values)
    ]
    dep = np.asarray(ds["req_api_depart_us"].values).copy()
    dep[req_model == "model-1"] += 300.0  # a second server's depart cost
    ds["req_api_depart_us"] = (("request",), dep)
    est = overheads.estimate(ds, replicates=300)
    h = est["heterogeneity"]["depart"]
    assert not h["pooled"] and h["tau_us"] > 100.0
    e0, e1 = (est["estimates"][m]["depart"] for m in ("model-0", "model-1"))
    assert e0["lower"] < 800.0 < e0["upper"] and e1["lower"] < 1100.0 < e1["upper"]
    pop = est["estimates"]["population"]["depart"]
    assert pop["upper"] - pop["lower"] > 150.0  # a new model: the spread between servers


def test_alphas_clip_at_zero_and_fall_back_to_population(data):
    est = overheads.estimate(data, replicates=50)
    est["estimates"]["model-0"]["per_token"]["mean"] = -5.0
    a = overheads.alphas(est, "model-0")
    assert a["mean"][2] == 0.0 and a["raw_mean"][2] == -5.0 and a["clipped"] == ["per_token"]
    assert overheads.alphas(est, "unseen")["set"] == "population"


def test_no_request_labels_is_a_user_error():
    from calib.errors import CalibError

    ds, _, _ = make_replay_dataset(seed=1, steps_per_exp=300, requests_per_exp=10, api=False)
    with pytest.raises(CalibError, match="API overhead 'queue'"):
        overheads.estimate(ds, replicates=10)
    with pytest.raises(CalibError, match="lacks variable"):
        overheads.estimate(ds.drop_vars("req_api_depart_us"), replicates=10)
