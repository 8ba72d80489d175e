"""Write a simulated experiment in the exact on-disk layout of instrumented vLLM.

Layout (see the trace-format spec)::

    <root>/<YYYYMMDD-HHMMSS>-<model-slug>-tp<N>-<workload>/
        exp-config.yaml, profile.yaml, traces.json (or traces.json.gz),
        results/summary_lifecycle_metrics.json

and, separately and only when asked, the truth (for tests; the fit never reads it)::

    <truth_dir>/<experiment dir name>.nc

Conventions chosen where the format leaves freedom (the importer must not rely on
more than the spec says):

* ``traces.json`` lines hold up to :data:`SPANS_PER_LINE` spans, in span end-time
  order, grouped by scope inside a line (``vllm.api``, ``vllm.scheduler``,
  ``vllm.scheduler.step``).
* One ``llm_core`` span per engine lifecycle of a request: a span closes with a
  PREEMPTED event and the next opens with SCHEDULED(RESUME). Its parent is the
  request's ``llm_request`` API span (same traceId).
* Step spans ``scheduler_steps_<k>`` cover steps ``[k·STEPS_PER_SPAN, (k+1)·STEPS_PER_SPAN)``
  (by position, k from 0) and carry the BATCH_SUMMARY events of the sampled steps
  among them plus their REQUEST_SNAPSHOT events (``request.id`` = the engine id
  ``cmpl-<hex>-0-<suffix>``; counts are as seen when the step was scheduled:
  ``num_computed_tokens`` and ``num_output_tokens`` before the step, blocks after
  allocation; ``kv.blocks_cached_gpu`` = prefix-cache blocks hit).
* ``queue.running_depth`` counts the running queue after scheduling (including
  requests that finish in this step), ``kv.*`` the cache after allocation.
"""

from __future__ import annotations

import gzip as gzip_mod
import json
import os
from pathlib import Path

import numpy as np
import yaml

from calib.io import atomic_path, manifest, manifest_to_attr
from calib.simulate.scheduler import (
    EV_FINISHED,
    EV_PREEMPTED,
    EV_SCHEDULED,
    EVENT_PHASES,
    EVENT_TYPES,
    SimResult,
    padded_composition,
)

