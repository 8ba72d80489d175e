"""Step-time predictions: plug-in, BLIS-style and per posterior draw.

Pure functions over arrays (numpy, float64). Three ways to predict a step's
duration from its roofline terms (:class:`StepFeatures`, µs and counts):

* :func:`plugin_step_time_us` — the fitted model's mean function
  (:func:`calib.steptime.step_time_us`) at one parameter set (e.g. the posterior means:
  a *plug-in* prediction, which is not the posterior-mean prediction because the model
  is non-linear in ``alpha``). ``mu`` is the *body median* step time of the model; the
  predictive mean is ``mean_factor·mu`` (:mod:`calib.noise`).
* :func:`blis_step_time_us` — BLIS's trained-physics ``StepTime`` formula from
  exported ``beta_coeffs`` (BLIS order, :data:`BLIS_BETA_NAMES`). It adds prefill and
  decode terms (no ``alpha``), so with ``alpha = 0`` it equals the plug-in prediction.
* :func:`step_time_draws_us` — the plug-in formula vectorised over posterior draws
  (``(draws, steps)``), grouped by the correction set each step uses (model,
  experiment, or a new model drawn from the population).

Exported-module contract (checked by the validation helper): for any non-empty
batch the BLIS prediction is > 0, deterministic and side-effect free (no global
state, no randomness), and costs far below 1 ms at batch size 128.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from calib import steptime
from calib.vocab import COMPONENTS, DC_C, DC_KV, PF_C, PF_KV

__all__ = [
    "ALPHA_NAMES",
    "BLIS_BETA_NAMES",
    "BLIS_EP_NAME",
    "StepFeatures",
    "betas_from_params",
    "batch_type",
    "blis_step_time_us",
    "params_from_betas",
    "plugin_step_time_us",
    "step_time_draws_us",
]

#: BLIS ``beta_coeffs`` order (trained-physics backend, 10 coefficients).
BLIS_BETA_NAMES = (
    "pf_compute",
    "dc_compute",
    "weight",
    "tp",
    "per_layer_us",
    "per_request_us",
    "per_step_us",
    "per_moe_layer_us",
    "pf_kv",
    "dc_kv",
)
#: BLIS's optional 11th beta (MoE dispatch/combine under DP > 1); not fitted, not exported.
BLIS_EP_NAME = "ep"
#: BLIS ``alpha_coeffs`` order (µs): ARRIVED→QUEUED, FINISHED→DEPARTED, per output token.
ALPHA_NAMES = ("queueing_us", "post_decode_us", "per_output_token_us")


class StepFeatures(NamedTuple):
    """Roofline terms of ``n`` steps.

    Attributes
    ----------
    components : (n, 6) float, µs, columns in :data:`calib.COMPONENTS` order.
    num_layers, batch_size, num_moe_layers : (n,) float counts (0 for an empty step).
    """

    components: np.ndarray
    num_layers: np.ndarray
    batch_size: np.ndarray
    num_moe_layers: np.ndarray

    @classmethod
    def from_components(cls, comps) -> StepFeatures:
        """From :func:`calib.roofline.dataset_components` output (an ``xr.Dataset``)."""
        from calib.roofline import components_matrix

        mat = components_matrix(comps)

        def get(k: str) -> np.ndarray:
            return np.asarray(comps[k].values, dtype=np.float64)

        moe = get("num_moe_layers") if "num_moe_layers" in comps else np.zeros(len(mat))
        return cls(mat, get("num_layers"), get("batch_size"), moe)

    @classmethod
    def from_model_data(cls, data) -> StepFeatures:
        """The steps of a :class:`calib.data.ModelData` (no MoE layer counts)."""
        comps = np.asarray(data.components, np.float64)
        return cls(
            comps,
            np.asarray(data.num_layers, np.float64),
            np.asarray(data.batch_size, np.float64),
            np.zeros(len(comps)),
        )

    @classmethod
    def from_dataset(cls, ds) -> StepFeatures:
        """Roofline terms of every step of a canonical dataset."""
        from calib.roofline import dataset_components

        return cls.from_components(dataset_components(ds))

    def take(self, idx) -> StepFeatures:
        """The features of the steps ``idx``."""
        return StepFeatures(*(np.asarray(a)[idx] for a in self))

    def __len__(self) -> int:  # number of steps
        return int(np.shape(self.components)[0])


def batch_type(components) -> np.ndarray:
    """ "prefill-only", "decode-only" or "mixed" per step, from its (n, 6) roofline terms."""
    c = np.asarray(components, np.float64)
    pf = (c[:, PF_C] + c[:, PF_KV]) > 0
    dc = (c[:, DC_C] + c[:, DC_KV]) > 0
    return np.where(pf & dc, "mixed", np.where(pf, "prefill-only", "decode-only"))


def plugin_step_time_us(
    b,
    per_layer_us: float,
    per_request_us: float,
    per_step_us: float,
    alpha: float,
    features: StepFeatures,
) -> np.ndarray:
    """Model step time (µs, the median under the model) at one parameter set
    (:func:`calib.steptime.step_time_us`).

    Parameters
    ----------
    b : (6,) or (n, 6) dimensionless corrections in ``COMPONENTS`` order (one set,
        or one per step).
    per_layer_us, per_request_us, per_step_us : overheads (µs per layer, per request, per step).
    alpha : prefill/decode mixing weight in [0, 1].
    features : the steps.

    Returns
    -------
    (n,) float64 µs.
    """
    bc = np.asarray(features.components, dtype=np.float64) * np.asarray(b, dtype=np.float64)
    return steptime.step_time_us(
        np,
        bc.T,
        np.asarray(features.num_layers, np.float64),
        np.asarray(features.batch_size, np.float64),
        per_layer_us,
        per_request_us,
        per_step_us,
        alpha,
    )


def betas_from_params(
    b: Sequence[float], per_layer_us: float, per_request_us: float, per_step_us: float
) -> list[float]:
    """The 10 BLIS ``beta_coeffs`` (order :data:`BLIS_BETA_NAMES`) of one parameter set.

    ``per_moe_layer_us`` is 0: the model does not fit BLIS's β₈ (it applies only to
    interleaved MoE architectures). The optional 11th ``ep`` beta is left out, so
    BLIS defaults it to β₄ (the TP correction); it matters only for MoE under DP > 1.
    """
    b = [float(x) for x in b]
    named = dict(zip(COMPONENTS, b, strict=True))
    vals = {
        **named,
        "per_layer_us": float(per_layer_us),
        "per_request_us": float(per_request_us),
        "per_step_us": float(per_step_us),
        "per_moe_layer_us": 0.0,
    }
    return [vals[k] for k in BLIS_BETA_NAMES]


def params_from_betas(betas: Sequence[float]) -> dict:
    """Inverse of :func:`betas_from_params` for 10 or 11 betas (alpha taken as 0)."""
    betas = [float(x) for x in betas]
    if len(betas) < 10:
        raise ValueError(f"need at least 10 betas (prefill and decode split), got {len(betas)}")
    named = dict(zip(BLIS_BETA_NAMES, betas[:10], strict=True))
    return {
        "b": np.array([named[c] for c in COMPONENTS]),
        "per_layer_us": named["per_layer_us"],
        "per_request_us": named["per_request_us"],
        "per_step_us": named["per_step_us"],
        "per_moe_layer_us": named["per_moe_layer_us"],
        "alpha": 0.0,
    }


def blis_step_time_us(
    beta_coeffs: Sequence[float],
    features: StepFeatures,
    *,
    interleaved_moe: bool = False,
    integer: bool = False,
) -> np.ndarray:
    """BLIS trained-physics ``StepTime`` (µs) from ``beta_coeffs`` on our roofline terms.

    Follows BLIS's rules: with fewer than 9 betas the prefill term is
    ``β₁·max(T_pf_compute, T_pf_kv)`` (else ``β₁·T_pf_compute + β₉·T_pf_kv``); with fewer
    than 10 the decode term is ``β₂·max(...)``; β₈ multiplies the MoE layer count only
    for interleaved MoE architectures; an empty batch costs 0 (BLIS: its 1 µs floor),
    as in :func:`calib.steptime.step_time_us`, which evaluates the sum. The MoE dispatch
    term (11th beta, DP > 1) is not modelled (DP = 1).

    Parameters
    ----------
    beta_coeffs : 7 to 11 non-negative values in :data:`BLIS_BETA_NAMES` order.
    features : the steps.
    interleaved_moe : whether the architecture interleaves MoE and dense layers.
    integer : return BLIS's integer µs (truncated, at least 1) instead of floats.
    """
    beta = np.zeros(11)
    given = np.asarray(beta_coeffs, dtype=np.float64)
    if given.ndim != 1 or not 7 <= given.size <= 11:
        raise ValueError(f"BLIS takes 7 to 11 beta coefficients, got shape {given.shape}")
    beta[: given.size] = given
    C = np.asarray(features.components, dtype=np.float64)
    named = dict(zip(BLIS_BETA_NAMES, beta[:10], strict=True))
    terms = C * np.array([named[c] for c in COMPONENTS])
    if given.size < 9:  # β₁·max(T_pf_compute, T_pf_kv)
        terms[:, PF_C] = beta[0] * np.maximum(C[:, PF_C], C[:, PF_KV])
        terms[:, PF_KV] = 0.0
    if given.size < 10:  # β₂·max(T_dc_compute, T_dc_kv)
        terms[:, DC_C] = beta[1] * np.maximum(C[:, DC_C], C[:, DC_KV])
        terms[:, DC_KV] = 0.0
    per_step = beta[6] + (
        beta[7] * np.asarray(features.num_moe_layers, np.float64) if interleaved_moe else 0.0
    )
    out = steptime.step_time_us(
        np,
        terms.T,
        np.asarray(features.num_layers, np.float64),
        np.asarray(features.batch_size, np.float64),
        beta[4],
        beta[5],
        per_step,
        0.0,
    )
    if integer:
        return np.maximum(1, np.trunc(out)).astype(np.int64)
    return out


def step_time_draws_us(
    b: np.ndarray,
    per_layer_us: np.ndarray,
    per_request_us: np.ndarray,
    per_step_us: np.ndarray,
    alpha: np.ndarray,
    features: StepFeatures,
    group: np.ndarray,
) -> np.ndarray:
    """Model step time (µs) for every draw and step: shape ``(draws, n)``.

    Parameters
    ----------
    b : (draws, G, 6) corrections per draw and correction group (a model, an
        experiment, or a new model drawn from the population).
    per_layer_us, per_request_us, per_step_us, alpha : (draws,).
    features : the n steps.
    group : (n,) int index into G: the correction set each step uses.

    Returns a ``(draws, n)`` view of a steps-major array (contiguous per group of
    steps); :func:`calib.steptime.step_time_us` on outer products ``T_k ⊗ b_k``.
    """
    b = np.asarray(b, dtype=np.float64)
    group = np.asarray(group)
    comps = np.asarray(features.components, dtype=np.float64)
    L = np.asarray(features.num_layers, np.float64)[:, None]
    B = np.asarray(features.batch_size, np.float64)[:, None]
    per_layer_us, per_request_us, per_step_us, alpha = (
        np.asarray(v, np.float64)[None, :]
        for v in (per_layer_us, per_request_us, per_step_us, alpha)
    )
    out = np.empty((len(features), b.shape[0]))  # steps x draws: contiguous per group
    for g in np.unique(group):
        idx = np.nonzero(group == g)[0]
        sel: np.ndarray | slice = idx
        if idx.size and idx[-1] - idx[0] + 1 == idx.size:
            sel = slice(int(idx[0]), int(idx[-1]) + 1)
        terms = [comps[sel, k, None] * b[None, :, g, k] for k in range(len(COMPONENTS))]
        out[sel] = steptime.step_time_us(
            np, terms, L[sel], B[sel], per_layer_us, per_request_us, per_step_us, alpha
        )
    return out.T
