"""bench/bench_coverage.py: its recipes differ from the default's truth as promised, its
acceptance reads the replay's numbers, and the smoke run goes end to end."""

from __future__ import annotations

import csv
import importlib.util

import numpy as np
import pandas as pd
import pytest
from fixtures.checks import run_script

from calib import config
from calib.simulate.stress import HELD_BACK, SETS, TRUTH_FAMILIES, set_truth

SCRIPT = config.PROJECT_ROOT / "bench" / "bench_coverage.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_coverage", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=900):
    return run_script(SCRIPT, *args, timeout=timeout)


def test_recipes_differ_from_the_default_truth():
    """0 / 0.5 / 2 % stalls of 2-8x, another GEMM curve, async and sync; fresh seeds."""
    sets = _module().SETS
    assert len(sets) == 3
    default = TRUTH_FAMILIES["default"]
    truths = [set_truth(s) for s in sets]
    assert sorted(t.hiccup_prob for t in truths) == [0.0, 0.005, 0.02]
    assert all((t.hiccup_low, t.hiccup_high) == (2.0, 8.0) for t in truths)
    # each differs from the embedded default's truth (its stall model at least)
    assert all(t != default for t in truths)
    assert any(t.gemm_curve_power != default.gemm_curve_power for t in truths)
    assert any(t.cpu_overlap > 0 for t in truths) and any(t.cpu_overlap == 0 for t in truths)
    assert all(len({e.model for e in s.experiments}) == 4 for s in sets)
    assert not {s.seed for s in sets} & {s.seed for s in SETS + HELD_BACK}


def _replay_like(errors: list[float], inside: int) -> tuple[pd.DataFrame, dict]:
    n = len(errors)
    table = pd.DataFrame(
        [
            {"metric": m, "experiment": f"x{i}", "error_pct": e, "basis": "fitted"}
            for m in ("e2e", "ttft", "itl")
            for i, e in enumerate(errors)
        ]
    )
    cov = {
        m: {"inside": inside, "n": n, "rate": inside / n, "median_half_width_pct": 1.234}
        for m in ("e2e", "ttft", "itl")
    }
    return table, cov


def test_acceptance_reads_coverage_and_mean_signed_error():
    mod = _module()
    errors = [1.0] * 11 + [-3.0]  # mean +0.667 %, worst -3.0 % (x11)
    row = mod.coverage_row(*_replay_like(errors, 9))
    assert row["e2e_cov"] == "9/12" and row["e2e_half_width_pct"] == 1.23
    assert row["e2e_mean_signed_pct"] == pytest.approx(0.67)
    assert (row["e2e_worst_pct"], row["e2e_worst_exp"]) == (-3.0, "x11")
    assert row["basis"] == "fitted" and row["accept"] == "yes"
    assert mod.coverage_row(*_replay_like(errors, 8))["accept"] == "NO"  # 67 % < 75 %
    assert mod.coverage_row(*_replay_like([1.2] * 12, 12))["accept"] == "NO"  # +1.2 %
    assert mod.coverage_row(*_replay_like([-1.0] * 12, 12))["accept"] == "yes"


def test_unknown_set_is_a_user_error():
    proc = _run("--sets", "no-such-set")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no-such-set" in lines[0]


@pytest.mark.slow
def test_smoke_run_writes_its_table(tmp_path):
    """--quick data, very short chains: simulate, import, fit, replay, table.

    Slow: whatever the draws, calib.fit.fit's fixed costs (JIT compilation, the Laplace
    start with its exact Hessian, the pilot run) and simulating and importing 12 quick
    experiments took about 2 min of CPU (300 s wall at load 9, 2026-12-03): more than
    the fast suite's budget of about a minute a test."""
    proc = _run(
        "--quick",
        "--sets",
        "t1-nostall",
        "--chains",
        "2",
        "--warmup",
        "10",
        "--draws",
        "10",
        "--max-tree-depth",
        "3",
        "--e2e-draws",
        "40",
        "--out",
        tmp_path / "out",
        "--cache",
        tmp_path / "cache",
    )
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "out" / "coverage.csv").read_text().splitlines()))
    assert len(rows) == 1
    r = rows[0]
    assert r["set"] == "t1-nostall" and r["models"] == "4" and r["experiments"] == "12"
    assert int(r["sampled"]) > 1000 and r["basis"] == "fitted"
    for m in ("e2e", "ttft", "itl"):
        k, n = map(int, r[f"{m}_cov"].split("/"))
        assert n == 12 and 0 <= k <= n
        assert 0 < float(r[f"{m}_half_width_pct"]) < 50
        assert np.isfinite(float(r[f"{m}_mean_signed_pct"]))
    assert (r["accept"] == "yes") == (proc.returncode == 0)
    assert (tmp_path / "out" / "t1-nostall-quick-seed0.nc").is_file()
    per_exp = pd.read_csv(tmp_path / "out" / "t1-nostall-quick-seed0-e2e.csv")
    assert len(per_exp) == 36
    assert "| t1-nostall |" in (tmp_path / "out" / "coverage.md").read_text()
    assert "sets meet the acceptance" in proc.stdout
