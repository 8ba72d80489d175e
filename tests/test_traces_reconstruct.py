"""Journey reconstruction against a hand-written experiment and a mini scheduler's truth."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from fixtures.trace_builder import (
    core_span,
    good_lines,
    journey_event,
    line,
    simulate,
    write_experiment,
)

from calib.traces import TraceWarning, import_experiment, iter_records, read_traces
from calib.traces.otlp import FINISHED, QUEUED, JourneyEvent
from calib.traces.reconstruct import base_request_id, reconstruct

# (step, [(request letter, phase, new tokens, progress)]) -- derived by hand in
# trace_builder.good_lines' docstring (M = 32, decodes first, FCFS chunking).
EXPECTED_STEPS = {
    1: [("a", 1, 10, 0), ("b", 1, 22, 0)],
    2: [("a", 2, 1, 10), ("b", 1, 28, 22)],
    3: [("a", 2, 1, 11), ("b", 2, 1, 50), ("c", 1, 8, 32)],
    4: [("c", 2, 1, 40), ("d", 1, 20, 0)],
    5: [("d", 2, 1, 20)],
    6: [("d", 2, 1, 21), ("e", 1, 16, 0)],
    7: [("f", 1, 32, 0)],
    9: [("d", 1, 23, 0), ("f", 1, 9, 0)],
    10: [("d", 2, 1, 23), ("f", 1, 31, 9)],
    11: [("f", 1, 20, 40)],
}
PROMPT = {"a": 10, "b": 50, "c": 40, "d": 20, "e": 16, "f": 60}


def _import(d, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = import_experiment(d, **kw)
    return ds, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = write_experiment(tmp_path_factory.mktemp("good") / "exp-good", good_lines())
    ds, msgs = _import(d)
    assert msgs == []
    return ds


def _steps(ds):
    ids = [s.removeprefix("cmpl-")[0] for s in ds["req_id"].values]
    out = {}
    for i, s in enumerate(ds["step_id"].values.tolist()):
        m = ds["slot_mask"].values[i]
        out[s] = [
            (ids[r], int(p), int(n), int(g))
            for r, p, n, g in zip(
                ds["slot_request"].values[i][m],
                ds["slot_phase"].values[i][m],
                ds["slot_new_tokens"].values[i][m],
                ds["slot_progress"].values[i][m],
                strict=True,
            )
        ]
    return out


def test_good_experiment_batches_exact(good):
    assert _steps(good) == EXPECTED_STEPS
    assert good.sizes["slot"] == 3
    # padding and prompt lengths
    m = good["slot_mask"].values
    assert (good["slot_request"].values[~m] == -1).all()
    assert (good["slot_phase"].values[~m] == 0).all()
    ids = [s.removeprefix("cmpl-")[0] for s in good["req_id"].values]
    for i in range(good.sizes["step"]):
        for k in np.flatnonzero(m[i]):
            r = good["slot_request"].values[i, k]
            assert good["slot_prompt_len"].values[i, k] == PROMPT[ids[r]]
    # per-step aggregates
    np.testing.assert_array_equal(good["num_decode"].values, [0, 1, 2, 1, 1, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(
        good["prefill_tokens"].values, [32, 28, 8, 20, 0, 16, 32, 32, 31, 20]
    )
    # no step exceeds the token budget
    assert ((good["prefill_tokens"] + good["decode_tokens"]).values <= 32).all()


def test_good_experiment_requests_and_labels(good):
    r = good
    assert r["req_id"].values.tolist() == [f"cmpl-{c}{c}" for c in "abcdef"]
    np.testing.assert_array_equal(r["req_prompt_len"].values, [10, 50, 40, 20, 16, 60])
    np.testing.assert_array_equal(r["req_cached_tokens"].values, [0, 0, 32, 0, 0, 0])
    np.testing.assert_array_equal(r["req_output_len"].values, [3, 2, 2, 5, -1, 1])
    np.testing.assert_array_equal(r["req_num_preemptions"].values, [0, 0, 0, 1, 0, 1])
    np.testing.assert_array_equal(r["req_failed"].values, [0, 0, 0, 0, 1, 0])
    assert r["req_finish_status"].values.tolist() == [
        "length",
        "length",
        "stopped",
        "length",
        "",
        "length",
    ]
    np.testing.assert_array_equal(r["req_first_token_step"].values, [1, 2, 3, 4, 6, 11])
    np.testing.assert_array_equal(r["req_finished_step"].values, [3, 3, 4, 10, -1, 11])
    nan = np.nan
    exp = {
        "req_queueing_us": [14000, 14000, 14000, 14000, nan, 14000],
        "req_ttft_us": [14000, 24000, 14000, 14000, nan, 54000],
        "req_e2e_us": [34000, 34000, 24000, 74000, nan, 54000],
        "req_processing_us": [20000, 20000, 10000, 40000, nan, 30000],
        "req_decode_interval_us": [10000, 10000, 10000, 15000, nan, nan],
        "req_api_queue_us": [1000, 1000, 1000, 1000, nan, 1000],
        "req_api_depart_us": [3000, 3000, 3000, 3000, nan, 3000],
    }
    for k, v in exp.items():
        np.testing.assert_allclose(r[k].values, v, atol=1e-3, err_msg=k)
    np.testing.assert_allclose(r["req_queued_ts_us"].values[4], 1000.051e6, atol=1e-2)


def test_good_experiment_summary_join_and_crosschecks(good):
    sampled = good["sampled"].values
    assert good["step_id"].values[sampled].tolist() == [3, 9]
    np.testing.assert_array_equal(good["duration_us"].values[sampled], [1234, 2000])
    assert np.isnan(good["duration_us"].values[~sampled]).all()
    assert (good["bs_num_decode_reqs"].values[~sampled] == -1).all()
    assert good["bs_num_prefill_reqs"].values[sampled].tolist() == [1, 2]
    assert float(good["exp_xcheck_batch_rate"].values[0]) == 0.0
    assert float(good["exp_xcheck_snapshot_rate"].values[0]) == 0.0
    assert int(good["exp_num_failed"].values[0]) == 1
    assert int(good["exp_num_sampled"].values[0]) == 2
    assert good["exp_model"].values[0] == "llama-2-7b"


def test_vectorised_path_equals_walk(tmp_path):
    d = tmp_path / "sim"
    simulate(
        d,
        n_requests=120,
        seed=3,
        max_num_batched_tokens=128,
        max_num_seqs=12,
        rate_per_s=80.0,
        record_truth=False,
    )
    for src in (d / "traces.json",):
        c = read_traces(src)
        a = reconstruct(c, 128)
        b = reconstruct(c, 128, _vectorise=False)
        for name in ("step_id", "slot_request", "slot_phase", "slot_new_tokens", "slot_progress"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        for k in a.req:
            np.testing.assert_array_equal(a.req[k], b.req[k])


@pytest.mark.parametrize("rate,budget", [(15.0, 256), (300.0, 128)])
def test_round_trip_mini_scheduler_exact(tmp_path, rate, budget):
    d = tmp_path / "sim"
    truth = simulate(
        d, n_requests=250, seed=7, max_num_batched_tokens=budget, max_num_seqs=16, rate_per_s=rate
    )
    ds, msgs = _import(d)
    assert msgs == []
    got = {}
    ids = ds["req_id"].values
    for i, s in enumerate(ds["step_id"].values.tolist()):
        m = ds["slot_mask"].values[i]
        got[s] = [
            (ids[r], int(p), int(n), int(g))
            for r, p, n, g in zip(
                ds["slot_request"].values[i][m],
                ds["slot_phase"].values[i][m],
                ds["slot_new_tokens"].values[i][m],
                ds["slot_progress"].values[i][m],
                strict=True,
            )
        ]
    want = {
        s: [(base_request_id(r), p, n, g) for r, p, n, g in v] for s, v in truth["steps"].items()
    }
    assert got == want
    # chunked prefills happened and the prefix cache was hit
    assert (ds["num_prefill"].values > 1).any() or (ds["prefill_tokens"].values == budget).any()
    assert (ds["req_cached_tokens"].values > 0).sum() > 100
    assert float(ds["exp_xcheck_batch_rate"].values[0]) == 0.0
    assert float(ds["exp_xcheck_snapshot_rate"].values[0]) == 0.0
    assert int(ds["exp_num_sampled"].values[0]) > 10


def test_gzip_equals_plain(tmp_path):
    a, _ = _import(write_experiment(tmp_path / "plain", good_lines()))
    b, _ = _import(write_experiment(tmp_path / "gz", good_lines(), gz=True))
    for name in a.data_vars:
        if name != "exp_source_sha256":
            np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_iter_records_typed(tmp_path):
    d = write_experiment(tmp_path / "e", good_lines())
    recs = list(iter_records(d / "traces.json"))
    journey = [r for r in recs if isinstance(r, JourneyEvent)]
    assert len(journey) == 27
    first = journey[0]
    assert first.request_id == "cmpl-aa-0-0000" and first.kind == QUEUED
    assert isinstance(first.step, int) and isinstance(first.ts_s, float)
    assert first.phase == "WAITING"
    fin = [r for r in journey if r.kind == FINISHED and r.request_id.startswith("cmpl-ff")]
    assert fin[0].finish_status == "length" and fin[0].num_preemptions == 1


def test_events_split_over_lines_and_scopes_interleaved(tmp_path):
    """One request's journey in three spans on three lines, mixed with other scopes."""
    ev = [
        journey_event("QUEUED", step=0, ts=1.0, pf_done=0, pf_total=8, dc_max=2),
        journey_event(
            "SCHEDULED",
            step=1,
            ts=1.1,
            pf_done=0,
            pf_total=8,
            dc_max=2,
            **{"schedule.kind": "FIRST"},
        ),
        journey_event("FIRST_TOKEN", step=1, ts=1.2, pf_done=8, pf_total=8, dc_done=1, dc_max=2),
        journey_event(
            "FINISHED",
            step=2,
            ts=1.3,
            pf_done=8,
            pf_total=8,
            dc_done=2,
            dc_max=2,
            **{"finish.status": "length", "some.new.attribute": "x"},
        ),
    ]
    rid = "cmpl-x-0-1"
    obj = json.loads(line([core_span(rid, ev[2:3])]))
    obj["resourceSpans"][0]["scopeSpans"].insert(
        0, {"scope": {"name": "other.scope"}, "spans": [{"name": "whatever"}]}
    )
    lines = [
        line([core_span(rid, ev[:1])]),
        json.dumps(obj),
        line([core_span(rid, ev[3:]), core_span(rid, ev[1:2])]),
    ]
    ds, msgs = _import(write_experiment(tmp_path / "e", lines))
    assert msgs == []
    assert ds["step_id"].values.tolist() == [1, 2]
    assert not bool(ds["req_failed"].values[0])
    np.testing.assert_allclose(ds["req_e2e_us"].values, [3e5], rtol=1e-9)


