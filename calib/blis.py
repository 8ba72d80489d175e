"""The user's BLIS as the closed-loop simulator: its trace-replay input, command line and output.

BLIS (github.com/inference-sim/inference-sim) is not on a package registry; this module
writes what its ``blis replay`` command reads and reads what it writes, following its
public source:

* ``sim/workload/tracev2.go`` — the TraceV2 pair: a YAML header (``TraceHeader``, parsed
  with unknown keys rejected: ``trace_version``, ``time_unit``, ``mode``,
  ``warm_up_requests``, optional ``server``) and a CSV whose first row names the columns
  ``traceV2Columns`` (27, in that order) and whose rows ``parseTraceRecord`` reads by
  position. Times are integer microseconds. With a ``prefix_group``, ``input_tokens`` is
  the suffix only: ``LoadTraceV2Requests`` (``sim/workload/replay.go``) prepends
  ``prefix_length`` shared tokens per group; ``server_input_tokens`` 0 means "not
  recorded"; a request is injected at ``send_time_us`` when > 0, else ``arrival_time_us``.
* ``cmd/replay.go`` — flags ``--trace-header``, ``--trace-data``, ``--results-path``
  (a JSON list of ``SimResult``: ``request_id``, ``ttft_us``, ``e2e_us``,
  ``input_tokens``, ``output_tokens``, ``slo_class``, ``model``, ``itl_mean_us``; µs),
  ``--metrics-path``; the simulator flags of ``cmd/root.go`` (``--model``,
  ``--hardware``, ``--tp``, ``--latency-model``, ``--alpha-coeffs``, ``--beta-coeffs``,
  ``--defaults-filepath``, ``--total-kv-blocks``, ``--max-num-seqs``,
  ``--max-num-batched-tokens``, ``--block-size-in-tokens``, ``--max-model-len``,
  ``--model-config-folder``, ``--seed``, ``--log``).
* ``sim/simulator.go`` — BLIS's accounting of the alphas (the one
  :mod:`calib.closed_loop` mirrors): TTFT = first-token step end + α₂ − arrival, every
  inter-token latency = step + α₂, E2E = TTFT + Σ ITL + α₁; a request queues α₀ after
  its arrival.

Request ids are the row numbers of the experiment's replayed requests (BLIS names them
``request_<id>`` and returns the number in ``request_id``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from calib.errors import CalibError

__all__ = [
    "BLIS_ENV",
    "TRACE_COLUMNS",
    "blis_closed_loop",
    "blis_command",
    "defaults_files",
    "find_blis",
    "parse_results",
    "run_blis",
    "replay_means",
    "trace_csv",
    "trace_header",
    "write_replay_inputs",
]

#: Environment variable naming the BLIS binary when --blis is not given.
BLIS_ENV = "CALIB_BLIS"
#: TraceV2 CSV columns, in BLIS's order (``traceV2Columns``, sim/workload/tracev2.go).
TRACE_COLUMNS = (
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
)
#: Accelerator names of calib's bundled hardware -> BLIS's ``--hardware`` names.
BLIS_HARDWARE = {"H100-SXM": "H100", "A100-SXM": "A100-80"}
#: Keys of an HF ``config.json`` BLIS reads from ``--model-config-folder``.
_HF_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "num_key_value_heads",
    "vocab_size",
    "torch_dtype",
    "num_local_experts",
    "num_experts_per_tok",
    "max_position_embeddings",
)


def find_blis(explicit: str | None = None) -> Path:
    """The BLIS binary: ``explicit``, else ``$CALIB_BLIS``, else ``blis`` on PATH."""
    for source, cand in (("--blis", explicit), (f"${BLIS_ENV}", os.environ.get(BLIS_ENV))):
        if cand:
            p = Path(cand)
            if p.is_file() and os.access(p, os.X_OK):
                return p
            raise CalibError(
                f"{cand} is not an executable file",
                field=source,
                fix="give the path of a BLIS binary built from "
                "github.com/inference-sim/inference-sim (go build -o blis .)",
            )
    found = shutil.which("blis")
    if found:
        return Path(found)
    raise CalibError(
        "no BLIS binary found (no --blis, no $CALIB_BLIS, no blis on PATH)",
        field="--blis",
        fix="build BLIS from github.com/inference-sim/inference-sim "
        "(go build -o blis .) and pass --blis PATH",
    )


def trace_header(plan) -> dict:
    """The TraceV2 header (``TraceHeader`` YAML fields only) of one experiment."""
    spec = plan.spec
    server = {
        "type": "vllm",
        "model": spec.model,
        "tensor_parallel": int(spec.tp),
        "max_num_seqs": int(spec.max_num_seqs),
        "block_size": 16,
        "max_model_len": int(spec.max_model_len),
    }
    # mode "real": the records come from a measured run (blis observe writes "real")
    return {
        "trace_version": 2,
        "time_unit": "microseconds",
        "mode": "real",
        "warm_up_requests": 0,
        "server": server,
    }


def trace_csv(plan) -> str:
    """The TraceV2 data CSV of one experiment: header row + one row per replayed request.

    ``arrival_time_us`` is the observed ARRIVED time relative to the first arrival
    (integer µs; BLIS adds α₀ itself); ``send_time_us`` equals it (the injection time).
    """
    arrived = np.asarray(plan.arrived_us, np.float64)
    rel = np.round(arrived - arrived.min()).astype(np.int64)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(TRACE_COLUMNS)
    grouped = plan.prefix_len > 0
    for i in range(arrived.size):
        prefix = int(plan.prefix_len) if grouped else 0
        row = {
            "request_id": i,
            "client_id": "",
            "tenant_id": "",
            "slo_class": "",
            "session_id": "",
            "round_index": 0,
            "prefix_group": f"prefix-{int(plan.prefix_group[i])}" if grouped else "",
            "prefix_length": prefix,
            "streaming": "true",
            "input_tokens": int(plan.prompt_len[i]) - prefix,
            "output_tokens": int(plan.output_len[i]),
            "text_tokens": 0,
            "image_tokens": 0,
            "audio_tokens": 0,
            "video_tokens": 0,
            "reason_ratio": 0,
            "model": "",
            "deadline_us": 0,
            "server_input_tokens": 0,
            "arrival_time_us": int(rel[i]),
            "send_time_us": int(rel[i]),
            "first_chunk_time_us": 0,
            "last_chunk_time_us": 0,
            "num_chunks": 0,
            "status": "ok",
            "error_message": "",
            "finish_reason": "length",
        }
        w.writerow([row[c] for c in TRACE_COLUMNS])
    return buf.getvalue()


def _model_config(arch_json: str) -> dict:
    arch = json.loads(arch_json)
    return {k: arch[k] for k in _HF_KEYS if k in arch}


def write_replay_inputs(
    plan, out_dir: str | Path, *, arch_json: str | None = None
) -> dict[str, Path]:
    """Write header YAML, data CSV (and ``config.json`` when ``arch_json``) into ``out_dir``."""
    from calib.io import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"header": out / "trace.yaml", "data": out / "trace.csv"}
    atomic_write_text(paths["header"], yaml.safe_dump(trace_header(plan), sort_keys=False))
    atomic_write_text(paths["data"], trace_csv(plan))
    if arch_json:
        cfg = out / "model"
        cfg.mkdir(exist_ok=True)
        atomic_write_text(cfg / "config.json", json.dumps(_model_config(arch_json), indent=1))
        paths["model_config"] = cfg
    return paths


def blis_command(
    blis: str | Path,
    plan,
    paths: dict[str, Path],
    *,
    alphas: Sequence[float],
    betas: Sequence[float],
    defaults: str | Path | None,
    results: str | Path,
    metrics: str | Path | None = None,
    seed: int = 42,
    extra: Sequence[str] = (),
) -> list[str]:
    """``blis replay`` argument list for one experiment and coefficient set."""
    spec = plan.spec

    def fmt(xs) -> str:
        return ",".join(repr(float(x)) for x in xs)

    cmd = [
        str(blis),
        "replay",
        "--trace-header",
        str(paths["header"]),
        "--trace-data",
        str(paths["data"]),
        "--model",
        spec.model,
        "--hardware",
        BLIS_HARDWARE.get(spec.hardware, spec.hardware),
        "--tp",
        str(int(spec.tp)),
        "--latency-model",
        "trained-physics",
        "--alpha-coeffs",
        fmt(alphas),
        "--beta-coeffs",
        fmt(betas),
        "--max-num-seqs",
        str(int(spec.max_num_seqs)),
        "--max-num-batched-tokens",
        str(int(spec.max_num_batched_tokens)),
        "--block-size-in-tokens",
        "16",
        "--max-model-len",
        str(int(spec.max_model_len)),
        "--seed",
        str(int(seed)),
        "--log",
        "error",
        "--results-path",
        str(results),
    ]
    if defaults is not None:
        cmd += ["--defaults-filepath", str(defaults)]
    if plan.kv_blocks_total:
        cmd += ["--total-kv-blocks", str(int(plan.kv_blocks_total))]
    if "model_config" in paths:
        cmd += ["--model-config-folder", str(paths["model_config"])]
    if metrics is not None:
        cmd += ["--metrics-path", str(metrics)]
    return [*cmd, *extra]


def parse_results(text: str, source: str = "results") -> dict[int, dict[str, float]]:
    """BLIS's ``--results-path`` JSON (list of SimResult) -> {request_id: {ttft, e2e, itl} µs}."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise CalibError(f"not JSON ({err.msg} at line {err.lineno})", path=source) from None
    if not isinstance(rows, list):
        raise CalibError("expected a JSON list of SimResult objects", path=source)
    out = {}
    for i, r in enumerate(rows):
        try:
            out[int(r["request_id"])] = {
                "ttft": float(r["ttft_us"]),
                "e2e": float(r["e2e_us"]),
                "itl": float(r.get("itl_mean_us", float("nan"))),
            }
        except (KeyError, TypeError, ValueError):
            raise CalibError(
                f"entry {i} lacks request_id/ttft_us/e2e_us", path=source, field="request_id"
            ) from None
    return out


