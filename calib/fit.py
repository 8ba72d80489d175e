"""Fit the step-time model: NUTS -> InferenceData -> diagnostics gate -> posterior file.

:func:`run_nuts` (NumPyro) and :func:`run_pymc` (PyMC, or nutpie through PyMC)
return the same InferenceData layout:

``posterior``        every latent and deterministic site without a ``step`` dim, on
                     named dims from :data:`calib.model.SITE_DIMS` (``model``,
                     ``component``, ``experiment``); the file keeps only the named
                     natural parameters (:func:`calib.posterior.save_posterior`);
``sample_stats``     ``diverging``, ``energy``, ``n_steps``, ``tree_depth``,
                     ``reached_max_treedepth``, ``acceptance_rate``, ``step_size``, ``lp``;
``observed_data``    ``duration_us`` (step);
``constant_data``    the :class:`calib.data.ModelData` arrays (see
                     :data:`calib.posterior.CONSTANT_VARS`); the ``step`` coordinate holds
                     the dataset's global step indices;
``log_likelihood``   (optional) ``duration_us`` (chain, draw, step): pointwise log density
                     of the observed duration in µs (a model observing ``log y`` gets the
                     Jacobian ``−log y`` added so ``az.loo`` compares on the µs scale);
``prior``            (optional) prior draws of the named parameters
                     (``calib.vocab.PARAMETER_SITES``, chain of size 1), drawn from the
                     model without observations (exact: no pinned coordinates).

:func:`fit` ties dataset -> model data -> sampler -> gate -> manifest -> file.
Library code never changes global JAX state (x64, device count, platform are
the script's job, before JAX is imported).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calib import config
from calib.errors import CalibError
from calib.vocab import HIERARCHIES, fittable_steps

if TYPE_CHECKING:
    from calib.diagnostics import GateResult

__all__ = [
    "BACKENDS",
    "CHAIN_METHODS",
    "FitResult",
    "SamplerSettings",
    "fit",
    "fit_model_data",
    "numpyro_to_idata",
    "pymc_prior_draws",
    "release_compiled_near_map_limit",
    "run_nuts",
    "run_pymc",
]

BACKENDS = ("numpyro", "pymc", "nutpie")
CHAIN_METHODS = ("parallel", "sequential", "vectorized")

#: NumPyro fields recorded per draw (E-BFMI needs energy, the tree-depth check num_steps).
NUMPYRO_EXTRA_FIELDS = (
    "diverging",
    "energy",
    "num_steps",
    "accept_prob",
    "adapt_state.step_size",
    "potential_energy",
)


@dataclass(frozen=True)
class SamplerSettings:
    """Everything that shapes a sampler run (recorded in the manifest)."""

    chains: int = config.SAMPLER.chains
    warmup: int = config.SAMPLER.warmup
    draws: int = config.SAMPLER.draws
    seed: int = config.SAMPLER.seed
    chain_method: str = config.SAMPLER.chain_method
    target_accept: float = config.SAMPLER.target_accept
    max_tree_depth: int = config.SAMPLER.max_tree_depth
    dense_mass: bool = config.DENSE_MASS
    #: Parameterisation of the hierarchical corrections (None: ``config.MODEL_CENTERED``).
    centered: bool | None = None
    #: Where chains start (``config.INIT_METHODS``; NumPyro only).
    init: str = config.SAMPLER.init

    def validate(self) -> None:
        """Raise :class:`CalibError` for values no sampler accepts."""
        for name in ("chains", "draws", "max_tree_depth"):
            if getattr(self, name) < 1:
                raise CalibError(
                    f"must be at least 1, got {getattr(self, name)}",
                    field=name,
                    fix=f"pass --{name.replace('_', '-')} >= 1",
                )
        if self.warmup < 0:
            raise CalibError(
                f"must be >= 0, got {self.warmup}", field="warmup", fix="pass --warmup >= 0"
            )
        if not 0.0 < self.target_accept < 1.0:
            raise CalibError(
                f"must be in (0, 1), got {self.target_accept}",
                field="target_accept",
                fix="pass e.g. --target-accept 0.85",
            )
        if self.init not in config.INIT_METHODS:
            raise CalibError(
                f"unknown start {self.init!r}",
                field="init",
                fix=f"use one of {list(config.INIT_METHODS)}",
            )
        if self.chain_method not in CHAIN_METHODS:
            raise CalibError(
                f"unknown chain method {self.chain_method!r}",
                field="chain_method",
                fix=f"use one of {list(CHAIN_METHODS)}",
            )


@dataclass(frozen=True)
class FitResult:
    """Outcome of :func:`fit`.

    Attributes
    ----------
    idata : az.InferenceData (attrs hold ``manifest`` and ``diagnostics`` JSON strings).
    gate : calib.diagnostics.GateResult
    path : where the posterior was written, or None (gate failed without ``save_on_fail``,
        or no ``out_path``).
    sampling_s : wall-clock seconds of the sampler call (compilation included).
    """

    idata: object
    gate: GateResult
    path: Path | None
    sampling_s: float

    @property
    def passed(self) -> bool:
        return bool(self.gate.passed)


# --------------------------------------------------------------------------- helpers
def _sizes(coords: dict[str, list], n_steps: int) -> dict[str, int]:
    """Sizes of every coordinate (``model``, ``component``, ``active``, ...) and ``step``."""
    out = {k: len(v) for k, v in coords.items() if k != "step"}
    out["step"] = n_steps
    return out


def _site_dims(name: str, shape: tuple[int, ...], site_dims: dict, sizes: dict) -> tuple:
    """Dims of a site's per-draw value ``shape``: SITE_DIMS when they fit, else defaults."""
    want = site_dims.get(name)
    if want is not None:
        want = tuple(want)
        cands = [want]
        if len(want) > len(shape):  # e.g. pooled: ("model", "component") stored as (component,)
            cands.append(want[len(want) - len(shape) :])
        for cand in cands:
            if len(cand) == len(shape) and all(
                sizes.get(d, s) == s for d, s in zip(cand, shape, strict=True)
            ):
                return cand
    return tuple(f"{name}_dim_{i}" for i in range(len(shape)))


