"""The stress suite: its recipes span what they promise, generate traces that import,
and the runner writes its table (scripts/stress.py)."""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest
import yaml
from fixtures.checks import run_script

from calib import config
from calib.arch import load_architecture
from calib.hardware import load_hardware
from calib.simulate import TruthStepTime, simulate_experiment
from calib.simulate.stress import (
    HELD_BACK,
    SETS,
    TRUTH_FAMILIES,
    generate_set,
    get_set,
    recipe_hash,
    set_specs,
    set_truth,
)
from calib.simulate.truth import StepBatch

SCRIPT = config.PROJECT_ROOT / "scripts" / "stress.py"
SMALLEST = "s01-tiny"


def test_recipes_span_the_suite():
    """12 sets + 3 held back covering the models, TPs, stalls, families and cases asked for."""
    assert len(SETS) >= 12 and len(HELD_BACK) == 3
    names = [s.name for s in SETS + HELD_BACK]
    assert len(set(names)) == len(names)
    assert all(s.held_back for s in HELD_BACK) and not any(s.held_back for s in SETS)
    # held-back seeds are fresh
    assert not {s.seed for s in HELD_BACK} & {s.seed for s in SETS}
    n_models = [len({e.model for e in s.experiments}) for s in SETS]
    assert min(n_models) == 2 and max(n_models) == 7
    archs = {load_architecture(e.model) for s in SETS for e in s.experiments}
    assert any(a.is_moe for a in archs)
    assert any(a.num_key_value_heads < a.num_attention_heads for a in archs)  # GQA
    assert any(a.num_key_value_heads == a.num_attention_heads for a in archs)  # MHA
    assert {e.tp for s in SETS for e in s.experiments} == {1, 2, 4, 8}
    assert {s.stall_rate for s in SETS} >= {0.0, 0.02}
    assert max(s.stall_high for s in SETS) == 10.0
    assert len({s.family for s in SETS}) >= 2 and set(TRUTH_FAMILIES) == {s.family for s in SETS}
    assert any(TRUTH_FAMILIES[f].cpu_overlap > 0 for f in TRUTH_FAMILIES)
    assert any(TRUTH_FAMILIES[f].cpu_overlap == 0 for f in TRUTH_FAMILIES)
    prefix = [e.prefix_caching for s in SETS for e in s.experiments]
    assert True in prefix and False in prefix

    # one set where a model has under 5 % of the others' simulated time
    def durations(s):
        out = {}
        for e in s.experiments:
            out[e.model] = out.get(e.model, 0.0) + sum(d for _, d in e.stages)
        return out

    assert any(
        min(durations(s).values()) < 0.05 * np.median(list(durations(s).values())) for s in SETS
    )


def test_truth_families_fast_path_equals_vectorised():
    """Every family's scalar fast path reproduces its vectorised truth exactly (MoE, TP2)."""
    for fam in ("steep-sync", "fast-async"):
        params = replace(TRUTH_FAMILIES[fam], hiccup_prob=0.05, hiccup_high=10.0)
        spec = set_specs(get_set("s03-stall2pct"), quick=True)[-1]  # Mixtral TP2
        spec = replace(spec, stages=((12.0, 1.5),))
        res_fast = simulate_experiment(spec, seed=8, truth_params=params)

        class Vectorised(TruthStepTime):  # a subclass disables the fast path
            pass

        res_vec = simulate_experiment(spec, seed=8, step_time=Vectorised(params))
        assert np.allclose(res_fast.steps["duration_us"], res_vec.steps["duration_us"], rtol=1e-12)


def test_truth_families_differ_in_shape():
    """Tiles and Hill ramps change small-batch GEMM time; overlap hides CPU overhead."""
    arch, hw = load_architecture("llama-3.1-8b"), load_hardware("H100-SXM")
    quiet = dict(step_overhead_sigma=0.0, gpu_noise_sigma=0.0, hiccup_prob=0.0)

    def prefill(tokens, params):
        b = StepBatch(
            phase=np.array([[1]]),
            new_tokens=np.array([[tokens]]),
            progress=np.array([[0]]),
            prompt_len=np.array([[4096]]),
            mask=np.array([[True]]),
        )
        return float(TruthStepTime(params)(b, arch, hw, 1, np.random.default_rng(0))[0])

    base = replace(TRUTH_FAMILIES["default"], **quiet)
    tiled = replace(base, gemm_tile_tokens=256)
    # compute-bound sizes: 1025 tokens pad to 1280 (nearly its time); unpadded, clearly less
    assert prefill(1025, tiled) == pytest.approx(prefill(1280, tiled), rel=0.03)
    assert prefill(1025, base) < 0.9 * prefill(1280, base)
    # a Hill ramp (power 2) is lower below its knee than the hyperbolic one
    knee = replace(base, gemm_knee_tokens=400.0)
    assert prefill(200, replace(knee, gemm_curve_power=2.0)) > 1.3 * prefill(200, knee)
    overlap = replace(base, cpu_overlap=1.0)
    cpu = base.step_overhead_us + base.request_overhead_us + base.prefill_request_overhead_us
    assert prefill(512, base) - prefill(512, overlap) == pytest.approx(cpu, rel=1e-9)


