"""Export a posterior as BLIS trained-physics coefficients, with their uncertainty.

For every fitted LLM (and a ``population`` set for an unseen model) the export
writes, into one directory:

``<model>.yaml``
    the BLIS block ``trained_physics_coefficients: {alpha_coeffs, beta_coeffs}``
    (strict: nothing else inside it), the same numbers as BLIS command-line flags
    (``blis_flags``), the coefficient names and the mapping from the fitted
    parameters, an ``uncertainty`` section, an ``approximation`` section (the cost of
    BLIS adding prefill and decode terms when the fitted ``alpha`` is not 0), the
    source posterior (file hash, diagnostics verdict) and a ``manifest`` mapping.
``<model>.defaults.yaml``
    the trained_physics section of a BLIS defaults file: only the top-level key
    ``trained_physics_coefficients`` (BLIS parses its defaults file with unknown keys
    rejected, so provenance is written as YAML comments). Use it with BLIS's
    ``--defaults-filepath``; it carries no other section of BLIS's defaults.

Statistic: the exported betas reproduce the **posterior predictive mean step time**
(BLIS adds step times, so it needs means). The model's ``mu`` is the *body median*
step time; the predictive mean is ``mean_factor[m]·mu`` (:mod:`calib.noise`: the
stall and fast components and the body's log-normal spread). ``mu`` is homogeneous of
degree 1 in (``b``, overheads) for fixed ``alpha``, so ``F·mu(b, o) = mu(F·b, F·o)``
and every exported beta (corrections and the per-layer / per-request / per-step
overheads, exported per model) is the posterior mean of ``mean_factor[m]·coefficient``.
The ``uncertainty`` section describes the same scaled quantities and keeps the
body-median plug-in betas and ``mean_factor`` for readers. The remaining plug-in
approximation is ``alpha`` (the model is non-linear in it; BLIS drops it anyway).

Population (new-model) set: a new model's corrections are
``log b_new ~ N(log b_pop, tau)`` (the posterior predictive of the hierarchy); its
point is the predictive mean ``b_pop·exp(tau²/2)`` (times the mean over fitted models
of ``mean_factor``), averaged over draws, and its band the quantiles of the
predictive draws.

Mapping to BLIS ``beta_coeffs`` (10 values, BLIS order):

===================  =================================================================
BLIS beta            fitted parameter
===================  =================================================================
β₁  pf_compute       ``F·b[model, pf_compute]``  (``F = mean_factor[model]``)
β₂  dc_compute       ``F·b[model, dc_compute]``
β₃  weight           ``F·b[model, weight]``
β₄  tp               ``F·b[model, tp]``
β₅  µs/layer         ``F·per_layer_us`` (the overhead is shared, F per model)
β₆  µs/request       ``F·per_request_us``
β₇  µs/step          ``F·per_step_us``
β₈  µs/MoE-layer     0: not fitted (BLIS applies it to interleaved MoE architectures only)
β₉  pf_kv            ``F·b[model, pf_kv]``
β₁₀ dc_kv            ``F·b[model, dc_kv]``
(β₁₁ ep)             omitted: BLIS then sets it to β₄; it only acts for MoE under DP > 1
===================  =================================================================

For ``per-experiment`` fits the per-model ``b`` (the centre of that model's
workload effects) is exported. Components inactive for a model (e.g. ``tp`` at
TP = 1) carry the population value.

Alpha coefficients (µs): α₀ queueing (ARRIVED→QUEUED), α₁ post-decode fixed
overhead (FINISHED→DEPARTED), α₂ per output token; the API-overhead estimate the fit
stored in the posterior (:mod:`calib.overheads`: means with bootstrap intervals,
pooled across the models of the server as far as the data allow), clipped at 0, or
values given explicitly. The export runs no inference and reads no other data.

Structural discrepancy (``uncertainty.structural_discrepancy``, :mod:`calib.discrepancy`):
per metric (E2E, TTFT, decode interval) the mean ``mu`` and between-experiment sd
``tau`` of ``log(observed / predicted)`` step-time sums, learned across the fitted
experiments: for a new workload the step-time part of a predicted metric is off by a
factor ``exp(δ)``, ``δ ~ N(mu, tau)``. It is metric-specific, so it is described, not
folded into the betas (they stay the posterior predictive mean step time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from calib import config, discrepancy, noise, overheads
from calib.errors import CalibError
from calib.io import atomic_write_text, manifest
from calib.posterior import plugin_means
from calib.predict import (
    ALPHA_NAMES,
    BLIS_BETA_NAMES,
    StepFeatures,
    batch_type,
    betas_from_params,
    blis_step_time_us,
    plugin_step_time_us,
)

__all__ = [
    "BLIS_BLOCK",
    "ExportResult",
    "blis_flags",
    "export_posterior",
    "model_export",
    "population_name",
]

#: The top-level key of BLIS's defaults file that holds the coefficients.
BLIS_BLOCK = "trained_physics_coefficients"
POPULATION = "population"

_MAPPING = {
    "pf_compute": "F·b[model, pf_compute]",
    "dc_compute": "F·b[model, dc_compute]",
    "weight": "F·b[model, weight]",
    "tp": "F·b[model, tp]",
    "per_layer_us": "F·per_layer_us",
    "per_request_us": "F·per_request_us",
    "per_step_us": "F·per_step_us",
    "per_moe_layer_us": "0 (not fitted; BLIS applies it to interleaved MoE only)",
    "pf_kv": "F·b[model, pf_kv]",
    "dc_kv": "F·b[model, dc_kv]",
    "F": "mean_factor[model] = E[step time]/mu, the noise's mean over the body median "
    "(population: the mean over fitted models, per draw)",
}
#: The exported statistic (YAML ``statistic`` and the manifest).
STATISTIC = (
    "posterior predictive mean step time (posterior means of mean_factor·coefficient; "
    "alpha dropped, as BLIS adds prefill and decode)"
)
_ALPHA_MEANING = {
    "queueing_us": "α₀ QueueingTime: ARRIVED→QUEUED per request (req_api_queue_us)",
    "post_decode_us": "α₁ PostDecodeFixedOverhead: FINISHED→DEPARTED once per request "
    "(req_api_depart_us)",
    "per_output_token_us": "α₂ OutputTokenProcessingTime: host time per output token, "
    "added by BLIS to every inter-token latency",
}


def population_name() -> str:
    """File stem of the population-level export."""
    return POPULATION


def blis_flags(alpha_coeffs, beta_coeffs) -> str:
    """BLIS command-line flags carrying the same numbers as the YAML block."""

    def fmt(xs) -> str:
        return ",".join(repr(float(x)) for x in xs)

    return (
        f"--latency-model trained-physics --alpha-coeffs {fmt(alpha_coeffs)} "
        f"--beta-coeffs {fmt(beta_coeffs)}"
    )


def _summary(draws: np.ndarray, prob: float) -> dict:
    draws = np.asarray(draws, np.float64).reshape(-1)
    return {
        "mean": float(draws.mean()),
        "median": float(np.median(draws)),
        "sd": float(draws.std(ddof=1)) if draws.size > 1 else 0.0,
        "lower": float(np.quantile(draws, (1 - prob) / 2)),
        "upper": float(np.quantile(draws, (1 + prob) / 2)),
    }


def _beta_draws(
    b: np.ndarray, post: dict, factor: np.ndarray | float = 1.0
) -> dict[str, np.ndarray]:
    """Draws of each BLIS beta from corrections ``b`` (draws, 6), all scaled by ``factor``
    (draws,) (the mean factor: the betas of the mean step time)."""
    f = np.asarray(factor, np.float64)
    named = {c: f * b[:, i] for i, c in enumerate(config.COMPONENTS)}
    d = b.shape[0]
    return {
        "pf_compute": named["pf_compute"],
        "dc_compute": named["dc_compute"],
        "weight": named["weight"],
        "tp": named["tp"],
        "per_layer_us": f * post["per_layer_us"],
        "per_request_us": f * post["per_request_us"],
        "per_step_us": f * post["per_step_us"],
        "per_moe_layer_us": np.zeros(d),
        "pf_kv": named["pf_kv"],
        "dc_kv": named["dc_kv"],
    }


def _approximation(
    b_mean, post_means: dict, features: StepFeatures, duration_us: np.ndarray | None
) -> dict:
    """Cost of BLIS's additive prefill+decode (alpha = 0) on the fitted steps."""
    alpha = float(post_means["alpha"])
    betas = betas_from_params(
        b_mean, post_means["per_layer_us"], post_means["per_request_us"], post_means["per_step_us"]
    )
    out: dict = {
        "posterior_mean_alpha": alpha,
        "how": (
            "The fitted model mixes prefill and decode as prefill + decode − "
            "alpha·min(prefill, decode); BLIS adds them (alpha = 0). The BLIS block keeps "
            "the fitted corrections and drops the −alpha·min term, so it predicts mixed "
            "batches slower by alpha·min(prefill, decode); prefill-only and decode-only "
            "batches are unchanged."
        ),
        "n_steps": int(len(features)),
    }
    if len(features) == 0:
        return out
    full = plugin_step_time_us(
        b_mean,
        post_means["per_layer_us"],
        post_means["per_request_us"],
        post_means["per_step_us"],
        alpha,
        features,
    )
    blis = blis_step_time_us(betas, features)
    rel = 100.0 * (blis - full) / full
    kinds = batch_type(features.components)
    by = {}
    for k in ("prefill-only", "decode-only", "mixed"):
        sel = kinds == k
        if sel.any():
            by[k] = {
                "n_steps": int(sel.sum()),
                "mean_pct": float(rel[sel].mean()),
                "max_pct": float(rel[sel].max()),
            }
    out["blis_vs_fitted_step_time_pct"] = {
        "definition": "100·(BLIS − fitted plug-in)/fitted plug-in, on the posterior's fitted steps",
        "mean": float(rel.mean()),
        "median": float(np.median(rel)),
        "p95": float(np.quantile(rel, 0.95)),
        "max": float(rel.max()),
        "by_batch_type": by,
    }
    if duration_us is not None and np.all(np.isfinite(duration_us)):
        y = np.asarray(duration_us, np.float64)
        out["error_vs_observed_pct"] = {
            "definition": "mean of 100·|prediction − observed|/observed over the fitted steps",
            "fitted_plugin": float(np.mean(100.0 * np.abs(full - y) / y)),
            "blis_block": float(np.mean(100.0 * np.abs(blis - y) / y)),
            "fitted_plugin_mean_signed": float(np.mean(100.0 * (full - y) / y)),
            "blis_block_mean_signed": float(np.mean(100.0 * (blis - y) / y)),
        }
    return out