def _step_index(data, step_index) -> np.ndarray:
    n = int(np.shape(data.components)[0])
    return (
        np.arange(n, dtype=np.int64)
        if step_index is None
        else np.asarray(step_index, dtype=np.int64)
    )


def _coords_for(coords: dict, step_index: np.ndarray) -> dict:
    out: dict[str, list | np.ndarray] = {k: list(v) for k, v in coords.items() if k != "step"}
    out["step"] = step_index
    return out


def _check_model_data(data, coords) -> None:
    for key in ("model", "component", "experiment"):
        if key not in coords:
            raise ValueError(f"coords lack {key!r}")
    if data.duration_us is None:
        raise CalibError(
            "no measured step durations to fit",
            field="duration_us",
            fix="use a dataset with sampled steps (steps with step.duration_us)",
        )
    y = np.asarray(data.duration_us)
    if y.size == 0:
        raise CalibError(
            "no sampled steps to fit", field="duration_us", fix="use a dataset with sampled steps"
        )
    if not np.all(np.isfinite(y) & (y > 0)):
        raise CalibError(
            f"{int((~(np.isfinite(y) & (y > 0))).sum())} step duration(s) are "
            "not finite and positive",
            field="duration_us",
            fix="fit only sampled steps with positive durations",
        )


def _observed_sites(model_fn, data, priors) -> dict[str, np.ndarray]:
    """Observed sites of the model and their values.

    Traced abstractly (``jax.eval_shape``: no XLA compilation, which dominates eager
    tracing on small CPUs); observed values passed in as data are concrete and
    captured as they are, computed ones are evaluated with one jitted call.
    """
    import jax
    from numpyro import handlers

    captured: dict[str, object] = {}

    def run():
        tr = handlers.trace(handlers.seed(model_fn, 0)).get_trace(data, priors)
        out = {}
        for name, site in tr.items():
            if site["type"] == "sample" and site["is_observed"]:
                captured[name] = site["value"]
                out[name] = site["value"]
        return out

    jax.eval_shape(run)
    if any(isinstance(v, jax.core.Tracer) for v in captured.values()):
        return {k: np.asarray(v) for k, v in jax.jit(run)().items()}
    return {k: np.asarray(v) for k, v in captured.items()}


def _likelihood_site(obs_sites: dict) -> str:
    """The observed data site: ``calib.model.OBS_SITE``, else the one observed site that
    is not a ``numpyro.factor`` (factors are observed ``Unit`` sites with no data)."""
    from calib.model import OBS_SITE

    if OBS_SITE in obs_sites:
        return OBS_SITE
    names = [k for k, v in obs_sites.items() if np.ndim(v) > 0]
    if len(names) != 1:
        raise ValueError(f"cannot tell the observed data site among {list(obs_sites)}")
    return names[0]


def _jacobian(obs_value: np.ndarray, duration_us: np.ndarray) -> np.ndarray | None:
    """``−log y`` when the model observes ``log y``; 0 when it observes ``y``; else None."""
    y = np.asarray(duration_us, dtype=float)
    v = np.asarray(obs_value, dtype=float)
    if v.shape != y.shape:
        return None
    if np.allclose(v, y, rtol=1e-6):
        return np.zeros_like(y)
    if np.allclose(v, np.log(y), rtol=1e-6, atol=1e-9):
        return -np.log(y)
    return None


def _posterior_dataset(
    samples: dict,
    *,
    drop: set,
    site_dims: dict,
    coords: dict,
    sizes: dict,
    library,
    group_by_chain: bool = True,
):
    """Dataset of (chain, draw, ...) samples; step-shaped and dropped sites left out."""
    import arviz as az

    data, dims = {}, {}
    for name, value in samples.items():
        if name in drop:
            continue
        v = np.asarray(value)
        d = _site_dims(name, v.shape[2:], site_dims, sizes)
        if "step" in d:
            continue  # per-step outputs are re-predicted from constant_data, not stored
        data[name] = v
        dims[name] = list(d)
    return az.dict_to_dataset(data, library=library, coords=coords, dims=dims)


def _sample_stats_numpyro(extra: dict, max_tree_depth: int, library):
    import arviz as az

    n_steps = np.asarray(extra["num_steps"]).astype(np.int64)
    tree_depth = (np.floor(np.log2(np.maximum(n_steps, 1))) + 1).astype(np.int64)
    stats = {
        "diverging": np.asarray(extra["diverging"], dtype=bool),
        "energy": np.asarray(extra["energy"]),
        "n_steps": n_steps,
        "tree_depth": tree_depth,
        "reached_max_treedepth": tree_depth >= max_tree_depth,
        "acceptance_rate": np.asarray(extra["accept_prob"]),
        "step_size": np.asarray(extra["adapt_state.step_size"]),
        "lp": -np.asarray(extra["potential_energy"]),
    }
    return az.dict_to_dataset(stats, library=library)


