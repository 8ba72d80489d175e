"""Streaming reader of ``traces.json`` (OTLP JSON lines, optionally gzip-compressed).

Each non-empty line is one ``{"resourceSpans": [...]}`` object. Lines are read one at
a time (memory is bounded by the longest line plus the columns kept), parsed with
``orjson`` when it is importable (falls back to the standard ``json``), and dispatched
on the scope name:

``vllm.scheduler``       ``llm_core`` spans: request journey events (one request may
                         have several spans and its events may be spread over lines).
``vllm.api``             ``llm_request`` spans: api.ARRIVED / DEPARTED / ABORTED.
``vllm.scheduler.step``  step.BATCH_SUMMARY and step.REQUEST_SNAPSHOT events.

Other scopes, span names, event names and attribute keys are ignored. Values of
attributes the importer uses are checked strictly (``intValue`` must be a
string-encoded integer, ``doubleValue`` a finite number, ``stringValue`` a string);
values of attributes it does not use are not inspected.

An ``intValue`` of a used attribute must fit a signed 64-bit integer; only
``step.duration_us`` may be larger (kept as a float, so the importer can reject an
impossible duration stating its real value instead of a wrapped-around one).

A malformed line (invalid or truncated JSON, wrong structure, a used attribute
missing, of the wrong type or out of the 64-bit range) is skipped *as a whole* --
nothing from it is kept -- with a :class:`TraceWarning` naming the file and line
number, and counted in :attr:`TraceColumns.num_bad_lines`. After
``IMPORT_MAX_LINE_WARNINGS`` per-line warnings the remaining ones are summarised in one
warning at the end of the file.

Two entry points share one line parser:

* :func:`read_traces` -- the fast path: everything in columns (numpy arrays).
* :func:`iter_records` -- typed records (:class:`JourneyEvent`, :class:`ApiEvent`,
  :class:`BatchSummary`, :class:`RequestSnapshot`) one at a time, for inspection.

Speed: the cyclic garbage collector is paused while a file is read (it would rescan
the growing columns on every few thousand decoder allocations: quadratic), the
attribute list of an event becomes a dict in C (``dict(map(itemgetter(...)))``) and
the common case is validated in bulk with a precise slow path only on failure. A
large uncompressed file can be split into line ranges parsed by several processes
(``read_traces(..., workers=N)``).
"""

from __future__ import annotations

import gc
import gzip
import math
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from calib import config
from calib.errors import CalibError
from calib.io import worker_signals

try:  # optional accelerator: ~3x faster JSON parsing
    import orjson as _orjson

    _loads = _orjson.loads
    _JSON_ERRORS: tuple[type[Exception], ...] = (_orjson.JSONDecodeError, ValueError)
    JSON_BACKEND = "orjson"
except ImportError:  # pragma: no cover - depends on the environment
    import json as _json

    _loads = _json.loads
    _JSON_ERRORS = (ValueError, UnicodeDecodeError)
    JSON_BACKEND = "json"


class TraceWarning(UserWarning):
    """A problem in trace input that the importer skipped or worked around (counted)."""


# Journey event codes (``JourneyEvent.kind``).
QUEUED, SCHEDULED, FIRST_TOKEN, PREEMPTED, FINISHED = range(5)
JOURNEY_NAMES = ("QUEUED", "SCHEDULED", "FIRST_TOKEN", "PREEMPTED", "FINISHED")
_JOURNEY_CODES = {f"journey.{n}": i for i, n in enumerate(JOURNEY_NAMES)}
# API event codes.
ARRIVED, DEPARTED, ABORTED = range(3)
API_NAMES = ("ARRIVED", "DEPARTED", "ABORTED")
_API_CODES = {f"api.{n}": i for i, n in enumerate(API_NAMES)}

#: BATCH_SUMMARY integer attributes, in column order (all but step.id optional: -1).
BATCH_INT_KEYS = (
    "step.id",
    "step.duration_us",
    "step.ts_start_ns",
    "step.ts_end_ns",
    "queue.running_depth",
    "queue.waiting_depth",
    "batch.num_prefill_reqs",
    "batch.num_decode_reqs",
    "batch.scheduled_tokens",
    "batch.prefill_tokens",
    "batch.decode_tokens",
    "batch.num_finished",
    "batch.num_preempted",
    "kv.blocks_total_gpu",
    "kv.blocks_free_gpu",
)
#: REQUEST_SNAPSHOT integer attributes (step.id required, others optional: -1).
SNAPSHOT_INT_KEYS = (
    "step.id",
    "request.num_prompt_tokens",
    "request.num_computed_tokens",
    "request.num_output_tokens",
    "request.num_preemptions",
    "request.scheduled_tokens_this_step",
    "kv.blocks_allocated_gpu",
    "kv.blocks_cached_gpu",
    "request.effective_prompt_len",
)
#: Journey integer attributes (all required on every journey event).
JOURNEY_INT_KEYS = (
    "scheduler.step",
    "prefill.done_tokens",
    "prefill.total_tokens",
    "decode.done_tokens",
    "decode.max_tokens",
    "num_preemptions",
)


