"""A vLLM-v1-like continuous-batching scheduler, as a discrete-event loop over steps.

Model (one experiment = one server, one workload)
-------------------------------------------------
* Requests arrive as a Poisson process per load stage (``stages`` = (rate req/s,
  duration s)); each picks a shared system prompt uniformly, its prompt is
  ``system_prompt_len + question_len`` tokens and, as with ``ignore_eos``, it
  generates exactly ``output_len`` tokens. ``api.ARRIVED`` precedes ``QUEUED``
  by a log-normal API/tokenisation delay.
* vLLM v1 request state: ``num_tokens`` (prompt + generated) and
  ``num_computed_tokens``. A scheduled request computes
  ``min(num_tokens − num_computed, budget)`` tokens; when it has computed all
  its tokens at the end of a step it samples one token (the first one is
  FIRST_TOKEN). So prefill finishes with the first token and each later step
  of a running request is a one-token decode.
* Each step: running decode requests first (one token each, admission order),
  then running partial prefills (admission order), then waiting requests
  (FCFS; preempted requests go back to the FRONT of the queue), within
  ``max_num_batched_tokens`` and at most ``max_num_seqs`` running. As in vLLM
  v1, no waiting request is admitted in a step that preempted.
* KV cache: ``blocks_total = floor((memory·gpu_memory_utilization − weights/TP)
  / (16·kv_bytes_per_token/TP))`` 16-token blocks per GPU (all GPUs hold the
  same number of blocks). When a running request cannot get the blocks it needs,
  the newest running request is preempted (recompute: its blocks are freed and
  ``num_computed`` reset; on resume it recomputes prompt + generated tokens as a
  prefill, after which it samples its next token).
* Automatic prefix caching of the shared system prompts: the full 16-token
  blocks of a system prompt (``system_prompt_len // 16`` of them) are hashed and
  cached as soon as they are allocated (vLLM v1 caches at allocation). A request
  being scheduled (first time or resume) whose system prompt has ``c`` leading
  blocks resident gets ``16·c`` prompt tokens as already computed (its
  SCHEDULED event's ``prefill.done_tokens``). With
  ``enable_prefix_caching=False`` nothing is shared or hit. Unreferenced cached blocks sit in
  the free queue and are evicted LRU (tail block first) when new blocks are
  allocated; referencing them again takes them out of the free queue. Blocks
  holding questions/outputs are never shared (unique text) and count as free
  once their request ends. ``kv.blocks_free_gpu`` counts the free queue
  (including evictable cached blocks), as vLLM does.
* Admission timing (one step ahead, documented contract): step ``n`` occupies
  the window ``[start_n, start_{n+1})`` with ``start_{n+1} = end_n + gap`` and
  ``end_n = start_n + duration_n``. The batch of step ``n+1`` is formed at
  ``start_{n+1}`` from the requests QUEUED before it: a request QUEUED during
  step ``n``'s window (its QUEUED event carries ``scheduler.step = n``) is first
  schedulable at step ``n + 1``. When the engine is idle, a request queued
  after the last step ``n`` starts step ``n + 1`` after ``idle_wake_us``.
  Steps are numbered from 1; a QUEUED before any step carries step 0.
* Event times: QUEUED at the queue time, SCHEDULED and PREEMPTED at the step
  start, FIRST_TOKEN and FINISHED at the step end; ``step.duration_us`` is the
  true duration rounded to integer µs and ``end_n − start_n`` is the true
  duration rounded to integer ns.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from calib.arch import Architecture, load_architecture
from calib.config import KV_BLOCK_TOKENS, SIMULATION
from calib.errors import CalibError
from calib.hardware import Hardware, load_hardware
from calib.simulate.truth import (
    PHASE_DECODE,
    PHASE_PREFILL,
    StepBatch,
    StepTimeFn,
    TruthParams,
    TruthStepTime,
    kv_bytes_per_token,
    weight_bytes,
)

#: Event type codes of the journey (index into EVENT_TYPES).
EV_QUEUED, EV_SCHEDULED, EV_FIRST_TOKEN, EV_PREEMPTED, EV_FINISHED = range(5)
EVENT_TYPES = ("QUEUED", "SCHEDULED", "FIRST_TOKEN", "PREEMPTED", "FINISHED")
#: Phase codes of journey events (index into EVENT_PHASES).
EVENT_PHASES = ("WAITING", "PREFILL", "DECODE")

SHARED_PREFIX_KEYS = (
    "num_unique_system_prompts",
    "num_users_per_system_prompt",
    "system_prompt_len",
    "question_len",
    "output_len",
)


@dataclass(frozen=True)
class ExperimentSpec:
    """One simulated experiment: server, hardware, workload and load.

    Attributes
    ----------
    model : Hugging Face id written to exp-config.yaml (must resolve to a bundled
        architecture, e.g. ``meta-llama/Llama-2-7b-hf``).
    tp : tensor-parallel degree.
    workload : workload name (exp-config ``app``, directory suffix).
    shared_prefix : the profile's ``data.shared_prefix`` dict
        (:data:`SHARED_PREFIX_KEYS`, token counts).
    stages : load stages, tuple of ``(rate req/s, duration s)``.
    hardware : bundled accelerator name.
    max_num_batched_tokens, max_num_seqs, max_model_len : vLLM limits.
    gpu_memory_utilization : vLLM's memory fraction for weights + KV cache.
    seed_offset : mixed with the seed so experiments of one recipe differ.
    started : directory timestamp ``YYYYMMDD-HHMMSS`` (UTC wall clock of the run).
    enable_prefix_caching : vLLM's automatic prefix caching (False: every prompt token
        is computed; no block is shared).
    """

    model: str
    tp: int
    workload: str
    shared_prefix: Mapping[str, int]
    stages: tuple[tuple[float, float], ...]
    hardware: str = "H100-SXM"
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    max_model_len: int = 4096
    gpu_memory_utilization: float = SIMULATION.gpu_memory_utilization
    seed_offset: int = 0
    started: str = "20261101-090000"
    enable_prefix_caching: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shared_prefix"] = dict(self.shared_prefix)
        d["stages"] = [list(s) for s in self.stages]
        return d

    def profile(self) -> dict:
        """The load generator's profile (profile.yaml content)."""
        return {
            "load": {
                "type": "constant",
                "stages": [{"rate": float(r), "duration": float(d)} for r, d in self.stages],
            },
            "api": {"type": "completion", "streaming": True},
            "server": {"type": "vllm", "model_name": self.model, "ignore_eos": True},
            "data": {
                "type": "shared_prefix",
                "shared_prefix": {k: int(self.shared_prefix[k]) for k in SHARED_PREFIX_KEYS},
            },
        }


