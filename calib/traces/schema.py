"""The canonical step dataset: one xarray Dataset, saved as NetCDF under ``traces/``.

This table is the contract between the importer (``calib.traces``), the
simulator's round-trip tests, the roofline and the fit. ``load_dataset``
validates a file against it.

Dimensions
----------
``experiment``  one per experiment directory (coordinate: directory name).
``step``        every reconstructed scheduler step of every experiment, sorted by
                (experiment, step id). Only ``sampled`` steps carry a duration.
``slot``        padded per-request positions inside a step (width = largest batch).
``request``     one per request (engine journey), sorted by (experiment, queue order).

Semantics
---------
* ``slot_progress`` is the ProgressIndex: tokens already in the KV cache before
  this step. Prefill chunk: prompt tokens computed (or found in the prefix
  cache) so far. Decode step k (1-based) after the first token: prompt + k − 1.
* ``slot_new_tokens``: tokens computed this step (prefill chunk size, or 1).
* Slots of one step hold decode requests first, then prefill requests, each
  in request order; padding has phase 0, request −1, mask False, zeros elsewhere.
* Times are µs (``*_us``), step ids are vLLM ``scheduler.step`` values; −1 marks
  a missing integer, NaN a missing float.
"""

from __future__ import annotations

from typing import NamedTuple


class Var(NamedTuple):
    dims: tuple[str, ...]
    dtype: str  # numpy dtype kind name: "int8", "int32", "int64", "float64", "bool", "str"
    doc: str


PHASE_PAD, PHASE_PREFILL, PHASE_DECODE = 0, 1, 2

E, S, K, R = ("experiment",), ("step",), ("step", "slot"), ("request",)