# ----------------------------------------------------------------------------- records
class JourneyEvent(NamedTuple):
    request_id: str  # gen_ai.request.id of the llm_core span (cmpl-<id>-0-<suffix>)
    kind: int  # QUEUED .. FINISHED
    ts_s: float  # ts.monotonic (seconds)
    step: int  # scheduler.step
    prefill_done: int
    prefill_total: int
    decode_done: int
    decode_max: int
    num_preemptions: int
    resume: int  # schedule.kind: 1 RESUME, 0 FIRST, -1 absent
    finish_status: str  # finish.status ('' if absent)
    phase: str  # phase ('' if absent)


class ApiEvent(NamedTuple):
    request_id: str  # base id cmpl-<id>
    kind: int  # ARRIVED / DEPARTED / ABORTED
    ts_s: float  # event.ts.monotonic (seconds)


class BatchSummary(NamedTuple):
    values: dict[str, int | float]  # BATCH_INT_KEYS plus kv.usage_gpu_ratio


class RequestSnapshot(NamedTuple):
    request_id: str
    phase: str
    values: dict[str, int]  # SNAPSHOT_INT_KEYS


class _Bad(Exception):
    """A malformed line (internal)."""


_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


# ---------------------------------------------------------------------- value decoding
def _int(d: dict, key: str) -> int:
    v = _int_unbounded(d, key)
    if not _I64_MIN <= v <= _I64_MAX:
        raise _Bad(f"attribute {key!r}: intValue {v} is outside the 64-bit integer range")
    return v


def _int_unbounded(d: dict, key: str) -> int:
    try:
        s = d[key]["intValue"]
    except KeyError:
        raise _Bad(f"attribute {key!r} missing or not an intValue") from None
    except TypeError:
        raise _Bad(f"attribute {key!r} value is not an object") from None
    if s.__class__ is not str:
        raise _Bad(f"attribute {key!r}: intValue must be a string-encoded integer, got {s!r}")
    try:
        return int(s)
    except ValueError:
        raise _Bad(f"attribute {key!r}: intValue {s!r} is not an integer") from None


def _int_opt(d: dict, key: str) -> int:
    return _int(d, key) if key in d else -1


def _float(d: dict, key: str, value_key: str = "doubleValue") -> float:
    try:
        x = d[key][value_key]
    except KeyError:
        raise _Bad(f"attribute {key!r} missing or not a {value_key}") from None
    except TypeError:
        raise _Bad(f"attribute {key!r} value is not an object") from None
    cls = x.__class__
    if cls is not float and cls is not int:
        raise _Bad(f"attribute {key!r}: {value_key} must be a number, got {x!r}")
    x = float(x)
    if not math.isfinite(x):
        raise _Bad(f"attribute {key!r}: {value_key} is not finite ({x!r})")
    return x


def _str(d: dict, key: str, default: str | None = None) -> str:
    v = d.get(key)
    if v is None:
        if default is None:
            raise _Bad(f"attribute {key!r} missing")
        return default
    try:
        s = v["stringValue"]
    except KeyError:
        raise _Bad(f"attribute {key!r} is not a stringValue") from None
    except TypeError:
        raise _Bad(f"attribute {key!r} value is not an object") from None
    if s.__class__ is not str:
        raise _Bad(f"attribute {key!r}: stringValue must be a string, got {s!r}")
    return s


_KV = itemgetter("key", "value")
_J_GET = itemgetter(*JOURNEY_INT_KEYS)


def _attrs(lst) -> dict:
    if lst.__class__ is not list:
        raise _Bad("attributes is not a list")
    return dict(map(_KV, lst))


# ---------------------------------------------------------------------------- columns
#: A column that is a list while parsing and a numpy array after ``TraceColumns.finish``.
_Column = Any


