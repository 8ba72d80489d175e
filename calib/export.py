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

Statistic: every exported coefficient is the **posterior mean** of its
parameter, a plug-in point estimate (the prediction at the posterior means is
not the posterior-mean prediction: the model is non-linear in ``alpha``, and
``mu`` is the median step time under the log-scale Student-t noise).

Mapping to BLIS ``beta_coeffs`` (10 values, BLIS order):

===================  =================================================================
BLIS beta            fitted parameter
===================  =================================================================
β₁  pf_compute       ``b[model, pf_compute]``
β₂  dc_compute       ``b[model, dc_compute]``
β₃  weight           ``b[model, weight]``
β₄  tp               ``b[model, tp]``
β₅  µs/layer         ``per_layer_us`` (shared by all models)
β₆  µs/request       ``per_request_us``
β₇  µs/step          ``per_step_us``
β₈  µs/MoE-layer     0: not fitted (BLIS applies it to interleaved MoE architectures only)
β₉  pf_kv            ``b[model, pf_kv]``
β₁₀ dc_kv            ``b[model, dc_kv]``
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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from calib import config, overheads
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

__all__ = ["BLIS_BLOCK", "ExportResult", "blis_flags", "export_posterior", "model_export",
           "population_name"]

#: The top-level key of BLIS's defaults file that holds the coefficients.
BLIS_BLOCK = "trained_physics_coefficients"
POPULATION = "population"

_MAPPING = {
    "pf_compute": "b[model, pf_compute]", "dc_compute": "b[model, dc_compute]",
    "weight": "b[model, weight]", "tp": "b[model, tp]", "per_layer_us": "per_layer_us",
    "per_request_us": "per_request_us", "per_step_us": "per_step_us",
    "per_moe_layer_us": "0 (not fitted; BLIS applies it to interleaved MoE only)",
    "pf_kv": "b[model, pf_kv]", "dc_kv": "b[model, dc_kv]",
}
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

    return (f"--latency-model trained-physics --alpha-coeffs {fmt(alpha_coeffs)} "
            f"--beta-coeffs {fmt(beta_coeffs)}")


def _summary(draws: np.ndarray, prob: float) -> dict:
    draws = np.asarray(draws, np.float64).reshape(-1)
    return {"mean": float(draws.mean()), "median": float(np.median(draws)),
            "sd": float(draws.std(ddof=1)) if draws.size > 1 else 0.0,
            "lower": float(np.quantile(draws, (1 - prob) / 2)),
            "upper": float(np.quantile(draws, (1 + prob) / 2))}


def _beta_draws(b: np.ndarray, post: dict) -> dict[str, np.ndarray]:
    """Draws of each BLIS beta from corrections ``b`` (draws, 6)."""
    named = {c: b[:, i] for i, c in enumerate(config.COMPONENTS)}
    d = b.shape[0]
    return {"pf_compute": named["pf_compute"], "dc_compute": named["dc_compute"],
            "weight": named["weight"], "tp": named["tp"],
            "per_layer_us": post["per_layer_us"], "per_request_us": post["per_request_us"],
            "per_step_us": post["per_step_us"], "per_moe_layer_us": np.zeros(d),
            "pf_kv": named["pf_kv"], "dc_kv": named["dc_kv"]}