@dataclass(frozen=True)
class ExportResult:
    """Files written by :func:`export_posterior` and the BLIS flags per set."""

    paths: tuple[Path, ...]
    flags: dict[str, str]
    documents: dict[str, dict]


def model_export(
    post: dict,
    *,
    model: str | None,
    b_draws: np.ndarray,
    factor: np.ndarray,
    noise_draws: dict,
    alphas: dict,
    features: StepFeatures,
    duration_us: np.ndarray | None,
    prob: float,
    source: dict,
    export_manifest: dict,
    b_point: np.ndarray | None = None,
    structural: dict | None = None,
) -> dict:
    """The export document of one model (``model=None``: the population set).

    ``b_draws`` (draws, 6) are the corrections (population: the predictive draws of a new
    model's), ``factor`` (draws,) the mean factor, ``noise_draws`` the noise parameters'
    draws to summarise; ``b_point`` (draws, 6), default ``b_draws``, the corrections whose
    ``factor``-scaled mean is the point (population: ``b_pop·exp(tau²/2)``, the exact
    predictive mean over a new model). ``structural``: the uncertainty section's
    description of the structural discrepancy (:func:`calib.discrepancy.summary`).
    """
    b_point = b_draws if b_point is None else b_point
    means = plugin_means(post)
    scaled = _beta_draws(b_point, post, factor)
    betas = [float(np.mean(scaled[k])) for k in BLIS_BETA_NAMES]
    b_mean = np.array([np.mean(scaled[c]) for c in config.COMPONENTS])
    mean_point = {
        **means,
        **{k: float(np.mean(scaled[k])) for k in ("per_layer_us", "per_request_us", "per_step_us")},
    }
    median_b = b_point.mean(axis=0)
    median_betas = betas_from_params(
        median_b, means["per_layer_us"], means["per_request_us"], means["per_step_us"]
    )
    alpha_coeffs = [float(a) for a in alphas["mean"]]
    bad = [v for v in betas + alpha_coeffs if not (np.isfinite(v) and v >= 0)]
    if bad:
        raise CalibError(
            f"exported coefficients must be finite and >= 0, got {bad}",
            field="posterior",
            fix="check the fit's diagnostics and re-fit",
        )
    beta_draws = _beta_draws(b_draws, post, factor)
    name = model or POPULATION
    notes = [
        "statistic: " + STATISTIC + "; mu (the model's step time) is the body median, and "
        "the predictive mean step time is mean_factor·mu (uncertainty.mean_factor)",
        "beta_coeffs[7] per_moe_layer_us = 0: not fitted",
        "11th beta (ep) omitted: BLIS defaults it to beta_coeffs[3] (tp); it only acts for "
        "MoE models under data parallelism > 1",
        "with >= 10 betas BLIS splits prefill and decode into compute and KV terms, as fitted",
    ]
    if model is None:
        notes.append(
            "population set for an unseen model: a new model's corrections follow "
            "log b_new ~ N(log b_pop, tau); the point is their predictive mean "
            "b_pop·exp(tau²/2) (times the mean over fitted models of mean_factor), "
            "averaged over posterior draws; uncertainty.beta_coeffs gives the "
            "quantiles of the predictive draws mean_factor·b_pop·exp(tau·z)"
        )
    if alphas.get("source"):
        notes.append(f"alpha_coeffs: {alphas['source']}")
    if alphas.get("clipped"):
        notes.append(f"alpha_coeffs clipped at 0 (negative estimate): {alphas['clipped']}")
    pop = " (mean over fitted models, per draw)" if model is None else ""
    unc = {
        "interval": {"kind": config.INTERVAL_KIND, "probability": prob},
        "statistic": STATISTIC,
        "beta_coeffs": {k: _summary(v, prob) for k, v in beta_draws.items()},
        "alpha_coeffs": (
            {
                n: {
                    "estimate": alphas["raw_mean"][i],
                    "sd": alphas["sd"][i],
                    "lower": alphas["lower"][i],
                    "upper": alphas["upper"][i],
                }
                for i, n in enumerate(ALPHA_NAMES)
            }
            if "sd" in alphas
            else "given explicitly (no uncertainty)"
        ),
        "mixing_alpha": {
            **_summary(post["alpha"], prob),
            "meaning": "mu = prefill + decode − alpha·min(prefill, decode) + ...",
        },
        "mean_factor": {
            **_summary(factor, prob),
            "meaning": "E[step time]/mu: predictive mean over the body median" + pop,
        },
        "body_median_plugin_beta_coeffs": {
            "values": median_betas,
            "meaning": "posterior means of the unscaled coefficients: the body-median step "
            "time mu at the plug-in point (not a mean; BLIS adding these would be "
            "biased low by mean_factor)",
        },
        "noise": {
            k: {**_summary(v, prob), "meaning": _NOISE_MEANING[k] + pop}
            for k, v in noise_draws.items()
        },
        "structural_discrepancy": structural,
    }
    return {
        "model": name,
        "statistic": STATISTIC,
        BLIS_BLOCK: {"alpha_coeffs": alpha_coeffs, "beta_coeffs": betas},
        "blis_flags": blis_flags(alpha_coeffs, betas),
        "coefficient_names": {
            "alpha_coeffs": list(ALPHA_NAMES),
            "beta_coeffs": list(BLIS_BETA_NAMES),
        },
        "alpha_meaning": dict(_ALPHA_MEANING),
        "beta_mapping": dict(_MAPPING),
        "notes": notes,
        "uncertainty": unc,
        "approximation": _approximation(b_mean, mean_point, features, duration_us),
        "source_posterior": source,
        "manifest": export_manifest,
    }