@dataclass
class TraceColumns:
    """Everything one traces.json holds that the importer uses, column-wise.

    Journey columns are aligned (one entry per journey event, file order);
    ``j_req`` indexes ``request_ids`` (journey ids in order of first appearance).
    After :meth:`finish` the list columns are numpy arrays.
    """

    path: str = ""
    request_ids: list[str] = field(default_factory=list)
    req_index: dict[str, int] = field(default_factory=dict)
    j_req: _Column = field(default_factory=list)
    j_kind: _Column = field(default_factory=list)
    j_ts: _Column = field(default_factory=list)
    #: flat JOURNEY_INT_KEYS values, 6 per event (split into j_step .. j_npre by finish()).
    j_ints: list = field(default_factory=list)
    j_resume: _Column = field(default_factory=list)
    j_status: list = field(default_factory=list)
    a_id: list = field(default_factory=list)
    a_kind: _Column = field(default_factory=list)
    a_ts: _Column = field(default_factory=list)
    #: BATCH_SUMMARY rows, flat: BATCH_INT_KEYS values + kv.usage_gpu_ratio (NaN) per row.
    b_rows: list = field(default_factory=list)
    s_req: list = field(default_factory=list)  # REQUEST_SNAPSHOT request.id
    s_phase: list = field(default_factory=list)
    s_rows: list = field(default_factory=list)  # flat SNAPSHOT_INT_KEYS values per row
    #: per request (aligned with ``request_ids``): line of its first journey event.
    request_lines: list = field(default_factory=list)
    #: line being parsed (set by the reader; names requests in warnings).
    lineno: int = 0
    num_lines: int = 0
    num_bad_lines: int = 0
    #: (line number, reason) of the first bad lines (all of them are counted).
    bad_lines: list = field(default_factory=list)

    _LISTS = (
        "j_req",
        "j_kind",
        "j_ts",
        "j_ints",
        "j_resume",
        "j_status",
        "a_id",
        "a_kind",
        "a_ts",
        "b_rows",
        "s_req",
        "s_phase",
        "s_rows",
    )

    def _mark(self) -> tuple:
        return tuple(len(getattr(self, n)) for n in self._LISTS), len(self.request_ids)

    def _rollback(self, mark: tuple) -> None:
        lens, nreq = mark
        for n, k in zip(self._LISTS, lens, strict=True):
            del getattr(self, n)[k:]
        for rid in self.request_ids[nreq:]:
            del self.req_index[rid]
        del self.request_ids[nreq:]
        del self.request_lines[nreq:]

    def finish(self) -> TraceColumns:
        """Convert the list columns to numpy arrays (in place); returns self."""
        ji = np.asarray(self.j_ints, dtype=np.int64).reshape(-1, len(JOURNEY_INT_KEYS))
        (
            self.j_step,
            self.j_pf_done,
            self.j_pf_total,
            self.j_dc_done,
            self.j_dc_max,
            self.j_npre,
        ) = (np.ascontiguousarray(ji[:, k]) for k in range(ji.shape[1]))
        self.j_ints = []
        self.j_req = np.asarray(self.j_req, dtype=np.int64)
        self.j_kind = np.asarray(self.j_kind, dtype=np.int8)
        self.j_resume = np.asarray(self.j_resume, dtype=np.int8)
        self.j_ts = np.asarray(self.j_ts, dtype=np.float64)
        self.a_kind = np.asarray(self.a_kind, dtype=np.int8)
        self.a_ts = np.asarray(self.a_ts, dtype=np.float64)
        nb = len(BATCH_INT_KEYS)
        b = np.asarray(self.b_rows, dtype=np.float64).reshape(-1, nb + 1)
        #: step.duration_us as float64: the one integer that may exceed int64 (rejected
        #: later as impossible, with its real value).
        self.b_dur = b[:, 1].copy()
        b[:, 1] = np.clip(b[:, 1], -1.0, 2.0**62)
        self.b_int = b[:, :nb].astype(np.int64)
        self.b_kv_ratio = b[:, nb]
        self.b_rows = []
        self.s_int = np.asarray(self.s_rows, dtype=np.int64).reshape(-1, len(SNAPSHOT_INT_KEYS))
        self.s_rows = []
        return self


