"""Round trip: simulate -> write -> calib.traces.import_experiment -> compare with the truth."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from calib.simulate import ExperimentSpec, simulate_experiment, write_experiment

traces = pytest.importorskip("calib.traces")

SP = dict(
    num_unique_system_prompts=3,
    num_users_per_system_prompt=5,
    system_prompt_len=100,
    question_len=447,
    output_len=60,
)


def _spec(**kw):
    base = dict(
        model="meta-llama/Llama-2-7b-hf",
        tp=1,
        workload="general",
        shared_prefix=SP,
        stages=((12.0, 2.0), (30.0, 2.0)),
    )
    base.update(kw)
    return ExperimentSpec(**base)


CASES = {
    "plain": dict(),
    # small KV cache and a small token budget: recompute preemptions and chunked prefills
    "pressured": dict(
        gpu_memory_utilization=0.2,
        max_num_batched_tokens=512,
        max_num_seqs=48,
        shared_prefix=dict(SP, question_len=700, output_len=120),
        stages=((14.0, 3.0),),
    ),
    "mixtral-gzip": dict(model="mistralai/Mixtral-8x7B-v0.1", tp=2, stages=((20.0, 2.0),)),
}


@pytest.fixture(scope="module", params=list(CASES))
def roundtrip(request, tmp_path_factory):
    kw = CASES[request.param]
    res = simulate_experiment(_spec(**kw), seed=21)
    root = tmp_path_factory.mktemp(request.param)
    d = write_experiment(res, root, gzip=request.param.endswith("gzip"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a consistent trace imports without warnings
        ds = traces.import_experiment(d)
    return request.param, res, ds


def _rows(ids, rq, phase, new, prog, plen):
    return sorted(zip(ids, phase.tolist(), new.tolist(), prog.tolist(), plen.tolist(), strict=True))


def test_compositions_match(roundtrip):
    name, res, ds = roundtrip
    if name == "pressured":
        assert res.requests["num_preemptions"].sum() > 0
        assert (
            (res.comp["phase"] == 1)
            & (res.comp["new_tokens"] < res.comp["prompt_len"] - res.comp["progress"])
        ).any()
    st = res.steps
    assert np.array_equal(ds["step_id"].values, st["id"])
    imp_req_ids = ds["req_id"].values
    my_ids = res.requests["id"]
    off = res.comp["offsets"]
    m = ds["slot_mask"].values
    sreq = ds["slot_request"].values
    mismatched = 0
    for i in range(st["id"].size):
        a, b = off[i], off[i + 1]
        sl = slice(a, b)
        mine = _rows(
            my_ids[res.comp["request"][sl]],
            None,
            res.comp["phase"][sl],
            res.comp["new_tokens"][sl],
            res.comp["progress"][sl],
            res.comp["prompt_len"][sl],
        )
        mi = m[i]
        theirs = _rows(
            imp_req_ids[sreq[i][mi]],
            None,
            ds["slot_phase"].values[i][mi],
            ds["slot_new_tokens"].values[i][mi],
            ds["slot_progress"].values[i][mi],
            ds["slot_prompt_len"].values[i][mi],
        )
        mismatched += mine != theirs
    assert mismatched == 0, f"{mismatched} of {st['id'].size} steps differ"
    assert float(ds["exp_xcheck_batch_rate"].values[0]) == 0.0
    snap = float(ds["exp_xcheck_snapshot_rate"].values[0])
    assert snap == 0.0


def test_durations_exact(roundtrip):
    _, res, ds = roundtrip
    st = res.steps
    sampled = ds["sampled"].values
    assert np.array_equal(sampled, st["sampled"])
    got = ds["duration_us"].values[sampled]
    assert np.array_equal(got, st["duration_us_int"][st["sampled"]].astype(float))
    assert np.all(np.isnan(ds["duration_us"].values[~sampled]))


def test_request_labels_to_the_microsecond(roundtrip):
    _, res, ds = roundtrip
    rq = res.requests
    pos = {rid: i for i, rid in enumerate(rq["id"])}
    idx = np.array([pos[r] for r in ds["req_id"].values])
    q = rq["queued_ns"][idx] / 1e3
    s = rq["scheduled_ns"][idx] / 1e3
    f = rq["first_token_ns"][idx] / 1e3
    e = rq["finished_ns"][idx] / 1e3
    tol = dict(rtol=0, atol=1.0)
    assert not ds["req_failed"].values.any()
    assert np.allclose(ds["req_queueing_us"].values, s - q, **tol)
    assert np.allclose(ds["req_ttft_us"].values, f - q, **tol)
    assert np.allclose(ds["req_e2e_us"].values, e - q, **tol)
    assert np.allclose(ds["req_api_queue_us"].values, q - rq["arrived_ns"][idx] / 1e3, **tol)
    assert np.allclose(ds["req_api_depart_us"].values, rq["departed_ns"][idx] / 1e3 - e, **tol)
    assert np.array_equal(ds["req_cached_tokens"].values, rq["cached_tokens"][idx])
    assert np.array_equal(ds["req_num_preemptions"].values, rq["num_preemptions"][idx])
    assert np.array_equal(ds["req_output_len"].values, rq["output_len"][idx])
    for k in ("queued_step", "scheduled_step", "first_token_step", "finished_step"):
        assert np.array_equal(ds[f"req_{k}"].values, rq[k][idx]), k
    nopre = rq["num_preemptions"][idx] == 0
    assert np.allclose(ds["req_processing_us"].values[nopre], (e - s)[nopre], **tol)