def replay_means(
    plan, per_request: dict[int, dict[str, float]], source: str = "results"
) -> dict[str, float]:
    """Mean E2E, TTFT and decode interval (µs) over the plan's compared requests."""
    idx = np.nonzero(plan.compared)[0]
    missing = [int(i) for i in idx if int(i) not in per_request]
    if missing:
        raise CalibError(
            f"BLIS returned no result for {len(missing)} of {idx.size} requests "
            f"(first: request_{missing[0]}); they may have outlived the horizon",
            path=source,
            fix="pass a longer --horizon through --blis-arg",
        )
    e2e = np.array([per_request[int(i)]["e2e"] for i in idx])
    ttft = np.array([per_request[int(i)]["ttft"] for i in idx])
    many = [int(i) for i in idx if plan.output_len[i] >= 2]
    itl = np.array([per_request[i]["itl"] for i in many])
    return {
        "e2e": float(e2e.mean()),
        "ttft": float(ttft.mean()),
        "itl": float(itl.mean()) if itl.size else float("nan"),
    }


def run_blis(cmd: list[str], results: Path) -> dict[int, dict[str, float]]:
    """Run one ``blis replay``; its per-request results (CalibError with BLIS's last line)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (
            proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["(no output)"]
        )[-1]
        raise CalibError(f"blis replay exited {proc.returncode}: {tail}", path=cmd[0])
    return parse_results(Path(results).read_text(), source=str(results))


def defaults_files(export_result) -> dict[str, Path]:
    """Each exported set's ``<stem>.defaults.yaml`` (paths come in (yaml, defaults) pairs)."""
    out = {}
    for name, path in zip(export_result.documents, export_result.paths[1::2], strict=True):
        if not path.name.endswith(".defaults.yaml"):
            raise ValueError(f"unexpected export layout: {path}")
        out[name] = path
    return out