# ------------------------------------------------------------------------ line parser
def _journey_spans(spans, c: TraceColumns, keep_phase: list | None) -> None:
    req_index = c.req_index
    for sp in spans:
        if sp["name"] != "llm_core":
            continue
        rid = _str(_attrs(sp["attributes"]), "gen_ai.request.id")
        events = sp.get("events")
        if not events:
            continue
        if events.__class__ is not list:
            raise _Bad("span events is not a list")
        idx = req_index.get(rid)
        if idx is None:
            idx = req_index[rid] = len(c.request_ids)
            c.request_ids.append(rid)
            c.request_lines.append(c.lineno)
        for ev in events:
            kind = _JOURNEY_CODES.get(ev["name"])
            if kind is None:
                continue
            d = dict(map(_KV, ev["attributes"]))
            try:  # fast path; the slow path below names what is wrong
                raw = [v["intValue"] for v in _J_GET(d)]
                ts = d["ts.monotonic"]["doubleValue"]
                ints = list(map(int, raw))
                "".join(raw)  # TypeError unless all are strings
                if max(ints) > _I64_MAX or min(ints) < _I64_MIN:
                    raise TypeError
                if ts.__class__ is not float or ts - ts != 0.0:
                    raise TypeError
            except (KeyError, TypeError, ValueError):
                ints = [_int(d, k) for k in JOURNEY_INT_KEYS]
                ts = _float(d, "ts.monotonic")
            c.j_ts.append(ts)
            c.j_ints.extend(ints)
            c.j_req.append(idx)
            c.j_kind.append(kind)
            if kind == SCHEDULED:
                sk = _str(d, "schedule.kind", "")
                c.j_resume.append(1 if sk == "RESUME" else (0 if sk else -1))
            else:
                c.j_resume.append(-1)
            c.j_status.append(_str(d, "finish.status", "") if kind == FINISHED else "")
            if keep_phase is not None:
                keep_phase.append(_str(d, "phase", ""))


def _api_spans(spans, c: TraceColumns, keep_phase: list | None) -> None:
    for sp in spans:
        events = sp.get("events")
        if not events:
            continue
        rid = _str(_attrs(sp["attributes"]), "gen_ai.request.id")
        if events.__class__ is not list:
            raise _Bad("span events is not a list")
        for ev in events:
            kind = _API_CODES.get(ev["name"])
            if kind is None:
                continue
            d = _attrs(ev["attributes"])
            c.a_ts.append(_float(d, "event.ts.monotonic"))
            c.a_id.append(rid)
            c.a_kind.append(kind)


def _step_spans(spans, c: TraceColumns, keep_phase: list | None) -> None:
    for sp in spans:
        events = sp.get("events")
        if not events:
            continue
        if events.__class__ is not list:
            raise _Bad("span events is not a list")
        for ev in events:
            name = ev["name"]
            if name == "step.BATCH_SUMMARY":
                d = _attrs(ev["attributes"])
                row: list[float] = [_int(d, "step.id"), _int_unbounded(d, "step.duration_us")]
                row.extend([_int_opt(d, k) for k in BATCH_INT_KEYS[2:]])
                row.append(
                    _float(d, "kv.usage_gpu_ratio") if "kv.usage_gpu_ratio" in d else math.nan
                )
                c.b_rows.extend(row)
            elif name == "step.REQUEST_SNAPSHOT":
                d = _attrs(ev["attributes"])
                row = [_int(d, "step.id")]
                row.extend([_int_opt(d, k) for k in SNAPSHOT_INT_KEYS[1:]])
                c.s_req.append(_str(d, "request.id"))
                c.s_phase.append(_str(d, "request.phase", ""))
                c.s_rows.extend(row)


_SCOPES = {
    "vllm.scheduler": _journey_spans,
    "vllm.api": _api_spans,
    "vllm.scheduler.step": _step_spans,
}


def _parse_line(raw: bytes, c: TraceColumns, keep_phase: list | None = None) -> None:
    try:
        obj = _loads(raw)
    except _JSON_ERRORS as exc:
        raise _Bad(f"invalid JSON ({str(exc).splitlines()[0][:80]})") from None
    if obj.__class__ is not dict:
        raise _Bad('line is not a JSON object {"resourceSpans": [...]}')
    try:
        rs_list = obj["resourceSpans"]
        if rs_list.__class__ is not list:
            raise _Bad("resourceSpans is not a list")
        for rs in rs_list:
            for ss in rs.get("scopeSpans") or ():
                handler = _SCOPES.get(ss["scope"]["name"])
                if handler is not None:
                    spans = ss.get("spans") or ()
                    if spans.__class__ is not list:
                        raise _Bad("spans is not a list")
                    handler(spans, c, keep_phase)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else "unexpected structure"
        raise _Bad(f"wrong OTLP structure ({what})") from None