def _approximation(b_mean, post_means: dict, features: StepFeatures,
                   duration_us: np.ndarray | None) -> dict:
    """Cost of BLIS's additive prefill+decode (alpha = 0) on the fitted steps."""
    alpha = float(post_means["alpha"])
    betas = betas_from_params(b_mean, post_means["per_layer_us"], post_means["per_request_us"],
                              post_means["per_step_us"])
    out: dict = {
        "posterior_mean_alpha": alpha,
        "how": ("The fitted model mixes prefill and decode as prefill + decode − "
                "alpha·min(prefill, decode); BLIS adds them (alpha = 0). The BLIS block keeps "
                "the fitted corrections and drops the −alpha·min term, so it predicts mixed "
                "batches slower by alpha·min(prefill, decode); prefill-only and decode-only "
                "batches are unchanged."),
        "n_steps": int(len(features)),
    }
    if len(features) == 0:
        return out
    full = plugin_step_time_us(b_mean, post_means["per_layer_us"], post_means["per_request_us"],
                               post_means["per_step_us"], alpha, features)
    blis = blis_step_time_us(betas, features)
    rel = 100.0 * (blis - full) / full
    kinds = batch_type(features.components)
    by = {}
    for k in ("prefill-only", "decode-only", "mixed"):
        sel = kinds == k
        if sel.any():
            by[k] = {"n_steps": int(sel.sum()), "mean_pct": float(rel[sel].mean()),
                     "max_pct": float(rel[sel].max())}
    out["blis_vs_fitted_step_time_pct"] = {
        "definition": "100·(BLIS − fitted plug-in)/fitted plug-in, on the posterior's fitted steps",
        "mean": float(rel.mean()), "median": float(np.median(rel)),
        "p95": float(np.quantile(rel, 0.95)), "max": float(rel.max()), "by_batch_type": by}
    if duration_us is not None and np.all(np.isfinite(duration_us)):
        y = np.asarray(duration_us, np.float64)
        out["error_vs_observed_pct"] = {
            "definition": "mean of 100·|prediction − observed|/observed over the fitted steps",
            "fitted_plugin": float(np.mean(100.0 * np.abs(full - y) / y)),
            "blis_block": float(np.mean(100.0 * np.abs(blis - y) / y)),
            "fitted_plugin_mean_signed": float(np.mean(100.0 * (full - y) / y)),
            "blis_block_mean_signed": float(np.mean(100.0 * (blis - y) / y))}
    return out


@dataclass(frozen=True)
class ExportResult:
    """Files written by :func:`export_posterior` and the BLIS flags per set."""

    paths: tuple[Path, ...]
    flags: dict[str, str]
    documents: dict[str, dict]


def model_export(post: dict, *, model: str | None, b_draws: np.ndarray, alphas: dict,
                 features: StepFeatures, duration_us: np.ndarray | None, prob: float,
                 source: dict, export_manifest: dict) -> dict:
    """The export document of one model (``model=None``: the population set)."""
    means = plugin_means(post)
    b_mean = b_draws.mean(axis=0)
    betas = betas_from_params(b_mean, means["per_layer_us"], means["per_request_us"],
                              means["per_step_us"])
    alpha_coeffs = [float(a) for a in alphas["mean"]]
    bad = [v for v in betas + alpha_coeffs if not (np.isfinite(v) and v >= 0)]
    if bad:
        raise CalibError(f"exported coefficients must be finite and >= 0, got {bad}",
                         field="posterior", fix="check the fit's diagnostics and re-fit")
    beta_draws = _beta_draws(b_draws, post)
    name = model or POPULATION
    notes = [
        "statistic: posterior mean of each parameter (a plug-in point estimate; mu is the "
        "median step time under the log-scale Student-t noise, and the plug-in prediction is "
        "not the posterior-mean prediction)",
        "beta_coeffs[7] per_moe_layer_us = 0: not fitted",
        "11th beta (ep) omitted: BLIS defaults it to beta_coeffs[3] (tp); it only acts for "
        "MoE models under data parallelism > 1",
        "with >= 10 betas BLIS splits prefill and decode into compute and KV terms, as fitted",
    ]
    if model is None:
        notes.append("population set for an unseen model: b = posterior mean of b_pop (the "
                     "population median correction); uncertainty.beta_coeffs describes a new "
                     "model's correction b_pop·exp(tau·z) (posterior predictive)")
    if alphas.get("source"):
        notes.append(f"alpha_coeffs: {alphas['source']}")
    if alphas.get("clipped"):
        notes.append(f"alpha_coeffs clipped at 0 (negative estimate): {alphas['clipped']}")
    sigma = post["sigma"] if model is None else post["sigma_model"]
    unc = {
        "interval": {"kind": config.INTERVAL_KIND, "probability": prob},
        "beta_coeffs": {k: _summary(v, prob) for k, v in beta_draws.items()},
        "alpha_coeffs": ({n: {"estimate": alphas["raw_mean"][i], "sd": alphas["sd"][i],
                              "lower": alphas["lower"][i], "upper": alphas["upper"][i]}
                          for i, n in enumerate(ALPHA_NAMES)}
                         if "sd" in alphas else "given explicitly (no uncertainty)"),
        "mixing_alpha": {**_summary(post["alpha"], prob),
                         "meaning": "mu = prefill + decode − alpha·min(prefill, decode) + ..."},
        "sigma": {**_summary(sigma, prob),
                  "meaning": "Student-t scale of log step duration"
                             + (" (mean over fitted models, per draw)" if model is None else "")},
        "nu": {**_summary(post["nu"], prob), "meaning": "Student-t degrees of freedom"},
    }
    return {
        "model": name,
        "statistic": "posterior mean",
        BLIS_BLOCK: {"alpha_coeffs": alpha_coeffs, "beta_coeffs": betas},
        "blis_flags": blis_flags(alpha_coeffs, betas),
        "coefficient_names": {"alpha_coeffs": list(ALPHA_NAMES),
                              "beta_coeffs": list(BLIS_BETA_NAMES)},
        "alpha_meaning": dict(_ALPHA_MEANING),
        "beta_mapping": dict(_MAPPING),
        "notes": notes,
        "uncertainty": unc,
        "approximation": _approximation(b_mean, means, features, duration_us),
        "source_posterior": source,
        "manifest": export_manifest,
    }