_NOISE_MEANING = {
    "sigma": "log-scale sd of the body of the step-time noise",
    "stall_prob": "probability that a step stalls (pooled)",
    "stall_log_mult": "median log multiplier of a stalled step",
    "stall_log_sd": "log sd of the stall multiplier",
    "fast_prob": "probability of a fast step (one the mean function over-predicts)",
    "fast_log_mult": "median log divisor of a fast step (it runs exp(-x) of its body)",
    "fast_log_sd": "log sd of the fast step's multiplier",
}


def _defaults_text(doc: dict) -> str:
    m = doc["manifest"]
    src = doc["source_posterior"]
    lines = [
        "# BLIS defaults file: the trained_physics section only "
        f"(calib export of {doc['model']!r}).",
        "# Use with: blis run --latency-model trained-physics --defaults-filepath <this file> ...",
        "# Statistic: posterior predictive mean step time. Uncertainty and provenance: the sibling",
        f"# {doc['model']}.yaml. BLIS rejects unknown keys here, so provenance is in comments.",
        f"# source posterior: {src.get('file')} sha256={src.get('sha256')}",
        f"# diagnostics: {src.get('diagnostics')}",
        f"# calib {m.get('calib_version')} git {m.get('git_sha')} created {m.get('created_utc')}",
        "# alpha_coeffs [µs]: " + ", ".join(ALPHA_NAMES),
        "# beta_coeffs: " + ", ".join(BLIS_BETA_NAMES),
    ]
    body = yaml.safe_dump(
        {BLIS_BLOCK: doc[BLIS_BLOCK]}, sort_keys=False, default_flow_style=None, allow_unicode=True
    )
    return "\n".join(lines) + "\n" + body


