"""BLIS replay input and output (calib/blis.py) against BLIS's public source format.

Format facts checked here, from github.com/inference-sim/inference-sim:
sim/workload/tracev2.go (``TraceHeader`` YAML keys, ``traceV2Columns`` order,
``parseTraceRecord`` positions and units), sim/workload/replay.go (``input_tokens`` is
the suffix when ``prefix_group`` is set), cmd/replay.go and cmd/root.go (flag names,
``--results-path`` SimResult JSON keys).
"""

from __future__ import annotations

import csv
import io
import os
import subprocess

import numpy as np
import pytest
import yaml

from calib.blis import (
    TRACE_COLUMNS,
    blis_command,
    find_blis,
    parse_results,
    replay_means,
    trace_csv,
    trace_header,
    write_replay_inputs,
)
from calib.closed_loop import ExperimentPlan
from calib.errors import CalibError
from calib.simulate import ExperimentSpec

# traceV2Columns in sim/workload/tracev2.go, verbatim order
BLIS_COLUMNS = [
    "request_id",
    "client_id",
    "tenant_id",
    "slo_class",
    "session_id",
    "round_index",
    "prefix_group",
    "prefix_length",
    "streaming",
    "input_tokens",
    "output_tokens",
    "text_tokens",
    "image_tokens",
    "audio_tokens",
    "video_tokens",
    "reason_ratio",
    "model",
    "deadline_us",
    "server_input_tokens",
    "arrival_time_us",
    "send_time_us",
    "first_chunk_time_us",
    "last_chunk_time_us",
    "num_chunks",
    "status",
    "error_message",
    "finish_reason",
]
# TraceHeader / TraceServerConfig yaml tags (KnownFields(true): nothing else allowed)
HEADER_KEYS = {
    "trace_version",
    "time_unit",
    "created_at",
    "mode",
    "warm_up_requests",
    "workload_seed",
    "workload_spec",
    "server",
    "network",
    "goodput_slo_targets",
}
SERVER_KEYS = {
    "type",
    "model",
    "tensor_parallel",
    "max_num_seqs",
    "block_size",
    "gpu_memory_utilization",
    "max_model_len",
}


def _plan(prefix_len=64):
    spec = ExperimentSpec(
        model="meta-llama/Llama-2-7b-hf",
        tp=2,
        workload="w",
        shared_prefix={
            "num_unique_system_prompts": 2,
            "num_users_per_system_prompt": 1,
            "system_prompt_len": prefix_len,
            "question_len": 1,
            "output_len": 1,
        },
        stages=((1.0, 1.0),),
        max_num_seqs=64,
        max_num_batched_tokens=1024,
        max_model_len=4096,
    )
    return ExperimentPlan(
        name="e",
        model="llama-2-7b",
        spec=spec,
        arrived_us=np.array([5_000_000.4, 5_000_100.0, 5_250_000.0]),
        has_api=np.ones(3, bool),
        prompt_len=np.array([300, 164, 500]),
        output_len=np.array([10, 1, 40]),
        prefix_group=np.array([1, 0, 1]),
        prefix_len=prefix_len,
        kv_blocks_total=7609,
        compared=np.array([True, True, False]),
        observed_us={},
    )


def test_trace_csv_columns_order_and_units():
    rows = list(csv.reader(io.StringIO(trace_csv(_plan()))))
    assert rows[0] == BLIS_COLUMNS == list(TRACE_COLUMNS)
    body = [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]
    assert len(body) == 3 and all(len(r) == 27 for r in rows)
    # arrival_time_us: integer µs from the first arrival; send_time_us the same
    assert [r["arrival_time_us"] for r in body] == ["0", "100", "250000"]
    assert all(r["send_time_us"] == r["arrival_time_us"] for r in body)
    # prefix group set -> input_tokens is the suffix (prompt - prefix_length)
    assert [r["input_tokens"] for r in body] == ["236", "100", "436"]
    assert [r["prefix_length"] for r in body] == ["64"] * 3
    assert body[0]["prefix_group"] == body[2]["prefix_group"] != body[1]["prefix_group"]
    assert [r["output_tokens"] for r in body] == ["10", "1", "40"]
    assert [r["request_id"] for r in body] == ["0", "1", "2"]
    # parseTraceRecord: ints parse, bool parses, reason_ratio in [0, 1], server tokens 0
    for r in body:
        for k in (
            "round_index",
            "prefix_length",
            "input_tokens",
            "output_tokens",
            "text_tokens",
            "deadline_us",
            "server_input_tokens",
            "num_chunks",
        ):
            int(r[k])
        assert r["streaming"] in ("true", "false") and 0 <= float(r["reason_ratio"]) <= 1
        assert r["server_input_tokens"] == "0" and r["status"] == "ok"


