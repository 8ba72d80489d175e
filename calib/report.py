"""Report of a posterior: PNG plots and a markdown summary linking them.

Figures (headless Agg backend; each titled, axes labelled with units, legends):

``trace.png``              trace plots of the key parameters (per chain);
``rank.png``               rank histograms of the same per chain (flat = chains agree);
``forest.png``             per-model corrections ``b`` with 90 % intervals beside the
                           population ``b_pop``, one panel per roofline component;
``ppc_step_durations.png`` posterior predictive check of step durations (µs, log
                           axis), split by batch type: prefill-only, decode-only, mixed;
``e2e.png``                observed vs predicted experiment means (E2E, TTFT, decode
                           interval) with posterior predictive interval bars
                           (only when the dataset is given).

``summary.md`` links them and carries the parameter summary, the E2E table, the
diagnostics verdict and the manifest (JSON). PNGs carry the manifest as PNG
text metadata (``Description``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from calib import config
from calib.io import atomic_path, atomic_write_text, manifest

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["KEY_PARAMETERS", "make_report"]

#: Parameters shown in trace and rank plots (those present in the posterior).
KEY_PARAMETERS = (
    "b_pop",
    "tau",
    "per_layer_us",
    "per_request_us",
    "per_step_us",
    "alpha",
    "sigma",
    "stall_prob",
    "stall_log_mult",
    "fast_prob",
    "mean_factor",
)
_UNITS = {
    "b_pop": "dimensionless",
    "tau": "log-scale sd",
    "per_layer_us": "µs/layer",
    "per_request_us": "µs/request",
    "per_step_us": "µs/step",
    "alpha": "mixing weight",
    "sigma": "log-scale sd (body)",
    "stall_prob": "probability",
    "stall_log_mult": "log multiplier",
    "fast_prob": "probability",
    "mean_factor": "E[y]/mu",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, meta: dict) -> Path:
    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(
            tmp,
            format="png",
            dpi=config.REPORT_DPI,
            bbox_inches="tight",
            metadata={
                "Title": path.stem,
                "Software": "calib",
                "Description": json.dumps(meta, sort_keys=True, default=str),
            },
        )
    plt.close(fig)
    return path


def _key_vars(idata) -> list[str]:
    post = idata.posterior
    out = []
    for v in KEY_PARAMETERS:
        if v in post and float(np.nanstd(post[v].values)) > 0:
            out.append(v)
    return out


def _elements(idata, name: str) -> list[tuple[str, np.ndarray]]:
    """(label, (chain, draw) array) for every element of a posterior variable."""
    da = idata.posterior[name]
    extra = [d for d in da.dims if d not in ("chain", "draw")]
    if not extra:
        return [(name, np.asarray(da.values))]
    stacked = da.stack(_el=extra)
    out = []
    for i in range(stacked.sizes["_el"]):
        idx = stacked["_el"].values[i]
        idx = idx if isinstance(idx, tuple) else (idx,)
        out.append(
            (f"{name}[{', '.join(str(x) for x in idx)}]", np.asarray(stacked.isel(_el=i).values))
        )
    return out


def _trace(idata, out: Path, meta: dict) -> Path:
    plt = _plt()
    names = _key_vars(idata)
    fig, axes = plt.subplots(len(names), 2, figsize=(13, 2.3 * len(names)), squeeze=False)
    n_chain = idata.posterior.sizes["chain"]
    styles = ["-", "--", ":", "-."]
    for row, name in zip(axes, names, strict=True):
        unit = _UNITS.get(name, "")
        els = _elements(idata, name)
        for j, (label, v) in enumerate(els):
            for c in range(n_chain):
                kw = {
                    "color": f"C{j % 10}",
                    "ls": styles[c % 4],
                    "lw": 0.8,
                    "label": label if c == 0 else None,
                }
                row[1].plot(v[c], alpha=0.7, **kw)
                row[0].hist(v[c], bins=30, density=True, histtype="step", **kw)
        row[0].set_title(f"{name} ({unit}): posterior density, one line style per chain")
        row[0].set_xlabel(f"{name} [{unit}]")
        row[0].set_ylabel("density")
        row[1].set_title(f"{name}: trace per chain")
        row[1].set_xlabel("draw (after warm-up)")
        row[1].set_ylabel(f"{name} [{unit}]")
        if len(els) <= 8:
            row[1].legend(fontsize=6, loc="upper right", ncol=2)
    fig.suptitle(
        "Trace plots of the key parameters: overlapping, stationary lines = chains mixed", y=1.0
    )
    fig.tight_layout()
    return _save(fig, out / "trace.png", meta)


def _rank(idata, out: Path, meta: dict) -> Path | None:
    from scipy.stats import rankdata

    plt = _plt()
    n_chain = idata.posterior.sizes["chain"]
    if n_chain < 2:
        return None
    els = [el for n in _key_vars(idata) for el in _elements(idata, n)][:24]
    ncol = 4
    nrow = int(np.ceil(len(els) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 2.4 * nrow), squeeze=False)
    for ax, (label, v) in zip(axes.ravel(), els, strict=False):
        ranks = rankdata(v.ravel()).reshape(v.shape)
        bins = np.linspace(0, ranks.size, 21)
        for c in range(n_chain):
            counts, _ = np.histogram(ranks[c], bins=bins)
            ax.step(
                bins[:-1],
                counts / counts.mean() + 1.2 * c,
                where="post",
                color=f"C{c}",
                label=f"chain {c}",
            )
            ax.axhline(1 + 1.2 * c, color="grey", lw=0.5, ls=":")
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("rank of draw (chains pooled)")
        ax.set_ylabel("relative count (offset per chain)")
        ax.set_yticks([])
    for ax in axes.ravel()[len(els) :]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=6)
    fig.suptitle(
        "Rank plots: flat rank histograms per chain (dotted = uniform) "
        "mean the chains sample the same distribution",
        y=1.0,
    )
    fig.tight_layout()
    return _save(fig, out / "rank.png", meta)


def _forest(idata, out: Path, meta: dict, prob: float) -> Path:
    plt = _plt()
    post = idata.posterior
    comps = [str(c) for c in post["component"].values]
    models = [str(m) for m in post["model"].values]
    b = post["b"].values.reshape(-1, len(models), len(comps))
    pop = post["b_pop"].values.reshape(-1, len(comps))
    lo_q, hi_q = (1 - prob) / 2, (1 + prob) / 2
    ncol = 3
    nrow = int(np.ceil(len(comps) / ncol))
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(5 * ncol, 0.45 * (len(models) + 2) * nrow + 1.5), squeeze=False
    )
    labels = models + ["population (b_pop)"]
    for k, comp in enumerate(comps):
        ax = axes[k // ncol, k % ncol]
        for i, draws in enumerate([b[:, m, k] for m in range(len(models))] + [pop[:, k]]):
            lo, hi = np.quantile(draws, [lo_q, hi_q])
            is_pop = i == len(models)
            ax.plot(
                [lo, hi],
                [i, i],
                color="C3" if is_pop else "C0",
                lw=2,
                label=(
                    f"population b_pop ({100 * prob:.0f} % interval)"
                    if is_pop
                    else (f"per-model b ({100 * prob:.0f} % interval)" if i == 0 else None)
                ),
            )
            ax.plot(
                [np.mean(draws)],
                [i],
                "o",
                color="C3" if is_pop else "C0",
                ms=5,
                label="posterior mean" if i == 0 else None,
            )
        ax.axvline(1.0, color="grey", ls=":", lw=1, label="1 (roofline exact)")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xlabel(f"correction b[{comp}] (dimensionless)")
        ax.set_title(f"{comp}")
        if k == 0:
            ax.legend(fontsize=7, loc="best")
    for k in range(len(comps), nrow * ncol):
        axes[k // ncol, k % ncol].axis("off")
    fig.suptitle(
        "Per-model roofline corrections b (posterior) and the population b_pop; "
        "components without data for a model equal b_pop",
        y=1.0,
    )
    fig.tight_layout()
    return _save(fig, out / "forest.png", meta)


def _ppc(idata, out: Path, meta: dict, seed: int) -> Path:
    from calib import noise
    from calib.posterior import flat_draws, model_data_from_idata, predict_step_time_us
    from calib.predict import batch_type

    plt = _plt()
    data = model_data_from_idata(idata)
    comps = np.asarray(data.components, np.float64)
    midx = np.asarray(data.model_idx)
    y = np.asarray(data.duration_us, np.float64)
    p = flat_draws(idata, config.REPORT_PPC_DRAWS)
    rng = np.random.default_rng(seed)
    mu = predict_step_time_us(idata, config.REPORT_PPC_DRAWS, data=data)
    yrep = noise.sample(
        rng, mu, *(a[:, midx] for a in noise.posterior_params(p, int(data.n_models)))
    )
    kinds = batch_type(comps)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, kind in zip(axes, ("prefill-only", "decode-only", "mixed"), strict=True):
        sel = kinds == kind
        ax.set_title(f"{kind} batches (n = {int(sel.sum())} steps)")
        ax.set_xlabel("step duration [µs] (log scale)")
        ax.set_ylabel("density of log10 duration")
        if not sel.any():
            ax.text(
                0.5, 0.5, "no steps of this type", ha="center", va="center", transform=ax.transAxes
            )
            continue
        lo = np.log10(max(min(y[sel].min(), np.quantile(yrep[:, sel], 0.001)), 1e-3))
        hi = np.log10(max(y[sel].max(), np.quantile(yrep[:, sel], 0.999)))
        bins = np.logspace(lo, hi, 40)
        centers = np.sqrt(bins[1:] * bins[:-1])
        widths = np.diff(np.log10(bins))
        dens = np.array([np.histogram(r, bins=bins)[0] for r in yrep[:50, sel]]) / (
            sel.sum() * widths
        )
        ax.fill_between(
            centers,
            np.quantile(dens, 0.05, axis=0),
            np.quantile(dens, 0.95, axis=0),
            color="C0",
            alpha=0.3,
            step="mid",
            label="posterior predictive (90 % band of 50 replicates)",
        )
        ax.hist(
            yrep[:, sel].ravel(),
            bins=bins,
            density=False,
            histtype="step",
            color="C0",
            weights=np.full(yrep[:, sel].size, 1.0 / (yrep.shape[0] * sel.sum()))
            / np.repeat(widths, 1)[
                np.clip(np.digitize(yrep[:, sel].ravel(), bins) - 1, 0, len(widths) - 1)
            ],
            label="posterior predictive (all draws)",
        )
        ax.hist(
            y[sel],
            bins=bins,
            histtype="step",
            color="k",
            lw=1.5,
            weights=np.full(sel.sum(), 1.0 / sel.sum())
            / widths[np.clip(np.digitize(y[sel], bins) - 1, 0, len(widths) - 1)],
            label="observed",
        )
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(
        "Posterior predictive check of step durations by batch type "
        "(model mu with its step noise (calib.noise) vs measured step.duration_us)",
        y=1.02,
    )
    fig.tight_layout()
    return _save(fig, out / "ppc_step_durations.png", meta)


def _e2e_error_panel(ax, t, metric: str, name: str) -> None:
    """Per experiment: the interval as % error vs observed, the step-level bias, baselines."""
    sub = t[(t.metric == metric) & np.isfinite(t.observed_us)]
    if sub.empty:
        ax.set_title(f"{name}: no data")
        return
    y = np.arange(len(sub))
    obs = sub.observed_us.values
    pct = lambda v: 100.0 * (np.asarray(v, float) - obs) / obs  # noqa: E731
    lo, mid, hi = pct(sub.lower_us), pct(sub.predicted_us), pct(sub.upper_us)
    inside = sub.inside.values.astype(bool)
    ax.axvline(0.0, color="grey", ls="--", lw=1)
    ax.hlines(
        y,
        lo,
        hi,
        color=np.where(inside, "C0", "C3"),
        lw=4,
        alpha=0.6,
        label="Bayesian interval (red: misses observed)",
    )
    ax.plot(mid, y, "|", color="k", ms=10, label="Bayesian predicted mean")
    if "step_bias_pct" in sub:
        ax.plot(
            sub.step_bias_pct.values,
            y,
            "D",
            mfc="none",
            color="C4",
            ms=5,
            label="step-level bias on sampled steps",
        )
    for j, bname in enumerate(("blackbox", "nnls")):
        if f"{bname}_error_pct" in sub:
            ax.plot(
                sub[f"{bname}_error_pct"].values,
                y,
                "x",
                color=f"C{j + 1}",
                label=f"{bname} baseline",
            )
    ax.set_yticks(y)
    ax.set_yticklabels(
        [
            str(e)[16:] if len(str(e)) > 16 and str(e)[:8].isdigit() else str(e)
            for e in sub.experiment
        ],
        fontsize=6,
    )
    ax.invert_yaxis()
    ax.set_xlabel("error vs observed mean [%]")
    ax.set_title(f"{name}: error per experiment")
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)


def _e2e_plot(result, out: Path, meta: dict) -> Path:
    plt = _plt()
    t = result.table
    fig, grid = plt.subplots(2, 3, figsize=(15, 10.5))
    axes = grid[0]
    names = {
        "e2e": "E2E latency",
        "ttft": "time to first token",
        "itl": "decode interval (E2E−TTFT)/(output−1)",
    }
    for ax, metric in zip(grid[1], ("e2e", "ttft", "itl"), strict=True):
        _e2e_error_panel(ax, t, metric, names[metric])
    for ax, metric in zip(axes, ("e2e", "ttft", "itl"), strict=True):
        sub = t[(t.metric == metric) & np.isfinite(t.observed_us)]
        if sub.empty:
            ax.set_title(f"{names[metric]}: no data")
            continue
        obs = sub.observed_us.values / 1e3
        pred = sub.predicted_us.values / 1e3
        err = np.vstack([pred - sub.lower_us.values / 1e3, sub.upper_us.values / 1e3 - pred])
        inside = sub.inside.values.astype(bool)
        ax.errorbar(
            obs[inside],
            pred[inside],
            yerr=err[:, inside],
            fmt="o",
            color="C0",
            capsize=3,
            label=f"Bayesian, interval contains observed ({inside.sum()})",
        )
        if (~inside).any():
            ax.errorbar(
                obs[~inside],
                pred[~inside],
                yerr=err[:, ~inside],
                fmt="s",
                color="C3",
                capsize=3,
                label=f"Bayesian, interval misses ({(~inside).sum()})",
            )
        for j, bname in enumerate(("blackbox", "nnls")):
            if f"{bname}_us" in sub:
                ax.plot(
                    obs,
                    sub[f"{bname}_us"].values / 1e3,
                    "x",
                    color=f"C{j + 1}",
                    label=f"{bname} baseline (point)",
                )
        lim = [min(obs.min(), pred.min()) * 0.9, max(obs.max(), pred.max()) * 1.1]
        ax.plot(lim, lim, color="grey", ls="--", lw=1, label="predicted = observed")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("observed experiment mean [ms]")
        ax.set_ylabel("predicted experiment mean [ms]")
        c = result.coverage[metric]
        ax.set_title(f"{names[metric]}: {c['inside']}/{c['n']} inside")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Teacher-forced replay: observed vs predicted per experiment "
        f"({100 * result.prob:.0f} % posterior predictive intervals; bottom: errors "
        f"relative to the observed mean)",
        y=1.01,
    )
    fig.tight_layout()
    return _save(fig, out / "e2e.png", meta)


def _md_table(frame) -> str:
    cols = list(frame.columns)
    lines = [
        "| " + " | ".join(str(c) for c in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for _, row in frame.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def make_report(
    idata,
    out_dir: str | Path,
    *,
    ds=None,
    features=None,
    new_experiments: bool = False,
    e2e_result=None,
    source_path: str | Path | None = None,
    prob: float = config.INTERVAL_PROB,
    seed: int = config.E2E_SEED,
    draws: int | None = config.E2E_DRAWS,
    command: list[str] | None = None,
) -> dict[str, Path]:
    """Write the report figures and ``summary.md`` into ``out_dir``; return name -> path.

    With ``ds`` (canonical dataset) and no ``e2e_result``, runs the teacher-forced
    replay (:func:`calib.e2e.replay`) for the E2E figure and table;
    ``new_experiments`` predicts every experiment as a new workload (set it from
    :attr:`calib.cli.DataChoice.new_experiments` when ``ds`` is not the fitted data).
    """
    import arviz as az

    from calib.io import file_sha256
    from calib.posterior import posterior_manifest

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pm = posterior_manifest(idata)
    meta = manifest(
        kind="report",
        seed=seed,
        data_hash=pm.get("data_hash"),
        priors_hash=pm.get("priors_hash"),
        command=command,
        diagnostics=pm.get("diagnostics"),
        source_posterior=None if source_path is None else str(source_path),
        source_posterior_sha256=(None if source_path is None else file_sha256(source_path)),
    )
    paths: dict[str, Path] = {"trace": _trace(idata, out, meta)}
    r = _rank(idata, out, meta)
    if r is not None:
        paths["rank"] = r
    paths["forest"] = _forest(idata, out, meta, prob)
    paths["ppc"] = _ppc(idata, out, meta, seed)
    if e2e_result is None and ds is not None:
        from calib.e2e import replay

        e2e_result = replay(
            idata,
            ds,
            features=features,
            prob=prob,
            draws=draws,
            seed=seed,
            new_experiments=new_experiments,
        )
    if e2e_result is not None:
        paths["e2e"] = _e2e_plot(e2e_result, out, meta)

    names = _key_vars(idata) + [v for v in ("b",) if v in idata.posterior]
    # the default fmt="wide" returns a DataFrame (arviz types the return as DataFrame | Dataset)
    summ = cast(
        "pd.DataFrame", az.summary(idata, var_names=names, hdi_prob=prob, kind="all", round_to=4)
    )
    titles = {
        "trace": "Trace plots",
        "rank": "Rank plots",
        "forest": "Per-model corrections and population (forest plot)",
        "ppc": "Posterior predictive check of step durations by batch type",
        "e2e": "Observed vs predicted experiment latencies (teacher-forced replay)",
    }
    md = [
        f"# Posterior report: {Path(source_path).name if source_path else 'posterior'}",
        "",
        f"- hierarchy: `{idata.attrs.get('hierarchy', pm.get('hierarchy'))}`",
        f"- diagnostics verdict: `{pm.get('diagnostics')}`",
        f"- draws: {idata.posterior.sizes['chain']} chains × {idata.posterior.sizes['draw']}",
        f"- intervals: {config.INTERVAL_KIND} {100 * prob:.0f} % "
        f"(parameter table: ArviZ HDI columns)",
        "",
    ]
    for key, path in paths.items():
        md += [f"## {titles[key]}", "", f"![{titles[key]}]({path.name})", ""]
    md += [
        "## Parameter summary",
        "",
        _md_table(summ.reset_index().rename(columns={"index": "parameter"})),
        "",
    ]
    if e2e_result is not None:
        from calib.e2e import format_table

        cols = [
            "metric",
            "experiment",
            "basis",
            "observed_us",
            "predicted_us",
            "lower_us",
            "upper_us",
            "error_pct",
            "bias_us",
            "inside",
        ]
        cols += [c for c in ("gap_us", "step_bias_pct") if c in e2e_result.table]
        cols += [
            c for c in e2e_result.table.columns if c.endswith("_error_pct") and c != "error_pct"
        ]
        md += [
            "## Teacher-forced E2E check",
            "",
            f"**{e2e_result.message}**",
            "",
            _md_table(e2e_result.table[cols]),
            "",
            "<details><summary>text table</summary>",
            "",
            "```",
            format_table(e2e_result),
            "```",
            "</details>",
            "",
        ]
    md += [
        "## Manifest",
        "",
        "```json",
        json.dumps(meta, indent=2, sort_keys=True, default=str),
        "```",
        "",
        "Source posterior manifest:",
        "",
        "```json",
        json.dumps(pm, indent=2, sort_keys=True, default=str),
        "```",
        "",
    ]
    summary = out / "summary.md"
    atomic_write_text(summary, "\n".join(md))
    paths["summary"] = summary
    return paths
