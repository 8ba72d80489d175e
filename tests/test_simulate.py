"""Scheduler and truth tests of calib.simulate (fast: a few simulated seconds each)."""

from __future__ import annotations

import numpy as np
import pytest

from calib.arch import load_architecture
from calib.config import DEFAULT_RECIPE, KV_BLOCK_TOKENS
from calib.errors import CalibError
from calib.hardware import load_hardware
from calib.simulate import (
    ExperimentSpec,
    StepBatch,
    TruthParams,
    TruthStepTime,
    kv_capacity_blocks,
    recipe_specs,
    simulate_experiment,
)

GENERAL = dict(
    num_unique_system_prompts=4,
    num_users_per_system_prompt=8,
    system_prompt_len=100,
    question_len=447,
    output_len=48,
)


def spec(**kw) -> ExperimentSpec:
    base = dict(
        model="meta-llama/Llama-2-7b-hf",
        tp=1,
        workload="general",
        shared_prefix=GENERAL,
        stages=((10.0, 2.0), (25.0, 2.0)),
    )
    base.update(kw)
    return ExperimentSpec(**base)


@pytest.fixture(scope="module")
def normal():
    return simulate_experiment(spec(), seed=3)


@pytest.fixture(scope="module")
def pressured():
    """Small KV cache (low gpu_memory_utilization) and a tight budget: preemptions, chunking."""
    sp = dict(GENERAL, output_len=300, question_len=700)
    return simulate_experiment(
        spec(
            shared_prefix=sp,
            gpu_memory_utilization=0.22,
            max_num_batched_tokens=512,
            max_num_seqs=48,
            stages=((12.0, 3.0),),
        ),
        seed=5,
    )


def entries_by_step(res):
    off = res.comp["offsets"]
    return np.repeat(np.arange(off.size - 1), np.diff(off))