SPANS_PER_LINE = 32
STEPS_PER_SPAN = 256
_SCOPES = ("vllm.api", "vllm.scheduler", "vllm.scheduler.step")
_RESOURCE = {"attributes": [{"key": "service.name", "value": {"stringValue": "vllm"}}]}
_DUMPS = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def _public(tmp: Path) -> None:
    """Give a temporary file the usual permissions (mkstemp makes it 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)


def experiment_dirname(result: SimResult) -> str:
    """``<YYYYMMDD-HHMMSS>-<model-slug>-tp<N>-<workload>`` of a result."""
    spec = result.spec
    slug = spec.model.rsplit("/", 1)[-1].lower()
    return f"{spec.started}-{slug}-tp{spec.tp}-{spec.workload}"


# ----------------------------------------------------------------- attributes
def _s(k, v):
    return {"key": k, "value": {"stringValue": v}}


def _i(k, v):
    return {"key": k, "value": {"intValue": str(int(v))}}


def _d(k, v):
    return {"key": k, "value": {"doubleValue": float(v)}}


def _ts(ns: int) -> float:
    return ns / 1e9


class _Ids:
    """Deterministic trace/span ids from a seeded generator."""

    def __init__(self, seed_parts):
        self.rng = np.random.default_rng(seed_parts)

    def hex(self, nbytes: int) -> str:
        return bytes(self.rng.integers(0, 256, size=nbytes, dtype=np.uint8)).hex()


def _journey_spans(res: SimResult):
    """Yield (end_ns, scope, kind-tag, payload) descriptors of llm_core spans."""
    ev = res.events
    order = np.lexsort((np.arange(ev["request"].size), ev["request"]))
    reqs = ev["request"][order]
    bounds = np.flatnonzero(np.diff(reqs)) + 1
    starts = np.concatenate([[0], bounds]) if reqs.size else np.zeros(0, np.int64)
    ends = np.concatenate([bounds, [reqs.size]]) if reqs.size else np.zeros(0, np.int64)
    out = []
    types = ev["type"]
    for a, b in zip(starts, ends, strict=True):
        idx = order[a:b]
        seg_start = 0
        for j in range(idx.size):
            if types[idx[j]] == EV_PREEMPTED or j == idx.size - 1:
                seg = idx[seg_start : j + 1]
                out.append((int(ev["ts_ns"][seg[-1]]), 1, seg))
                seg_start = j + 1
    return out


def _event_attrs_journey(res, e, prompt_len, max_tokens):
    ev = res.events
    typ = int(ev["type"][e])
    ts = int(ev["ts_ns"][e])
    attrs = [
        _s("event.type", EVENT_TYPES[typ]),
        _d("ts.monotonic", _ts(ts)),
        _i("ts.monotonic_ns", ts),
        _i("scheduler.step", ev["step"][e]),
        _s("phase", EVENT_PHASES[int(ev["phase"][e])]),
        _i("prefill.done_tokens", ev["prefill_done"][e]),
        _i("prefill.total_tokens", prompt_len),
        _i("decode.done_tokens", ev["decode_done"][e]),
        _i("decode.max_tokens", max_tokens),
        _i("num_preemptions", ev["num_preemptions"][e]),
    ]
    if typ == EV_SCHEDULED:
        attrs.append(_s("schedule.kind", "RESUME" if ev["resume"][e] else "FIRST"))
    elif typ == EV_FINISHED:
        attrs.append(_s("finish.status", "length"))
    return {
        "timeUnixNano": str(ts + res.unix_offset_ns),
        "name": "journey." + EVENT_TYPES[typ],
        "attributes": attrs,
    }


def _step_span(res: SimResult, k: int, snap_by_step: dict, ids: _Ids, trace_id: str) -> dict:
    st, comp, rq = res.steps, res.comp, res.requests
    lo, hi = k * STEPS_PER_SPAN, min((k + 1) * STEPS_PER_SPAN, st["id"].size)
    total = res.kv_blocks_total
    events = []
    for i in np.flatnonzero(st["sampled"][lo:hi]) + lo:
        end = int(st["end_ns"][i])
        free = int(st["kv_blocks_free"][i])
        attrs = [
            _i("step.id", st["id"][i]),
            _i("step.ts_start_ns", st["start_ns"][i]),
            _i("step.ts_end_ns", end),
            _i("step.duration_us", st["duration_us_int"][i]),
            _i("queue.running_depth", st["running_depth"][i]),
            _i("queue.waiting_depth", st["waiting_depth"][i]),
            _i("batch.num_prefill_reqs", st["num_prefill"][i]),
            _i("batch.num_decode_reqs", st["num_decode"][i]),
            _i(
                "batch.scheduled_tokens", int(st["prefill_tokens"][i]) + int(st["decode_tokens"][i])
            ),
            _i("batch.prefill_tokens", st["prefill_tokens"][i]),
            _i("batch.decode_tokens", st["decode_tokens"][i]),
            _i("batch.num_finished", st["num_finished"][i]),
            _i("batch.num_preempted", st["num_preempted"][i]),
            _d("kv.usage_gpu_ratio", (total - free) / total if total else 0.0),
            _i("kv.blocks_total_gpu", total),
            _i("kv.blocks_free_gpu", free),
        ]
        tun = str(end + res.unix_offset_ns)
        events.append({"timeUnixNano": tun, "name": "step.BATCH_SUMMARY", "attributes": attrs})
        for j in snap_by_step.get(int(i), ()):
            r = int(comp["request"][j])
            prog, new = int(comp["progress"][j]), int(comp["new_tokens"][j])
            plen, cached = int(comp["prompt_len"][j]), int(comp["cached_blocks"][j])
            sattrs = [
                _i("step.id", st["id"][i]),
                _s("request.id", f"{rq['id'][r]}-0-{rq['suffix'][r]}"),
                _s("request.phase", "DECODE" if comp["phase"][j] == 2 else "PREFILL"),
                _i("request.num_prompt_tokens", plen),
                _i("request.num_computed_tokens", prog),
                _i("request.num_output_tokens", comp["num_output"][j]),
                _i("request.num_preemptions", comp["num_preemptions"][j]),
                _i("request.scheduled_tokens_this_step", new),
                _i("kv.blocks_allocated_gpu", comp["blocks"][j]),
                _i("kv.blocks_cached_gpu", cached),
                _i("request.effective_prompt_len", plen - 16 * cached),
            ]
            events.append(
                {"timeUnixNano": tun, "name": "step.REQUEST_SNAPSHOT", "attributes": sattrs}
            )
    start = int(st["start_ns"][lo]) + res.unix_offset_ns
    end = int(st["end_ns"][hi - 1]) + res.unix_offset_ns
    return {
        "traceId": trace_id,
        "spanId": ids.hex(8),
        "name": f"scheduler_steps_{k}",
        "kind": 1,
        "startTimeUnixNano": str(start),
        "endTimeUnixNano": str(end),
        "attributes": [],
        "events": events,
    }


def iter_trace_lines(res: SimResult):
    """Yield the lines (str, no newline) of traces.json for a result, in order."""
    rq, ev = res.requests, res.events
    ids = _Ids([res.seed, res.spec.seed_offset, 7])
    N = rq["prompt_len"].size
    trace_ids = [ids.hex(16) for _ in range(N)]
    api_span_ids = [ids.hex(8) for _ in range(N)]
    off = res.unix_offset_ns

    desc = []  # (end_ns, scope, payload)
    for r in range(N):
        if rq["departed_ns"][r] >= 0:
            desc.append((int(rq["departed_ns"][r]), 0, r))
    desc.extend(_journey_spans(res))
    S = res.steps["id"].size
    nchunks = -(-S // STEPS_PER_SPAN)
    for k in range(nchunks):
        last = min((k + 1) * STEPS_PER_SPAN, S) - 1
        desc.append((int(res.steps["end_ns"][last]), 2, k))
    desc.sort(key=lambda d: (d[0], d[1]))

    comp = res.comp
    snap_idx = np.flatnonzero(comp["snapshot"])
    step_of = np.searchsorted(comp["offsets"], snap_idx, side="right") - 1
    snap_by_step: dict[int, list[int]] = {}
    for j, s in zip(snap_idx, step_of, strict=True):
        snap_by_step.setdefault(int(s), []).append(int(j))
    step_trace = ids.hex(16)

    def api_span(r):
        a, d = int(rq["arrived_ns"][r]), int(rq["departed_ns"][r])
        return {
            "traceId": trace_ids[r],
            "spanId": api_span_ids[r],
            "name": "llm_request",
            "kind": 2,
            "startTimeUnixNano": str(a + off),
            "endTimeUnixNano": str(d + off),
            "attributes": [
                _s("gen_ai.request.id", rq["id"][r]),
                _s("http.route", "/v1/completions"),
                _i("gen_ai.usage.prompt_tokens", rq["prompt_len"][r]),
                _i("gen_ai.request.max_tokens", rq["output_len"][r]),
            ],
            "events": [
                {
                    "timeUnixNano": str(a + off),
                    "name": "api.ARRIVED",
                    "attributes": [_d("event.ts.monotonic", _ts(a))],
                },
                {
                    "timeUnixNano": str(d + off),
                    "name": "api.DEPARTED",
                    "attributes": [_d("event.ts.monotonic", _ts(d))],
                },
            ],
        }

    def core_span(seg):
        r = int(ev["request"][seg[0]])
        plen, mx = int(rq["prompt_len"][r]), int(rq["output_len"][r])
        events = [_event_attrs_journey(res, int(e), plen, mx) for e in seg]
        return {
            "traceId": trace_ids[r],
            "spanId": ids.hex(8),
            "parentSpanId": api_span_ids[r],
            "name": "llm_core",
            "kind": 1,
            "startTimeUnixNano": events[0]["timeUnixNano"],
            "endTimeUnixNano": events[-1]["timeUnixNano"],
            "attributes": [_s("gen_ai.request.id", f"{rq['id'][r]}-0-{rq['suffix'][r]}")],
            "events": events,
        }

    for a in range(0, len(desc), SPANS_PER_LINE):
        by_scope: dict[int, list] = {}
        for _, scope, payload in desc[a : a + SPANS_PER_LINE]:
            if scope == 0:
                span = api_span(payload)
            elif scope == 1:
                span = core_span(payload)
            else:
                span = _step_span(res, payload, snap_by_step, ids, step_trace)
            by_scope.setdefault(scope, []).append(span)
        line = {
            "resourceSpans": [
                {
                    "resource": _RESOURCE,
                    "scopeSpans": [
                        {"scope": {"name": _SCOPES[s]}, "spans": spans}
                        for s, spans in sorted(by_scope.items())
                    ],
                }
            ]
        }
        yield _DUMPS(line)


# ------------------------------------------------------------ client metrics
_PCTS = (
    ("p0.1", 0.1),
    ("p1", 1),
    ("p5", 5),
    ("p10", 10),
    ("p25", 25),
    ("median", 50),
    ("p75", 75),
    ("p90", 90),
    ("p95", 95),
    ("p99", 99),
    ("p99.9", 99.9),
)


def _dist(x) -> dict:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return {k: None for k in ("mean", "min", *(p for p, _ in _PCTS), "max")}
    out = {"mean": float(x.mean()), "min": float(x.min())}
    q = np.percentile(x, [p for _, p in _PCTS])
    out.update({name: float(v) for (name, _), v in zip(_PCTS, q, strict=True)})
    out["max"] = float(x.max())
    return out


def client_metrics(res: SimResult) -> dict:
    """inference-perf style lifecycle metrics (seconds), with the streaming quirk.

    The client receives two streamed events per generated token (the second a
    few tens of µs after the first), so its ``inter_token_latency`` samples
    alternate between the true token interval and ~50 µs and its
    ``time_per_output_token`` is (E2E − TTFT) / (2·output_len − 1): both read
    about half the true decode interval.
    """
    rq, comp, st = res.requests, res.comp, res.steps
    ok = rq["departed_ns"] >= 0
    rng = np.random.default_rng([res.seed, res.spec.seed_offset, 11])
    net = rng.lognormal(np.log(0.25e6), 0.3, size=ok.size)  # client-side network, ns
    lat = (rq["departed_ns"] - rq["arrived_ns"] + net) / 1e9
    ttft = (rq["first_token_ns"] - rq["arrived_ns"] + net) / 1e9
    out = rq["output_len"].astype(np.float64)
    tpot = np.where(out > 1, (lat - ttft) / np.maximum(2 * out - 1, 1), 0.0)
    # token emission times: entries that complete all known tokens
    makes_tok = (
        comp["progress"].astype(np.int64) + comp["new_tokens"]
        == comp["prompt_len"].astype(np.int64) + comp["num_output"]
    )
    step_of = np.repeat(np.arange(st["id"].size), np.diff(comp["offsets"]))
    tr = comp["request"][makes_tok]
    tt = st["end_ns"][step_of[makes_tok]]
    o = np.lexsort((tt, tr))
    tr, tt = tr[o], tt[o]
    same = tr[1:] == tr[:-1]
    gaps = (tt[1:] - tt[:-1])[same] / 1e9
    small = rng.lognormal(np.log(50e-6), 0.4, size=gaps.size)
    itl = np.concatenate([gaps, small])
    t0 = rq["arrived_ns"].min() if ok.any() else 0
    t1 = rq["departed_ns"][ok].max() if ok.any() else 1
    span_s = max((t1 - t0) / 1e9, 1e-9)
    n_ok = int(ok.sum())
    return {
        "load_summary": {"count": int(ok.size), "schedule_delay": _dist(np.zeros(0))},
        "successes": {
            "count": n_ok,
            "latency": {
                "request_latency": _dist(lat[ok]),
                "time_to_first_token": _dist(ttft[ok]),
                "time_per_output_token": _dist(tpot[ok]),
                "inter_token_latency": _dist(itl),
            },
            "prompt_len": _dist(rq["prompt_len"][ok]),
            "output_len": _dist(rq["output_len"][ok]),
            "throughput": {
                "input_tokens_per_sec": float(rq["prompt_len"][ok].sum() / span_s),
                "output_tokens_per_sec": float(rq["output_len"][ok].sum() / span_s),
                "total_tokens_per_sec": float(
                    (rq["prompt_len"][ok].sum() + rq["output_len"][ok].sum()) / span_s
                ),
                "requests_per_sec": float(n_ok / span_s),
            },
        },
        "failures": {
            "count": int((~ok).sum()),
            "request_latency": _dist(np.zeros(0)),
            "prompt_len": _dist(np.zeros(0)),
        },
    }


# ------------------------------------------------------------------- writing
def exp_config(res: SimResult) -> dict:
    s = res.spec
    return {
        "model": s.model,
        "tensor_parallelism": s.tp,
        "max_model_len": s.max_model_len,
        "max_num_batched_tokens": s.max_num_batched_tokens,
        "max_num_seqs": s.max_num_seqs,
        "app": s.workload,
        "hardware": s.hardware,
        "gpu_memory_utilization": s.gpu_memory_utilization,
        "enable_prefix_caching": bool(s.enable_prefix_caching),
    }


def write_experiment(
    result: SimResult, root: str | Path, *, truth_dir: str | Path | None = None, gzip: bool = False
) -> Path:
    """Write one experiment directory under ``root`` (and its truth under ``truth_dir``).

    Every file is streamed to a temporary name and renamed into place.
    ``gzip=True`` writes ``traces.json.gz`` instead of ``traces.json`` (the other
    variant, if present from an earlier run, is removed). Returns the directory.
    """
    d = Path(root) / experiment_dirname(result)
    d.mkdir(parents=True, exist_ok=True)
    with atomic_path(d / "exp-config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(exp_config(result), sort_keys=False), encoding="utf-8")
        _public(tmp)
    with atomic_path(d / "profile.yaml") as tmp:
        tmp.write_text(
            json.dumps(result.spec.profile(), separators=(",", ":")) + "\n", encoding="utf-8"
        )
        _public(tmp)
    name = "traces.json.gz" if gzip else "traces.json"
    with atomic_path(d / name) as tmp:
        if gzip:
            with (
                open(tmp, "wb") as raw,
                gzip_mod.GzipFile(
                    filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0
                ) as f,
            ):
                buf = []
                for line in iter_trace_lines(result):
                    buf.append(line)
                    if len(buf) >= 64:
                        f.write(("\n".join(buf) + "\n").encode("utf-8"))
                        buf = []
                if buf:
                    f.write(("\n".join(buf) + "\n").encode("utf-8"))
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for line in iter_trace_lines(result):
                    f.write(line)
                    f.write("\n")
        _public(tmp)
    other = d / ("traces.json" if gzip else "traces.json.gz")
    if other.exists():
        os.remove(other)
    with atomic_path(d / "results" / "summary_lifecycle_metrics.json") as tmp:
        tmp.write_text(json.dumps(client_metrics(result), indent=2) + "\n", encoding="utf-8")
        _public(tmp)
    if truth_dir is not None:
        write_truth(result, Path(truth_dir) / f"{d.name}.nc")
    return d


def truth_dataset(result: SimResult):
    """The truth of one experiment as an xarray Dataset (see :func:`write_truth`)."""
    import xarray as xr

    st, rq = result.steps, result.requests
    pb = padded_composition(result.comp)
    W = pb.mask.shape[1]
    sreq = np.full(pb.mask.shape, -1, np.int32)
    off = result.comp["offsets"]
    counts = np.diff(off)
    rows = np.repeat(np.arange(counts.size), counts)
    cols = np.arange(off[-1]) - np.repeat(off[:-1], counts)
    sreq[rows, cols] = result.comp["request"]
    K = ("step", "slot")
    data = {
        "step_id": (("step",), st["id"]),
        "duration_us": (("step",), st["duration_us"]),
        "duration_us_int": (("step",), st["duration_us_int"]),
        "start_ns": (("step",), st["start_ns"]),
        "end_ns": (("step",), st["end_ns"]),
        "sampled": (("step",), st["sampled"]),
        **{
            k: (("step",), st[k])
            for k in (
                "running_depth",
                "waiting_depth",
                "num_prefill",
                "num_decode",
                "prefill_tokens",
                "decode_tokens",
                "num_finished",
                "num_preempted",
                "kv_blocks_free",
            )
        },
        "slot_request": (K, sreq),
        "slot_phase": (K, pb.phase),
        "slot_new_tokens": (K, pb.new_tokens),
        "slot_progress": (K, pb.progress),
        "slot_prompt_len": (K, pb.prompt_len),
        "slot_mask": (K, pb.mask),
        "req_id": (("request",), rq["id"].astype(str)),
        "req_engine_id": (
            ("request",),
            np.asarray(
                [f"{i}-0-{s}" for i, s in zip(rq["id"], rq["suffix"], strict=True)], dtype=str
            ),
        ),
    }
    for k in (
        "system_prompt",
        "prompt_len",
        "output_len",
        "arrived_ns",
        "queued_ns",
        "departed_ns",
        "scheduled_ns",
        "first_token_ns",
        "finished_ns",
        "queued_step",
        "scheduled_step",
        "first_token_step",
        "finished_step",
        "cached_tokens",
        "num_preemptions",
    ):
        data[f"req_{k}"] = (("request",), rq[k])
    ds = xr.Dataset(data, coords={"slot": np.arange(W)})
    ds.attrs.update(
        {
            "experiment": experiment_dirname(result),
            "spec_json": json.dumps(result.spec.to_dict(), sort_keys=True),
            "seed": int(result.seed),
            "kv_blocks_total": int(result.kv_blocks_total),
            "mono_base_ns": str(result.mono_base_ns),
            "unix_offset_ns": str(result.unix_offset_ns),
            "truth_params_json": result.truth_params,
            "manifest": manifest_to_attr(manifest(kind="simulation-truth", seed=int(result.seed))),
            "doc": (
                "True step durations (float µs; duration_us_int == step.duration_us written), "
                "padded compositions (slot_* as calib.traces.schema; slot_request indexes the "
                "request dim), request timings (monotonic ns, -1 = never)."
            ),
        }
    )
    return ds


def write_truth(result: SimResult, path: str | Path) -> Path:
    """Write the truth NetCDF of one experiment atomically (zlib-compressed)."""
    ds = truth_dataset(result)
    enc = {v: {"zlib": True, "complevel": 4} for v in ds.data_vars if ds[v].dtype.kind in "iufb"}
    path = Path(path)
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine="netcdf4", encoding=enc)
        _public(tmp)
    return path