def test_over_budget_is_reported(tmp_path):
    """A prefill that cannot fit the budget at its FIRST_TOKEN step is counted and warned."""
    cfg = {
        "model": "meta-llama/Llama-2-7b-hf",
        "tensor_parallelism": 1,
        "max_model_len": 4096,
        "max_num_batched_tokens": 16,
        "max_num_seqs": 8,
        "app": "t",
    }
    ev = [
        journey_event("QUEUED", step=0, ts=1.0, pf_done=0, pf_total=40, dc_max=1),
        journey_event("SCHEDULED", step=1, ts=1.1, pf_done=0, pf_total=40, dc_max=1),
        journey_event("FIRST_TOKEN", step=2, ts=1.2, pf_done=40, pf_total=40, dc_done=1, dc_max=1),
        journey_event("FINISHED", step=2, ts=1.2, pf_done=40, pf_total=40, dc_done=1, dc_max=1),
    ]
    ds, msgs = _import(
        write_experiment(tmp_path / "e", [line([core_span("cmpl-o-0-1", ev)])], exp_config=cfg)
    )
    assert any("more prefill tokens than max_num_batched_tokens" in m for m in msgs)
    assert ds["slot_new_tokens"].values[:, 0].tolist() == [16, 24]
    stats = json.loads(ds.attrs["import_stats"])["e"]
    assert stats["over_budget_steps"] == 1 and stats["over_budget_tokens"] == 8


def test_trace_warning_class():
    assert issubclass(TraceWarning, UserWarning)


def test_span_without_journey_events_is_not_a_request(tmp_path):
    lines = good_lines() + [line([core_span("cmpl-empty-0-1", [])])]
    ds, msgs = _import(write_experiment(tmp_path / "e", lines))
    assert msgs == []
    assert ds.sizes["request"] == 6 and "cmpl-empty" not in ds["req_id"].values.tolist()
    assert _steps(ds) == EXPECTED_STEPS