def test_smallest_set_writes_traces_that_import(tmp_path):
    """The smallest set (quick size) -> on-disk traces -> the real importer."""
    from calib.traces import import_root

    s = get_set(SMALLEST)
    s_off = replace(
        s, experiments=tuple(replace(e, prefix_caching=False) for e in s.experiments[:1])
    )
    paths = generate_set(s, tmp_path / "on", quick=True)
    generate_set(s_off, tmp_path / "off", quick=True)
    assert len(paths) == len(s.experiments)
    ds = import_root(tmp_path / "on", workers=1, progress=False, use_cache=False)
    assert ds.sizes["experiment"] == len(s.experiments)
    assert set(ds["exp_model"].values.tolist()) == {"llama-2-7b", "llama-3.1-8b"}
    assert int(ds["exp_num_bad_lines"].values.sum()) == 0
    n_sampled = int(ds["exp_num_sampled"].values.sum())
    assert 0.07 < n_sampled / int(ds["exp_num_steps"].values.sum()) < 0.13
    assert np.all(np.asarray(ds["duration_us"].values)[ds["sampled"].values] > 0)
    on_cfg = yaml.safe_load((paths[0] / "exp-config.yaml").read_text())
    assert on_cfg["enable_prefix_caching"] is True
    off_dir = next((tmp_path / "off").iterdir())
    assert (
        yaml.safe_load((off_dir / "exp-config.yaml").read_text())["enable_prefix_caching"] is False
    )
    off = import_root(tmp_path / "off", workers=1, progress=False, use_cache=False)
    # prefix-cache hits (SCHEDULED events' cached tokens) exist only with caching on
    assert int(np.nansum(off["req_cached_tokens"].values)) == 0
    assert int(np.nansum(ds["req_cached_tokens"].values)) > 0
    # the cache key follows the recipe
    assert recipe_hash(s, quick=True) != recipe_hash(s) != recipe_hash(s_off)
    assert set_truth(s).hiccup_prob == s.stall_rate


def _run(*args, timeout=900):
    return run_script(SCRIPT, *args, timeout=timeout)


def test_runner_unknown_set_is_a_user_error():
    proc = _run("--sets", "no-such-set")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no-such-set" in lines[0]


def test_runner_writes_its_table(tmp_path):
    """One row per set x seed, in the CSV and markdown table (very short chains; about
    1.5 min of CPU, mostly compilation and the start)."""
    proc = _run(
        "--sets",
        SMALLEST,
        "--seeds",
        "3",
        "--quick",
        "--chains",
        "2",
        "--warmup",
        "10",
        "--draws",
        "10",
        "--out",
        tmp_path / "out",
        "--cache",
        tmp_path / "cache",
    )
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "out" / "stress.csv").read_text().splitlines()))
    assert len(rows) == 1
    r = rows[0]
    assert r["set"] == SMALLEST and r["seed"] == "3" and r["models"] == "2"
    assert r["gate"] in ("pass", "FAIL") and (r["gate"] == "pass") == (proc.returncode == 0)
    assert int(r["sampled"]) > 100 and 0 < int(r["min_model_sampled"]) <= int(r["sampled"]) / 2
    assert 0 < float(r["sampling_s"]) <= float(r["wall_s"])
    assert 1 <= float(r["leapfrog_per_iter"]) <= 2**config.SAMPLER.max_tree_depth
    assert 0 <= float(r["saturated_pct"]) <= 100
    assert float(r["min_ess_per_s"]) > 0
    md = (tmp_path / "out" / "stress.md").read_text()
    assert f"| {SMALLEST} | 3 |" in md
    assert f"{SMALLEST}" in proc.stdout and "rows pass" in proc.stdout