@dataclass
class SimResult:
    """Everything one simulated experiment produced (in memory, arrays by name).

    ``steps``: per step (length S) ``id``, ``start_ns``, ``end_ns`` (monotonic),
    ``duration_us`` (float, true), ``duration_us_int`` (int64, as written),
    ``sampled`` (bool, has a BATCH_SUMMARY), ``running_depth``, ``waiting_depth``,
    ``num_prefill``, ``num_decode``, ``prefill_tokens``, ``decode_tokens``,
    ``num_finished``, ``num_preempted``, ``kv_blocks_free``.

    ``comp``: the batch compositions in CSR form: ``offsets`` (S+1) and per
    entry ``request`` (index into requests), ``new_tokens``, ``progress``,
    ``prompt_len``, ``phase`` (1 prefill, 2 decode), ``num_output`` (generated
    before the step), ``blocks`` (blocks held after allocation), ``cached_blocks``
    (prefix-cache blocks the request hit when last scheduled), ``num_preemptions``,
    ``snapshot`` (bool, has a REQUEST_SNAPSHOT). Within a step entries are decodes
    first, then prefills, each in scheduling order.

    ``requests``: per request (arrival order) ``id`` (base ``cmpl-<hex>``),
    ``suffix``, ``system_prompt``, ``prompt_len``, ``output_len``, ``arrived_ns``,
    ``queued_ns``, ``departed_ns``, ``scheduled_ns``, ``first_token_ns``,
    ``finished_ns``, ``queued_step``, ``scheduled_step``, ``first_token_step``,
    ``finished_step``, ``cached_tokens`` (first SCHEDULED), ``num_preemptions``.

    ``events``: journey events in emission order, arrays ``request``, ``type``
    (index into :data:`EVENT_TYPES`), ``step``, ``ts_ns``, ``phase`` (index into
    :data:`EVENT_PHASES`), ``prefill_done``, ``decode_done``, ``num_preemptions``,
    ``resume`` (SCHEDULED: 1 if RESUME).
    """

    spec: ExperimentSpec
    seed: int
    arch: Architecture
    hardware: Hardware
    kv_blocks_total: int
    mono_base_ns: int
    unix_offset_ns: int
    steps: dict[str, np.ndarray]
    comp: dict[str, np.ndarray]
    requests: dict[str, np.ndarray]
    events: dict[str, np.ndarray]
    truth_params: str = "{}"
    stats: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return int(self.steps["id"].size)

    def step_batch(self) -> StepBatch:
        """All steps' compositions as padded ``(steps, width)`` arrays."""
        return padded_composition(self.comp)