def _open_lines(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _iter_raw(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        f = _open_lines(path)
    except FileNotFoundError:
        raise CalibError("trace file not found", path=path) from None
    except OSError as exc:
        raise CalibError(f"cannot open trace file ({exc.strerror or exc})", path=path) from None
    try:
        with f:
            yield from enumerate(f, 1)
    except (OSError, EOFError) as exc:
        # A truncated or damaged gzip stream: keep what was read, say so (counted).
        yield -1, repr(exc).encode()


def read_traces(
    path: str | Path, *, max_line_warnings: int | None = None, workers: int = 1
) -> TraceColumns:
    """Read one ``traces.json`` / ``traces.json.gz`` into columns (streaming).

    Parameters
    ----------
    path : the trace file.
    max_line_warnings : individual per-line warnings before summarising
        (default ``calib.config.IMPORT_MAX_LINE_WARNINGS``).
    workers : processes parsing disjoint line ranges of an uncompressed file larger
        than ``calib.config.IMPORT_PARALLEL_MIN_BYTES`` (1: this process only). The
        result is identical to the sequential read.

    Returns
    -------
    TraceColumns, finished (numpy columns). Malformed lines are skipped, counted in
    ``num_bad_lines`` and reported with :class:`TraceWarning`.
    """
    path = Path(path)
    limit = config.IMPORT_MAX_LINE_WARNINGS if max_line_warnings is None else max_line_warnings
    if (
        workers > 1
        and path.suffix != ".gz"
        and path.is_file()
        and path.stat().st_size >= config.IMPORT_PARALLEL_MIN_BYTES
    ):
        c = _read_parallel(path, workers)
        for k, (lineno, reason) in enumerate(c.bad_lines):
            if k < limit:
                warnings.warn(
                    TraceWarning(f"{path}:{lineno}: skipped malformed line: {reason}"), stacklevel=2
                )
    else:
        c = _read_range(path, limit)
    if c.num_bad_lines > limit:
        warnings.warn(
            TraceWarning(
                f"{path}: {c.num_bad_lines} malformed lines skipped in total "
                f"({c.num_bad_lines - limit} not listed individually)"
            ),
            stacklevel=2,
        )
    return c


def _read_range(path: Path, limit: int, start: int = 0, end: int | None = None) -> TraceColumns:
    c = TraceColumns(path=str(path))
    # The cyclic GC rescans the growing columns on every few thousand allocations the
    # JSON decoder makes (quadratic); nothing here builds cycles, so pause it.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if end is None:
            _read_into(c, path, limit)
        else:
            _read_into(c, path, limit, _iter_range(path, start, end))
    finally:
        if gc_was_enabled:
            gc.enable()
    return c.finish()


def _iter_range(path: Path, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        for lineno, raw in enumerate(f, 1):
            if pos >= end:
                return
            pos += len(raw)
            yield lineno, raw


def mp_context():
    """Start method for calib's worker processes.

    ``fork`` (fast, works from any script) unless JAX is loaded in this process --
    forking a multithreaded JAX process is unsafe -- then ``forkserver``, which like
    ``spawn`` needs the calling script to guard its entry point with
    ``if __name__ == "__main__":``.
    """
    import multiprocessing as mp

    methods = mp.get_all_start_methods()
    if "jax" not in sys.modules and "fork" in methods:
        return mp.get_context("fork")
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def _read_parallel(path: Path, workers: int) -> TraceColumns:
    from concurrent.futures import ProcessPoolExecutor

    size = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as f:
        for k in range(1, workers):
            f.seek(size * k // workers)
            f.readline()
            cuts.append(max(f.tell(), cuts[-1]))
    cuts.append(size)
    ranges = [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]
    ctx = mp_context()
    with ProcessPoolExecutor(
        max_workers=len(ranges), mp_context=ctx, initializer=worker_signals
    ) as pool:
        parts = list(
            pool.map(
                _read_range,
                [path] * len(ranges),
                [0] * len(ranges),
                [a for a, _ in ranges],
                [b for _, b in ranges],
            )
        )
    return merge_columns(parts, path)


def merge_columns(parts: list[TraceColumns], path: str | Path) -> TraceColumns:
    """Concatenate finished columns of consecutive line ranges of one file."""
    out = TraceColumns(path=str(path))
    j_req, offset = [], 0
    for p in parts:
        gidx = np.empty(len(p.request_ids), np.int64)
        for i, rid in enumerate(p.request_ids):
            g = out.req_index.get(rid)
            if g is None:
                g = out.req_index[rid] = len(out.request_ids)
                out.request_ids.append(rid)
                out.request_lines.append(p.request_lines[i] + offset)
            gidx[i] = g
        j_req.append(gidx[p.j_req])
        out.bad_lines.extend((ln + offset, why) for ln, why in p.bad_lines)
        offset += p.num_lines
        out.num_bad_lines += p.num_bad_lines
        out.j_status.extend(p.j_status)
        out.a_id.extend(p.a_id)
        out.s_req.extend(p.s_req)
        out.s_phase.extend(p.s_phase)
    out.num_lines = offset
    out.j_req = np.concatenate(j_req)
    for n in (
        "j_kind",
        "j_ts",
        "j_step",
        "j_pf_done",
        "j_pf_total",
        "j_dc_done",
        "j_dc_max",
        "j_npre",
        "j_resume",
        "a_kind",
        "a_ts",
        "b_int",
        "b_dur",
        "b_kv_ratio",
        "s_int",
    ):
        setattr(out, n, np.concatenate([getattr(p, n) for p in parts]))
    out.b_rows, out.s_rows, out.j_ints = [], [], []
    return out


def _read_into(c: TraceColumns, path: Path, limit: int, lines=None) -> None:
    for lineno, raw in _iter_raw(path) if lines is None else lines:
        if lineno < 0:
            _bad(c, path, c.num_lines + 1, f"unreadable compressed data ({raw.decode()})", limit)
            break
        c.num_lines = c.lineno = lineno
        if not raw.strip():
            continue
        mark = c._mark()
        try:
            _parse_line(raw, c)
        except _Bad as exc:
            c._rollback(mark)
            _bad(c, path, lineno, str(exc), limit)


def _bad(c: TraceColumns, path: Path, lineno: int, reason: str, limit: int) -> None:
    c.num_bad_lines += 1
    if len(c.bad_lines) < 100:
        c.bad_lines.append((lineno, reason))
    if c.num_bad_lines <= limit:
        warnings.warn(
            TraceWarning(f"{path}:{lineno}: skipped malformed line: {reason}"), stacklevel=3
        )


def iter_records(
    path: str | Path,
) -> Iterator[JourneyEvent | ApiEvent | BatchSummary | RequestSnapshot]:
    """Yield typed records of one trace file (slow path, for inspection).

    Lines are visited in file order; within a line, journey events come first, then
    API events, BATCH_SUMMARY and REQUEST_SNAPSHOT records.

    Malformed lines are skipped with a :class:`TraceWarning` exactly as in
    :func:`read_traces`.
    """
    path = Path(path)
    limit = config.IMPORT_MAX_LINE_WARNINGS
    counter = TraceColumns(path=str(path))
    for lineno, raw in _iter_raw(path):
        if lineno < 0:
            _bad(counter, path, counter.num_lines + 1, "unreadable compressed data", limit)
            return
        counter.num_lines = lineno
        if not raw.strip():
            continue
        c = TraceColumns(path=str(path))
        phases: list = []
        try:
            _parse_line(raw, c, phases)
        except _Bad as exc:
            _bad(counter, path, lineno, str(exc), limit)
            continue
        for i in range(len(c.j_req)):
            step, pf_done, pf_total, dc_done, dc_max, npre = c.j_ints[6 * i : 6 * i + 6]
            yield JourneyEvent(
                c.request_ids[c.j_req[i]],
                c.j_kind[i],
                c.j_ts[i],
                step,
                pf_done,
                pf_total,
                dc_done,
                dc_max,
                npre,
                c.j_resume[i],
                c.j_status[i],
                phases[i],
            )
        for i in range(len(c.a_id)):
            yield ApiEvent(c.a_id[i], c.a_kind[i], c.a_ts[i])
        nb = len(BATCH_INT_KEYS) + 1
        ns = len(SNAPSHOT_INT_KEYS)
        b_rows = [c.b_rows[i : i + nb] for i in range(0, len(c.b_rows), nb)]
        s_rows = [c.s_rows[i : i + ns] for i in range(0, len(c.s_rows), ns)]
        for row in b_rows:
            vals: dict[str, int | float] = dict(zip(BATCH_INT_KEYS, row[:-1], strict=True))
            vals["kv.usage_gpu_ratio"] = row[-1]
            yield BatchSummary(vals)
        for rid, ph, row in zip(c.s_req, c.s_phase, s_rows, strict=True):
            yield RequestSnapshot(rid, ph, dict(zip(SNAPSHOT_INT_KEYS, row, strict=True)))
