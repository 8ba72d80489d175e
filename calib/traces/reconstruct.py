"""Journey reconstruction: journey events -> per-step batches, labels and cross-checks.

Rules (spec "From journey events to per-step batches", made precise here)
-------------------------------------------------------------------------
Event order
    A request's events are its journey events from all its ``llm_core`` spans,
    sorted by ``scheduler.step`` and, within a step, by file order.

Running intervals
    The first SCHEDULED (or a SCHEDULED(RESUME)) at step ``a`` opens an interval;
    PREEMPTED at ``p`` closes it at ``p - 1``; FINISHED at ``e`` closes it at ``e``.
    An interval that no event closes is kept only up to a FIRST_TOKEN inside it
    (its decode steps are unknown and dropped). A SCHEDULED while already running
    is ignored (counted as an anomaly).

Prefill phase (no first token before the interval)
    A prefill *job* runs from ``a`` to the FIRST_TOKEN step ``F`` (inclusive) if
    ``a <= F <= b``, computing ``prompt - kv0`` tokens starting at ProgressIndex
    ``kv0`` = the SCHEDULED event's ``prefill.done_tokens`` (prefix-cache hits on the
    first SCHEDULED, ``req_cached_tokens``; clamped to ``prompt - 1`` because vLLM
    always computes at least one token). Decode runs ``F + 1 .. b``, one token per
    step, ProgressIndex ``prompt + k - 1`` at the k-th decode step. If the interval
    ends before a first token (preempted / aborted), the job has no completion step.

Resume after the first token (recompute preemption)
    vLLM recomputes prompt + generated tokens as a prefill. With ``g0`` =
    ``decode.done_tokens`` at the RESUME and ``g1`` at the closing event, the
    recompute job computes ``prompt + g0 - kv0`` tokens (ProgressIndex from ``kv0``)
    and its completing step ``c`` samples the next token, so
    ``c = b - (g1 - g0) + 1``; decode runs ``c + 1 .. b`` with ProgressIndex
    ``prompt + g0`` at ``c + 1``. If no token was generated (``g1 == g0``) the job
    has no completion step.

Chunked prefill split (token budget)
    Steps are swept in order. At step ``t`` the prefill budget is
    ``max_num_batched_tokens - (decode requests at t)``. Jobs whose completion step
    is ``t`` take all their remaining tokens first (the last chunk ends exactly at
    FIRST_TOKEN); the remaining budget goes to the other running jobs FCFS (by job
    start step, then request queue order), each taking at most ``remaining - 1``
    tokens (a job must not complete before its completion step). A job given 0
    tokens at a step is not in that step's batch. Tolerance: when completing jobs
    need more than the budget the step is over budget; the number of such steps
    and the excess tokens are reported in ``stats`` (0 for consistent traces, and
    single-step prefills are always exact).

Failed requests (missing QUEUED, SCHEDULED, FIRST_TOKEN or FINISHED) keep their
known steps in the batches; their latency labels are NaN. Requests are ordered by
QUEUED time (else their first event's), ties by first appearance in the file; an
``llm_core`` span without journey events is not a request.

Event order and label signs: a complete request must have QUEUED <= SCHEDULED <=
FIRST_TOKEN <= FINISHED both in ``ts.monotonic`` and in ``scheduler.step``, so that
queueing, TTFT, E2E and processing time are >= 0. A request that breaks this keeps
its steps in the batches but is dropped from the labels (NaN, counted as failed and
in ``stats["disordered_requests"]``), with one TraceWarning per experiment naming
the file, the line of the request's first journey event and the offending values.

Damaged input guard: a decode segment or prefill job longer than
``calib.config.IMPORT_MAX_INTERVAL_STEPS`` steps is dropped (counted anomaly).
Anomalies are counted in ``Reconstruction.stats["anomalies"]`` and reported in one
:class:`~calib.traces.otlp.TraceWarning` per experiment.

Cross-checks
------------
BATCH_SUMMARY: a summary disagrees when any of ``batch.num_prefill_reqs``,
``batch.num_decode_reqs``, ``batch.prefill_tokens``, ``batch.decode_tokens`` differs
from the reconstruction; summaries naming a step with no reconstructed batch count
as disagreeing (and are dropped). REQUEST_SNAPSHOT: agrees when the request is in
that step's batch with the same phase and ``scheduled_tokens_this_step`` equal to the
slot's new tokens, and ``num_computed_tokens`` equals the ProgressIndex before or
after the step (the snapshot's timing within the step is not specified); a WAITING
snapshot of a request not in the batch agrees.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calib import config
from calib.traces.otlp import (
    ARRIVED,
    DEPARTED,
    FINISHED,
    FIRST_TOKEN,
    PREEMPTED,
    QUEUED,
    SCHEDULED,
    SNAPSHOT_INT_KEYS,
    TraceColumns,
    TraceWarning,
)
from calib.traces.schema import PHASE_DECODE, PHASE_PREFILL

_BASE_ID = re.compile(r"^(.*)-\d+-[^-]+$")


def base_request_id(journey_id: str) -> str:
    """``cmpl-<id>-0-<suffix>`` -> ``cmpl-<id>`` (ids without the suffix are returned as is)."""
    m = _BASE_ID.match(journey_id)
    return m.group(1) if m else journey_id


@dataclass
class Reconstruction:
    """Per-step batches and per-request labels of one experiment (numpy columns).

    Invariants: ``step_id`` strictly increasing; for every step row the slots
    ``0..n-1`` hold requests (decode first, then prefill, each in request order)
    and the rest is padding (request -1, phase 0, zeros); ``slot_new_tokens >= 1``
    on every real slot; requests are in queue order and ``slot_request`` indexes them.
    """

    step_id: np.ndarray
    num_prefill: np.ndarray
    num_decode: np.ndarray
    prefill_tokens: np.ndarray
    decode_tokens: np.ndarray
    slot_request: np.ndarray
    slot_phase: np.ndarray
    slot_new_tokens: np.ndarray
    slot_progress: np.ndarray
    slot_prompt_len: np.ndarray
    slot_mask: np.ndarray
    bs: dict[str, np.ndarray]  # schema's bs_* variables + duration_us, sampled
    req: dict[str, np.ndarray]  # schema's req_* variables (without req_experiment)
    xcheck_batch_rate: float
    xcheck_snapshot_rate: float
    stats: dict = field(default_factory=dict)


def _first_rows(
    kind_sorted: np.ndarray, req_sorted: np.ndarray, vals: np.ndarray, k: int, n_req: int, fill
):
    """Per request, ``vals`` at its first event of kind ``k`` (in sorted order)."""
    out = np.full(n_req, fill, dtype=vals.dtype)
    sel = np.flatnonzero(kind_sorted == k)
    if sel.size:
        r = req_sorted[sel]
        _, first = np.unique(r, return_index=True)
        out[r[first]] = vals[sel[first]]
    return out


def reconstruct(
    c: TraceColumns,
    max_num_batched_tokens: int,
    *,
    source: str | Path = "traces.json",
    _vectorise: bool = True,
) -> Reconstruction:
    """Reconstruct per-step batches, labels and cross-checks from parsed traces.

    Parameters
    ----------
    c : finished :class:`~calib.traces.otlp.TraceColumns` of one experiment.
    max_num_batched_tokens : vLLM's per-step token budget (exp-config.yaml).
    source : file named in warnings.
    """
    n_req = len(c.request_ids)
    n_ev = len(c.j_req)
    stats: dict = {"anomalies": {}}
    anomalies = stats["anomalies"]

    def anomaly(name: str, n: int = 1) -> None:
        anomalies[name] = anomalies.get(name, 0) + n

    order = np.lexsort((np.arange(n_ev), c.j_step, c.j_req))
    req_s = c.j_req[order]
    kind_s = c.j_kind[order]
    step_s = c.j_step[order]
    ts_s = c.j_ts[order]
    # Per-request scalars, vectorised.
    bounds = np.searchsorted(req_s, np.arange(n_req + 1))
    counts = np.diff(bounds)
    has = counts > 0
    prompt = np.zeros(n_req, np.int64)
    max_tokens = np.full(n_req, -1, np.int64)
    npre = np.zeros(n_req, np.int64)
    if n_ev:
        np.maximum.at(prompt, req_s, c.j_pf_total[order])
        np.maximum.at(max_tokens, req_s, c.j_dc_max[order])
        np.maximum.at(npre, req_s, c.j_npre[order])
    first_ts = np.full(n_req, np.inf)
    if n_ev:
        np.minimum.at(first_ts, req_s, ts_s)
    q_step = _first_rows(kind_s, req_s, step_s, QUEUED, n_req, -1)
    q_ts = _first_rows(kind_s, req_s, ts_s, QUEUED, n_req, np.nan)
    sc_step = _first_rows(kind_s, req_s, step_s, SCHEDULED, n_req, -1)
    sc_ts = _first_rows(kind_s, req_s, ts_s, SCHEDULED, n_req, np.nan)
    cached = _first_rows(kind_s, req_s, c.j_pf_done[order], SCHEDULED, n_req, 0)
    ft_step = _first_rows(kind_s, req_s, step_s, FIRST_TOKEN, n_req, -1)
    ft_ts = _first_rows(kind_s, req_s, ts_s, FIRST_TOKEN, n_req, np.nan)
    fin_step = _first_rows(kind_s, req_s, step_s, FINISHED, n_req, -1)
    fin_ts = _first_rows(kind_s, req_s, ts_s, FINISHED, n_req, np.nan)
    out_len = _first_rows(kind_s, req_s, c.j_dc_done[order], FINISHED, n_req, -1)
    status_arr = np.asarray(c.j_status, dtype=object)[order] if n_ev else np.array([], object)
    status = _first_rows(kind_s, req_s, status_arr, FINISHED, n_req, "")
    failed = (q_step < 0) | (sc_step < 0) | (ft_step < 0) | (fin_step < 0)

    # Queue order: QUEUED time (else the first event's), ties by first appearance.
    # Spans without journey events are not requests.
    qkey = np.where(np.isnan(q_ts), first_ts, q_ts)
    kept = np.flatnonzero(has)
    rank_order = kept[np.lexsort((kept, qkey[kept]))]
    rank = np.full(n_req, -1, np.int64)
    rank[rank_order] = np.arange(rank_order.size)

    # ---- the per-request walk (only requests that have more than the simple path)
    kind_l = kind_s.tolist()
    step_l = step_s.tolist()
    ts_l = ts_s.tolist()
    pfd_l = c.j_pf_done[order].tolist()
    dcd_l = c.j_dc_done[order].tolist()
    bounds_l = bounds.tolist()
    prompt_l = prompt.tolist()
    ft_l = ft_step.tolist()
    fin_l = fin_step.tolist()
    gaps_s = np.zeros(n_req)
    # Simple requests (one SCHEDULED, no PREEMPTED, FINISHED after SCHEDULED, FIRST_TOKEN
    # absent or not before SCHEDULED) are vectorised; the walk below gives the same result.
    n_sched = np.bincount(req_s[kind_s == SCHEDULED], minlength=n_req)
    n_pre = np.bincount(req_s[kind_s == PREEMPTED], minlength=n_req)
    simple = _vectorise & (
        (n_sched == 1)
        & (n_pre == 0)
        & (sc_step >= 0)
        & (fin_step >= sc_step)
        & ((ft_step < 0) | (ft_step >= sc_step))
    )
    sr = np.flatnonzero(simple)
    sa, sb, sF, sP = sc_step[sr], fin_step[sr], ft_step[sr], prompt[sr]
    skv = np.minimum(np.maximum(cached[sr], 0), np.maximum(sP - 1, 0))
    sneed = np.maximum(sP - skv, 1)
    scomp = (sF >= 0) & (sF <= sb)
    sdec = scomp & (sF < sb)
    if (sdec & (out_len[sr] >= 0) & (out_len[sr] - 1 != sb - sF)).any():
        anomaly(
            "decode_steps_vs_tokens",
            int((sdec & (out_len[sr] >= 0) & (out_len[sr] - 1 != sb - sF)).sum()),
        )
    d_req, d_a, d_b = sr[sdec].tolist(), (sF[sdec] + 1).tolist(), sb[sdec].tolist()
    d_p0 = sP[sdec].tolist()
    j_req, j_a = sr.tolist(), sa.tolist()
    j_b = np.where(scomp, sF, sb).tolist()
    j_comp, j_need, j_kv0 = scomp.tolist(), sneed.tolist(), skv.tolist()
    for r in np.flatnonzero(~simple & has).tolist():
        lo, hi = bounds_l[r], bounds_l[r + 1]
        P = prompt_l[r]
        F = ft_l[r]
        open_a = None
        g0 = kv0 = 0
        pre_ts = None
        gap = 0.0
        intervals = []
        seen_sched = False
        for i in range(lo, hi):
            k = kind_l[i]
            if k == SCHEDULED:
                if open_a is not None:
                    anomaly("scheduled_while_running")
                    continue
                if seen_sched and pre_ts is not None:
                    gap += ts_l[i] - pre_ts
                pre_ts = None
                seen_sched = True
                open_a, g0, kv0 = step_l[i], dcd_l[i], pfd_l[i]
            elif k == PREEMPTED:
                if open_a is not None:
                    intervals.append((open_a, step_l[i] - 1, g0, dcd_l[i], kv0))
                    open_a = None
                else:
                    anomaly("preempted_while_not_running")
                pre_ts = ts_l[i]
            elif k == FINISHED:
                if open_a is not None:
                    intervals.append((open_a, step_l[i], g0, dcd_l[i], kv0))
                    open_a = None
                    break
        if open_a is not None:
            if fin_l[r] >= 0:
                anomaly("unclosed_interval")
            if F >= open_a and g0 == 0:
                intervals.append((open_a, F, g0, -1, kv0))  # prefill up to FIRST_TOKEN only
        gaps_s[r] = gap
        for a, b, ga, gb, kv in intervals:
            if b < a:
                continue
            if F < 0 or F >= a:  # prefill phase
                kvc = min(max(kv, 0), max(P - 1, 0))
                need = max(P - kvc, 1)
                done = F if 0 <= F <= b else None  # completion step: FIRST_TOKEN
                p0 = P
                if done is not None and F < b and gb >= 0 and gb - max(ga, 1) != b - F:
                    anomaly("decode_steps_vs_tokens")
            else:  # resumed after the first token: recompute
                ga = max(ga, 1)
                target = P + ga
                kvc = min(max(kv, 0), target - 1)
                need = target - kvc
                done = None
                p0 = P + ga
                if gb > ga:
                    done = b - (gb - ga) + 1  # it samples the next token (module doc)
                    if done < a:
                        anomaly("resume_tokens_exceed_steps")
                        done = a
            # a job to its completion step (then decode to b), or unfinished to b
            j_req.append(r)
            j_a.append(a)
            j_b.append(b if done is None else done)
            j_comp.append(done is not None)
            j_need.append(need)
            j_kv0.append(kvc)
            if done is not None and done < b:
                d_req.append(r)
                d_a.append(done + 1)
                d_b.append(b)
                d_p0.append(p0)

    # ---- guard against absurd step values (a damaged trace must not exhaust memory)
    cap = config.IMPORT_MAX_INTERVAL_STEPS
    d_req_a = np.asarray(d_req, np.int64)
    d_a_a = np.asarray(d_a, np.int64)
    d_len = np.asarray(d_b, np.int64) - d_a_a + 1
    d_p0_a = np.asarray(d_p0, np.int64)
    long_ = d_len > cap
    jl = np.asarray(j_b, np.int64) - np.asarray(j_a, np.int64) + 1
    jlong = jl > cap
    if long_.any() or jlong.any():
        anomaly("interval_longer_than_IMPORT_MAX_INTERVAL_STEPS", int(long_.sum() + jlong.sum()))
        d_req_a, d_a_a, d_len, d_p0_a = (x[~long_] for x in (d_req_a, d_a_a, d_len, d_p0_a))
        keep = np.flatnonzero(~jlong).tolist()
        j_req, j_a, j_b, j_comp, j_need, j_kv0 = (
            [x[i] for i in keep] for x in (j_req, j_a, j_b, j_comp, j_need, j_kv0)
        )

    # ---- decode pairs, vectorised
    tot = int(d_len.sum())
    offs = np.arange(tot, dtype=np.int64) - np.repeat(np.cumsum(d_len) - d_len, d_len)
    dec_step = np.repeat(d_a_a, d_len) + offs
    dec_req = np.repeat(d_req_a, d_len)
    dec_prog = np.repeat(d_p0_a, d_len) + offs

    # ---- prefill allocation sweep
    pf_step, pf_req, pf_new, pf_prog, over = _allocate_prefills(
        j_req, j_a, j_b, j_comp, j_need, j_kv0, rank, dec_step, max_num_batched_tokens
    )
    stats["over_budget_steps"], stats["over_budget_tokens"] = over
    stats["prefill_jobs"] = len(j_req)

    # ---- assemble slots
    all_step = np.concatenate([dec_step, pf_step])
    all_req = np.concatenate([dec_req, pf_req])
    all_phase = np.concatenate(
        [
            np.full(dec_step.size, PHASE_DECODE, np.int8),
            np.full(pf_step.size, PHASE_PREFILL, np.int8),
        ]
    )
    all_new = np.concatenate([np.ones(dec_step.size, np.int64), pf_new])
    all_prog = np.concatenate([dec_prog, pf_prog])
    new_req = rank[all_req] if all_req.size else all_req  # queue-order request index
    o = np.lexsort((new_req, -all_phase, all_step))
    all_step, new_req, all_phase = all_step[o], new_req[o], all_phase[o]
    all_new, all_prog, all_req = all_new[o], all_prog[o], all_req[o]
    dup = (np.diff(all_step) == 0) & (np.diff(new_req) == 0)
    if dup.any():
        anomaly("request_twice_in_step", int(dup.sum()))
        first = np.concatenate([[True], ~dup])
        all_step, new_req, all_phase = all_step[first], new_req[first], all_phase[first]
        all_new, all_prog, all_req = all_new[first], all_prog[first], all_req[first]
    step_id, step_pos, per_step = np.unique(all_step, return_inverse=True, return_counts=True)
    n_steps = step_id.size
    width = int(per_step.max()) if n_steps else 0
    start = np.cumsum(per_step) - per_step
    slot = np.arange(all_step.size) - start[step_pos]

    def mat(vals, dtype, fill=0):
        m = np.full((n_steps, width), fill, dtype=dtype)
        m[step_pos, slot] = vals
        return m

    slot_request = mat(new_req, np.int32, -1)
    slot_phase = mat(all_phase, np.int8)
    slot_new = mat(all_new, np.int32)
    slot_prog = mat(all_prog, np.int32)
    slot_prompt = mat(prompt[all_req], np.int32)
    slot_mask = slot_request >= 0
    is_pf = all_phase == PHASE_PREFILL
    num_prefill = np.bincount(step_pos, weights=is_pf, minlength=n_steps).astype(np.int32)
    num_decode = (per_step - num_prefill).astype(np.int32)
    prefill_tokens = np.bincount(
        step_pos, weights=np.where(is_pf, all_new, 0), minlength=n_steps
    ).astype(np.int32)
    decode_tokens = np.bincount(
        step_pos, weights=np.where(is_pf, 0, all_new), minlength=n_steps
    ).astype(np.int32)

    # ---- BATCH_SUMMARY join
    bs, xb = _join_batch_summaries(
        c, step_id, num_prefill, num_decode, prefill_tokens, decode_tokens, source, stats
    )

    # ---- REQUEST_SNAPSHOT cross-check
    xs = _check_snapshots(
        c, step_id, rank, slot_request, slot_phase, slot_new, slot_prog, source, stats
    )

    # ---- event order and label signs per request
    disorder = _check_event_order(
        c,
        ~failed & has,
        (q_ts, sc_ts, ft_ts, fin_ts),
        (q_step, sc_step, ft_step, fin_step),
        gaps_s,
        source,
        stats,
    )
    failed = failed | disorder

    # ---- labels (µs), in queue order
    us = 1e6
    ok = ~failed
    nan = np.full(n_req, np.nan)

    def lab(x):
        return np.where(ok, x * us, nan)

    e2e = lab(fin_ts - q_ts)
    ttft = lab(ft_ts - q_ts)
    with np.errstate(divide="ignore", invalid="ignore"):
        dint = np.where(ok & (out_len >= 2), (e2e - ttft) / (out_len - 1), np.nan)
    api_arr, api_dep = _api_times(c)
    base = [base_request_id(x) for x in c.request_ids]
    arr = np.array([api_arr.get(b, np.nan) for b in base], dtype=np.float64)
    dep = np.array([api_dep.get(b, np.nan) for b in base], dtype=np.float64)
    req = {
        "req_id": np.array(base, dtype=object),
        "req_prompt_len": prompt,
        "req_cached_tokens": cached,
        "req_output_len": out_len,
        "req_max_tokens": max_tokens,
        "req_num_preemptions": npre,
        "req_failed": failed,
        "req_finish_status": status,
        "req_queued_step": q_step,
        "req_scheduled_step": sc_step,
        "req_first_token_step": ft_step,
        "req_finished_step": fin_step,
        "req_queued_ts_us": q_ts * us,
        "req_queueing_us": lab(sc_ts - q_ts),
        "req_ttft_us": ttft,
        "req_e2e_us": e2e,
        "req_processing_us": lab(fin_ts - sc_ts - gaps_s),
        "req_decode_interval_us": dint,
        "req_api_queue_us": lab(q_ts - arr),
        "req_api_depart_us": lab(dep - fin_ts),
    }
    req = {k: v[rank_order] for k, v in req.items()}
    req["req_id"] = req["req_id"].astype(str)
    req["req_finish_status"] = req["req_finish_status"].astype(str)
    stats["requests_without_events"] = int((~has).sum())
    stats["failed"] = int(failed[kept].sum())
    stats["api_joined"] = int(np.isfinite(arr).sum())
    if any(anomalies.values()):
        warnings.warn(
            TraceWarning(
                f"{source}: journey anomalies (counted, handled as documented in "
                f"calib.traces.reconstruct): {anomalies}"
            ),
            stacklevel=2,
        )
    if stats["over_budget_steps"]:
        warnings.warn(
            TraceWarning(
                f"{source}: {stats['over_budget_steps']} steps need more prefill tokens than "
                f"max_num_batched_tokens allows ({stats['over_budget_tokens']} tokens over); "
                f"check max_num_batched_tokens in exp-config.yaml"
            ),
            stacklevel=2,
        )
    return Reconstruction(
        step_id,
        num_prefill,
        num_decode,
        prefill_tokens,
        decode_tokens,
        slot_request,
        slot_phase,
        slot_new,
        slot_prog,
        slot_prompt,
        slot_mask,
        bs,
        req,
        xb,
        xs,
        stats,
    )


def _check_event_order(c, complete, ts, steps, gaps_s, source, stats) -> np.ndarray:
    """Requests (of ``complete``) whose journey order is impossible (module doc).

    ``ts`` and ``steps``: the QUEUED, SCHEDULED, FIRST_TOKEN and FINISHED timestamps (s)
    and steps per request."""
    q_ts, sc_ts, ft_ts, fin_ts = ts
    q_step, sc_step, ft_step, fin_step = steps
    with np.errstate(invalid="ignore"):
        labels = {
            "queueing": sc_ts - q_ts,
            "TTFT": ft_ts - q_ts,
            "E2E": fin_ts - q_ts,
            "first token before scheduling": ft_ts - sc_ts,
            "finish before first token": fin_ts - ft_ts,
            "processing": fin_ts - sc_ts - gaps_s,
        }
        bad = np.zeros(complete.shape, bool)
        for v in labels.values():
            bad |= v < 0
    steps = ~((q_step <= sc_step) & (sc_step <= ft_step) & (ft_step <= fin_step))
    bad = complete & (bad | steps)
    n = int(bad.sum())
    stats["disordered_requests"] = n
    if n:
        lines = getattr(c, "request_lines", None) or []
        shown = []
        for r in np.flatnonzero(bad)[: config.IMPORT_MAX_REQUEST_WARNINGS].tolist():
            what = [f"{k} {v[r]:+.6g} s" for k, v in labels.items() if v[r] < 0]
            if steps[r]:
                what.append(
                    f"steps QUEUED {q_step[r]}, SCHEDULED {sc_step[r]}, "
                    f"FIRST_TOKEN {ft_step[r]}, FINISHED {fin_step[r]}"
                )
            where = f"{source}:{lines[r]}" if r < len(lines) and lines[r] else f"{source}"
            shown.append(f"{where} request {c.request_ids[r]} ({'; '.join(what)})")
        more = "" if n <= len(shown) else f"; {n - len(shown)} more"
        warnings.warn(
            TraceWarning(
                f"{source}: {n} requests with impossible event order (negative queueing, TTFT, "
                f"E2E or processing time) dropped from the labels, their steps kept: "
                + " | ".join(shown)
                + more
            ),
            stacklevel=3,
        )
    return bad


def _allocate_prefills(j_req, j_a, j_b, j_comp, j_need, j_kv0, rank, dec_step, budget_total):
    """Sweep steps in order, splitting prefill jobs over their steps (see module doc)."""
    nj = len(j_req)
    empty = np.zeros(0, np.int64)
    if nj == 0:
        return empty, empty, empty, empty, (0, 0)
    ja = np.asarray(j_a, np.int64)
    jb = np.asarray(j_b, np.int64)
    jr = np.asarray(j_req, np.int64)
    order = np.lexsort((rank[jr], ja)).tolist()
    # The steps the sweep visits: the union of the job ranges (bounded by their lengths).
    jlen = np.maximum(jb - ja + 1, 0)
    offs = np.arange(int(jlen.sum()), dtype=np.int64) - np.repeat(np.cumsum(jlen) - jlen, jlen)
    visit = np.unique(np.repeat(ja, jlen) + offs)
    dec_sorted = np.sort(dec_step)
    ndec = (
        np.searchsorted(dec_sorted, visit, "right") - np.searchsorted(dec_sorted, visit, "left")
    ).tolist()
    rem = list(j_need)
    prog = list(j_kv0)
    out_s, out_r, out_n, out_p = [], [], [], []
    active: list[int] = []
    over_steps = over_tokens = 0
    ji = 0
    for vi, t in enumerate(visit.tolist()):
        while ji < nj and j_a[order[ji]] <= t:
            j = order[ji]
            ji += 1
            if j_b[j] >= j_a[j]:
                active.append(j)
        left = budget_total - ndec[vi]
        done = False
        for j in active:
            if j_b[j] == t and j_comp[j]:
                a = rem[j]
                left -= a
                out_s.append(t)
                out_r.append(j_req[j])
                out_n.append(a)
                out_p.append(prog[j])
                rem[j] = 0
                prog[j] += a
                done = True
        if left < 0:
            over_steps += 1
            over_tokens -= left
            left = 0
        for j in active:
            if left <= 0:
                break
            if rem[j] == 0 or (done and j_b[j] == t and j_comp[j]):
                continue
            a = min(rem[j] - 1, left)
            if a > 0:
                left -= a
                out_s.append(t)
                out_r.append(j_req[j])
                out_n.append(a)
                out_p.append(prog[j])
                rem[j] -= a
                prog[j] += a
        active = [j for j in active if j_b[j] > t]
    i64 = np.int64
    return (
        np.asarray(out_s, i64),
        np.asarray(out_r, i64),
        np.asarray(out_n, i64),
        np.asarray(out_p, i64),
        (over_steps, over_tokens),
    )


_BS_MAP = {  # schema variable -> column of otlp.BATCH_INT_KEYS
    "bs_num_prefill_reqs": 6,
    "bs_num_decode_reqs": 7,
    "bs_scheduled_tokens": 8,
    "bs_prefill_tokens": 9,
    "bs_decode_tokens": 10,
    "bs_num_finished": 11,
    "bs_num_preempted": 12,
    "bs_running_depth": 4,
    "bs_waiting_depth": 5,
    "bs_kv_blocks_total_gpu": 13,
    "bs_kv_blocks_free_gpu": 14,
}


def _join_batch_summaries(
    c, step_id, num_prefill, num_decode, prefill_tokens, decode_tokens, source, stats
):
    n = step_id.size
    bs = {k: np.full(n, -1, np.int32) for k in _BS_MAP}
    bs["bs_ts_start_ns"] = np.full(n, -1, np.int64)
    bs["bs_ts_end_ns"] = np.full(n, -1, np.int64)
    bs["bs_kv_usage_gpu_ratio"] = np.full(n, np.nan)
    bs["duration_us"] = np.full(n, np.nan)
    bs["sampled"] = np.zeros(n, bool)
    b = c.b_int
    stats["batch_summaries"] = int(b.shape[0])
    if b.shape[0] == 0:
        stats.update(batch_duplicates=0, batch_unmatched=0, batch_bad_duration=0, batch_too_long=0)
        return bs, float("nan")
    ids, first = np.unique(b[:, 0], return_index=True)
    ndup = b.shape[0] - ids.size
    first = np.sort(first)
    b = b[first]
    ratio = c.b_kv_ratio[first]
    pos = np.searchsorted(step_id, b[:, 0])
    matched = (
        (pos < n) & (step_id[np.minimum(pos, max(n - 1, 0))] == b[:, 0])
        if n
        else np.zeros(b.shape[0], bool)
    )
    nun = int((~matched).sum())
    b, ratio, pos = b[matched], ratio[matched], pos[matched]
    for k, col in _BS_MAP.items():
        bs[k][pos] = b[:, col]
    bs["bs_ts_start_ns"][pos] = b[:, 2]
    bs["bs_ts_end_ns"][pos] = b[:, 3]
    bs["bs_kv_usage_gpu_ratio"][pos] = ratio
    dur = c.b_dur[first][matched]
    too_long = dur > config.IMPORT_MAX_STEP_DURATION_US
    good = (dur > 0) & ~too_long
    bs["duration_us"][pos[good]] = dur[good]
    bs["sampled"][pos[good]] = True
    nbad = int((dur <= 0).sum())
    nlong = int(too_long.sum())
    stats.update(
        batch_duplicates=int(ndup),
        batch_unmatched=nun,
        batch_bad_duration=nbad,
        batch_too_long=nlong,
    )
    if ndup:
        warnings.warn(
            TraceWarning(
                f"{source}: {ndup} duplicate step.BATCH_SUMMARY step.id values; kept the first "
                f"of each"
            ),
            stacklevel=3,
        )
    if nun:
        warnings.warn(
            TraceWarning(
                f"{source}: {nun} step.BATCH_SUMMARY events name steps with no reconstructed "
                f"batch (no journey covers them); dropped"
            ),
            stacklevel=3,
        )
    if nbad:
        warnings.warn(
            TraceWarning(
                f"{source}: {nbad} step.BATCH_SUMMARY events have step.duration_us <= 0; "
                f"those steps are treated as not sampled"
            ),
            stacklevel=3,
        )
    if nlong:
        worst = float(dur[too_long].max())
        warnings.warn(
            TraceWarning(
                f"{source}: {nlong} step.BATCH_SUMMARY events have step.duration_us above the "
                f"physical bound of {config.IMPORT_MAX_STEP_DURATION_US} µs (1 hour; "
                f"calib.config.IMPORT_MAX_STEP_DURATION_US), largest {worst:.6g} µs "
                f"({worst / 3.6e9:.3g} h); those steps are treated as not sampled"
            ),
            stacklevel=3,
        )
    disagree = np.zeros(pos.size, bool)
    for col, rec in ((6, num_prefill), (7, num_decode), (9, prefill_tokens), (10, decode_tokens)):
        have = b[:, col] >= 0
        disagree |= have & (b[:, col] != rec[pos])
    denom = pos.size + nun
    rate = float((disagree.sum() + nun) / denom) if denom else float("nan")
    stats["batch_disagreements"] = int(disagree.sum())
    if rate > config.CROSSCHECK_WARN_RATE:
        warnings.warn(
            TraceWarning(
                f"{source}: {rate:.1%} of step.BATCH_SUMMARY events disagree with the "
                f"reconstructed batch counts"
            ),
            stacklevel=3,
        )
    return bs, rate


def _check_snapshots(
    c, step_id, rank, slot_request, slot_phase, slot_new, slot_prog, source, stats
):
    ns = len(c.s_req)
    stats["snapshots"] = ns
    if ns == 0:
        return float("nan")
    jid = c.req_index
    by_base: dict[str, int] = {}
    for rid, i in jid.items():
        b = base_request_id(rid)
        by_base[b] = -2 if b in by_base else i
    sreq = np.array([jid.get(x, by_base.get(x, -1)) for x in c.s_req], np.int64)
    s_step = c.s_int[:, 0]
    spos = np.minimum(np.searchsorted(step_id, s_step), max(step_id.size - 1, 0))
    sok = (sreq >= 0) & (step_id[spos] == s_step)
    want = np.where(sreq >= 0, rank[np.maximum(sreq, 0)], -2)
    hit = slot_request[spos] == want[:, None]
    found = sok & hit.any(axis=1)
    col = hit.argmax(axis=1)
    ph, nw, pg = slot_phase[spos, col], slot_new[spos, col], slot_prog[spos, col]
    phase_map = {"PREFILL": PHASE_PREFILL, "DECODE": PHASE_DECODE}
    sphase = np.array([phase_map.get(p, -1) for p in c.s_phase], np.int64)
    sched = c.s_int[:, SNAPSHOT_INT_KEYS.index("request.scheduled_tokens_this_step")]
    comp = c.s_int[:, SNAPSHOT_INT_KEYS.index("request.num_computed_tokens")]
    agree = found & ((sphase < 0) | (sphase == ph))
    agree &= (sched < 0) | (sched == nw)
    agree &= (comp < 0) | (comp == pg) | (comp == pg + nw)
    # A WAITING snapshot of a request not in the batch agrees.
    waiting = np.array([p == "WAITING" for p in c.s_phase]) & ~found & (sched <= 0)
    agree |= waiting
    rate = float((~agree).mean())
    stats["snapshot_disagreements"] = int((~agree).sum())
    if rate > config.CROSSCHECK_WARN_RATE:
        warnings.warn(
            TraceWarning(
                f"{source}: {rate:.1%} of step.REQUEST_SNAPSHOT events disagree with the "
                f"reconstruction"
            ),
            stacklevel=3,
        )
    return rate


def _api_times(c: TraceColumns) -> tuple[dict[str, float], dict[str, float]]:
    """First api.ARRIVED and last api.DEPARTED time (seconds) per base request id."""
    arr: dict[str, float] = {}
    dep: dict[str, float] = {}
    kinds = c.a_kind.tolist()
    ts = c.a_ts.tolist()
    for rid, k, t in zip(c.a_id, kinds, ts, strict=True):
        if k == ARRIVED:
            if rid not in arr or t < arr[rid]:
                arr[rid] = t
        elif k == DEPARTED:
            if rid not in dep or t > dep[rid]:
                dep[rid] = t
    return arr, dep