def _defaults_text(doc: dict) -> str:
    m = doc["manifest"]
    src = doc["source_posterior"]
    lines = [
        "# BLIS defaults file: the trained_physics section only "
        f"(calib export of {doc['model']!r}).",
        "# Use with: blis run --latency-model trained-physics --defaults-filepath <this file> ...",
        "# Statistic: posterior means (plug-in). Uncertainty and provenance: the sibling",
        f"# {doc['model']}.yaml. BLIS rejects unknown keys here, so provenance is in comments.",
        f"# source posterior: {src.get('file')} sha256={src.get('sha256')}",
        f"# diagnostics: {src.get('diagnostics')}",
        f"# calib {m.get('calib_version')} git {m.get('git_sha')} created {m.get('created_utc')}",
        "# alpha_coeffs [µs]: " + ", ".join(ALPHA_NAMES),
        "# beta_coeffs: " + ", ".join(BLIS_BETA_NAMES),
    ]
    body = yaml.safe_dump({BLIS_BLOCK: doc[BLIS_BLOCK]}, sort_keys=False,
                          default_flow_style=None, allow_unicode=True)
    return "\n".join(lines) + "\n" + body


def _fitted_steps(idata):
    from calib.posterior import model_data_from_idata

    data = model_data_from_idata(idata)
    feats = StepFeatures.from_model_data(data)
    dur = None if data.duration_us is None else np.asarray(data.duration_us, np.float64)
    return feats, np.asarray(data.model_idx), dur