SCHEMA: dict[str, Var] = {
    # ---- per experiment
    "exp_model": Var(
        E, "str", "calib model name (e.g. 'llama-2-7b'); the `model` coordinate of fits"
    ),
    "exp_model_id": Var(E, "str", "exp-config.yaml `model` as written (HF id)"),
    "exp_tp": Var(E, "int32", "tensor_parallelism"),
    "exp_max_num_batched_tokens": Var(E, "int32", "vLLM token budget per step"),
    "exp_max_num_seqs": Var(E, "int32", "vLLM max running requests"),
    "exp_max_model_len": Var(E, "int32", "vLLM max model length"),
    "exp_hardware": Var(
        E, "str", "accelerator name (exp-config `hardware`, else the import default)"
    ),
    "exp_workload": Var(E, "str", "exp-config.yaml `app` (workload name)"),
    "exp_arch_json": Var(E, "str", "JSON of calib.arch.Architecture used for this experiment"),
    "exp_hardware_json": Var(E, "str", "JSON of calib.hardware.Hardware used for this experiment"),
    "exp_profile_json": Var(E, "str", "profile.yaml content as JSON ('{}' if absent)"),
    "exp_client_metrics_json": Var(
        E, "str", "results/summary_lifecycle_metrics.json ('{}' if absent)"
    ),
    "exp_source_sha256": Var(E, "str", "SHA-256 of traces.json + exp-config.yaml + profile.yaml"),
    "exp_num_steps": Var(E, "int64", "reconstructed steps"),
    "exp_num_sampled": Var(E, "int64", "steps with a measured duration"),
    "exp_num_requests": Var(E, "int64", "requests with a journey"),
    "exp_num_failed": Var(
        E, "int64", "requests missing QUEUED, SCHEDULED, FIRST_TOKEN or FINISHED"
    ),
    "exp_num_bad_lines": Var(E, "int64", "malformed traces.json lines skipped"),
    "exp_xcheck_batch_rate": Var(
        E,
        "float64",
        "fraction of sampled steps whose BATCH_SUMMARY counts disagree with the reconstruction",
    ),
    "exp_xcheck_snapshot_rate": Var(
        E,
        "float64",
        "fraction of REQUEST_SNAPSHOTs disagreeing with the reconstruction (NaN if none)",
    ),
    # ---- per step
    "step_experiment": Var(S, "int32", "index into the experiment dimension"),
    "step_id": Var(S, "int64", "vLLM scheduler step id"),
    "duration_us": Var(S, "float64", "measured step.duration_us (NaN when not sampled)"),
    "sampled": Var(S, "bool", "step has a step.BATCH_SUMMARY event with a duration"),
    "num_prefill": Var(S, "int32", "reconstructed prefill requests in the batch"),
    "num_decode": Var(S, "int32", "reconstructed decode requests in the batch"),
    "prefill_tokens": Var(S, "int32", "reconstructed prefill tokens computed this step"),
    "decode_tokens": Var(S, "int32", "reconstructed decode tokens this step"),
    "bs_num_prefill_reqs": Var(
        S, "int32", "BATCH_SUMMARY batch.num_prefill_reqs (−1 if not sampled)"
    ),
    "bs_num_decode_reqs": Var(S, "int32", "BATCH_SUMMARY batch.num_decode_reqs (−1)"),
    "bs_scheduled_tokens": Var(S, "int32", "BATCH_SUMMARY batch.scheduled_tokens (−1)"),
    "bs_prefill_tokens": Var(S, "int32", "BATCH_SUMMARY batch.prefill_tokens (−1)"),
    "bs_decode_tokens": Var(S, "int32", "BATCH_SUMMARY batch.decode_tokens (−1)"),
    "bs_num_finished": Var(S, "int32", "BATCH_SUMMARY batch.num_finished (−1)"),
    "bs_num_preempted": Var(S, "int32", "BATCH_SUMMARY batch.num_preempted (−1)"),
    "bs_running_depth": Var(S, "int32", "BATCH_SUMMARY queue.running_depth (−1)"),
    "bs_waiting_depth": Var(S, "int32", "BATCH_SUMMARY queue.waiting_depth (−1)"),
    "bs_kv_usage_gpu_ratio": Var(S, "float64", "BATCH_SUMMARY kv.usage_gpu_ratio (NaN)"),
    "bs_kv_blocks_total_gpu": Var(S, "int32", "BATCH_SUMMARY kv.blocks_total_gpu (−1)"),
    "bs_kv_blocks_free_gpu": Var(S, "int32", "BATCH_SUMMARY kv.blocks_free_gpu (−1)"),
    "bs_ts_start_ns": Var(S, "int64", "BATCH_SUMMARY step.ts_start_ns, monotonic (−1)"),
    "bs_ts_end_ns": Var(S, "int64", "BATCH_SUMMARY step.ts_end_ns, monotonic (−1)"),
    # ---- per step x slot
    "slot_request": Var(K, "int32", "index into the request dimension (−1 for padding)"),
    "slot_phase": Var(K, "int8", "0 padding, 1 prefill, 2 decode"),
    "slot_new_tokens": Var(K, "int32", "tokens computed this step"),
    "slot_progress": Var(K, "int32", "ProgressIndex: tokens in KV cache before this step"),
    "slot_prompt_len": Var(K, "int32", "full prompt length of the request"),
    "slot_mask": Var(K, "bool", "True where the slot holds a request"),
    # ---- per request
    "req_experiment": Var(R, "int32", "index into the experiment dimension"),
    "req_id": Var(R, "str", "base request id `cmpl-<id>` (joins the vllm.api span)"),
    "req_prompt_len": Var(R, "int32", "prefill.total_tokens"),
    "req_cached_tokens": Var(
        R, "int32", "prompt tokens found in the prefix cache (first SCHEDULED prefill.done_tokens)"
    ),
    "req_output_len": Var(
        R, "int32", "decode tokens generated (decode.done_tokens at FINISHED; −1 if unknown)"
    ),
    "req_max_tokens": Var(R, "int32", "decode.max_tokens"),
    "req_num_preemptions": Var(R, "int32", "preemptions"),
    "req_failed": Var(R, "bool", "missing QUEUED, SCHEDULED, FIRST_TOKEN or FINISHED (labels NaN)"),
    "req_finish_status": Var(R, "str", "finish.status ('' if unknown)"),
    "req_queued_step": Var(R, "int64", "scheduler step of QUEUED (−1)"),
    "req_scheduled_step": Var(R, "int64", "scheduler step of the first SCHEDULED (−1)"),
    "req_first_token_step": Var(R, "int64", "scheduler step of FIRST_TOKEN (−1)"),
    "req_finished_step": Var(R, "int64", "scheduler step of FINISHED (−1)"),
    "req_queued_ts_us": Var(R, "float64", "QUEUED ts.monotonic in µs (NaN)"),
    "req_queueing_us": Var(R, "float64", "first SCHEDULED − QUEUED"),
    "req_ttft_us": Var(R, "float64", "FIRST_TOKEN − QUEUED"),
    "req_e2e_us": Var(R, "float64", "FINISHED − QUEUED"),
    "req_processing_us": Var(R, "float64", "FINISHED − first SCHEDULED − preemption gaps"),
    "req_decode_interval_us": Var(
        R, "float64", "(E2E − TTFT) / (output_len − 1) (NaN if output_len < 2)"
    ),
    "req_api_queue_us": Var(R, "float64", "QUEUED − api.ARRIVED (NaN without the API span)"),
    "req_api_depart_us": Var(R, "float64", "api.DEPARTED − FINISHED (NaN without the API span)"),
}

#: Dataset attributes: ``schema_version`` (int), ``manifest`` (JSON string).
REQUIRED_ATTRS = ("schema_version", "manifest")
