"""On-disk format tests of calib.simulate.writer (the exact keys of the trace spec)."""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pytest
import xarray as xr
import yaml

from calib.io import file_sha256
from calib.simulate import ExperimentSpec, simulate_experiment, simulate_recipe, write_experiment

SP = dict(
    num_unique_system_prompts=3,
    num_users_per_system_prompt=5,
    system_prompt_len=150,
    question_len=600,
    output_len=80,
)

COMMON = {
    "event.type",
    "ts.monotonic",
    "ts.monotonic_ns",
    "scheduler.step",
    "phase",
    "prefill.done_tokens",
    "prefill.total_tokens",
    "decode.done_tokens",
    "decode.max_tokens",
    "num_preemptions",
}
COMMON_TYPES = {"event.type": "stringValue", "ts.monotonic": "doubleValue", "phase": "stringValue"}
BATCH = {
    "step.id",
    "step.ts_start_ns",
    "step.ts_end_ns",
    "step.duration_us",
    "queue.running_depth",
    "queue.waiting_depth",
    "batch.num_prefill_reqs",
    "batch.num_decode_reqs",
    "batch.scheduled_tokens",
    "batch.prefill_tokens",
    "batch.decode_tokens",
    "batch.num_finished",
    "batch.num_preempted",
    "kv.usage_gpu_ratio",
    "kv.blocks_total_gpu",
    "kv.blocks_free_gpu",
}
SNAP = {
    "step.id",
    "request.id",
    "request.phase",
    "request.num_prompt_tokens",
    "request.num_computed_tokens",
    "request.num_output_tokens",
    "request.num_preemptions",
    "request.scheduled_tokens_this_step",
    "kv.blocks_allocated_gpu",
    "kv.blocks_cached_gpu",
    "request.effective_prompt_len",
}
STRING_ATTRS = {
    "event.type",
    "phase",
    "schedule.kind",
    "finish.status",
    "request.id",
    "request.phase",
    "gen_ai.request.id",
    "http.route",
}
DOUBLE_ATTRS = {"ts.monotonic", "kv.usage_gpu_ratio", "event.ts.monotonic"}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A run with preemptions (small KV cache) written plainly, with its truth."""
    spec = ExperimentSpec(
        model="meta-llama/Llama-2-7b-hf",
        tp=1,
        workload="roleplay",
        shared_prefix=SP,
        stages=((16.0, 4.0),),
        gpu_memory_utilization=0.20,
        max_num_seqs=64,
    )
    res = simulate_experiment(spec, seed=7)
    root = tmp_path_factory.mktemp("raw")
    truth = tmp_path_factory.mktemp("truth")
    d = write_experiment(res, root, truth_dir=truth)
    return res, d, truth


def attr_map(attrs):
    out = {}
    for a in attrs:
        assert set(a) == {"key", "value"}
        v = a["value"]
        assert len(v) == 1, a
        ((kind, val),) = v.items()
        k = a["key"]
        assert k not in out, f"duplicate attribute {k}"
        if kind == "intValue":
            assert isinstance(val, str) and re.fullmatch(r"-?\d+", val), a
            val = int(val)
        elif kind == "doubleValue":
            assert isinstance(val, float), a
            assert k in DOUBLE_ATTRS, a
        elif kind == "stringValue":
            assert isinstance(val, str) and k in STRING_ATTRS | {"service.name"}, a
        else:
            raise AssertionError(f"unexpected value kind {kind}")
        if k in DOUBLE_ATTRS:
            assert kind == "doubleValue", a
        elif k not in STRING_ATTRS | {"service.name"}:
            assert kind == "intValue", a
        out[k] = val
    return out


def parse(path):
    spans = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            assert set(obj) == {"resourceSpans"}
            for rs in obj["resourceSpans"]:
                assert set(rs) == {"resource", "scopeSpans"}
                attr_map(rs["resource"]["attributes"])
                for ss in rs["scopeSpans"]:
                    for sp in ss["spans"]:
                        spans.append((ss["scope"]["name"], sp))
    return spans


def test_layout_and_configs(written):
    res, d, _ = written
    assert re.fullmatch(r"\d{8}-\d{6}-llama-2-7b-hf-tp1-roleplay", d.name)
    cfg = yaml.safe_load((d / "exp-config.yaml").read_text())
    assert cfg["model"] == "meta-llama/Llama-2-7b-hf" and cfg["tensor_parallelism"] == 1
    for k in ("max_model_len", "max_num_batched_tokens", "max_num_seqs"):
        assert isinstance(cfg[k], int)
    assert cfg["app"] == "roleplay"
    prof_text = (d / "profile.yaml").read_text()
    assert prof_text.count("\n") == 1
    prof = json.loads(prof_text)
    assert yaml.safe_load(prof_text) == prof
    assert prof["data"]["shared_prefix"] == SP
    assert prof["load"]["stages"] == [{"rate": 16.0, "duration": 4.0}]
    assert prof["server"]["ignore_eos"] is True
    assert not list(d.glob(".*.tmp"))


def test_traces_exact_keys_and_types(written):
    res, d, _ = written
    spans = parse(d / "traces.json")
    rq = res.requests
    N = rq["prompt_len"].size
    api = [s for sc, s in spans if sc == "vllm.api"]
    core = [s for sc, s in spans if sc == "vllm.scheduler"]
    step = [s for sc, s in spans if sc == "vllm.scheduler.step"]
    assert len(api) == N and len(core) == N + int(rq["num_preemptions"].sum())
    assert {sc for sc, _ in spans} == {"vllm.api", "vllm.scheduler", "vllm.scheduler.step"}
    for sp in api + core + step:
        assert re.fullmatch(r"[0-9a-f]{32}", sp["traceId"])
        assert re.fullmatch(r"[0-9a-f]{16}", sp["spanId"])
        assert isinstance(sp["startTimeUnixNano"], str) and int(sp["endTimeUnixNano"]) >= int(
            sp["startTimeUnixNano"]
        )
        for e in sp["events"]:
            assert set(e) == {"timeUnixNano", "name", "attributes"}
            int(e["timeUnixNano"])
    # API spans
    for sp in api:
        assert sp["name"] == "llm_request" and sp["kind"] == 2
        a = attr_map(sp["attributes"])
        assert set(a) == {
            "gen_ai.request.id",
            "http.route",
            "gen_ai.usage.prompt_tokens",
            "gen_ai.request.max_tokens",
        }
        assert re.fullmatch(r"cmpl-[0-9a-f]{32}", a["gen_ai.request.id"])
        assert [e["name"] for e in sp["events"]] == ["api.ARRIVED", "api.DEPARTED"]
        for e in sp["events"]:
            assert set(attr_map(e["attributes"])) == {"event.ts.monotonic"}
    # journey spans
    by_req: dict[str, list] = {}
    api_ids = {attr_map(s["attributes"])["gen_ai.request.id"]: s for s in api}
    for sp in core:
        assert sp["name"] == "llm_core" and sp["kind"] == 1
        a = attr_map(sp["attributes"])
        rid = a["gen_ai.request.id"]
        m = re.fullmatch(r"(cmpl-[0-9a-f]{32})-0-[0-9a-f]+", rid)
        assert m and m.group(1) in api_ids
        assert sp["traceId"] == api_ids[m.group(1)]["traceId"]
        assert sp["parentSpanId"] == api_ids[m.group(1)]["spanId"]
        for e in sp["events"]:
            ea = attr_map(e["attributes"])
            extra = set(ea) - COMMON
            assert COMMON <= set(ea)
            typ = ea["event.type"]
            assert e["name"] == "journey." + typ
            assert extra == (
                {"schedule.kind"}
                if typ == "SCHEDULED"
                else {"finish.status"}
                if typ == "FINISHED"
                else set()
            )
            assert ea["ts.monotonic"] == ea["ts.monotonic_ns"] / 1e9
            by_req.setdefault(rid, []).append(ea)
    assert len(by_req) == N
    for evs in by_req.values():
        types = [e["event.type"] for e in evs]
        assert types[0] == "QUEUED" and types[-1] == "FINISHED"
        assert types.count("FIRST_TOKEN") == 1
        assert types.count("PREEMPTED") == types.count("SCHEDULED") - 1
        assert evs[-1]["decode.done_tokens"] == SP["output_len"]
        ft = evs[types.index("FIRST_TOKEN")]
        assert ft["prefill.done_tokens"] == ft["prefill.total_tokens"]
        steps = [e["scheduler.step"] for e in evs]
        assert steps == sorted(steps)
        kinds = [e["schedule.kind"] for e in evs if e["event.type"] == "SCHEDULED"]
        assert kinds[0] == "FIRST" and all(k == "RESUME" for k in kinds[1:])
    assert int(res.requests["num_preemptions"].sum()) > 0, "fixture should preempt"
    # step spans
    n_bs = n_snap = 0
    durations = {}
    for sp in step:
        assert re.fullmatch(r"scheduler_steps_\d+", sp["name"])
        for e in sp["events"]:
            a = attr_map(e["attributes"])
            if e["name"] == "step.BATCH_SUMMARY":
                assert set(a) == BATCH
                assert (
                    a["batch.prefill_tokens"] + a["batch.decode_tokens"]
                    == a["batch.scheduled_tokens"]
                )
                assert 0.0 <= a["kv.usage_gpu_ratio"] <= 1.0
                durations[a["step.id"]] = a["step.duration_us"]
                n_bs += 1
            else:
                assert e["name"] == "step.REQUEST_SNAPSHOT"
                assert set(a) == SNAP
                assert a["request.id"] in by_req
                n_snap += 1
    st = res.steps
    assert n_bs == int(st["sampled"].sum())
    assert durations == {
        int(i): int(v)
        for i, v in zip(st["id"][st["sampled"]], st["duration_us_int"][st["sampled"]], strict=True)
    }
    assert n_snap == int(res.comp["snapshot"].sum()) > 0


def test_batch_summary_rate(written):
    res, _, _ = written
    S = res.steps["id"].size
    assert S > 400
    rate = res.steps["sampled"].mean()
    assert abs(rate - 0.10) < 4 * np.sqrt(0.09 / S)
    snap = res.comp["snapshot"].mean()
    assert abs(snap - 0.01) < 0.005


def test_truth_matches_written(written):
    res, d, truth = written
    ds = xr.open_dataset(truth / f"{d.name}.nc")
    try:
        st = res.steps
        assert np.array_equal(ds["step_id"].values, st["id"])
        assert np.array_equal(ds["duration_us_int"].values, st["duration_us_int"])
        assert np.all(np.abs(ds["duration_us"].values - ds["duration_us_int"].values) <= 0.5)
        pb = res.step_batch()
        for name in ("phase", "new_tokens", "progress", "prompt_len", "mask"):
            assert np.array_equal(ds[f"slot_{name}"].values, getattr(pb, name)), name
        m = ds["slot_mask"].values
        assert np.all(ds["slot_request"].values[~m] == -1)
        assert np.array_equal(ds["slot_request"].values[m], res.comp["request"])
        assert np.array_equal(ds["req_cached_tokens"].values, res.requests["cached_tokens"])
        assert list(ds["req_id"].values) == list(res.requests["id"])
        assert np.array_equal(ds["req_num_preemptions"].values, res.requests["num_preemptions"])
        assert ds.attrs["kv_blocks_total"] == res.kv_blocks_total
        json.loads(ds.attrs["manifest"])
    finally:
        ds.close()
    # the written traces' journey timestamps are the truth's (µs precision)
    spans = parse(d / "traces.json")
    queued = {}
    for sc, sp in spans:
        if sc == "vllm.scheduler":
            rid = attr_map(sp["attributes"])["gen_ai.request.id"].rsplit("-0-", 1)[0]
            for e in sp["events"]:
                a = attr_map(e["attributes"])
                if a["event.type"] == "QUEUED":
                    queued[rid] = a["ts.monotonic"]
    ids = list(res.requests["id"])
    got = np.array([queued[i] for i in ids]) * 1e6
    assert np.allclose(got, res.requests["queued_ns"] / 1e3, rtol=0, atol=0.01)


def test_client_metrics_itl_quirk(written):
    res, d, _ = written
    m = json.loads((d / "results" / "summary_lifecycle_metrics.json").read_text())
    lat = m["successes"]["latency"]
    keys = {
        "mean",
        "min",
        "p0.1",
        "p1",
        "p5",
        "p10",
        "p25",
        "median",
        "p75",
        "p90",
        "p95",
        "p99",
        "p99.9",
        "max",
    }
    for k in (
        "request_latency",
        "time_to_first_token",
        "time_per_output_token",
        "inter_token_latency",
    ):
        assert set(lat[k]) == keys
    assert m["successes"]["count"] == res.requests["prompt_len"].size
    assert m["failures"]["count"] == 0
    rq = res.requests
    true_interval = ((rq["finished_ns"] - rq["first_token_ns"]) / (rq["output_len"] - 1)).mean()
    ratio = lat["time_per_output_token"]["mean"] * 1e9 / true_interval
    assert 0.4 < ratio < 0.6
    assert 0.4 < lat["inter_token_latency"]["mean"] * 1e9 / true_interval < 0.6
    assert lat["request_latency"]["mean"] > lat["time_to_first_token"]["mean"] > 0


def test_gzip_same_content_and_reproducible(written, tmp_path):
    res, d, _ = written
    gz_dir = write_experiment(res, tmp_path / "gz", gzip=True)
    assert not (gz_dir / "traces.json").exists()
    with gzip.open(gz_dir / "traces.json.gz", "rb") as f:
        assert f.read() == (d / "traces.json").read_bytes()
    again = write_experiment(res, tmp_path / "gz2", gzip=True)
    assert file_sha256(again / "traces.json.gz") == file_sha256(gz_dir / "traces.json.gz")


def test_simulate_recipe_and_cli(tmp_path, capsys):
    recipe = {
        "seed": 4,
        "hardware": "H100-SXM",
        "vllm": {"max_num_batched_tokens": 2048, "max_num_seqs": 128, "max_model_len": 4096},
        "models": [{"model": "meta-llama/Llama-2-7b-hf", "tp": 1}],
        "workloads": {
            "tiny": {
                "shared_prefix": dict(SP, output_len=20),
                "stages": [{"rate": 5, "duration": 1.0}],
            },
            "tiny2": {
                "shared_prefix": dict(SP, output_len=10),
                "stages": [{"rate": 5, "duration": 1.0}],
            },
        },
    }
    seen = []
    paths = simulate_recipe(
        recipe, tmp_path / "a", truth_dir=tmp_path / "t", workers=1, progress=seen.append
    )
    assert [p.name.rsplit("-", 1)[-1] for p in paths] == ["tiny", "tiny2"]
    assert len(seen) == 2 and len(list((tmp_path / "t").glob("*.nc"))) == 2
    paths2 = simulate_recipe(recipe, tmp_path / "b", workers=1)
    for p, q in zip(paths, paths2, strict=True):
        assert file_sha256(p / "traces.json") == file_sha256(q / "traces.json")

    import importlib.util

    from calib.config import PROJECT_ROOT

    spec = importlib.util.spec_from_file_location(
        "simulate_script", PROJECT_ROOT / "scripts" / "simulate.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\nmodels: []\nworkloads: {}\n")
    assert mod.main(["--recipe", str(bad), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "models" in err and "\n" not in err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(recipe))
    assert mod.main(["--recipe", str(good), "--out", str(tmp_path / "d"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "sampled steps" in out and "prefix-cache hit" in out


def test_workers_give_identical_output(tmp_path):
    recipe = {
        "seed": 9,
        "models": [{"model": "meta-llama/Llama-2-7b-hf", "tp": 1}],
        "workloads": {
            w: {"shared_prefix": dict(SP, output_len=12), "stages": [{"rate": 4, "duration": 1.0}]}
            for w in ("w1", "w2")
        },
    }
    one = simulate_recipe(recipe, tmp_path / "one", workers=1)
    two = simulate_recipe(recipe, tmp_path / "two", workers=2)
    assert [p.name for p in one] == [p.name for p in two]
    for p, q in zip(one, two, strict=True):
        for f in (
            "traces.json",
            "exp-config.yaml",
            "profile.yaml",
            "results/summary_lifecycle_metrics.json",
        ):
            assert file_sha256(p / f) == file_sha256(q / f), f