def _fitted_steps(idata):
    from calib.posterior import model_data_from_idata

    data = model_data_from_idata(idata)
    feats = StepFeatures.from_model_data(data)
    dur = None if data.duration_us is None else np.asarray(data.duration_us, np.float64)
    return feats, np.asarray(data.model_idx), dur


def export_posterior(
    idata,
    out_dir: str | Path,
    *,
    alpha_coeffs=None,
    source_path: str | Path | None = None,
    prob: float = config.INTERVAL_PROB,
    command: list[str] | None = None,
) -> ExportResult:
    """Write the BLIS exports of every model and of the population (see module docstring).

    A pure function of the posterior: no inference, no other data.

    Parameters
    ----------
    idata : posterior (``calib.posterior.load_posterior``).
    out_dir : output directory (created).
    alpha_coeffs : 3 values (µs) used for every set instead of the posterior's own
        API-overhead estimate (:func:`calib.posterior.api_overheads`).
    source_path : the posterior file (hashed into the export).
    prob : interval probability of the uncertainty section (the alphas keep the
        interval they were estimated with, stated in their source note).
    """
    from calib.io import file_sha256
    from calib.posterior import api_overheads, flat_draws, model_coords, posterior_manifest

    api = None
    if alpha_coeffs is None:
        api = api_overheads(idata)
        if api is None:
            raise CalibError(
                "the posterior carries no API-overhead estimate (fitted without "
                "the dataset's request labels)",
                field="api_overheads",
                fix="re-fit with scripts/fit.py on the dataset, or give --alpha-coeffs a,b,c",
            )
    else:
        alpha_coeffs = [float(a) for a in alpha_coeffs]
        if len(alpha_coeffs) != 3 or not all(np.isfinite(a) and a >= 0 for a in alpha_coeffs):
            raise CalibError(
                f"need 3 finite non-negative values (µs), got {alpha_coeffs}",
                field="--alpha-coeffs",
                fix="e.g. --alpha-coeffs 15563,777,46",
            )
    if not 0 < prob < 1:
        raise CalibError(f"interval probability must be in (0, 1), got {prob}", field="--prob")
    post = flat_draws(idata)
    models = model_coords(idata)["model"]
    pm = posterior_manifest(idata)
    source = {
        "file": None if source_path is None else str(source_path),
        "sha256": None if source_path is None else file_sha256(source_path),
        "diagnostics": pm.get("diagnostics"),
        "hierarchy": idata.attrs.get("hierarchy", pm.get("hierarchy")),
        "manifest": pm,
    }
    export_manifest = manifest(
        kind="blis-export",
        seed=pm.get("seed"),
        data_hash=pm.get("data_hash"),
        priors_hash=pm.get("priors_hash"),
        command=command,
        diagnostics=pm.get("diagnostics"),
        source_posterior_sha256=source["sha256"],
        statistic=STATISTIC,
        interval={"kind": config.INTERVAL_KIND, "probability": prob},
    )
    feats, model_idx, dur = _fitted_steps(idata)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def alphas_for(model):
        if alpha_coeffs is not None:
            return {"mean": alpha_coeffs, "source": "given explicitly"}
        assert api is not None  # read above whenever alpha_coeffs is None
        a = overheads.alphas(api, model)
        pooled = [q for q, h in api["heterogeneity"].items() if h["pooled"]]
        a["source"] = (
            f"the posterior's API-overhead estimate ({api['method']}; "
            f"{api['prob']:g} intervals from {api['replicates']} replicates) for "
            f"{a['set']!r}; pooled across the models of the server: "
            f"{', '.join(pooled) or 'none'}"
        )
        return a

    structural = discrepancy.summary(discrepancy.load(idata), prob)
    docs: dict[str, dict] = {}
    d = post["b"].shape[0]
    per_model = dict(
        zip(noise.NOISE_PARAMS, noise.posterior_params(post, len(models)), strict=False)
    )
    factor = noise.mean_factor(*per_model.values())  # (draws, models)
    for m, name in enumerate(models):
        sel = model_idx == m
        docs[name] = model_export(
            post,
            model=name,
            b_draws=post["b"][:, m, :],
            factor=factor[:, m],
            noise_draws={k: v[:, m] for k, v in per_model.items()},
            alphas=alphas_for(name),
            features=feats.take(np.nonzero(sel)[0]),
            duration_us=None if dur is None else dur[sel],
            prob=prob,
            source=source,
            export_manifest=export_manifest,
            structural=structural,
        )
    tau = post.get("tau", np.zeros((d, len(config.COMPONENTS))))
    z = np.random.default_rng(config.E2E_SEED).standard_normal(tau.shape)
    b_new = post["b_pop"] * np.exp(tau * z)
    docs[POPULATION] = model_export(
        post,
        model=None,
        b_draws=b_new,
        b_point=post["b_pop"] * np.exp(0.5 * tau * tau),
        factor=factor.mean(axis=1),
        noise_draws={k: v.mean(axis=1) for k, v in per_model.items()},
        alphas=alphas_for(None),
        features=feats,
        duration_us=dur,
        prob=prob,
        source=source,
        export_manifest=export_manifest,
        structural=structural,
    )

    paths = []
    for name, doc in docs.items():
        stem = _safe_stem(name)
        header = (
            f"# calib BLIS export for {name!r}: the `{BLIS_BLOCK}` block is BLIS's "
            "trained-physics coefficients (posterior predictive mean step time); "
            "everything else is context.\n"
        )
        text = header + yaml.safe_dump(
            json.loads(json.dumps(doc, default=_jsonable)),
            sort_keys=False,
            allow_unicode=True,
            width=100,
        )
        p = out_dir / f"{stem}.yaml"
        atomic_write_text(p, text)
        q = out_dir / f"{stem}.defaults.yaml"
        atomic_write_text(q, _defaults_text(doc))
        paths += [p, q]
    return ExportResult(
        paths=tuple(paths), flags={k: v["blis_flags"] for k, v in docs.items()}, documents=docs
    )


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _safe_stem(name: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    return keep.strip(".") or "model"
