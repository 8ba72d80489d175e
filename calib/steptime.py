"""THE mean step time: one formula for NumPyro, PyMC, numpy prediction and the export.

For one step with roofline terms ``T`` (µs, :mod:`calib.roofline`), corrections ``b``
(dimensionless), layers ``L`` and requests ``B`` in the batch::

    prefill = b_pf_compute·T_pf_compute + b_pf_kv·T_pf_kv
    decode  = b_dc_compute·T_dc_compute + b_dc_kv·T_dc_kv
    mu      = prefill + decode − alpha·min(prefill, decode)
              + b_weight·T_weight + b_tp·T_tp
              + per_layer_us·L + per_request_us·B + per_step_us          (B > 0)
    mu      = 0                                                          (B = 0)

``alpha`` in [0, 1] lets a mixed batch overlap its prefill and decode work (BLIS adds
them: ``alpha = 0``). An empty batch costs nothing, as in BLIS's trained-physics
``StepTime`` (``sim/latency/trained_physics_model.go``: ``len(batch) == 0`` returns its
1 µs floor before any term, so neither the weight pass, nor the per-layer overhead, nor
β₇ = ``per_step_us`` is charged); every non-empty batch pays every term. The fitted
steps are all non-empty, so the rule only matters for prediction.

:func:`step_time_us` is written against an array namespace ``xp`` (``numpy``,
``jax.numpy`` or ``pytensor.tensor``); callers differ only in how they form the six
products ``b_k·T_k`` (a gather per step, a broadcast per run of equal corrections, an
outer product over posterior draws).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from calib.vocab import DC_C, DC_KV, PF_C, PF_KV, TP, WEIGHT

Array = Any  # numpy, JAX or PyTensor


def step_time_us(
    xp,
    terms: Sequence[Array] | Array,
    num_layers: Array,
    batch_size: Array,
    per_layer_us: Array,
    per_request_us: Array,
    per_step_us: Array,
    alpha: Array,
) -> Array:
    """Mean step time (µs) from the corrected roofline terms.

    Parameters
    ----------
    xp : array namespace with ``minimum`` and ``where`` (numpy, jax.numpy,
        pytensor.tensor).
    terms : the six products ``b_k·T_k`` in :data:`calib.vocab.COMPONENTS` order, each
        broadcastable against the others (e.g. ``(n,)`` or ``(n, draws)``).
    num_layers, batch_size : per step, broadcastable against ``terms``.
    per_layer_us, per_request_us, per_step_us, alpha : scalars or broadcastable arrays.
    """
    prefill = terms[PF_C] + terms[PF_KV]
    decode = terms[DC_C] + terms[DC_KV]
    mix = prefill + decode - alpha * xp.minimum(prefill, decode)
    mu = (
        mix
        + terms[WEIGHT]
        + terms[TP]
        + per_layer_us * num_layers
        + per_request_us * batch_size
        + per_step_us
    )
    return xp.where(batch_size > 0, mu, 0.0)