def blis_closed_loop(
    blis: str | Path,
    plans,
    coeffs,
    export_result,
    work_dir: str | Path,
    *,
    arch_json: Sequence[str] | None = None,
    extra: Sequence[str] = (),
    progress=None,
) -> tuple[np.ndarray, list[str]]:
    """Replay every experiment in BLIS with the point set and each draw.

    Returns ``(results, basis)`` as :func:`calib.closed_loop.judge` takes them: results
    of shape (sets, experiments, 3) in µs (set 0: the export's coefficients with its
    ``*.defaults.yaml``).
    """
    from calib.closed_loop import METRICS, discrepancy_factors, set_name

    defaults = defaults_files(export_result)
    sets = [coeffs.point, *coeffs.draws]
    factor = discrepancy_factors(coeffs, plans)  # the band's structural discrepancy
    results = np.full((len(sets), len(plans), len(METRICS)), np.nan)
    basis = []
    work = Path(work_dir)
    total, done = len(sets) * len(plans), 0
    for e, plan in enumerate(plans):
        name, b = set_name(plan, coeffs)
        basis.append(b)
        paths = write_replay_inputs(
            plan, work / f"exp{e:03d}", arch_json=None if arch_json is None else arch_json[e]
        )
        for k, s in enumerate(sets):
            alphas, betas = s[name]
            if k:  # BLIS's step time is linear in the betas
                betas = [float(b) * float(factor[k - 1, e]) for b in betas]
            res_path = work / f"exp{e:03d}" / f"results-{k:03d}.json"
            cmd = blis_command(
                blis,
                plan,
                paths,
                alphas=alphas,
                betas=betas,
                defaults=defaults[name],
                results=res_path,
                extra=extra,
            )
            means = replay_means(plan, run_blis(cmd, res_path), source=str(res_path))
            results[k, e] = [means[m] for m in METRICS]
            done += 1
            if progress:
                progress(done, total)
    return results, basis