def _log_likelihood_numpyro(
    model_fn,
    flat_samples: dict,
    data,
    priors,
    obs_names,
    n_chains: int,
    n_draws: int,
    max_elements: int = 2**24,
) -> dict:
    """Pointwise log-likelihood per observed site, (chain, draw, ...) arrays, in batches."""
    import jax
    import jax.numpy as jnp
    from numpyro.infer import log_likelihood as np_log_likelihood

    n_total = n_chains * n_draws
    n_steps = int(np.shape(data.components)[0])
    batch = max(1, min(n_total, max_elements // max(n_steps, 1)))
    fn = jax.jit(lambda s: np_log_likelihood(model_fn, s, data, priors))
    parts: dict[str, list] = {k: [] for k in obs_names}
    for start in range(0, n_total, batch):
        chunk = {k: jnp.asarray(v[start : start + batch]) for k, v in flat_samples.items()}
        if chunk and next(iter(chunk.values())).shape[0] < batch:  # pad: one compilation
            pad = batch - next(iter(chunk.values())).shape[0]
            chunk = {
                k: jnp.concatenate([v, jnp.repeat(v[-1:], pad, axis=0)]) for k, v in chunk.items()
            }
        out = fn(chunk)
        for k in obs_names:
            parts[k].append(np.asarray(out[k]))
    return {
        k: np.concatenate(v)[:n_total].reshape(n_chains, n_draws, *v[0].shape[1:])
        for k, v in parts.items()
    }


def release_compiled_near_map_limit(fraction: float = config.MAP_COUNT_CLEAR_FRACTION) -> bool:
    """Clear JAX's caches when this process holds over ``fraction`` of Linux's
    ``vm.max_map_count`` memory mappings; return whether it did.

    Compiled XLA programs stay mapped while JAX's caches hold them (about 3,000 mappings
    per NumPyro fit, ``calib.config.MAP_COUNT_CLEAR_FRACTION``), and a process that
    reaches the limit is aborted inside the compiler. Only caches are dropped (later
    calls compile again); elsewhere than Linux, or without ``/proc``, nothing happens.
    """
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps") as f:
            held = sum(1 for _ in f)
    except (OSError, ValueError):
        return False
    if held <= fraction * limit:
        return False
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
    return True


def _pmap_of_vmap(n_devices: int):
    """NumPyro ``chain_method`` callable: chains split over ``n_devices`` (pmap), the
    chains of one device vectorised (vmap). For more chains than host devices."""
    import jax

    def wrap(fn):
        def run(args):
            split = jax.tree_util.tree_map(
                lambda x: x.reshape(n_devices, x.shape[0] // n_devices, *x.shape[1:]), args
            )
            out = jax.pmap(jax.vmap(fn))(split)
            return jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), out)

        return run

    return wrap


def _assemble(
    samples: dict,
    *,
    prior_samples: dict | None,
    drop: set,
    site_dims: dict,
    sample_stats,
    log_lik,
    data,
    coords: dict,
    step_index: np.ndarray,
    library,
    attrs: dict,
):
    """InferenceData from one backend's (chain, draw, ...) ``samples``, its sample
    statistics, log-likelihood and (draw, ...) ``prior_samples`` (or None)."""
    import arviz as az

    from calib.posterior import modeldata_to_constant_data

    sizes = _sizes(coords, step_index.shape[0])
    xcoords = _coords_for(coords, step_index)

    def dataset(group: dict):
        return _posterior_dataset(
            group, drop=drop, site_dims=site_dims, coords=xcoords, sizes=sizes, library=library
        )

    const, obs = modeldata_to_constant_data(data, coords, step_index)
    groups = {
        "posterior": dataset(samples),
        "sample_stats": sample_stats,
        "observed_data": obs,
        "constant_data": const,
    }
    if log_lik is not None:
        groups["log_likelihood"] = log_lik
    if prior_samples is not None:
        groups["prior"] = dataset({k: np.asarray(v)[None] for k, v in prior_samples.items()})
    return az.InferenceData(attrs=attrs, **groups)


def _log_lik_dataset(values: np.ndarray, jac: np.ndarray | None, step_index, library):
    import arviz as az

    if jac is not None:
        values = values + jac
    return az.dict_to_dataset(
        {"duration_us": values},
        library=library,
        coords={"step": step_index},
        dims={"duration_us": ["step"]},
    )


# ------------------------------------------------------------------------- samplers
def run_nuts(
    model_fn,
    data,
    priors,
    *,
    coords: dict[str, list[str]],
    settings: SamplerSettings = SamplerSettings(),
    progress: bool = True,
    log_likelihood: bool = False,
    prior_draws: int = 0,
    step_index: np.ndarray | None = None,
    site_dims: dict | None = None,
):
    """Sample ``model_fn(data, priors)`` with NumPyro NUTS.

    Parameters
    ----------
    model_fn : NumPyro model ``(data, priors) -> None`` (``calib.model.get_model(h)``,
        parameterisation already bound).
    data : calib.data.ModelData with ``duration_us``.
    priors : calib.priors.Priors
    coords : ``model``, ``component``, ``experiment`` labels.
    settings : :class:`SamplerSettings` (``centered`` is the caller's: it is bound into
        ``model_fn``). ``seed`` becomes ``jax.random.key(seed)``, split into independent
        keys for the starts, the sampler and the prior draws.
        ``chain_method="parallel"`` needs ``jax.local_device_count() >= chains`` (the
        script sets the host device count); with fewer devices it runs ``vectorized``
        and says so in ``attrs``. ``init`` "laplace": NUTS samples coordinates whitened
        by the normal approximation at the posterior mode and chains start at draws from
        it (:mod:`calib.start`); "median": every chain at the prior median, unwhitened.
        The report is the ``start`` attr. With ``chains > 1`` and
        ``warmup >= config.ADAPTATION.min_warmup`` one pilot chain runs the ``warmup``
        iterations of NumPyro's adaptation and every chain samples with its mass matrix
        after a step-size-only warmup (the ``adaptation`` attr); otherwise each chain
        adapts on its own.
    progress : NumPyro's progress bar (slower for small models: one dispatch per iteration).
    log_likelihood : add the ``log_likelihood`` group (memory: chains x draws x steps).
    prior_draws : add a ``prior`` group with this many prior draws (0: none).
    step_index : global step indices of ``data``'s rows in the source dataset.
    site_dims : dims per site (default ``calib.model.SITE_DIMS``).

    Returns
    -------
    az.InferenceData (layout in the module docstring).
    """
    import jax
    from numpyro.infer import MCMC, NUTS, Predictive

    settings.validate()
    _check_model_data(data, coords)
    step_index = _step_index(data, step_index)
    release_compiled_near_map_limit()
    chains, draws = settings.chains, settings.draws

    key_start, key_mcmc, key_prior = jax.random.split(jax.random.key(settings.seed), 3)

    method = settings.chain_method
    run_method: object = method
    note = ""
    n_dev = jax.local_device_count()
    if chains == 1:
        method = run_method = "sequential"
    elif method == "parallel" and n_dev < chains:
        if n_dev > 1 and chains % n_dev == 0:
            method = f"parallel({n_dev} devices) x vectorized({chains // n_dev})"
            run_method = _pmap_of_vmap(n_dev)
            progress = False  # NumPyro has no progress bar for a callable chain method
        else:
            method = run_method = "vectorized"
            note = f"parallel asked with {n_dev} device(s) for {chains} chains: ran vectorized"

    # Whitened coordinates and dispersed starts (calib.start): NumPyro's uniform(-2, 2)
    # start can land outside the support of the pinned constants, and its mass-matrix
    # regularisation swamps the directions the data pin at large N.
    from calib.start import laplace_start, median_start

    make_start = laplace_start if settings.init == "laplace" else median_start
    start = make_start(
        model_fn, data, priors, chains=chains, key=key_start, dense_mass=settings.dense_mass
    )

    def sampler(n_chains, n_warmup, inverse_mass_matrix=None, step_size=1.0):
        kernel = NUTS(
            potential_fn=start.potential_fn,
            target_accept_prob=settings.target_accept,
            max_tree_depth=settings.max_tree_depth,
            dense_mass=settings.dense_mass,
            inverse_mass_matrix=inverse_mass_matrix,
            step_size=step_size,
            adapt_mass_matrix=inverse_mass_matrix is None,
        )
        return MCMC(
            kernel,
            num_warmup=n_warmup,
            num_samples=draws,
            num_chains=n_chains,
            chain_method=run_method if n_chains > 1 else "sequential",
            progress_bar=progress,
            postprocess_fn=start.postprocess_fn,
        )

    adapt = config.ADAPTATION
    adaptation = None
    warmup = settings.warmup
    if chains > 1 and warmup >= adapt.min_warmup:
        # Pilot warmup (config.ADAPTATION): one chain runs NumPyro's full adaptation; every
        # chain then samples with its mass matrix, from its own start, after a short
        # step-size-only warmup. The expensive early windows are paid once, not per chain.
        key_pilot, key_mcmc = jax.random.split(key_mcmc)
        pilot = sampler(1, warmup)
        t_pilot = time.perf_counter()
        pilot.warmup(key_pilot, init_params=start.init_params[0])
        tuned = pilot.post_warmup_state.adapt_state
        adaptation = {
            "method": "pilot chain",
            "pilot_warmup": warmup,
            "pilot_seconds": round(time.perf_counter() - t_pilot, 3),
            "pilot_step_size": float(tuned.step_size),
            "step_size_warmup": adapt.step_size_warmup,
        }
        mcmc = sampler(
            chains, adapt.step_size_warmup, tuned.inverse_mass_matrix, float(tuned.step_size)
        )
    else:
        mcmc = sampler(chains, warmup)
    mcmc.run(key_mcmc, extra_fields=NUMPYRO_EXTRA_FIELDS, init_params=start.init_params)

    samples = jax.device_get(mcmc.get_samples(group_by_chain=True))
    extra = jax.device_get(mcmc.get_extra_fields(group_by_chain=True))
    prior_samples = None
    if prior_draws > 0:
        # Exact prior draws come from the model without observations (its natural
        # coordinates); keep the named parameters, whose dims do not depend on that.
        from calib.vocab import PARAMETER_SITES

        prior_samples = jax.device_get(
            Predictive(model_fn, num_samples=prior_draws)(
                key_prior, data._replace(duration_us=None, log_duration=None), priors
            )
        )
        prior_samples = {k: v for k, v in prior_samples.items() if k in PARAMETER_SITES}
    attrs = {
        "sampler": "numpyro-nuts",
        "chain_method_run": method,
        "start": json.dumps(start.report),
    }
    if adaptation is not None:
        attrs["adaptation"] = json.dumps(adaptation)
    if note:
        attrs["sampler_note"] = note
    return numpyro_to_idata(
        samples,
        extra,
        model_fn,
        data,
        priors,
        coords=coords,
        max_tree_depth=settings.max_tree_depth,
        step_index=step_index,
        log_likelihood=log_likelihood,
        prior_samples=prior_samples,
        site_dims=site_dims,
        attrs=attrs,
    )


def numpyro_to_idata(
    samples: dict,
    extra_fields: dict,
    model_fn,
    data,
    priors,
    *,
    coords: dict[str, list[str]],
    max_tree_depth: int,
    step_index: np.ndarray | None = None,
    log_likelihood: bool = False,
    prior_samples: dict | None = None,
    site_dims: dict | None = None,
    attrs: dict | None = None,
):
    """InferenceData (layout in the module docstring) from NumPyro samples.

    Parameters
    ----------
    samples : site -> (chain, draw, ...) arrays (``mcmc.get_samples(group_by_chain=True)``).
    extra_fields : :data:`NUMPYRO_EXTRA_FIELDS` -> (chain, draw) arrays.
    model_fn, data, priors : the model the samples belong to (observed sites and the
        log-likelihood are taken from it).
    coords, max_tree_depth, step_index, log_likelihood, site_dims : see :func:`run_nuts`.
    prior_samples : site -> (draw, ...) prior draws for the ``prior`` group, or None.
    attrs : root attributes.
    """
    import numpyro

    if site_dims is None:
        from calib.model import SITE_DIMS

        site_dims = SITE_DIMS
    _check_model_data(data, coords)
    step_index = _step_index(data, step_index)
    obs_sites = _observed_sites(model_fn, data, priors)
    samples = {k: np.asarray(v) for k, v in samples.items()}
    stats = _sample_stats_numpyro(extra_fields, max_tree_depth, numpyro)
    n_chains, n_draws = next(iter(samples.values())).shape[:2]

    log_lik = None
    if log_likelihood:
        obs_name = _likelihood_site(obs_sites)
        obs_value = obs_sites[obs_name]
        flat = {
            k: v.reshape(n_chains * n_draws, *v.shape[2:])
            for k, v in samples.items()
            if k not in obs_sites
        }
        ll = _log_likelihood_numpyro(model_fn, flat, data, priors, [obs_name], n_chains, n_draws)
        log_lik = _log_lik_dataset(
            ll[obs_name], _jacobian(obs_value, data.duration_us), step_index, numpyro
        )

    return _assemble(
        samples,
        prior_samples=prior_samples,
        drop=set(obs_sites),
        site_dims=site_dims,
        sample_stats=stats,
        log_lik=log_lik,
        data=data,
        coords=coords,
        step_index=step_index,
        library=numpyro,
        attrs=dict(attrs or {}),
    )


def run_pymc(
    model_fn,
    data,
    priors,
    *,
    coords: dict[str, list[str]],
    settings: SamplerSettings = SamplerSettings(),
    progress: bool = True,
    log_likelihood: bool = False,
    prior_draws: int = 0,
    step_index: np.ndarray | None = None,
    site_dims: dict | None = None,
    hierarchy: str = "per-model",
    nuts_sampler: str = "pymc",
):
    """Same as :func:`run_nuts` with PyMC's NUTS (``nuts_sampler="pymc"``) or nutpie.

    ``model_fn`` is unused except for documentation symmetry: the PyMC model comes
    from ``calib.model_pymc.build_pymc_model(hierarchy, data, priors, coords)`` and
    must use the same site names (``settings.centered``: its parameterisation, default
    ``calib.config.MODEL_CENTERED``; ``settings.init`` is NumPyro-only). ``chain_method``
    "parallel" runs chains in worker processes (``cores=min(chains, cpu count)``),
    "sequential" in this process; "vectorized" is NumPyro-only. ``prior_draws`` come
    from :func:`pymc_prior_draws` (the model without observations: exact prior draws
    of the named parameters).
    """
    import pymc as pm

    if nuts_sampler == "nutpie":
        try:
            import nutpie  # noqa: F401
        except ImportError:
            raise CalibError(
                "backend nutpie needs the nutpie package, which is not installed",
                field="backend",
                fix="pip install -e '.[nutpie]', or use --backend numpyro / pymc",
            ) from None
        if log_likelihood:
            raise CalibError(
                "backend nutpie does not store the pointwise log-likelihood",
                field="log_likelihood",
                fix="use --backend numpyro or pymc with --log-likelihood",
            )
    settings.validate()
    if settings.chain_method == "vectorized":
        raise CalibError(
            "chain method 'vectorized' exists only for the numpyro backend",
            field="chain_method",
            fix="use --chain-method parallel or sequential",
        )
    from calib.model_pymc import build_pymc_model

    if site_dims is None:
        from calib.model import SITE_DIMS

        site_dims = SITE_DIMS
    _check_model_data(data, coords)
    step_index = _step_index(data, step_index)
    seed_mcmc, seed_prior = (
        int(s.generate_state(1)[0]) for s in np.random.SeedSequence(settings.seed).spawn(2)
    )
    centered, chains = settings.centered, settings.chains
    max_tree_depth, dense_mass = settings.max_tree_depth, settings.dense_mass

    model = build_pymc_model(
        hierarchy, data, priors, {**coords, "step": list(step_index)}, centered=centered
    )
    obs_names = [rv.name for rv in model.observed_RVs]
    cores = 1 if settings.chain_method == "sequential" else min(chains, os.cpu_count() or 1)
    kwargs = dict(
        draws=settings.draws,
        tune=settings.warmup,
        chains=chains,
        cores=cores,
        random_seed=seed_mcmc,
        progressbar=progress,
        nuts_sampler=nuts_sampler,
        compute_convergence_checks=False,
        idata_kwargs={"log_likelihood": bool(log_likelihood)},
    )
    if nuts_sampler == "pymc":
        kwargs.update(
            init="jitter+adapt_full" if dense_mass else "jitter+adapt_diag",
            nuts={"target_accept": settings.target_accept, "max_treedepth": max_tree_depth},
        )
        if cores > 1:
            # PyMC forks its chain processes on Linux; this process has usually started
            # JAX's runtime (the roofline components), whose threads make a fork liable
            # to deadlock (pymc-devs/pymc#7668). A fork server starts chains from a
            # clean single-threaded process.
            kwargs["mp_ctx"] = config.PYMC_MP_CONTEXT
    import warnings

    if nuts_sampler == "nutpie":
        trace = _sample_nutpie(model, settings, cores=cores, seed=seed_mcmc, progress=progress)
    else:
        with model, warnings.catch_warnings():
            # PyMC flags its full-mass adaptation as experimental on every call
            warnings.filterwarnings("ignore", message="QuadPotentialFullAdapt is an experimental")
            trace = pm.sample(**kwargs)
    prior_samples = (
        pymc_prior_draws(
            hierarchy, data, priors, coords, prior_draws, seed=seed_prior, centered=centered
        )
        if prior_draws > 0
        else None
    )

    st = trace.sample_stats
    stats_keep = (
        "diverging",
        "energy",
        "n_steps",
        "tree_depth",
        "reached_max_treedepth",
        "acceptance_rate",
        "step_size",
        "lp",
    )
    stats = st[[k for k in stats_keep if k in st]]
    if "reached_max_treedepth" not in stats and "tree_depth" in stats:
        stats["reached_max_treedepth"] = stats["tree_depth"] >= max_tree_depth

    log_lik = None
    if log_likelihood:
        obs_name = _likelihood_site(
            {k: trace.observed_data[k].values for k in obs_names if k in trace.observed_data}
        )
        ll = np.asarray(trace.log_likelihood[obs_name].values)
        ll = ll.reshape(ll.shape[0], ll.shape[1], -1)
        obs_value = np.asarray(trace.observed_data[obs_name].values).reshape(-1)
        log_lik = _log_lik_dataset(ll, _jacobian(obs_value, data.duration_us), step_index, pm)

    return _assemble(
        {k: v.values for k, v in trace.posterior.data_vars.items()},
        prior_samples=prior_samples,
        drop=set(obs_names),
        site_dims=site_dims,
        sample_stats=stats,
        log_lik=log_lik,
        data=data,
        coords=coords,
        step_index=step_index,
        library=pm,
        attrs={
            "sampler": f"{nuts_sampler}-nuts",
            "chain_method_run": "sequential" if cores == 1 else "parallel",
        },
    )


#: nutpie's sample-statistic names -> the names PyMC (and the gate) use.
_NUTPIE_STATS = {
    "depth": "tree_depth",
    "maxdepth_reached": "reached_max_treedepth",
    "mean_tree_accept": "acceptance_rate",
    "logp": "lp",
}


def _sample_nutpie(model, settings: SamplerSettings, *, cores: int, seed: int, progress: bool):
    """nutpie's NUTS on the PyMC model; an InferenceData with PyMC's sample-stat names.

    nutpie is called directly (PyMC's ``nuts_sampler="nutpie"`` drops ``cores`` and
    warns on every call). The model is compiled by nutpie's JAX backend: its default
    (Numba) had not compiled this model after 15 min on 2 loaded cores, JAX took 35 s.
    ``settings.dense_mass`` selects nutpie's low-rank modified mass matrix (its
    nearest to a dense one), else its default diagonal, gradient-based adaptation.
    """
    import nutpie

    compiled = nutpie.compile_pymc_model(model, backend="jax", gradient_backend="jax")
    trace = nutpie.sample(
        compiled,
        draws=settings.draws,
        tune=settings.warmup,
        chains=settings.chains,
        cores=cores,
        seed=seed,
        progress_bar=progress,
        save_warmup=False,
        low_rank_modified_mass_matrix=settings.dense_mass,
        target_accept=settings.target_accept,
        maxdepth=settings.max_tree_depth,
    )
    st = trace.sample_stats
    trace.sample_stats = st.rename({k: v for k, v in _NUTPIE_STATS.items() if k in st})
    # nutpie also stores the transformed values (``tau_log__``); PyMC's traces do not
    post = trace.posterior
    trace.posterior = post.drop_vars([v for v in post.data_vars if v.endswith("__")])
    return trace


def pymc_prior_draws(
    hierarchy: str,
    data,
    priors,
    coords: dict[str, list],
    draws: int,
    *,
    seed: int = 0,
    centered: bool | None = None,
) -> dict[str, np.ndarray]:
    """Exact prior draws of the named parameters from the PyMC model.

    The model is built WITHOUT observations, i.e. in its natural coordinates: with
    observations the pinned corrections and the bounded ``per_request_us``
    (``calib.geometry.pinned``) are sampled through raw sites whose prior is completed by
    ``pm.Potential`` terms, which ``pm.sample_prior_predictive`` ignores (as NumPyro's
    ``Predictive`` ignores factor sites). Same choice as :func:`run_nuts`.

    Parameters
    ----------
    hierarchy, data, priors : the model (``data.duration_us`` is dropped here).
    coords : ``model`` and ``experiment`` labels (the other coordinates are rebuilt for
        the observation-free data, whose active pairs include the pinned ones).
    draws : number of prior draws.
    seed : ``random_seed`` of ``pm.sample_prior_predictive``.
    centered : parameterisation (default ``calib.config.MODEL_CENTERED``).

    Returns
    -------
    dict
        :data:`calib.vocab.PARAMETER_SITES` present in the model -> (draws, ...) arrays;
        their dims (``model``, ``component``, ``experiment``) do not depend on the
        coordinates the model was sampled in.
    """
    import warnings

    import pymc as pm

    from calib.model import model_coords
    from calib.model_pymc import build_pymc_model
    from calib.priors import EXACT_BETALN_SUFFIX
    from calib.vocab import PARAMETER_SITES

    free = data._replace(duration_us=None, log_duration=None)
    pcoords = model_coords(free, list(coords["model"]), list(coords["experiment"]))
    model = build_pymc_model(hierarchy, free, priors, pcoords, centered=centered)
    names = [n for n in PARAMETER_SITES if n in model.named_vars]
    # the only potentials of the observation-free model are the Beta priors' constant
    # normaliser corrections (calib.priors.pymc_variable): ignoring them is exact
    constant = all(p.name.endswith(EXACT_BETALN_SUFFIX) for p in model.potentials)
    with model, warnings.catch_warnings():
        if constant:
            warnings.filterwarnings("ignore", message="The effect of Potentials on other")
        idata = pm.sample_prior_predictive(draws=int(draws), var_names=names, random_seed=int(seed))
    return {k: np.asarray(idata.prior[k].values)[0] for k in names}


# ------------------------------------------------------------------------------ fit
def _model_data_hash(data) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in (
        "components",
        "num_layers",
        "batch_size",
        "model_idx",
        "experiment_idx",
        "experiment_model",
        "active",
        "duration_us",
    ):
        v = getattr(data, name)
        if v is not None:
            a = np.ascontiguousarray(np.asarray(v))
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def fit_model_data(
    data,
    coords: dict[str, list[str]],
    *,
    hierarchy: str = "per-model",
    priors=None,
    priors_path: str | Path | None = None,
    backend: str = "numpyro",
    settings: SamplerSettings = SamplerSettings(),
    step_index: np.ndarray | None = None,
    data_hash: str | None = None,
    data_path: str | Path | None = None,
    out_path: str | Path | None = None,
    save_on_fail: bool = False,
    log_likelihood: bool = False,
    prior_draws: int = 0,
    progress: bool = True,
    command: list[str] | None = None,
    api_overheads: dict | None = None,
    ppc_draws: int = config.PPC_DRAWS,
    discrepancy_inputs=None,
) -> FitResult:
    """Fit prepared model data: sampler -> gate -> manifest -> (file).

    ``ppc_draws``: draws in the ``posterior_predictive`` group (:mod:`calib.ppc`; 0: none).

    Parameters
    ----------
    data, coords : from ``calib.model.build_model_data``.
    hierarchy : one of ``calib.vocab.HIERARCHIES``.
    priors : a loaded ``Priors``; else loaded from ``priors_path`` (default prior file).
    backend : "numpyro", "pymc" or "nutpie".
    settings : sampler settings.
    step_index : global step indices of the rows of ``data`` (stored as the ``step`` coord).
    data_hash : content hash of the dataset (``calib.traces.dataset_hash``; manifest ``data_hash``).
    data_path : where the dataset came from (manifest ``data_path``, absolute; the product
        commands use it when ``--traces`` is not given).
    out_path : where to write the posterior (None: do not write).
    save_on_fail : write the file even when the gate fails (the verdict says fail).
    log_likelihood, prior_draws, progress : see :func:`run_nuts`.
    command : command line for the manifest (default ``sys.argv``).
    api_overheads : the API-overhead estimate of the same data
        (:func:`calib.overheads.estimate`), stored in the posterior for the export.
    discrepancy_inputs : the sampled steps of the same data with their replay weights
        (:func:`calib.discrepancy.step_inputs`): the structural-discrepancy record
        (:func:`calib.discrepancy.from_fit`) is computed from them and the posterior.
    """
    from calib import diagnostics
    from calib.io import manifest
    from calib.model import get_model
    from calib.priors import load_priors, priors_hash

    if hierarchy not in HIERARCHIES:
        raise CalibError(
            f"unknown hierarchy {hierarchy!r}",
            field="hierarchy",
            fix=f"use one of {list(HIERARCHIES)}",
        )
    if backend not in BACKENDS:
        raise CalibError(
            f"unknown backend {backend!r}", field="backend", fix=f"use one of {list(BACKENDS)}"
        )
    if prior_draws < 0:
        raise CalibError(f"must be >= 0, got {prior_draws}", field="prior_draws")
    if priors is None:
        priors = load_priors(priors_path)

    model_fn = get_model(hierarchy)
    if settings.centered is not None:
        model_fn = functools.partial(model_fn, centered=settings.centered)
    common: dict[str, Any] = dict(
        coords=coords,
        settings=settings,
        progress=progress,
        log_likelihood=log_likelihood,
        prior_draws=prior_draws,
        step_index=step_index,
    )
    t0 = time.perf_counter()
    if backend == "numpyro":
        idata = run_nuts(model_fn, data, priors, **common)
    else:
        idata = run_pymc(
            model_fn, data, priors, hierarchy=hierarchy, nuts_sampler=backend, **common
        )
    sampling_s = time.perf_counter() - t0

    gate = diagnostics.check(idata, settings.max_tree_depth)
    m = manifest(
        kind="posterior",
        seed=settings.seed,
        data_hash=data_hash,
        data_path=None if data_path is None else str(Path(data_path).resolve()),
        priors_hash=priors_hash(priors),
        command=command,
        diagnostics=gate.verdict,
        hierarchy=hierarchy,
        backend=backend,
        sampler={
            **asdict(settings),
            "chain_method_run": idata.attrs.get("chain_method_run"),
            "parameterisation": (
                "centered"
                if (config.MODEL_CENTERED if settings.centered is None else settings.centered)
                else "noncentered"
            ),
            "mass_matrix": "dense" if settings.dense_mass else "diagonal",
        },
        model_data_hash=_model_data_hash(data),
        n_steps=int(np.shape(data.components)[0]),
        priors_source=priors.source,
        sampling_s=round(sampling_s, 3),
    )
    idata.attrs["manifest"] = m
    idata.attrs["diagnostics"] = diagnostics.gate_to_attr(gate)
    idata.attrs["hierarchy"] = hierarchy
    if api_overheads is not None:
        from calib.posterior import API_OVERHEADS_ATTR

        idata.attrs[API_OVERHEADS_ATTR] = json.dumps(api_overheads)
    if discrepancy_inputs is not None:
        from calib import discrepancy

        idata.attrs[discrepancy.ATTR] = json.dumps(discrepancy.from_fit(idata, discrepancy_inputs))

    from calib.ppc import add_posterior_predictive

    add_posterior_predictive(idata, draws=ppc_draws)
    path = None
    if out_path is not None and (gate.passed or save_on_fail):
        from calib.posterior import save_posterior

        path = save_posterior(idata, out_path)
    return FitResult(idata=idata, gate=gate, path=path, sampling_s=sampling_s)


def fit(
    dataset,
    *,
    hierarchy: str = "per-model",
    priors_path: str | Path | None = None,
    backend: str = "numpyro",
    settings: SamplerSettings = SamplerSettings(),
    out_path: str | Path | None = None,
    save_on_fail: bool = False,
    log_likelihood: bool = False,
    prior_draws: int = 0,
    progress: bool = True,
    command: list[str] | None = None,
    ppc_draws: int = config.PPC_DRAWS,
) -> FitResult:
    """Fit the step-time model to a canonical dataset and write the posterior.

    Parameters
    ----------
    dataset : path of a canonical dataset (NetCDF, validated by
        ``calib.traces.load_dataset``) or an already loaded ``xarray.Dataset``.
    hierarchy, priors_path, backend, settings, out_path, save_on_fail, log_likelihood,
    prior_draws, progress, command : see :func:`fit_model_data`.

    Returns
    -------
    FitResult. The gate verdict is in ``result.gate``; the file is written only when
    the gate passes or ``save_on_fail`` is set.

    Raises
    ------
    CalibError
        Unreadable dataset or priors, bad settings, no sampled steps.
    """
    from calib import overheads
    from calib.data import build_model_data
    from calib.priors import load_priors
    from calib.traces import dataset_hash, load_dataset

    settings.validate()
    priors = load_priors(priors_path)  # fail fast on a bad prior file, before the dataset
    ds = load_dataset(dataset, progress=progress) if isinstance(dataset, str | Path) else dataset
    data_hash = dataset_hash(ds)
    steps = fittable_steps(ds)
    if steps.size == 0:
        raise CalibError(
            "the dataset has no sampled steps with a positive duration",
            path=dataset if isinstance(dataset, str | Path) else None,
            field="duration_us",
            fix="import experiments whose traces carry step.BATCH_SUMMARY durations",
        )
    data, coords = build_model_data(ds, steps=steps)
    try:
        api = overheads.estimate(ds)
    except CalibError as err:  # no request labels: the export then needs --alpha-coeffs
        print(f"warning: no API-overhead estimate: {err}", file=sys.stderr)
        api = None
    disc = _discrepancy_inputs(ds)
    del ds  # the sampler needs only the model data (a real-size dataset is GBs)
    return fit_model_data(
        data,
        coords,
        hierarchy=hierarchy,
        priors=priors,
        backend=backend,
        settings=settings,
        step_index=steps,
        data_hash=data_hash,
        data_path=dataset if isinstance(dataset, str | Path) else None,
        out_path=out_path,
        save_on_fail=save_on_fail,
        log_likelihood=log_likelihood,
        prior_draws=prior_draws,
        progress=progress,
        command=command,
        api_overheads=api,
        ppc_draws=ppc_draws,
        discrepancy_inputs=disc,
    )


def _discrepancy_inputs(ds):
    """The structural-discrepancy inputs of a dataset (:func:`calib.discrepancy.step_inputs`),
    or None with a warning when it has no request windows to weight the steps by."""
    from calib import discrepancy

    try:
        return discrepancy.step_inputs(ds)
    except CalibError as err:
        print(f"warning: no structural-discrepancy record: {err}", file=sys.stderr)
        return None


# ------------------------------------------------------------------- prior check
def prior_check(
    data,
    coords: dict[str, list[str]],
    *,
    hierarchy: str,
    priors,
    num_samples: int = 200,
    seed: int = 0,
    max_steps: int = 20000,
    out_png: str | Path | None = None,
):
    """Prior predictive check: step times the priors imply vs the observed ones.

    Parameters
    ----------
    data, coords : from ``calib.model.build_model_data`` (with ``duration_us``).
    hierarchy, priors : the model and its priors.
    num_samples : prior draws.
    seed : integer seed (``jax.random.key(seed)``).
    max_steps : steps used (evenly thinned when there are more; bounds memory).
    out_png : where to write the plot (log-axis histograms per model), or None.

    Returns
    -------
    pandas.DataFrame, one row per (model, source) with quantiles (µs) of the implied
    step time (``prior``: simulated durations incl. noise) and the observed one.
    """
    import pandas as pd

    from calib.model import make_model_data, prior_predictive

    n = int(np.shape(data.components)[0])
    if n > max_steps:
        idx = np.linspace(0, n - 1, max_steps).round().astype(np.int64)
        data = make_model_data(
            np.asarray(data.components)[idx],
            np.asarray(data.num_layers)[idx],
            np.asarray(data.batch_size)[idx],
            np.asarray(data.model_idx)[idx],
            np.asarray(data.experiment_idx)[idx],
            np.asarray(data.duration_us)[idx],
            n_models=data.n_models,
            n_experiments=data.n_experiments,
            experiment_model=data.experiment_model,
        )
    pred = prior_predictive(hierarchy, data, priors, num_samples=num_samples, seed=seed)
    sim = np.asarray(pred["duration_us"])  # (draws, steps)
    obs = np.asarray(data.duration_us)
    midx = np.asarray(data.model_idx)
    qs = (0.05, 0.25, 0.5, 0.75, 0.95)
    rows = []
    for m, name in enumerate(coords["model"]):
        sel = midx == m
        if not sel.any():
            continue
        for source, vals in (("prior", sim[:, sel].ravel()), ("observed", obs[sel])):
            vals = vals[np.isfinite(vals)]
            row = {"model": name, "source": source, "n": int(vals.size)}
            row.update({f"q{int(q * 100):02d}_us": float(np.quantile(vals, q)) for q in qs})
            rows.append(row)
    table = pd.DataFrame(rows)
    if out_png is not None:
        _plot_prior_check(sim, obs, midx, coords["model"], hierarchy, out_png)
    return table


def _plot_prior_check(sim, obs, midx, models, hierarchy, out_png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from calib.io import atomic_path

    present = [m for m in range(len(models)) if (midx == m).any()]
    fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.4 * len(present)), squeeze=False)
    for ax, m in zip(axes[:, 0], present, strict=True):
        sel = midx == m
        s = sim[:, sel].ravel()
        s = s[np.isfinite(s) & (s > 0)]
        o = obs[sel]
        lo = np.log10(max(min(np.quantile(s, 0.001), o.min()), 1e-3))
        hi = np.log10(max(np.quantile(s, 0.999), o.max()))
        bins = np.logspace(lo, hi, 60)
        ax.hist(
            s, bins=bins, weights=np.full(s.size, 1 / s.size), alpha=0.5, label="prior predictive"
        )
        ax.hist(o, bins=bins, weights=np.full(o.size, 1 / o.size), alpha=0.6, label="observed")
        ax.set_xscale("log")
        ax.set_title(f"{models[m]} ({hierarchy})", fontsize=9)
        ax.set_xlabel("step time (µs)")
        ax.set_ylabel("fraction of steps")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=config.REPORT_DPI)
    plt.close(fig)
