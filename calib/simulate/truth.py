"""The simulator's "true" step-time function (what a GPU would measure).

It is deliberately NOT the roofline that calib fits (linear roofline terms times
constant correction factors). It has the non-linear shapes real kernels show:

* GEMM efficiency that ramps with the token count, ``eff = e_max·T/(T + knee)``,
  combined with memory-bound weight loading by a smooth maximum (p-norm), not a sum;
* attention efficiency that depends on the KV length (prefill FLOPs and decode KV
  reads both run poorly at short contexts);
* tensor-parallel all-reduces with a latency plus a bandwidth term;
* MoE routing variance: the number of distinct experts whose weights a step loads
  is random (binomial over layers) and saturates with the token count;
* prefill/decode attention overlap that is partial and depends on their ratio;
* per-layer and per-request costs, a per-step CPU overhead with log-normal jitter,
  multiplicative GPU noise, and rare heavy-tailed hiccups.

Parameters beyond the defaults give other truth families (used by the stress
suite, :mod:`calib.simulate.stress`): a sharper (Hill) GEMM and prefill-attention
efficiency ramp, tile quantisation of GEMM token counts, and a CPU overhead
partly hidden behind the GPU (asynchronous scheduling). At their defaults these
terms are skipped, so the default truth's draws and values are unchanged.

The callable protocol (also used by the ``step_time=`` hook of
:func:`calib.simulate.simulate_experiment`) is::

    step_time(batch: StepBatch, arch: Architecture, hardware: Hardware, tp: int,
              rng: numpy.random.Generator) -> numpy.ndarray  # shape (n,), µs, > 0

where ``batch`` holds padded ``(n, W)`` arrays for ``n`` steps (the simulator
calls it with ``n == 1``, once per step, in step order, with the experiment's
own seeded generator). Slots follow :mod:`calib.traces.schema`: ``phase`` is 0
padding / 1 prefill / 2 decode, ``new_tokens`` the tokens computed this step,
``progress`` the tokens already in the KV cache before the step (ProgressIndex;
for a prefill this includes prefix-cache hits), ``prompt_len`` the full prompt
length, ``mask`` True where a slot holds a request.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import NamedTuple, Protocol

import numpy as np

from calib.arch import Architecture
from calib.hardware import Hardware

PHASE_PAD, PHASE_PREFILL, PHASE_DECODE = 0, 1, 2


class StepBatch(NamedTuple):
    """Padded per-step composition, arrays of shape ``(n_steps, width)``."""

    phase: np.ndarray  # int8: 0 pad, 1 prefill, 2 decode
    new_tokens: np.ndarray  # int: tokens computed this step
    progress: np.ndarray  # int: tokens in KV cache before the step
    prompt_len: np.ndarray  # int: full prompt length
    mask: np.ndarray  # bool: slot holds a request


class StepTimeFn(Protocol):
    def __call__(
        self,
        batch: StepBatch,
        arch: Architecture,
        hardware: Hardware,
        tp: int,
        rng: np.random.Generator,
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class TruthParams:
    """Parameters of the true step time. Defaults: plausible H100 behaviour.

    They are round numbers chosen to look like published H100 kernel behaviour
    (cuBLAS GEMMs reach ~70 % of peak on large token counts, FlashAttention ~50 %,
    HBM streaming ~80 %, NCCL/custom all-reduce ~10 µs latency), NOT tuned to any
    trace or to the fitted model.
    """

    #: Large-GEMM fraction of peak BF16 throughput.
    gemm_efficiency_max: float = 0.70
    #: Token count at which GEMMs reach half of ``gemm_efficiency_max``.
    gemm_knee_tokens: float = 96.0
    #: Fraction of HBM bandwidth achieved when streaming weights.
    weight_bw_efficiency: float = 0.82
    #: Exponent of the smooth maximum combining compute- and memory-bound time.
    smooth_max_power: float = 3.0
    #: Prefill attention fraction of peak at long KV length.
    attn_efficiency_max: float = 0.50
    #: KV length at which prefill attention reaches half its peak efficiency.
    attn_knee_kv: float = 384.0
    #: Decode attention: fraction of HBM bandwidth reading KV at long context.
    kv_read_efficiency_max: float = 0.78
    #: Context at which decode KV reads reach half their peak efficiency.
    kv_read_knee_tokens: float = 160.0
    #: Largest fraction of the smaller attention part hidden behind the larger one.
    overlap_max: float = 0.45
    #: All-reduce latency per call (two calls per layer), µs.
    allreduce_latency_us: float = 8.0
    #: Fraction of NVLink bandwidth achieved by all-reduce.
    allreduce_bw_efficiency: float = 0.60
    #: Per-layer launch/sync cost not hidden by CUDA graphs, µs.
    layer_overhead_us: float = 3.5
    #: Median per-step CPU overhead (input prep, sampler, output processing), µs.
    step_overhead_us: float = 450.0
    #: Log-normal sigma of the per-step CPU overhead.
    step_overhead_sigma: float = 0.25
    #: CPU cost per scheduled request, µs.
    request_overhead_us: float = 7.0
    #: Extra CPU cost per prefill request (prompt handling), µs.
    prefill_request_overhead_us: float = 20.0
    #: MoE routing concentration: tokens behave like ``T**skew`` independent draws.
    moe_routing_skew: float = 0.8
    #: Log-normal sigma of multiplicative GPU-time noise.
    gpu_noise_sigma: float = 0.03
    #: Probability of a hiccup step (GC pause, clock throttling, NCCL stall).
    hiccup_prob: float = 0.005
    #: Hiccup multiplier range; drawn as ``lo + (hi - lo)·u**2`` (most are mild).
    hiccup_low: float = 2.0
    hiccup_high: float = 5.0
    #: Median CPU gap between two consecutive steps (not part of the step time), µs.
    inter_step_gap_us: float = 60.0
    #: Log-normal sigma of the inter-step gap.
    inter_step_gap_sigma: float = 0.3
    #: Latency from a request arriving at an idle engine to its step starting, µs.
    idle_wake_us: float = 200.0
    #: Hill exponent of the GEMM efficiency ramp, ``eff = e_max·T^h/(T^h + knee^h)``
    #: (1: the hyperbolic ramp above; > 1: flat at small T, then a sharp rise).
    gemm_curve_power: float = 1.0
    #: GEMM token counts are padded up to a multiple of this (tile / wave quantisation;
    #: 0: no padding). Applies to the linear layers, the experts and the LM head.
    gemm_tile_tokens: int = 0
    #: Hill exponent of the prefill-attention efficiency ramp over the KV length.
    attn_curve_power: float = 1.0
    #: Fraction of ``min(gpu, cpu)`` hidden by overlapping the CPU overhead with the
    #: GPU work (0: synchronous engine; 1: step time ``max(gpu, cpu)``).
    cpu_overlap: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _ramp(e_max: float, x, knee: float, power: float):
    """Efficiency ramp ``e_max·x^h/(x^h + knee^h)`` (``h == 1``: exactly ``e_max·x/(x + knee)``)."""
    if power == 1.0:
        return e_max * x / (x + knee)
    xp = x**power
    return e_max * xp / (xp + knee**power)


def _pad(x, tile: int):
    """``x`` rounded up to a multiple of ``tile`` (0: unchanged); scalar or array."""
    if not tile:
        return x
    return np.ceil(np.asarray(x, dtype=np.float64) / tile) * tile


# ------------------------------------------------------------------ arch facts
def linear_params(arch: Architecture) -> tuple[float, float, float]:
    """(dense params per layer, expert params per expert per layer, router params per layer)."""
    h, kv, inter = arch.hidden_size, arch.kv_dim, arch.intermediate_size
    attn = h * (h + 2 * kv) + h * h
    if arch.is_moe:
        return float(attn), float(3 * h * inter), float(h * arch.num_local_experts)
    return float(attn + 3 * h * inter), 0.0, 0.0


def weight_bytes(arch: Architecture) -> float:
    """Total weight bytes of the model (all GPUs together)."""
    dense, expert, router = linear_params(arch)
    per_layer = dense + expert * arch.num_local_experts + router + 2 * arch.hidden_size
    embed = 2 * arch.vocab_size * arch.hidden_size  # embedding + untied LM head
    return (arch.num_hidden_layers * per_layer + embed + arch.hidden_size) * arch.bytes_per_param


def kv_bytes_per_token(arch: Architecture, tp: int, kv_bytes: int = 2) -> float:
    """KV-cache bytes per token per GPU: 2 (K and V)·L·kv_dim·bytes / TP."""
    return 2.0 * arch.num_hidden_layers * arch.kv_dim * kv_bytes / tp


class TruthStepTime:
    """The default true step-time function (see the module docstring).

    An instance is a :class:`StepTimeFn`; it caches architecture constants per
    (arch, hardware, tp).
    """

    def __init__(self, params: TruthParams | None = None):
        self.params = params or TruthParams()
        self._cache: dict = {}

    def _consts(self, arch: Architecture, hw: Hardware, tp: int) -> dict:
        key = (arch, hw, tp)
        c = self._cache.get(key)
        if c is None:
            dense, expert, router = linear_params(arch)
            bpp = arch.bytes_per_param
            L = arch.num_hidden_layers
            c = {
                "L": L,
                "F": hw.flops_per_us,
                "W": hw.hbm_bytes_per_us,
                "N": hw.nvlink_bytes_per_us,
                # per-GPU FLOPs per token and bytes, all layers
                "dense_flops_tok": 2.0 * L * (dense + router) / tp,
                "dense_bytes": L * (dense + router) * bpp / tp,
                "expert_flops_tok": 2.0 * L * expert * max(arch.num_experts_per_tok, 0) / tp,
                "expert_bytes_each": expert * bpp / tp,  # per expert per layer
                "lm_flops_tok": 2.0 * arch.hidden_size * arch.vocab_size / tp,
                "lm_bytes": arch.hidden_size * arch.vocab_size * bpp / tp,
                # attention: FLOPs per (query token x key token), all layers, per GPU
                "attn_flops_qk": 4.0 * L * arch.num_attention_heads * arch.head_dim / tp,
                "kv_bytes_tok": kv_bytes_per_token(arch, tp),
                "ar_bytes_tok": 2.0 * arch.hidden_size,  # bf16 activations
            }
            self._cache[key] = c
        return c

    def one_step(
        self,
        arch: Architecture,
        hardware: Hardware,
        tp: int,
        n_decode: int,
        decode_progress_sum: int,
        pf_new: list[int],
        pf_progress: list[int],
        pf_prompt_len: list[int],
        rng: np.random.Generator,
    ) -> float:
        """Scalar fast path for one step (same formula and draws as ``__call__`` with n=1).

        Decode requests enter only through their count and the sum of their
        ProgressIndex values (the KV-read term is linear in context once the
        efficiency curve ``ctx/(ctx + knee)`` is divided out).
        """
        p = self.params
        c = self._consts(arch, hardware, tp)
        F, W, L = c["F"], c["W"], c["L"]
        pw = p.smooth_max_power
        n_pf = len(pf_new)
        tokens = float(n_decode + sum(pf_new))
        n_sample = n_decode + sum(
            1 for a, b, q in zip(pf_progress, pf_new, pf_prompt_len, strict=True) if a + b >= q
        )
        tile = p.gemm_tile_tokens
        t_g = float(_pad(tokens, tile))
        eff_g = max(_ramp(p.gemm_efficiency_max, t_g, p.gemm_knee_tokens, p.gemm_curve_power), 1e-6)
        t_comp = t_g * c["dense_flops_tok"] / (F * eff_g)
        wbytes = c["dense_bytes"]
        if arch.is_moe:
            E, k = arch.num_local_experts, arch.num_experts_per_tok
            p_hit = 1.0 - (1.0 - k / E) ** (tokens**p.moe_routing_skew) if tokens > 0 else 0.0
            hits = int(rng.binomial(L * E, min(max(p_hit, 0.0), 1.0)))
            hits = max(hits, L * k if tokens > 0 else 0)
            per_expert_tok = tokens * k * L / max(hits, 1)
            pe = float(_pad(per_expert_tok, tile))
            eff_e = _ramp(p.gemm_efficiency_max, pe, p.gemm_knee_tokens, p.gemm_curve_power)
            pad_e = pe / per_expert_tok if tile and per_expert_tok > 0 else 1.0
            t_comp += tokens * pad_e * c["expert_flops_tok"] / (F * max(eff_e, 1e-6))
            wbytes += hits * c["expert_bytes_each"]
        t_mem = wbytes / (W * p.weight_bw_efficiency)
        t_lin = (t_comp**pw + t_mem**pw) ** (1.0 / pw)
        n_lm = float(_pad(n_sample, tile))
        eff_lm = _ramp(p.gemm_efficiency_max, n_lm, p.gemm_knee_tokens, p.gemm_curve_power)
        t_lm_c = n_lm * c["lm_flops_tok"] / (F * max(eff_lm, 1e-6))
        t_lm_m = c["lm_bytes"] / (W * p.weight_bw_efficiency)
        t_lin += (t_lm_c**pw + t_lm_m**pw) ** (1.0 / pw)
        t_pf = 0.0
        for new, prog in zip(pf_new, pf_progress, strict=True):
            ctx = prog + new
            flops = c["attn_flops_qk"] * new * (prog + 0.5 * (new + 1.0))
            eff_a = max(_ramp(p.attn_efficiency_max, ctx, p.attn_knee_kv, p.attn_curve_power), 1e-6)
            t_pf += flops / (F * eff_a)
        ctx_sum = decode_progress_sum + n_decode  # ctx = progress + 1 per decode
        t_dc = (
            c["kv_bytes_tok"]
            * (ctx_sum + n_decode * p.kv_read_knee_tokens)
            / (W * p.kv_read_efficiency_max)
        )
        big, small = max(t_pf, t_dc), min(t_pf, t_dc)
        overlap = p.overlap_max * math.sqrt(small / max(big, 1e-9))
        t_attn = big + (1.0 - overlap) * small
        if tp > 1:
            ring = 2.0 * (tp - 1) / tp
            t_ar = (
                2.0
                * L
                * (
                    p.allreduce_latency_us
                    + ring * tokens * c["ar_bytes_tok"] / (c["N"] * p.allreduce_bw_efficiency)
                )
            )
        else:
            t_ar = 0.0
        gpu = (t_lin + t_attn + t_ar + L * p.layer_overhead_us) * rng.lognormal(
            0.0, p.gpu_noise_sigma
        )
        cpu = (
            p.step_overhead_us * rng.lognormal(0.0, p.step_overhead_sigma)
            + p.request_overhead_us * (n_decode + n_pf)
            + p.prefill_request_overhead_us * n_pf
        )
        total = gpu + cpu
        if p.cpu_overlap:
            total -= p.cpu_overlap * min(gpu, cpu)
        hic = rng.random() < p.hiccup_prob
        u = rng.random()
        if hic:
            total *= p.hiccup_low + (p.hiccup_high - p.hiccup_low) * u**2
        return float(total)

    def __call__(
        self,
        batch: StepBatch,
        arch: Architecture,
        hardware: Hardware,
        tp: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        p = self.params
        c = self._consts(arch, hardware, tp)
        mask = np.asarray(batch.mask, dtype=bool)
        phase = np.where(mask, batch.phase, 0)
        new = np.where(mask, batch.new_tokens, 0).astype(np.float64)
        prog = np.where(mask, batch.progress, 0).astype(np.float64)
        plen = np.where(mask, batch.prompt_len, 0).astype(np.float64)
        is_pf = phase == PHASE_PREFILL
        is_dc = phase == PHASE_DECODE
        n = mask.shape[0]
        F, W, L = c["F"], c["W"], c["L"]
        pw = p.smooth_max_power

        tokens = new.sum(axis=1)
        n_req = mask.sum(axis=1).astype(np.float64)
        n_pf = is_pf.sum(axis=1).astype(np.float64)
        # requests sampling a token this step: decodes and prefills that complete
        n_sample = is_dc.sum(axis=1) + (is_pf & (prog + new >= plen)).sum(axis=1)

        # ---- linear layers: compute vs weight streaming, smooth max
        tile = p.gemm_tile_tokens
        t_g = _pad(tokens, tile)
        eff_g = _ramp(p.gemm_efficiency_max, t_g, p.gemm_knee_tokens, p.gemm_curve_power)
        eff_g = np.maximum(eff_g, 1e-6)
        t_comp = t_g * c["dense_flops_tok"] / (F * eff_g)
        wbytes = np.full(n, c["dense_bytes"])
        if arch.is_moe:
            E, k = arch.num_local_experts, arch.num_experts_per_tok
            t_eff = np.power(np.maximum(tokens, 0.0), p.moe_routing_skew)
            p_hit = np.where(tokens > 0, 1.0 - np.power(1.0 - k / E, t_eff), 0.0)
            hits = rng.binomial(L * E, np.clip(p_hit, 0.0, 1.0))  # distinct experts, all layers
            hits = np.maximum(hits, np.where(tokens > 0, L * k, 0))
            per_expert_tok = tokens * k * L / np.maximum(hits, 1)
            pe = _pad(per_expert_tok, tile)
            eff_e = _ramp(p.gemm_efficiency_max, pe, p.gemm_knee_tokens, p.gemm_curve_power)
            if tile:
                pad_e = np.where(per_expert_tok > 0, pe / np.maximum(per_expert_tok, 1e-300), 1.0)
                t_comp = t_comp + tokens * pad_e * c["expert_flops_tok"] / (
                    F * np.maximum(eff_e, 1e-6)
                )
            else:
                t_comp = t_comp + tokens * c["expert_flops_tok"] / (F * np.maximum(eff_e, 1e-6))
            wbytes = wbytes + hits * c["expert_bytes_each"]
        t_mem = wbytes / (W * p.weight_bw_efficiency)
        t_lin = (t_comp**pw + t_mem**pw) ** (1.0 / pw)
        # LM head on sampled rows only
        n_lm = _pad(n_sample, tile)
        eff_lm = _ramp(p.gemm_efficiency_max, n_lm, p.gemm_knee_tokens, p.gemm_curve_power)
        t_lm_c = n_lm * c["lm_flops_tok"] / (F * np.maximum(eff_lm, 1e-6))
        t_lm_m = c["lm_bytes"] / (W * p.weight_bw_efficiency)
        t_lin = t_lin + (t_lm_c**pw + t_lm_m**pw) ** (1.0 / pw)

        # ---- attention
        ctx = prog + new
        pf_flops = c["attn_flops_qk"] * new * (prog + 0.5 * (new + 1.0))
        eff_a = _ramp(p.attn_efficiency_max, ctx, p.attn_knee_kv, p.attn_curve_power)
        t_pf = np.where(is_pf, pf_flops / (F * np.maximum(eff_a, 1e-6)), 0.0).sum(axis=1)
        kv_read = c["kv_bytes_tok"] * ctx
        eff_kv = p.kv_read_efficiency_max * ctx / (ctx + p.kv_read_knee_tokens)
        t_dc = np.where(is_dc, kv_read / (W * np.maximum(eff_kv, 1e-6)), 0.0).sum(axis=1)
        big, small = np.maximum(t_pf, t_dc), np.minimum(t_pf, t_dc)
        overlap = p.overlap_max * np.sqrt(small / np.maximum(big, 1e-9))
        t_attn = big + (1.0 - overlap) * small

        # ---- tensor-parallel all-reduce (two per layer)
        if tp > 1:
            ring = 2.0 * (tp - 1) / tp
            per_call = p.allreduce_latency_us + ring * tokens * c["ar_bytes_tok"] / (
                c["N"] * p.allreduce_bw_efficiency
            )
            t_ar = 2.0 * L * per_call
        else:
            t_ar = np.zeros(n)

        gpu = t_lin + t_attn + t_ar + L * p.layer_overhead_us
        gpu = gpu * rng.lognormal(0.0, p.gpu_noise_sigma, size=n)
        cpu = (
            p.step_overhead_us * rng.lognormal(0.0, p.step_overhead_sigma, size=n)
            + p.request_overhead_us * n_req
            + p.prefill_request_overhead_us * n_pf
        )
        total = gpu + cpu
        if p.cpu_overlap:
            total = total - p.cpu_overlap * np.minimum(gpu, cpu)
        hic = rng.random(n) < p.hiccup_prob
        u = rng.random(n)
        total = np.where(hic, total * (p.hiccup_low + (p.hiccup_high - p.hiccup_low) * u**2), total)
        return total