def check_invariants(res):
    s, c, rq, ev = res.spec, res.comp, res.requests, res.events
    st = res.steps
    S = st["id"].size
    step_of = entries_by_step(res)
    # step ids contiguous from 1; time increases; duration rounding
    assert np.array_equal(st["id"], np.arange(1, S + 1))
    assert np.all(st["start_ns"][1:] > st["end_ns"][:-1])
    assert np.array_equal(st["end_ns"] - st["start_ns"], np.rint(st["duration_us"] * 1000))
    assert np.array_equal(st["duration_us_int"], np.rint(st["duration_us"]))
    # token budget, max_num_seqs, decode one token
    tok = np.bincount(step_of, weights=c["new_tokens"], minlength=S)
    assert tok.max() <= s.max_num_batched_tokens
    assert np.array_equal(tok, st["prefill_tokens"] + st["decode_tokens"])
    assert np.diff(c["offsets"]).max() <= s.max_num_seqs
    assert st["running_depth"].max() <= s.max_num_seqs
    assert np.all(c["new_tokens"][c["phase"] == 2] == 1)
    assert np.all(c["new_tokens"] >= 1)
    # decodes first within a step
    ph = c["phase"]
    same = step_of[1:] == step_of[:-1]
    assert not np.any(same & (ph[:-1] == 1) & (ph[1:] == 2))
    # KV capacity: blocks of the scheduled requests (shared prompt blocks once) fit
    assert st["kv_blocks_free"].min() >= 0
    sys_blocks = s.shared_prefix["system_prompt_len"] // KV_BLOCK_TOKENS
    blocks = -(-(c["progress"].astype(np.int64) + c["new_tokens"]) // KV_BLOCK_TOKENS)
    private = blocks - np.minimum(blocks, sys_blocks)
    used = np.bincount(step_of, weights=private, minlength=S)
    key = step_of * 10_000 + rq["system_prompt"][c["request"]]
    uk = np.unique(key)
    used += np.bincount(uk // 10_000, minlength=S) * sys_blocks
    assert used.max() <= res.kv_blocks_total
    # every request finishes with exactly output_len tokens
    makes_tok = (
        c["progress"].astype(np.int64) + c["new_tokens"]
        == c["prompt_len"].astype(np.int64) + c["num_output"]
    )
    ntok = np.bincount(c["request"][makes_tok], minlength=rq["prompt_len"].size)
    assert np.array_equal(ntok, rq["output_len"])
    assert np.all(rq["finished_step"] > 0)
    fin = ev["type"] == 4
    assert np.array_equal(np.sort(ev["request"][fin]), np.arange(rq["prompt_len"].size))
    assert np.all(ev["decode_done"][fin] == rq["output_len"][ev["request"][fin]])
    # decode steps: exactly output_len - 1 between FIRST_TOKEN and FINISHED when not preempted
    nopre = rq["num_preemptions"] == 0
    assert np.all(
        (rq["finished_step"] - rq["first_token_step"])[nopre] == rq["output_len"][nopre] - 1
    )
    # async admission: first schedulable at the step after the one it was queued in
    assert np.all(rq["scheduled_step"] >= rq["queued_step"] + 1)
    assert np.all(rq["scheduled_ns"] > rq["queued_ns"])
    # QUEUED during step n's window [start_n, start_{n+1})
    qs = rq["queued_step"]
    has = qs > 0
    assert np.all(st["start_ns"][qs[has] - 1] <= rq["queued_ns"][has])
    nxt = qs[has] < S
    assert np.all(rq["queued_ns"][has][nxt] < st["start_ns"][qs[has][nxt]])
    # resumes == preemptions
    resumes = np.bincount(
        ev["request"][(ev["type"] == 1) & (ev["resume"] == 1)], minlength=rq["prompt_len"].size
    )
    assert np.array_equal(resumes, rq["num_preemptions"])
    pre = np.bincount(ev["request"][ev["type"] == 3], minlength=rq["prompt_len"].size)
    assert np.array_equal(pre, rq["num_preemptions"])
    assert int(st["num_preempted"].sum()) == int(rq["num_preemptions"].sum())


def test_invariants_normal(normal):
    check_invariants(normal)
    assert normal.requests["num_preemptions"].sum() == 0
    assert 40 <= normal.requests["prompt_len"].size <= 100
    # mixed prefill/decode steps exist and typical decode step time is ms-scale
    assert (normal.steps["num_prefill"] > 0).any() and (normal.steps["num_decode"] > 0).any()
    assert 2_000 < np.median(normal.steps["duration_us"]) < 60_000


def test_invariants_under_pressure(pressured):
    check_invariants(pressured)
    rq = pressured.requests
    assert rq["num_preemptions"].sum() >= 3, "fixture should preempt"
    assert np.all(rq["finished_step"][rq["num_preemptions"] > 0] > 0)
    # chunked prefill happened: some prompts split over several steps
    c = pressured.comp
    first_chunks = (c["phase"] == 1) & (c["new_tokens"] < c["prompt_len"] - c["progress"])
    assert first_chunks.any()
    # recompute after preemption covers prompt + generated tokens
    resumed = (c["phase"] == 1) & (c["num_output"] > 0)
    assert resumed.any()


def test_determinism():
    a = simulate_experiment(spec(stages=((15.0, 1.5),)), seed=11)
    b = simulate_experiment(spec(stages=((15.0, 1.5),)), seed=11)
    c = simulate_experiment(spec(stages=((15.0, 1.5),)), seed=12)
    for k in a.steps:
        assert np.array_equal(a.steps[k], b.steps[k]), k
    for k in a.comp:
        assert np.array_equal(a.comp[k], b.comp[k]), k
    for k in a.requests:
        assert np.array_equal(a.requests[k], b.requests[k]), k
    assert a.requests["prompt_len"].size != c.requests["prompt_len"].size or not np.array_equal(
        a.steps["duration_us"][:50], c.steps["duration_us"][:50]
    )
    # the seed offset separates experiments of one recipe
    d = simulate_experiment(spec(stages=((15.0, 1.5),), seed_offset=1), seed=11)
    assert not np.array_equal(a.requests["arrived_ns"][:5], d.requests["arrived_ns"][:5])


def test_prefix_cache_hits_reduce_prefill(normal):
    rq, c = normal.requests, normal.comp
    sys_len = GENERAL["system_prompt_len"]
    full = sys_len // KV_BLOCK_TOKENS * KV_BLOCK_TOKENS  # 96
    cached = rq["cached_tokens"]
    assert set(np.unique(cached)) <= {0, full}
    # only the first user of each system prompt misses (nothing is evicted here)
    assert (cached == 0).sum() == len(np.unique(rq["system_prompt"]))
    computed = np.bincount(
        c["request"][c["phase"] == 1],
        weights=c["new_tokens"][c["phase"] == 1],
        minlength=cached.size,
    )
    assert np.array_equal(computed, rq["prompt_len"] - cached)
    # the first SCHEDULED event carries the cached tokens
    ev = normal.events
    first = (ev["type"] == 1) & (ev["resume"] == 0)
    assert np.array_equal(ev["prefill_done"][first], cached[ev["request"][first]])
    # without a shared system prompt, nothing is cached
    nos = simulate_experiment(
        spec(shared_prefix=dict(GENERAL, system_prompt_len=0, question_len=547)), seed=3
    )
    assert nos.requests["cached_tokens"].max() == 0
    assert nos.stats["computed_prefill_tokens"] > normal.stats["computed_prefill_tokens"]


def test_kv_capacity_formula():
    arch, hw = load_architecture("llama-2-7b"), load_hardware("H100-SXM")
    blocks = kv_capacity_blocks(arch, hw, 1, 0.9)
    kv_tok = 2 * 32 * 4096 * 2  # bytes per token: K and V, 32 layers, kv_dim 4096, bf16
    weights = 6.738e9 * 2  # Llama-2-7B parameters x 2 bytes
    expect = (80 * 2**30 * 0.9 - weights) / (16 * kv_tok)
    assert abs(blocks - expect) / expect < 0.005
    # TP shards both weights and KV heads
    b70 = kv_capacity_blocks(load_architecture("llama-2-70b"), hw, 4, 0.9)
    expect70 = (4 * 80 * 2**30 * 0.9 - 68.98e9 * 2) / (16 * 2 * 80 * 1024 * 2)
    assert abs(b70 - expect70) / expect70 < 0.005


def _linear_step_time(batch: StepBatch, arch, hardware, tp, rng) -> np.ndarray:
    """A roofline-linear step time with known coefficients (recovery-test style hook)."""
    m = batch.mask
    new = np.where(m, batch.new_tokens, 0)
    ctx = np.where(m & (batch.phase == 2), batch.progress, 0)
    return 500.0 + 3.0 * new.sum(1) + 0.02 * ctx.sum(1) + 0.0 * rng.random(m.shape[0])


def test_step_time_hook():
    res = simulate_experiment(spec(stages=((10.0, 1.5),)), seed=2, step_time=_linear_step_time)
    pb = res.step_batch()
    expect = _linear_step_time(pb, None, None, 1, np.random.default_rng(0))
    assert np.allclose(res.steps["duration_us"], expect, rtol=0, atol=1e-9)
    assert res.truth_params == "{}"


def test_truth_shapes_and_noise():
    arch, hw = load_architecture("llama-2-7b"), load_hardware("H100-SXM")
    fn = TruthStepTime()
    n = 20_000

    def batch(tokens, phase=1, width=1, progress=0):
        shape = (n, width)
        return StepBatch(
            phase=np.full(shape, phase, np.int8),
            new_tokens=np.full(shape, tokens, np.int32),
            progress=np.full(shape, progress, np.int32),
            prompt_len=np.full(shape, tokens + progress, np.int32),
            mask=np.ones(shape, bool),
        )

    t64 = fn(batch(64), arch, hw, 1, np.random.default_rng(0))
    t2k = fn(batch(2048), arch, hw, 1, np.random.default_rng(0))
    assert np.median(t64) / 64 > 3 * np.median(t2k) / 2048  # GEMM efficiency ramps
    # deterministic for a seed
    again = fn(batch(64), arch, hw, 1, np.random.default_rng(0))
    assert np.array_equal(t64, again)
    # hiccups: rare, heavy
    ratio = t2k / np.median(t2k)
    frac = (ratio > 1.8).mean()
    assert 0.002 < frac < 0.009
    assert ratio.max() > 2.5
    # decode attention cost grows with context
    d_short = np.median(
        fn(batch(1, phase=2, width=64, progress=100), arch, hw, 1, np.random.default_rng(1))
    )
    d_long = np.median(
        fn(batch(1, phase=2, width=64, progress=2000), arch, hw, 1, np.random.default_rng(1))
    )
    assert d_long > 1.5 * d_short
    # MoE routing variance: Mixtral GPU time varies more than a dense model's
    mix = load_architecture("mixtral-8x7b")
    quiet = TruthParams(step_overhead_sigma=0.0, gpu_noise_sigma=0.0, hiccup_prob=0.0)
    fq = TruthStepTime(quiet)
    tm = fq(batch(1, phase=2, width=4, progress=500), mix, hw, 2, np.random.default_rng(2))
    td = fq(batch(1, phase=2, width=4, progress=500), arch, hw, 1, np.random.default_rng(2))
    assert tm.std() / tm.mean() > 0.01
    assert td.std() / td.mean() < 1e-9


def test_bad_specs_raise_calib_error():
    with pytest.raises(CalibError, match="max_model_len"):
        simulate_experiment(spec(shared_prefix=dict(GENERAL, output_len=4000)), seed=0)
    with pytest.raises(CalibError, match="unknown model"):
        simulate_experiment(spec(model="acme/NoSuchModel-1B"), seed=0)
    with pytest.raises(CalibError, match="tensor_parallelism"):
        simulate_experiment(spec(tp=3), seed=0)
    with pytest.raises(CalibError, match="stage"):
        simulate_experiment(spec(stages=((0.0, 1.0),)), seed=0)


def test_default_recipe_parses():
    specs, seed = recipe_specs(DEFAULT_RECIPE)
    assert len(specs) == 16 and seed > 0
    assert {s.workload for s in specs} == {"general", "codegen", "roleplay", "reasoning"}
    assert {(s.model, s.tp) for s in specs} == {
        ("meta-llama/Llama-2-7b-hf", 1),
        ("meta-llama/Llama-2-70b-hf", 4),
        ("codellama/CodeLlama-34b-Instruct-hf", 2),
        ("mistralai/Mixtral-8x7B-v0.1", 2),
    }
    assert all(
        s.max_num_batched_tokens == 2048
        and s.max_num_seqs == 128
        and s.max_model_len == 4096
        and s.hardware == "H100-SXM"
        for s in specs
    )
    real, _ = recipe_specs(DEFAULT_RECIPE, scale="real")
    assert real[0].stages[0][1] > 5 * specs[0].stages[0][1]
    assert len({s.seed_offset for s in specs}) == 16
    with pytest.raises(CalibError, match="scale"):
        recipe_specs(DEFAULT_RECIPE, scale="huge")


def test_truth_fast_path_equals_vectorised():
    """The scheduler's scalar fast path reproduces the vectorised truth exactly."""
    fn = TruthStepTime()
    res_fast = simulate_experiment(spec(stages=((12.0, 1.5),)), seed=8)

    class Vectorised(TruthStepTime):  # a subclass disables the fast path
        pass

    res_vec = simulate_experiment(spec(stages=((12.0, 1.5),)), seed=8, step_time=Vectorised())
    assert np.allclose(res_fast.steps["duration_us"], res_vec.steps["duration_us"], rtol=1e-12)
    mix = spec(model="mistralai/Mixtral-8x7B-v0.1", tp=2, stages=((12.0, 1.0),))
    a = simulate_experiment(mix, seed=8, step_time=fn)
    b = simulate_experiment(mix, seed=8, step_time=Vectorised())
    assert np.allclose(a.steps["duration_us"], b.steps["duration_us"], rtol=1e-12)


@pytest.mark.slow
def test_default_recipe_size():
    """The default set has 10-20 k sampled steps and its hard case preempts (~20 s)."""
    specs, seed = recipe_specs(DEFAULT_RECIPE)
    sampled = 0
    pre = {}
    for s in specs:
        r = simulate_experiment(s, seed=seed)
        sampled += r.stats["sampled"]
        pre[(s.model, s.workload)] = r.stats["preemptions"]
        check_invariants(r)
    assert 10_000 <= sampled <= 20_000
    assert pre[("meta-llama/Llama-2-7b-hf", "reasoning")] > 0
