"""The project's names, defined once (no JAX, no PyMC: safe for argument parsers).

Components and their indices, overhead sites, hierarchies, validation splits, and which
steps of a dataset are *fittable* (the one rule every consumer of measured step times
uses: fit, validation, E2E replay, API overheads, baselines).
"""

from __future__ import annotations

import numpy as np

#: Component order of the roofline matrix (the model's correction factors ``b``).
COMPONENTS = ("pf_compute", "pf_kv", "dc_compute", "dc_kv", "weight", "tp")
#: Column index of each component in :data:`COMPONENTS` order.
PF_C, PF_KV, DC_C, DC_KV, WEIGHT, TP = range(len(COMPONENTS))
#: Shared additive overheads (µs per unit) and the step count each multiplies
#: (``None``: one per non-empty step).
OVERHEAD_SITES = (
    ("per_layer_us", "num_layers"),
    ("per_request_us", "batch_size"),
    ("per_step_us", None),
)
#: The step-time noise parameters (:mod:`calib.noise`), in the order every noise
#: function takes them (:class:`calib.noise.NoiseParams`; also the model's site names).
NOISE_PARAMS = (
    "sigma",
    "stall_prob",
    "stall_log_mult",
    "stall_log_sd",
    "fast_prob",
    "fast_log_mult",
    "fast_log_sd",
)
#: Parameters with a scalar prior entry (``priors/*.yaml``), overheads then noise.
SCALAR_PARAMETERS = ("per_layer_us", "per_request_us", "per_step_us", "alpha", *NOISE_PARAMS)
#: The named parameters in natural coordinates, in display order: what a posterior
#: file stores (the sampler's raw coordinates are not saved).
PARAMETER_SITES = ("b_pop", "tau", "b", "tau_exp", "b_exp", *SCALAR_PARAMETERS, "mean_factor")
#: Hierarchy names accepted at the command line (``--hierarchy``).
HIERARCHIES = ("pooled", "per-model", "per-experiment")
#: Validation split families (``--split``).
SPLITS = ("temporal", "workload", "model", "request-hash")


def fittable(ds) -> np.ndarray:
    """Mask over the steps of a canonical dataset: sampled, with a finite positive
    duration (µs). The only steps whose measured time is used anywhere."""
    dur = np.asarray(ds["duration_us"].values, np.float64)
    with np.errstate(invalid="ignore"):
        return np.asarray(ds["sampled"].values, bool) & np.isfinite(dur) & (dur > 0)


def fittable_steps(ds) -> np.ndarray:
    """Positions of the fittable steps (:func:`fittable`)."""
    return np.flatnonzero(fittable(ds))
