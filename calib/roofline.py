"""Roofline basis functions of the BLIS trained-physics step-time model, in µs.

Pure, jitted, vectorised JAX. Given a model architecture, an accelerator and a
tensor-parallel degree (:class:`ArchConsts`), and the canonical dataset's padded
per-step arrays (shape ``(n_steps, n_slots)``), :func:`step_components` returns
one value per step for each roofline term (:class:`Components`). The fit
multiplies each term by a learned dimensionless correction.

Notation (all per GPU of a TP group)
------------------------------------
``L`` layers, ``d`` hidden size, ``H`` attention heads, ``kvH`` KV heads,
``d_h = d/H`` head dim, ``d_kv = kvH·d_h``, ``d_ff`` intermediate size,
``E`` local experts (0 = dense), ``k`` experts per token, ``k_eff = max(1, k)``,
``TP`` tensor-parallel degree, ``P`` peak FLOP per µs, ``W`` HBM bytes per µs,
``bpp`` weight bytes per parameter, KV and activation bytes 2
(:data:`calib.config.KV_BYTES`, :data:`calib.config.ROOFLINE_ACT_BYTES`).

Per step: prefill slots ``i`` (phase 1) compute ``t_i`` new tokens of a prompt
of full length ``s_i``; decode slots ``j`` (phase 2) read a context of
``c_j`` = ProgressIndex tokens. ``T_pf = Σ_i t_i``, ``T_dc`` = number of decode
requests, ``B`` = number of requests (mask True).

* ``pf_compute`` [µs] = [L·2·T_pf·d·(2d+2d_kv)/TP + L·Σ_i 4·(H/TP)·t_i·(s_i+t_i/2)·d_h
  + FFN(T_pf)] / P
* ``dc_compute`` [µs] = [L·2·T_dc·d·(2d+2d_kv)/TP + L·4·(H/TP)·(Σ_j c_j)·d_h + FFN(T_dc)] / P
* ``FFN(T)`` [FLOP] = L·T·k_eff·6·d·d_ff/TP (dense: k_eff = 1; MoE: every layer MoE)
* ``pf_kv`` [µs] = L·2·(d_kv/TP)·T_pf·2 / W           (KV written by the prefill chunk)
* ``dc_kv`` [µs] = L·2·(d_kv/TP)·2·(Σ_j c_j + T_dc) / W  (KV read plus the new token's KV)
* ``weight`` [µs] = [L·d·(2d+2d_kv)·bpp/TP + L·3·d·d_ff·bpp·max(1, E)/TP] / W,
  charged once per non-empty step (0 for an all-padding row)
* ``tp`` [µs] = 2L·(T_pf+T_dc)·d·2·2·(TP−1)/TP / W  (two all-reduces per layer, ring
  factor 2; exactly 0 at TP = 1. BLIS's coefficient absorbs the NVLink/HBM ratio.)
* counts: ``num_layers`` = L, ``num_moe_layers`` = L for MoE models else 0 (both 0 for an
  empty step), ``batch_size`` = B.

Terms of an absent phase are exactly zero.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from calib import config
from calib.arch import Architecture
from calib.errors import CalibError
from calib.hardware import Hardware
from calib.traces.schema import PHASE_DECODE, PHASE_PREFILL

__all__ = [
    "ArchConsts",
    "Components",
    "arch_consts",
    "step_components",
    "dataset_components",
    "components_matrix",
    "DATASET_VARIABLES",
]


class ArchConsts(NamedTuple):
    """Static facts of one (architecture, hardware, TP), as floats.

    A pytree of scalars: :func:`step_components` traces them, so one compiled
    program serves every experiment of a given array shape and dtype.
    """

    L: float
    """transformer layers"""
    d: float
    """hidden size"""
    H: float
    """attention heads (whole model, not per GPU)"""
    d_h: float
    """head dimension d/H"""
    d_kv: float
    """KV width kvH·d_h (whole model)"""
    d_ff: float
    """FFN intermediate size (per expert for MoE)"""
    k_eff: float
    """experts per token, max(1, k) (1 for dense)"""
    E: float
    """local experts (0 = dense)"""
    bpp: float
    """weight bytes per parameter"""
    tp: float
    """tensor-parallel degree"""
    P: float
    """peak FLOP per µs per GPU"""
    W: float
    """HBM bytes per µs per GPU"""
    kv_bytes: float = float(config.KV_BYTES)
    """bytes per KV-cache element"""
    act_bytes: float = float(config.ROOFLINE_ACT_BYTES)
    """bytes per activation element (TP all-reduce)"""


class Components(NamedTuple):
    """Roofline terms per step, each an array of shape ``(n_steps,)``.

    Times in µs; ``num_layers``, ``batch_size``, ``num_moe_layers`` are counts.
    """

    pf_compute: jax.Array
    pf_kv: jax.Array
    dc_compute: jax.Array
    dc_kv: jax.Array
    weight: jax.Array
    tp: jax.Array
    num_layers: jax.Array
    batch_size: jax.Array
    num_moe_layers: jax.Array


#: Units of the :class:`Components` fields (attrs of :func:`dataset_components`).
UNITS = {
    **{f: "us" for f in config.COMPONENTS},
    "num_layers": "count",
    "batch_size": "count",
    "num_moe_layers": "count",
}

#: Variables of the canonical dataset that :func:`dataset_components` reads.
DATASET_VARIABLES = (
    "exp_arch_json",
    "exp_hardware_json",
    "exp_tp",
    "step_experiment",
    "slot_new_tokens",
    "slot_progress",
    "slot_prompt_len",
    "slot_phase",
    "slot_mask",
)


def arch_consts(arch: Architecture, hw: Hardware, tp: int) -> ArchConsts:
    """The :class:`ArchConsts` of ``arch`` on ``hw`` at tensor parallelism ``tp``.

    Raises
    ------
    CalibError
        If ``tp`` is not a valid TP degree for ``arch`` (:meth:`Architecture.check_tp`).
    """
    arch.check_tp(tp)
    return ArchConsts(
        L=float(arch.num_hidden_layers),
        d=float(arch.hidden_size),
        H=float(arch.num_attention_heads),
        d_h=float(arch.head_dim),
        d_kv=float(arch.kv_dim),
        d_ff=float(arch.intermediate_size),
        k_eff=float(max(1, arch.num_experts_per_tok)),
        E=float(arch.num_local_experts),
        bpp=float(arch.bytes_per_param),
        tp=float(tp),
        P=float(hw.flops_per_us),
        W=float(hw.hbm_bytes_per_us),
    )


def _float_dtype(new_tokens, dtype):
    if dtype is not None:
        return jnp.dtype(dtype)
    in_dtype = getattr(new_tokens, "dtype", None)
    if in_dtype is not None and jnp.issubdtype(in_dtype, jnp.floating):
        return jnp.dtype(in_dtype)
    return jnp.asarray(0.0).dtype  # float64 with x64 enabled, else float32


def _slot_sums(new_tokens, progress, prompt_len, phase, mask, *, dtype):
    """Per-row sums over the slot axis of 2-D ``(n, n_slots)`` arrays.

    Returns ``T_pf``, ``Σ t_i (s_i + t_i/2)``, ``T_dc``, ``Σ c_j``, ``B``, each ``(n,)``.
    """
    is_pf = mask & (phase == PHASE_PREFILL)
    is_dc = mask & (phase == PHASE_DECODE)
    zero = jnp.zeros((), dtype)
    t = jnp.where(is_pf, new_tokens.astype(dtype), zero)  # t_i
    s = jnp.where(is_pf, prompt_len.astype(dtype), zero)  # s_i
    ctx = jnp.where(is_dc, progress.astype(dtype), zero)  # c_j
    return jnp.stack(
        [
            t.sum(axis=-1),  # T_pf  [tokens]
            (t * (s + 0.5 * t)).sum(axis=-1),  # Σ t_i (s_i + t_i/2)  [token²]
            is_dc.sum(axis=-1).astype(dtype),  # T_dc  [requests]
            ctx.sum(axis=-1),  # Σ c_j [tokens]
            mask.sum(axis=-1).astype(dtype),  # B     [requests]
        ]
    )


def _blocked_slot_sums(arrays, dtype, block_rows):
    """:func:`_slot_sums` over blocks of ``block_rows`` rows (a sequential ``lax.map``).

    On the CPU this keeps every intermediate in cache instead of materialising
    ``(n, n_slots)`` float temporaries: about 8x faster on large inputs.
    """
    n = arrays[0].shape[0]
    if not block_rows or n <= block_rows:
        return _slot_sums(*arrays, dtype=dtype)
    n_main = (n // block_rows) * block_rows
    blocks = [a[:n_main].reshape(n_main // block_rows, block_rows, a.shape[-1]) for a in arrays]
    main = jax.lax.map(lambda xs: _slot_sums(*xs, dtype=dtype), blocks)  # (n_blocks, 5, rows)
    main = jnp.moveaxis(main, 1, 0).reshape(5, n_main)
    if n_main == n:
        return main
    rest = _slot_sums(*(a[n_main:] for a in arrays), dtype=dtype)
    return jnp.concatenate([main, rest], axis=1)


def _components(
    consts: ArchConsts, new_tokens, progress, prompt_len, phase, mask, dtype, block_rows
) -> Components:
    c = ArchConsts._make(jnp.asarray(v, dtype) for v in consts)
    arrays = jnp.broadcast_arrays(
        jnp.asarray(new_tokens),
        jnp.asarray(progress),
        jnp.asarray(prompt_len),
        jnp.asarray(phase),
        jnp.asarray(mask).astype(bool),
    )
    lead, n_slots = arrays[0].shape[:-1], arrays[0].shape[-1]
    arrays = [a.reshape(-1, n_slots) for a in arrays]
    sums = _blocked_slot_sums(arrays, dtype, block_rows).reshape(5, *lead)
    t_pf, attn_pf, t_dc, ctx_dc, b = sums
    nonempty = (b > 0).astype(dtype)

    # FLOP per token: QKVO projections + FFN, and per token² of attention.
    proj_flop = c.L * 2.0 * c.d * (2.0 * c.d + 2.0 * c.d_kv) / c.tp
    ffn_flop = c.L * c.k_eff * 6.0 * c.d * c.d_ff / c.tp
    attn_flop = c.L * 4.0 * (c.H / c.tp) * c.d_h
    # HBM bytes per KV token, weight bytes per step, all-reduce bytes per token.
    kv_byte = c.L * 2.0 * (c.d_kv / c.tp) * c.kv_bytes
    weight_byte = (
        c.L * c.d * (2.0 * c.d + 2.0 * c.d_kv) * c.bpp / c.tp
        + c.L * 3.0 * c.d * c.d_ff * c.bpp * jnp.maximum(1.0, c.E) / c.tp
    )
    tp_byte = 2.0 * c.L * c.d * c.act_bytes * 2.0 * (c.tp - 1.0) / c.tp

    return Components(
        pf_compute=((proj_flop + ffn_flop) * t_pf + attn_flop * attn_pf) / c.P,
        pf_kv=kv_byte * t_pf / c.W,
        dc_compute=((proj_flop + ffn_flop) * t_dc + attn_flop * ctx_dc) / c.P,
        dc_kv=kv_byte * (ctx_dc + t_dc) / c.W,
        weight=nonempty * (weight_byte / c.W),
        tp=tp_byte * (t_pf + t_dc) / c.W,
        num_layers=nonempty * c.L,
        batch_size=b,
        num_moe_layers=nonempty * c.L * jnp.asarray(c.E > 0, dtype),
    )


_components_jit = jax.jit(_components, static_argnames=("dtype", "block_rows"))


def step_components(
    consts: ArchConsts,
    new_tokens,
    progress,
    prompt_len,
    phase,
    mask,
    *,
    dtype=None,
    block_rows: int | None = None,
) -> Components:
    """Roofline terms (µs) and counts per step, for padded ``(n_steps, n_slots)`` arrays.

    Parameters
    ----------
    consts
        :func:`arch_consts` of the model, accelerator and TP (traced scalars: changing
        them does not recompile).
    new_tokens, progress, prompt_len, phase, mask
        ``slot_new_tokens``, ``slot_progress`` (ProgressIndex), ``slot_prompt_len``,
        ``slot_phase`` (0 pad, 1 prefill, 2 decode) and ``slot_mask`` of the canonical
        dataset, each of shape ``(..., n_slots)``; any integer or float dtype. Only slots
        with ``mask`` True count; the phase decides prefill vs decode (not re-derived).
    dtype
        Float dtype of the computation and result. Default: the dtype of ``new_tokens``
        if it is floating, else JAX's default float (float64 with x64 enabled).
    block_rows
        Rows reduced per iteration of a sequential loop (0: one vectorised pass). Default
        :data:`calib.config.ROOFLINE_CPU_BLOCK_ROWS` on the CPU backend, 0 elsewhere.

    Returns
    -------
    Components
        Arrays of shape ``(...,)`` (the slot axis reduced); formulas in the module docstring.
    """
    dt = _float_dtype(new_tokens, dtype)
    if block_rows is None:
        block_rows = config.ROOFLINE_CPU_BLOCK_ROWS if jax.default_backend() == "cpu" else 0
    return _components_jit(
        consts, new_tokens, progress, prompt_len, phase, mask, dtype=dt, block_rows=int(block_rows)
    )


# ------------------------------------------------------------------------ datasets
def _experiment_consts(ds: xr.Dataset, e: int) -> ArchConsts:
    name = str(ds["experiment"].values[e]) if "experiment" in ds.coords else str(e)
    where = f"dataset experiment {name!r}"
    try:
        arch = Architecture(**json.loads(str(ds["exp_arch_json"].values[e])))
    except (json.JSONDecodeError, TypeError) as exc:
        raise CalibError(
            f"{where}: cannot rebuild the architecture ({exc})",
            field="exp_arch_json",
            fix="re-import the traces",
        ) from None
    try:
        hw = Hardware(**json.loads(str(ds["exp_hardware_json"].values[e])))
    except (json.JSONDecodeError, TypeError) as exc:
        raise CalibError(
            f"{where}: cannot rebuild the hardware ({exc})",
            field="exp_hardware_json",
            fix="re-import the traces",
        ) from None
    tp = int(ds["exp_tp"].values[e])
    arch.check_tp(tp, source=where)
    return arch_consts(arch, hw, tp)


def _bucket(n: int, chunk: int) -> int:
    """Padded row count for a block of ``n`` rows: a power of two (≥ 64), at most ``chunk``."""
    size = 64
    while size < n:
        size *= 2
    return max(n, min(size, chunk))


def _rows(var: xr.DataArray, sel: np.ndarray) -> np.ndarray:
    if sel.size and sel[-1] - sel[0] == sel.size - 1 and np.all(np.diff(sel) == 1):
        return var[int(sel[0]) : int(sel[-1]) + 1].values  # contiguous: cheap slice
    return var[sel].values


def dataset_components(
    ds: xr.Dataset, steps: np.ndarray | None = None, *, chunk: int | None = None
) -> xr.Dataset:
    """Roofline :class:`Components` for steps of a canonical dataset (``calib.traces.schema``).

    Reads only :data:`DATASET_VARIABLES`: ``exp_arch_json``, ``exp_hardware_json``,
    ``exp_tp`` (per experiment), ``step_experiment`` and the ``slot_*`` arrays
    ``slot_new_tokens``, ``slot_progress``, ``slot_prompt_len``, ``slot_phase``,
    ``slot_mask``. Each experiment uses its own architecture, hardware and TP.

    Parameters
    ----------
    ds
        Canonical dataset (in memory or lazily loaded).
    steps
        Global step indices (positions along ``step``) to compute, any order;
        default all steps.
    chunk
        Maximum steps per JAX call (bounds memory); default
        :data:`calib.config.ROOFLINE_CHUNK_STEPS`. Blocks are padded to a power of two
        so few shapes compile.

    Returns
    -------
    xr.Dataset
        Dimension ``step`` with coordinate ``step`` = the given indices; one float64
        variable per :class:`Components` field, attrs ``units`` ("us" or "count").
        Values are computed in JAX's default float (float64 only with x64 enabled).

    Raises
    ------
    CalibError
        A required variable is missing, a step index is out of range, or an
        experiment's architecture/hardware JSON or TP is invalid.
    """
    missing = [v for v in DATASET_VARIABLES if v not in ds]
    if missing:
        raise CalibError(
            f"dataset lacks variable(s) {', '.join(missing)}",
            field=missing[0],
            fix="import the traces with `calib.traces` (schema.py)",
        )
    n_total = ds.sizes["step"]
    if steps is None:
        steps = np.arange(n_total, dtype=np.int64)
    else:
        steps = np.asarray(steps)
        if steps.ndim != 1 or not (steps.size == 0 or np.issubdtype(steps.dtype, np.integer)):
            raise CalibError("steps must be a 1-D array of integer step indices", field="steps")
        steps = steps.astype(np.int64)
        if steps.size and (steps.min() < 0 or steps.max() >= n_total):
            raise CalibError(
                f"step indices must lie in [0, {n_total}), got {steps.min()}..{steps.max()}",
                field="steps",
            )
    chunk = int(chunk or config.ROOFLINE_CHUNK_STEPS)
    if chunk < 1:
        raise CalibError(f"chunk must be a positive integer, got {chunk}", field="chunk")

    slot_vars = [
        ds[v].transpose("step", "slot")
        for v in ("slot_new_tokens", "slot_progress", "slot_prompt_len", "slot_phase", "slot_mask")
    ]
    n_slots = ds.sizes["slot"]
    step_exp = np.asarray(ds["step_experiment"].values)[steps]
    out = np.zeros((len(Components._fields), steps.size), dtype=np.float64)
    for e in np.unique(step_exp):
        consts = _experiment_consts(ds, int(e))
        pos = np.nonzero(step_exp == e)[0]
        for start in range(0, pos.size, chunk):
            p = pos[start : start + chunk]
            order = np.argsort(steps[p], kind="stable")  # sorted rows read contiguously
            p = p[order]
            rows = [_rows(v, steps[p]) for v in slot_vars]
            size = _bucket(p.size, chunk)
            if size > p.size:
                rows = [
                    np.concatenate([r, np.zeros((size - p.size, n_slots), r.dtype)]) for r in rows
                ]
            comps = step_components(consts, *rows)
            out[:, p] = np.asarray(jnp.stack(comps))[:, : p.size]
    data = {
        f: xr.Variable(("step",), out[i], attrs={"units": UNITS[f]})
        for i, f in enumerate(Components._fields)
    }
    return xr.Dataset(
        data,
        coords={"step": steps},
        attrs={"description": "BLIS trained-physics roofline terms per step (calib.roofline)"},
    )


def components_matrix(comps: xr.Dataset) -> np.ndarray:
    """The ``(n_steps, 6)`` float64 matrix of time components in ``config.COMPONENTS`` order."""
    missing = [c for c in config.COMPONENTS if c not in comps]
    if missing:
        raise CalibError(
            f"components dataset lacks {', '.join(missing)}",
            field=missing[0],
            fix="build it with calib.roofline.dataset_components",
        )
    return np.stack(
        [np.asarray(comps[c].values, dtype=np.float64) for c in config.COMPONENTS], axis=1
    )