def padded_composition(comp: Mapping[str, np.ndarray]) -> StepBatch:
    """Convert the CSR composition to padded arrays (decodes first, as in schema)."""
    off = comp["offsets"]
    counts = np.diff(off)
    S = counts.size
    W = int(counts.max()) if S else 0
    rows = np.repeat(np.arange(S), counts)
    cols = np.arange(off[-1]) - np.repeat(off[:-1], counts)

    def pad(name, dtype):
        a = np.zeros((S, W), dtype=dtype)
        a[rows, cols] = comp[name]
        return a

    mask = np.zeros((S, W), dtype=bool)
    mask[rows, cols] = True
    return StepBatch(
        phase=pad("phase", np.int8),
        new_tokens=pad("new_tokens", np.int32),
        progress=pad("progress", np.int32),
        prompt_len=pad("prompt_len", np.int32),
        mask=mask,
    )


def kv_capacity_blocks(
    arch: Architecture, hw: Hardware, tp: int, gpu_memory_utilization: float
) -> int:
    """KV-cache blocks per GPU: (memory·util − weights/TP) / (16 · KV bytes per token per GPU)."""
    avail = hw.memory_bytes * gpu_memory_utilization - weight_bytes(arch) / tp
    return max(int(avail // (KV_BLOCK_TOKENS * kv_bytes_per_token(arch, tp))), 0)


def _check_spec(spec: ExperimentSpec) -> tuple[Architecture, Hardware]:
    src = f"experiment {spec.model} tp{spec.tp} {spec.workload}"
    arch = load_architecture(spec.model)
    arch.check_tp(spec.tp, source=src)
    hw = load_hardware(spec.hardware)
    for key in SHARED_PREFIX_KEYS:
        v = spec.shared_prefix.get(key)
        if (
            isinstance(v, bool)
            or not isinstance(v, int)
            or v < (0 if key == "system_prompt_len" else 1)
        ):
            raise CalibError(
                f"must be a positive integer, got {v!r}", path=src, field=f"shared_prefix.{key}"
            )
    for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
        v = getattr(spec, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CalibError(f"must be a positive integer, got {v!r}", path=src, field=name)
    if not spec.stages:
        raise CalibError(
            "no load stages", path=src, field="stages", fix="give a list of {rate, duration}"
        )
    for i, st in enumerate(spec.stages):
        if len(st) != 2 or not all(
            isinstance(x, int | float) and not isinstance(x, bool) and x > 0 for x in st
        ):
            raise CalibError(
                f"stage {i} must have positive rate and duration, got {st!r}",
                path=src,
                field="stages",
            )
    sp = spec.shared_prefix
    total = sp["system_prompt_len"] + sp["question_len"] + sp["output_len"]
    if total > spec.max_model_len:
        raise CalibError(
            f"prompt + output = {total} tokens exceeds max_model_len {spec.max_model_len}",
            path=src,
            field="max_model_len",
        )
    if not 0 < spec.gpu_memory_utilization <= 1:
        raise CalibError("must be in (0, 1]", path=src, field="gpu_memory_utilization")
    blocks = kv_capacity_blocks(arch, hw, spec.tp, spec.gpu_memory_utilization)
    if blocks * KV_BLOCK_TOKENS < total:
        raise CalibError(
            f"{arch.name} on {spec.tp}x {hw.name} leaves {blocks} KV blocks, "
            f"too few for one request of {total} tokens",
            path=src,
            field="tensor_parallelism",
            fix="use a larger TP degree",
        )
    return arch, hw


def _hex_ids(rng: np.random.Generator, n: int, nbytes: int) -> list[str]:
    raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    return [bytes(r).hex() for r in raw]


def _arrivals(spec: ExperimentSpec, rng: np.random.Generator) -> np.ndarray:
    """Poisson arrival times (seconds from the start of the load) over all stages."""
    out, t0 = [], 0.0
    for rate, dur in spec.stages:
        k = rng.poisson(rate * dur)
        out.append(np.sort(t0 + rng.random(k) * dur))
        t0 += dur
    return np.concatenate(out) if out else np.zeros(0)


class _KV:
    """Block accounting with an LRU free queue holding evictable system-prompt blocks."""

    def __init__(self, total: int, num_prompts: int):
        self.total = total
        self.used = 0
        self.fq: deque[list[int]] = deque([[-1, total]])  # [prompt or -1, count]
        self.resident = np.zeros(num_prompts, dtype=np.int64)
        self.refcount = np.zeros(num_prompts, dtype=np.int64)

    @property
    def free(self) -> int:
        return self.total - self.used

    def alloc(self, k: int) -> None:
        """Take ``k`` blocks from the head of the free queue (evicting cached blocks)."""
        self.used += k
        fq, res = self.fq, self.resident
        while k > 0:
            seg = fq[0]
            take = k if k < seg[1] else seg[1]
            seg[1] -= take
            if seg[0] >= 0:
                res[seg[0]] -= take
            if seg[1] == 0:
                fq.popleft()
            k -= take

    def release_private(self, k: int) -> None:
        if k <= 0:
            return
        self.used -= k
        if self.fq and self.fq[-1][0] == -1:
            self.fq[-1][1] += k
        else:
            self.fq.append([-1, k])

    def ref(self, p: int) -> int:
        """Reference system prompt ``p``; return its resident (hit) blocks."""
        if self.refcount[p] == 0 and self.resident[p] > 0:
            for i, seg in enumerate(self.fq):
                if seg[0] == p:
                    del self.fq[i]
                    break
            self.used += int(self.resident[p])
        self.refcount[p] += 1
        return int(self.resident[p])

    def unref(self, p: int) -> None:
        self.refcount[p] -= 1
        if self.refcount[p] == 0 and self.resident[p] > 0:
            self.used -= int(self.resident[p])
            self.fq.append([p, int(self.resident[p])])


@dataclass(frozen=True)
class RequestPlan:
    """Given requests that replace the spec's generated workload (replay of observed requests).

    Attributes
    ----------
    queued_us : (N,) float, when each request enters the waiting queue, µs (any origin).
    prompt_len, output_len : (N,) int tokens (``output_len`` >= 1).
    prefix_group : (N,) int in ``[0, groups)``: the shared prefix (system prompt) each uses.
    prefix_len : tokens of every group's shared prefix (0: no prefix-cache hits).
    kv_blocks_total : KV-cache blocks per GPU; None: from the spec's memory utilisation.
    inter_step_gap_us, idle_wake_us : deterministic host time between steps and from an
        idle engine's first queued request to its step (at least 1 ns), µs (replace the
        truth's draws).
    """

    queued_us: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray
    prefix_group: np.ndarray
    prefix_len: int = 0
    kv_blocks_total: int | None = None
    inter_step_gap_us: float = 0.0
    idle_wake_us: float = 0.0


def simulate_experiment(
    spec: ExperimentSpec,
    *,
    seed: int,
    step_time: StepTimeFn | None = None,
    truth_params: TruthParams | None = None,
    batch_summary_rate: float = SIMULATION.batch_summary_rate,
    snapshot_rate: float = SIMULATION.snapshot_rate,
    requests: RequestPlan | None = None,
) -> SimResult:
    """Simulate one experiment in memory (pure: same spec and seed, same result).

    Parameters
    ----------
    spec : the experiment.
    seed : base seed; mixed with ``spec.seed_offset``.
    step_time : the step-time function (:class:`calib.simulate.truth.StepTimeFn`
        protocol; µs per step); default :class:`TruthStepTime` with ``truth_params``.
    batch_summary_rate : fraction of steps with a BATCH_SUMMARY (Bernoulli per step).
    snapshot_rate : fraction of (step, request) pairs with a REQUEST_SNAPSHOT; drawn
        among sampled steps, so the within-step rate is ``snapshot_rate / batch_summary_rate``.
    requests : given requests (:class:`RequestPlan`) instead of the spec's load stages and
        shared-prefix lengths; API delays are then 0 (ARRIVED = QUEUED, DEPARTED = FINISHED).

    Raises
    ------
    CalibError : an unknown model/hardware or an impossible configuration.
    """
    arch, hw = _check_spec(spec)
    params = truth_params or TruthParams()
    if step_time is None:
        step_time = TruthStepTime(params)
    # the default truth has a scalar fast path with identical results (same draws)
    fast = step_time if type(step_time) is TruthStepTime else None
    ss = np.random.SeedSequence([int(seed), int(spec.seed_offset)])
    r_arr, r_ids, r_api, r_time, r_gap, r_samp = (np.random.default_rng(s) for s in ss.spawn(6))

    sp = spec.shared_prefix
    n_sys, sys_len = sp["num_unique_system_prompts"], sp["system_prompt_len"]
    if requests is not None:
        n_sys = int(np.max(requests.prefix_group, initial=0)) + 1
        sys_len = int(requests.prefix_len)
    # system-prompt blocks that can be shared (none without prefix caching)
    sys_blocks = sys_len // KV_BLOCK_TOKENS if spec.enable_prefix_caching else 0
    B = KV_BLOCK_TOKENS

    # ---- requests
    mono_base_ns = int(r_ids.integers(200_000, 2_000_000)) * 1_000_000_000
    unix_offset_ns = _unix_offset_ns(spec.started) - mono_base_ns
    if requests is None:
        arr_s = _arrivals(spec, r_arr)
        N = arr_s.size
        sys_id = r_arr.integers(0, n_sys, size=N)
        arrived_ns = mono_base_ns + 5_000_000_000 + np.round(arr_s * 1e9).astype(np.int64)
        api_q_ns = np.round(r_api.lognormal(np.log(1.2e6), 0.35, size=N)).astype(np.int64)
        queued_ns = arrived_ns + api_q_ns
        depart_ns = np.round(r_api.lognormal(np.log(0.4e6), 0.3, size=N)).astype(np.int64)
        prompt_len = np.full(N, sys_len + sp["question_len"], dtype=np.int64)
        output_len = np.full(N, sp["output_len"], dtype=np.int64)
        gap_us, wake_ns = None, int(params.idle_wake_us * 1000)
    else:
        q_us = np.asarray(requests.queued_us, np.float64)
        N = q_us.size
        sys_id = np.asarray(requests.prefix_group, np.int64)
        queued_ns = mono_base_ns + np.round((q_us - q_us.min(initial=0.0)) * 1e3).astype(np.int64)
        arrived_ns = queued_ns.copy()
        depart_ns = np.zeros(N, np.int64)
        prompt_len = np.asarray(requests.prompt_len, np.int64).copy()
        output_len = np.asarray(requests.output_len, np.int64).copy()
        gap_us = float(requests.inter_step_gap_us)
        wake_ns = max(1, int(requests.idle_wake_us * 1000))  # > 0: the queued request is due
    order = np.argsort(queued_ns, kind="stable")  # queue order (== arrival order nearly always)
    ids = ["cmpl-" + h for h in _hex_ids(r_ids, N, 16)]
    suffixes = _hex_ids(r_ids, N, 4)

    computed = np.zeros(N, dtype=np.int64)
    num_tokens = prompt_len.copy()
    num_out = np.zeros(N, dtype=np.int64)
    have = np.zeros(N, dtype=np.int64)  # blocks in the request's table
    shared = np.zeros(N, dtype=np.int64)  # of which shared system-prompt blocks
    hit_blocks = np.zeros(N, dtype=np.int64)
    npre = np.zeros(N, dtype=np.int64)
    cached_first = np.full(N, -1, dtype=np.int64)
    st_q = np.full(N, -1, dtype=np.int64)
    st_s = np.full(N, -1, dtype=np.int64)
    st_f = np.full(N, -1, dtype=np.int64)
    st_d = np.full(N, -1, dtype=np.int64)
    ts_s = np.full(N, -1, dtype=np.int64)
    ts_f = np.full(N, -1, dtype=np.int64)
    ts_d = np.full(N, -1, dtype=np.int64)

    kv = _KV(
        kv_capacity_blocks(arch, hw, spec.tp, spec.gpu_memory_utilization)
        if requests is None or requests.kv_blocks_total is None
        else int(requests.kv_blocks_total),
        n_sys,
    )

    # event columns
    ev_req: list[int] = []
    ev_type: list[int] = []
    ev_step: list[int] = []
    ev_ts: list[int] = []
    ev_phase: list[int] = []
    ev_pf: list[int] = []
    ev_dc: list[int] = []
    ev_np: list[int] = []
    ev_res: list[int] = []

    def emit(r, typ, step, ts, phase, resume=0):
        ev_req.append(r)
        ev_type.append(typ)
        ev_step.append(step)
        ev_ts.append(ts)
        ev_phase.append(phase)
        ev_pf.append(min(int(computed[r]), int(prompt_len[r])))
        ev_dc.append(int(num_out[r]))
        ev_np.append(int(npre[r]))
        ev_res.append(resume)

    # step columns
    s_id, s_start, s_end, s_dur = [], [], [], []
    s_run, s_wait, s_npf, s_ndc, s_tpf, s_tdc, s_fin, s_pre, s_free = ([] for _ in range(9))
    c_req, c_new, c_prog, c_phase, c_out, c_blk, c_hit, c_np = ([] for _ in range(8))
    c_count = []

    running: list[int] = []
    waiting: deque[int] = deque()
    nxt = 0  # next request (in queue order) not yet queued
    step = 0
    t = int(queued_ns[order[0]]) + wake_ns if N else 0
    budget_max, max_seqs = spec.max_num_batched_tokens, spec.max_num_seqs
    done = 0
    one = np.ones(1, dtype=bool)

    def preempt(r, step, t):
        kv.release_private(int(have[r] - shared[r]))
        kv.unref(int(sys_id[r]))
        have[r] = shared[r] = 0
        computed[r] = 0
        npre[r] += 1
        emit(r, EV_PREEMPTED, step, t, 0)
        waiting.appendleft(r)

    pf_req: list[int] = []
    pf_new: list[int] = []
    pf_prog: list[int] = []

    def schedule_prefill(r: int, new: int) -> bool:
        """Allocate blocks for ``new`` tokens of ``r``; False if the cache is full."""
        target = -(-(int(computed[r]) + new) // B)
        k = target - int(have[r])
        if k > kv.free:
            return False
        if k > 0:
            p = int(sys_id[r])
            lo, hi = int(have[r]), min(target, sys_blocks)
            if hi > lo:  # newly allocated system-prompt blocks become cached
                newly = max(0, hi - max(lo, int(kv.resident[p])))
                kv.alloc(k)
                kv.resident[p] += newly
                shared[r] += newly
                # blocks below resident are duplicates: private to r
            else:
                kv.alloc(k)
            have[r] = target
        pf_req.append(r)
        pf_new.append(new)
        pf_prog.append(int(computed[r]))
        return True

    while done < N:
        # ---- arrivals queued before this step's start
        while nxt < N and queued_ns[order[nxt]] < t:
            r = int(order[nxt])
            waiting.append(r)
            st_q[r] = step
            emit(r, EV_QUEUED, step, int(queued_ns[r]), 0)
            nxt += 1
        if not running and not waiting:
            t = max(t, int(queued_ns[order[nxt]]) + wake_ns)
            continue
        step += 1
        budget = budget_max
        n_preempted = 0

        # ---- running decodes (vectorised)
        if running:
            run = np.fromiter(running, dtype=np.int64, count=len(running))
            pend = num_tokens[run] - computed[run]
            is_dc = (pend == 1) & (num_out[run] > 0)
            need = -((-(computed[run] + 1)) // B) - have[run]
            need_dc = int(need[is_dc].sum())
            while need_dc > kv.free:
                victim = running.pop()
                pos = len(running)
                if is_dc[pos]:
                    need_dc -= int(need[pos])
                preempt(victim, step, t)
                n_preempted += 1
                run, is_dc, need = run[:pos], is_dc[:pos], need[:pos]
            dc = run[is_dc]
            if dc.size > budget:  # never with max_num_seqs < budget; kept for generality
                dc = dc[:budget]
            if dc.size:
                nd = need[is_dc][: dc.size]
                kv.alloc(int(nd.sum()))
                have[dc] += nd
            budget -= dc.size
            pf_running = [int(r) for r in run[~is_dc]]
        else:
            dc = np.zeros(0, dtype=np.int64)
            pf_running = []

        pf_req.clear()
        pf_new.clear()
        pf_prog.clear()

        # ---- running partial prefills / recomputes
        for r in pf_running:
            if budget <= 0:
                break
            if r not in running:  # preempted above
                continue
            new = min(int(num_tokens[r] - computed[r]), budget)
            while not schedule_prefill(r, new):
                victim = running.pop()
                if victim == r:
                    preempt(victim, step, t)
                    n_preempted += 1
                    break
                preempt(victim, step, t)
                n_preempted += 1
                if victim in dc:
                    # a decode victim: undo its token
                    keep = dc != victim
                    dc = dc[keep]
                    budget += 1
            else:
                budget -= new

        # ---- waiting requests
        while waiting and budget > 0 and len(running) < max_seqs and n_preempted == 0:
            r = waiting[0]
            p = int(sys_id[r])
            hit = kv.ref(p)
            hit = min(hit, sys_blocks, (int(num_tokens[r]) - 1) // B)
            computed[r] = hit * B
            have[r] = shared[r] = hit
            new = min(int(num_tokens[r] - computed[r]), budget)
            if not schedule_prefill(r, new):
                kv.unref(p)
                have[r] = shared[r] = computed[r] = 0
                break
            waiting.popleft()
            running.append(r)
            hit_blocks[r] = hit
            resume = int(st_s[r] >= 0)
            if not resume:
                st_s[r] = step
                ts_s[r] = t
                cached_first[r] = hit * B
            emit(r, EV_SCHEDULED, step, t, 1, resume)
            budget -= new

        # ---- batch composition
        n_dc, n_pf = dc.size, len(pf_req)
        if n_dc + n_pf == 0:
            # nothing schedulable (only possible transiently after preemption); wait a gap
            step -= 1
            t += int((params.inter_step_gap_us if gap_us is None else gap_us) * 1000)
            if not running and waiting and n_preempted == 0:
                raise CalibError(
                    "a waiting request can never be scheduled (KV cache too small)",
                    field="max_model_len",
                )
            continue
        pf_arr = np.asarray(pf_req, dtype=np.int64)
        ent = np.concatenate([dc, pf_arr]) if n_pf else dc
        new_t = np.concatenate([np.ones(n_dc, np.int64), np.asarray(pf_new, np.int64)])
        prog = np.concatenate([computed[dc], np.asarray(pf_prog, np.int64)])
        phase = np.concatenate(
            [np.full(n_dc, PHASE_DECODE, np.int8), np.full(n_pf, PHASE_PREFILL, np.int8)]
        )
        W = ent.size
        if fast is not None:
            dur_us = fast.one_step(
                arch,
                hw,
                spec.tp,
                n_dc,
                int(prog[:n_dc].sum()),
                pf_new,
                pf_prog,
                [int(prompt_len[r]) for r in pf_req],
                r_time,
            )
        else:
            sb = StepBatch(
                phase=phase[None, :],
                new_tokens=new_t[None, :],
                progress=prog[None, :],
                prompt_len=prompt_len[ent][None, :],
                mask=np.broadcast_to(one, (1, W)),
            )
            dur_us = float(step_time(sb, arch, hw, spec.tp, r_time)[0])
        if not (dur_us > 0 and math.isfinite(dur_us)):
            raise ValueError(f"step_time returned {dur_us!r} for step {step}")
        dur_ns = int(round(dur_us * 1000.0))
        t_end = t + dur_ns

        c_req.append(ent)
        c_new.append(new_t)
        c_prog.append(prog)
        c_phase.append(phase)
        c_out.append(num_out[ent])
        c_blk.append(have[ent])
        c_hit.append(hit_blocks[ent])
        c_np.append(npre[ent])
        c_count.append(W)

        # ---- execute: advance computed, sample tokens
        computed[ent] += new_t
        sampled_tok = ent[computed[ent] == num_tokens[ent]]
        num_out[sampled_tok] += 1
        num_tokens[sampled_tok] += 1
        n_fin = 0
        if n_pf:
            for r in pf_req:
                if num_out[r] == 1 and computed[r] == prompt_len[r]:
                    st_f[r] = step
                    ts_f[r] = t_end
                    emit(r, EV_FIRST_TOKEN, step, t_end, 2)
        fin = sampled_tok[num_out[sampled_tok] >= output_len[sampled_tok]]
        if fin.size:
            fin_set = set(int(x) for x in fin)
            for r in fin:
                r = int(r)
                st_d[r] = step
                ts_d[r] = t_end
                emit(r, EV_FINISHED, step, t_end, 2)
                kv.release_private(int(have[r] - shared[r]))
                kv.unref(int(sys_id[r]))
                have[r] = shared[r] = 0
            running = [r for r in running if r not in fin_set]
            n_fin = len(fin_set)
            done += n_fin

        s_id.append(step)
        s_start.append(t)
        s_end.append(t_end)
        s_dur.append(dur_us)
        s_run.append(len(running) + n_fin)
        s_wait.append(len(waiting))
        s_npf.append(n_pf)
        s_ndc.append(n_dc)
        s_tpf.append(int(new_t[n_dc:].sum()))
        s_tdc.append(n_dc)
        s_fin.append(n_fin)
        s_pre.append(n_preempted)
        s_free.append(kv.free)

        gap = (
            r_gap.lognormal(np.log(params.inter_step_gap_us * 1000.0), params.inter_step_gap_sigma)
            if gap_us is None
            else gap_us * 1000.0
        )
        t = t_end + int(round(gap))

    # ---- assemble
    S = len(s_id)
    steps: dict[str, np.ndarray] = {
        "id": np.asarray(s_id, np.int64),
        "start_ns": np.asarray(s_start, np.int64),
        "end_ns": np.asarray(s_end, np.int64),
        "duration_us": np.asarray(s_dur, np.float64),
        "running_depth": np.asarray(s_run, np.int32),
        "waiting_depth": np.asarray(s_wait, np.int32),
        "num_prefill": np.asarray(s_npf, np.int32),
        "num_decode": np.asarray(s_ndc, np.int32),
        "prefill_tokens": np.asarray(s_tpf, np.int32),
        "decode_tokens": np.asarray(s_tdc, np.int32),
        "num_finished": np.asarray(s_fin, np.int32),
        "num_preempted": np.asarray(s_pre, np.int32),
        "kv_blocks_free": np.asarray(s_free, np.int32),
    }
    steps["duration_us_int"] = np.rint(steps["duration_us"]).astype(np.int64)
    steps["sampled"] = r_samp.random(S) < batch_summary_rate
    offsets = np.zeros(S + 1, np.int64)
    offsets[1:] = np.cumsum(np.asarray(c_count, np.int64))

    def cat(parts, dtype):
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    comp = {
        "offsets": offsets,
        "request": cat(c_req, np.int32),
        "new_tokens": cat(c_new, np.int32),
        "progress": cat(c_prog, np.int32),
        "phase": cat(c_phase, np.int8),
        "num_output": cat(c_out, np.int32),
        "blocks": cat(c_blk, np.int32),
        "cached_blocks": cat(c_hit, np.int32),
        "num_preemptions": cat(c_np, np.int32),
    }
    comp["prompt_len"] = prompt_len[comp["request"]].astype(np.int32)
    step_of_entry = np.repeat(np.arange(S), np.diff(offsets))
    within = snapshot_rate / batch_summary_rate if batch_summary_rate > 0 else 0.0
    comp["snapshot"] = steps["sampled"][step_of_entry] & (r_samp.random(offsets[-1]) < within)

    req_cols = {
        "id": np.asarray(ids, dtype=object),
        "suffix": np.asarray(suffixes, dtype=object),
        "system_prompt": sys_id.astype(np.int32),
        "prompt_len": prompt_len.astype(np.int32),
        "output_len": output_len.astype(np.int32),
        "arrived_ns": arrived_ns,
        "queued_ns": queued_ns,
        "departed_ns": ts_d + depart_ns,
        "scheduled_ns": ts_s,
        "first_token_ns": ts_f,
        "finished_ns": ts_d,
        "queued_step": st_q,
        "scheduled_step": st_s,
        "first_token_step": st_f,
        "finished_step": st_d,
        "cached_tokens": cached_first.astype(np.int32),
        "num_preemptions": npre.astype(np.int32),
    }
    events: dict[str, np.ndarray] = {
        "request": np.asarray(ev_req, np.int64),
        "type": np.asarray(ev_type, np.int8),
        "step": np.asarray(ev_step, np.int64),
        "ts_ns": np.asarray(ev_ts, np.int64),
        "phase": np.asarray(ev_phase, np.int8),
        "prefill_done": np.asarray(ev_pf, np.int64),
        "decode_done": np.asarray(ev_dc, np.int64),
        "num_preemptions": np.asarray(ev_np, np.int64),
        "resume": np.asarray(ev_res, np.int8),
    }
    res = SimResult(
        spec=spec,
        seed=int(seed),
        arch=arch,
        hardware=hw,
        kv_blocks_total=kv.total,
        mono_base_ns=mono_base_ns,
        unix_offset_ns=unix_offset_ns,
        steps=steps,
        comp=comp,
        requests=req_cols,
        events=events,
        truth_params=params.to_json() if isinstance(step_time, TruthStepTime) else "{}",
    )
    res.stats = summary_stats(res)
    return res


def summary_stats(res: SimResult) -> dict:
    """Headline numbers of one simulated experiment."""
    rq, st = res.requests, res.steps
    comp_pf = res.comp["phase"] == PHASE_PREFILL
    computed_pf = int(res.comp["new_tokens"][comp_pf].sum())
    cached = int(np.clip(rq["cached_tokens"], 0, None).sum())
    total_prompt = int(rq["prompt_len"].sum())
    return {
        "experiments": 1,
        "requests": int(rq["prompt_len"].size),
        "steps": int(st["id"].size),
        "sampled": int(st["sampled"].sum()),
        "preemptions": int(rq["num_preemptions"].sum()),
        "cached_tokens": cached,
        "prompt_tokens": total_prompt,
        "computed_prefill_tokens": computed_pf,
        "prefix_hit_rate": cached / total_prompt if total_prompt else 0.0,
        "sum_step_us": float(st["duration_us"].sum()),
        "kv_blocks_total": res.kv_blocks_total,
    }


def _unix_offset_ns(started: str) -> int:
    from datetime import UTC, datetime

    try:
        dt = datetime.strptime(started, "%Y%m%d-%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        raise CalibError(
            f"bad start timestamp {started!r}", field="started", fix="use YYYYMMDD-HHMMSS"
        ) from None
    return int(dt.timestamp()) * 1_000_000_000