def test_trace_without_prefix_has_empty_group_and_full_input():
    body = list(csv.DictReader(io.StringIO(trace_csv(_plan(prefix_len=0)))))
    assert [r["prefix_group"] for r in body] == ["", "", ""]
    assert [r["input_tokens"] for r in body] == ["300", "164", "500"]


def test_header_uses_only_blis_keys(tmp_path):
    h = trace_header(_plan())
    assert set(h) <= HEADER_KEYS and set(h["server"]) <= SERVER_KEYS
    assert h["time_unit"] == "microseconds" and h["server"]["tensor_parallel"] == 2
    paths = write_replay_inputs(
        _plan(), tmp_path, arch_json='{"hidden_size": 4096, "num_hidden_layers": 32, "name": "x"}'
    )
    assert yaml.safe_load(paths["header"].read_text()) == h
    assert (paths["model_config"] / "config.json").read_text().count("hidden_size") == 1


def test_command_line_flags(tmp_path):
    paths = write_replay_inputs(_plan(), tmp_path)
    cmd = blis_command(
        "/x/blis",
        _plan(),
        paths,
        alphas=[1.0, 2.0, 3.5],
        betas=[0.5] * 10,
        defaults=tmp_path / "m.defaults.yaml",
        results=tmp_path / "r.json",
    )
    assert cmd[:2] == ["/x/blis", "replay"]
    flags = dict(zip(cmd[2::2], cmd[3::2], strict=True))
    assert flags["--trace-header"].endswith("trace.yaml")
    assert flags["--trace-data"].endswith("trace.csv")
    assert flags["--latency-model"] == "trained-physics"
    assert flags["--alpha-coeffs"] == "1.0,2.0,3.5"
    assert flags["--beta-coeffs"].count(",") == 9
    assert flags["--defaults-filepath"].endswith("m.defaults.yaml")
    assert flags["--tp"] == "2" and flags["--max-num-seqs"] == "64"
    assert flags["--max-num-batched-tokens"] == "1024"
    assert flags["--total-kv-blocks"] == "7609" and flags["--model"].endswith("Llama-2-7b-hf")
    assert flags["--hardware"] == "H100"


def test_parse_results_and_means():
    text = (
        '[{"request_id": 0, "ttft_us": 1000, "e2e_us": 9000, "input_tokens": 300, '
        '"output_tokens": 10, "slo_class": "", "model": "", "itl_mean_us": 800}, '
        '{"request_id": 1, "ttft_us": 3000, "e2e_us": 3100, "input_tokens": 164, '
        '"output_tokens": 1, "slo_class": "", "model": "", "itl_mean_us": 0}]'
    )
    per = parse_results(text)
    m = replay_means(_plan(), per)
    assert m == {"e2e": 6050.0, "ttft": 2000.0, "itl": 800.0}
    with pytest.raises(CalibError, match="no result for 1 of 2"):
        replay_means(_plan(), {0: per[0]})
    with pytest.raises(CalibError, match="not JSON"):
        parse_results("{")


def test_find_blis_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("CALIB_BLIS", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CalibError, match="no BLIS binary found"):
        find_blis(None)
    with pytest.raises(CalibError, match="not an executable"):
        find_blis(str(tmp_path / "nope"))
    exe = tmp_path / "blis"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert find_blis(None) == exe


def _real_blis():
    try:
        return find_blis(None)
    except CalibError:
        return None


@pytest.mark.skipif(
    _real_blis() is None,
    reason="no BLIS binary ($CALIB_BLIS or blis on PATH): BLIS is built from "
    "github.com/inference-sim/inference-sim and is on no package registry",
)
def test_real_blis_replays_the_trace(tmp_path):
    plan = _plan()
    paths = write_replay_inputs(plan, tmp_path)
    res = tmp_path / "r.json"
    cmd = blis_command(
        _real_blis(),
        plan,
        paths,
        alphas=[1000.0, 500.0, 20.0],
        betas=[0.2, 1.6, 1.4, 0.4, 60.0, 3.0, 170.0, 0.0, 1.0, 1.0],
        defaults=None,
        results=res,
    )
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ))
    m = replay_means(plan, parse_results(res.read_text()))
    assert m["e2e"] > m["ttft"] > 1000.0