def export_posterior(idata, out_dir: str | Path, *, alpha_coeffs=None,
                     source_path: str | Path | None = None, prob: float = config.INTERVAL_PROB,
                     command: list[str] | None = None) -> ExportResult:
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
            raise CalibError("the posterior carries no API-overhead estimate (fitted without "
                             "the dataset's request labels)", field="api_overheads",
                             fix="re-fit with scripts/fit.py on the dataset, or give "
                                 "--alpha-coeffs a,b,c")
    else:
        alpha_coeffs = [float(a) for a in alpha_coeffs]
        if len(alpha_coeffs) != 3 or not all(np.isfinite(a) and a >= 0 for a in alpha_coeffs):
            raise CalibError(f"need 3 finite non-negative values (µs), got {alpha_coeffs}",
                             field="--alpha-coeffs", fix="e.g. --alpha-coeffs 15563,777,46")
    if not 0 < prob < 1:
        raise CalibError(f"interval probability must be in (0, 1), got {prob}", field="--prob")
    post = flat_draws(idata)
    models = model_coords(idata)["model"]
    pm = posterior_manifest(idata)
    source = {"file": None if source_path is None else str(source_path),
              "sha256": None if source_path is None else file_sha256(source_path),
              "diagnostics": pm.get("diagnostics"),
              "hierarchy": idata.attrs.get("hierarchy", pm.get("hierarchy")),
              "manifest": pm}
    export_manifest = manifest(kind="blis-export", seed=pm.get("seed"),
                               data_hash=pm.get("data_hash"), priors_hash=pm.get("priors_hash"),
                               command=command, diagnostics=pm.get("diagnostics"),
                               source_posterior_sha256=source["sha256"],
                               statistic="posterior mean",
                               interval={"kind": config.INTERVAL_KIND, "probability": prob})
    feats, model_idx, dur = _fitted_steps(idata)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def alphas_for(model):
        if alpha_coeffs is not None:
            return {"mean": alpha_coeffs, "source": "given explicitly"}
        assert api is not None  # read above whenever alpha_coeffs is None
        a = overheads.alphas(api, model)
        pooled = [q for q, h in api["heterogeneity"].items() if h["pooled"]]
        a["source"] = (f"the posterior's API-overhead estimate ({api['method']}; "
                       f"{api['prob']:g} intervals from {api['replicates']} replicates) for "
                       f"{a['set']!r}; pooled across the models of the server: "
                       f"{', '.join(pooled) or 'none'}")
        return a

    docs: dict[str, dict] = {}
    d = post["b"].shape[0]
    for m, name in enumerate(models):
        sel = model_idx == m
        docs[name] = model_export({**post, "sigma_model": post["sigma"][:, m]}, model=name,
                                  b_draws=post["b"][:, m, :], alphas=alphas_for(name),
                                  features=feats.take(np.nonzero(sel)[0]),
                                  duration_us=None if dur is None else dur[sel], prob=prob,
                                  source=source, export_manifest=export_manifest)
    tau = post.get("tau", np.zeros((d, len(config.COMPONENTS))))
    z = np.random.default_rng(config.E2E_SEED).standard_normal(tau.shape)
    b_new = post["b_pop"] * np.exp(tau * z)
    pop_doc = model_export({**post, "sigma": post["sigma"].mean(axis=1)}, model=None,
                           b_draws=b_new, alphas=alphas_for(None), features=feats,
                           duration_us=dur, prob=prob, source=source,
                           export_manifest=export_manifest)
    # the population's point estimate is the posterior mean of b_pop (not of b_new)
    b_pop_mean = post["b_pop"].mean(axis=0)
    means = plugin_means(post)
    pop_betas = betas_from_params(b_pop_mean, means["per_layer_us"], means["per_request_us"],
                                  means["per_step_us"])
    pop_doc[BLIS_BLOCK]["beta_coeffs"] = pop_betas
    pop_doc["blis_flags"] = blis_flags(pop_doc[BLIS_BLOCK]["alpha_coeffs"], pop_betas)
    pop_doc["approximation"] = _approximation(b_pop_mean, means, feats, dur)
    docs[POPULATION] = pop_doc

    paths = []
    for name, doc in docs.items():
        stem = _safe_stem(name)
        header = (f"# calib BLIS export for {name!r}: the `{BLIS_BLOCK}` block is BLIS's "
                  "trained-physics coefficients (posterior means); everything else is context.\n")
        text = header + yaml.safe_dump(json.loads(json.dumps(doc, default=_jsonable)),
                                       sort_keys=False, allow_unicode=True, width=100)
        p = out_dir / f"{stem}.yaml"
        atomic_write_text(p, text)
        q = out_dir / f"{stem}.defaults.yaml"
        atomic_write_text(q, _defaults_text(doc))
        paths += [p, q]
    return ExportResult(paths=tuple(paths), flags={k: v["blis_flags"] for k, v in docs.items()},
                        documents=docs)


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _safe_stem(name: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    return keep.strip(".") or "model"
