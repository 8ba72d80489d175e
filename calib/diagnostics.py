"""The diagnostics gate: is a posterior fit good enough to be used?

Checks (thresholds from :data:`calib.config.GATE`, statistics from ArviZ):

* ``rhat``        rank-normalised split R-hat (``az.rhat(method="rank")``) below ``max_rhat``;
* ``ess_bulk``    bulk ESS per chain at least ``min_ess_bulk_per_chain``;
* ``ess_tail``    tail ESS per chain at least ``min_ess_tail_per_chain``;
* ``divergences`` divergent transitions at most ``max_divergences``;
* ``ebfmi``       smallest per-chain E-BFMI (``az.bfmi``) at least ``min_ebfmi``;
* ``tree_depth``  fraction of draws at the maximum tree depth at most
  ``max_treedepth_fraction``.

Posterior elements that never change (fixed entries such as inactive components)
have no defined R-hat/ESS and are left out of the first three checks; the row
says how many were left out. :func:`check` returns a :class:`GateResult`
(structured rows plus a one-line verdict), :func:`format_table` renders it for
the CLI, and :meth:`GateResult.to_dict` / :func:`gate_to_attr` give the JSON
stored in posterior files.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from calib import config

__all__ = [
    "CheckRow",
    "GateResult",
    "advice",
    "check",
    "format_table",
    "gate_from_attr",
    "gate_to_attr",
    "located",
]


@dataclass(frozen=True)
class CheckRow:
    """One check of the gate.

    Attributes
    ----------
    name : check name ("rhat", "ess_bulk", "ess_tail", "divergences", "ebfmi", "tree_depth").
    value : the worst value found (NaN when it could not be computed).
    threshold : the threshold from ``calib.config.GATE``.
    comparison : "<", "<=" or ">=": ``value comparison threshold`` must hold.
    ok : whether the check passed.
    worst : the parameter (``b[llama-2-7b, pf_compute]``) or chain at the worst value.
    note : extra context (units, elements skipped, why a value is missing).
    where : for ``divergences`` and ``tree_depth``: the parameter element whose values on
        the flagged draws sit furthest from its posterior mean (:func:`located`).
    """

    name: str
    value: float
    threshold: float
    comparison: str
    ok: bool
    worst: str = ""
    note: str = ""
    where: str = ""


@dataclass(frozen=True)
class GateResult:
    """Outcome of :func:`check`.

    Invariant: ``passed`` is True exactly when every row is ``ok``.
    """

    passed: bool
    rows: list[CheckRow] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """``"pass"`` or ``"fail: <failed checks with worst values>"``."""
        if self.passed:
            return "pass"
        bad = [
            f"{r.name} {_fmt(r.value)} (need {r.comparison} {_fmt(r.threshold)}"
            + (f", worst {r.worst}" if r.worst else "")
            + ")"
            for r in self.rows
            if not r.ok
        ]
        return "fail: " + "; ".join(bad)

    def to_dict(self) -> dict:
        """JSON-serialisable form (NaN becomes None)."""
        rows = []
        for r in self.rows:
            d = asdict(r)
            for k in ("value", "threshold"):
                if isinstance(d[k], float) and not math.isfinite(d[k]):
                    d[k] = None
            rows.append(d)
        return {"passed": self.passed, "verdict": self.verdict, "rows": rows}

    @classmethod
    def from_dict(cls, d: dict) -> GateResult:
        rows = [
            CheckRow(
                **{
                    **r,
                    "value": math.nan if r["value"] is None else r["value"],
                    "threshold": math.nan if r["threshold"] is None else r["threshold"],
                }
            )
            for r in d["rows"]
        ]
        return cls(passed=bool(d["passed"]), rows=rows)


def gate_to_attr(result: GateResult) -> str:
    """JSON string for NetCDF attrs (which cannot hold dicts or None)."""
    return json.dumps(result.to_dict(), sort_keys=True)


def gate_from_attr(text: str) -> GateResult:
    return GateResult.from_dict(json.loads(text))


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if float(x).is_integer() and abs(x) < 1e9:
        return str(int(x))
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def _labels(da) -> list[str]:
    """``name[c1, c2]`` labels of every element of a (chain, draw)-reduced DataArray."""
    name = da.name
    if da.ndim == 0:
        return [str(name)]
    axes = []
    for d in da.dims:
        vals = da.coords[d].values if d in da.coords else np.arange(da.sizes[d])
        axes.append([str(v) for v in vals])
    out = []
    for idx in np.ndindex(*da.shape):
        out.append(f"{name}[" + ", ".join(axes[k][i] for k, i in enumerate(idx)) + "]")
    return out


def _flat(ds, varying: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """Values and labels of every varying element of a per-parameter statistic Dataset."""
    vals: list[np.ndarray] = []
    labels: list[str] = []
    for name, da in ds.data_vars.items():
        keep = varying[name].ravel()
        vals.append(np.asarray(da.values, dtype=float).ravel()[keep])
        labels.extend(lab for lab, k in zip(_labels(da), keep, strict=True) if k)
    if not vals:
        return np.zeros(0), []
    return np.concatenate(vals), labels


def _worst(values: np.ndarray, labels: list[str], largest: bool) -> tuple[float, str]:
    if values.size == 0:
        return math.nan, ""
    if np.isnan(values).any():
        i = int(np.flatnonzero(np.isnan(values))[0])
        return math.nan, labels[i]
    i = int(np.argmax(values) if largest else np.argmin(values))
    return float(values[i]), labels[i]


def located(post, mask: np.ndarray) -> str:
    """The posterior element whose draws under ``mask`` (chain, draw) sit furthest from
    its posterior mean, as ``"name[labels] (z ±x.x)"``: z is the mean of the flagged
    draws minus the posterior mean, in posterior sds (of log|value| for positive
    parameters). "" when no draw is flagged or nothing varies; "most draws" when over
    half are flagged (a location then says nothing)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return ""
    if mask.mean() > 0.5:
        return "most draws"
    m = mask.reshape(-1)
    best, where = 0.0, ""
    for da in post.data_vars.values():
        v = np.asarray(da.values, dtype=float)
        flat = v.reshape(v.shape[0] * v.shape[1], -1)
        with np.errstate(all="ignore"):
            x = np.log(np.abs(flat)) if (flat > 0).all() else flat
            sd = x.std(axis=0)
            z = np.where(sd > 0, (x[m].mean(axis=0) - x.mean(axis=0)) / sd, 0.0)
        z = np.nan_to_num(z)
        i = int(np.argmax(np.abs(z)))
        if abs(z[i]) > abs(best):
            best = float(z[i])
            where = _labels(da.isel(chain=0, draw=0))[i]
    return f"{where} (z {best:+.1f})" if where else ""


def check(
    idata,
    max_tree_depth: int,
    *,
    thresholds: config.GateThresholds = config.GATE,
    var_names: list[str] | None = None,
) -> GateResult:
    """Run the diagnostics gate on a fitted posterior.

    Parameters
    ----------
    idata : az.InferenceData with ``posterior`` and ``sample_stats`` (``diverging``,
        ``energy``, ``tree_depth`` or ``reached_max_treedepth``).
    max_tree_depth : the sampler's maximum tree depth (a draw at this depth is saturated).
    thresholds : gate thresholds (default ``calib.config.GATE``).
    var_names : posterior variables to check (default: all).

    Returns
    -------
    GateResult
    """
    import arviz as az

    post = idata.posterior
    if var_names is not None:
        post = post[var_names]
    full_post = post
    n_chains = int(post.sizes["chain"])
    n_draws = int(post.sizes["draw"])
    stats = idata.sample_stats if "sample_stats" in idata.groups() else None
    rows: list[CheckRow] = []

    # elements that vary at all (constant ones have no R-hat / ESS)
    varying = {}
    for name, da in post.data_vars.items():
        v = np.asarray(da.values, dtype=float)
        flat = v.reshape(n_chains * n_draws, -1)
        varying[name] = (np.nanmax(flat, axis=0) > np.nanmin(flat, axis=0)).reshape(v.shape[2:])
    n_skipped = int(sum((~m).sum() for m in varying.values()))
    skip_note = f"{n_skipped} constant element(s) skipped" if n_skipped else ""

    # statistics of constant elements are 0/0: computed, then masked out; no warnings
    post = post[[n for n, m in varying.items() if m.any()]]
    varying = {n: m for n, m in varying.items() if m.any()}

    def quiet(fn, *args, **kw):
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            return fn(*args, **kw)

    # R-hat (rank-normalised)
    rhat_vals, labels = _flat(quiet(az.rhat, post, method="rank"), varying)
    value, worst = _worst(rhat_vals, labels, largest=True)
    rows.append(
        CheckRow(
            "rhat",
            value,
            thresholds.max_rhat,
            "<",
            ok=bool(np.isfinite(value) and value < thresholds.max_rhat),
            worst=worst,
            note=skip_note,
        )
    )

    # bulk and tail ESS per chain
    for method, thr in (
        ("bulk", thresholds.min_ess_bulk_per_chain),
        ("tail", thresholds.min_ess_tail_per_chain),
    ):
        ess_vals, labels = _flat(quiet(az.ess, post, method=method), varying)
        value, worst = _worst(ess_vals / n_chains, labels, largest=False)
        rows.append(
            CheckRow(
                f"ess_{method}",
                value,
                thr,
                ">=",
                ok=bool(np.isfinite(value) and value >= thr),
                worst=worst,
                note=f"per chain ({n_chains} chains x {n_draws} draws)",
            )
        )

    # divergences
    if stats is not None and "diverging" in stats:
        div = np.asarray(stats["diverging"].values, dtype=bool)
        per_chain = div.reshape(div.shape[0], -1).sum(axis=1)
        n_div = int(per_chain.sum())
        worst = f"chain {int(np.argmax(per_chain))}" if n_div else ""
        rows.append(
            CheckRow(
                "divergences",
                float(n_div),
                float(thresholds.max_divergences),
                "<=",
                ok=n_div <= thresholds.max_divergences,
                worst=worst,
                note=f"{n_div / div.size:.2%} of draws",
                where=located(full_post, div) if n_div else "",
            )
        )
    else:
        rows.append(
            CheckRow(
                "divergences",
                math.nan,
                float(thresholds.max_divergences),
                "<=",
                ok=False,
                note="sample_stats.diverging not recorded",
            )
        )

    # E-BFMI
    if stats is not None and "energy" in stats:
        # float64: a float32 fit's energies (~1e5 at 10^5 steps) lose the variance
        energy = np.asarray(stats["energy"].values, dtype=np.float64)
        bfmi = np.atleast_1d(np.asarray(quiet(az.bfmi, energy), dtype=float))
        i = int(np.nanargmin(bfmi)) if np.isfinite(bfmi).any() else 0
        value = float(bfmi[i])
        rows.append(
            CheckRow(
                "ebfmi",
                value,
                thresholds.min_ebfmi,
                ">=",
                ok=bool(np.isfinite(value) and value >= thresholds.min_ebfmi),
                worst=f"chain {i}",
            )
        )
    else:
        rows.append(
            CheckRow(
                "ebfmi",
                math.nan,
                thresholds.min_ebfmi,
                ">=",
                ok=False,
                note="sample_stats.energy not recorded",
            )
        )

    # saturated tree depth
    sat = None
    if stats is not None and "reached_max_treedepth" in stats:
        sat = np.asarray(stats["reached_max_treedepth"].values, dtype=bool)
    elif stats is not None and "tree_depth" in stats:
        sat = np.asarray(stats["tree_depth"].values) >= max_tree_depth
    if sat is not None:
        per_chain = sat.reshape(sat.shape[0], -1).sum(axis=1)
        frac = float(sat.mean())
        rows.append(
            CheckRow(
                "tree_depth",
                frac,
                thresholds.max_treedepth_fraction,
                "<=",
                ok=frac <= thresholds.max_treedepth_fraction,
                worst=f"chain {int(np.argmax(per_chain))}" if per_chain.sum() else "",
                note=f"fraction of draws at max depth {max_tree_depth}",
                where="" if frac <= thresholds.max_treedepth_fraction else located(full_post, sat),
            )
        )
    else:
        rows.append(
            CheckRow(
                "tree_depth",
                math.nan,
                thresholds.max_treedepth_fraction,
                "<=",
                ok=False,
                note="sample_stats.tree_depth not recorded",
            )
        )

    return GateResult(passed=all(r.ok for r in rows), rows=rows)


def _param(worst: str) -> str:
    """The parameter name of a ``worst``/``where`` label (``tau[pf_kv] (z -2.1)`` -> ``tau``)."""
    return worst.split("[")[0].split(" ")[0]


def advice(result: GateResult, *, width: int = 88) -> str:
    """One paragraph for a failed gate: which parameters failed, and what to try.

    Built from the rows only (so it works on a gate read back from a posterior file);
    "" when the gate passed.
    """
    import textwrap

    if result.passed:
        return ""
    r = {row.name: row for row in result.rows}
    bad = {k: v for k, v in r.items() if not v.ok}
    what: list[str] = []
    tries: list[str] = []
    mixing = [k for k in ("rhat", "ess_bulk", "ess_tail") if k in bad]
    if "rhat" in bad:
        what.append(f"the chains disagree on {bad['rhat'].worst} (R-hat {_fmt(bad['rhat'].value)})")
    for k, kind in (("ess_bulk", "bulk"), ("ess_tail", "tail")):
        if k in bad:
            what.append(
                f"{bad[k].worst} has {_fmt(bad[k].value)} effective {kind} draws per chain "
                f"(need {_fmt(bad[k].threshold)})"
            )
    if "divergences" in bad:
        d = bad["divergences"]
        at = f", sitting at {d.where}" if d.where else ""
        what.append(f"{_fmt(d.value)} divergent transition(s){at}")
        tries.append(
            "rerun with another --seed: a divergence or two at a posterior tail that moves "
            "between seeds is chance, one that returns at the same parameter marks a funnel "
            "there (check that parameter's prior against what the data say; a model with few "
            "sampled steps leaves its corrections to the prior); a higher --target-accept "
            "hides rare ones at the cost of time"
        )
    if "tree_depth" in bad:
        t = bad["tree_depth"]
        at = f", most at {t.where}" if t.where and t.where != "most draws" else ""
        what.append(f"{100 * t.value:.1f} % of draws hit the maximum tree depth{at}")
        tries.append(
            "a longer adaptation (--warmup 1000) or --max-tree-depth 10: the step size "
            "adapted far below the posterior's scale in some direction"
        )
    if "ebfmi" in bad:
        what.append(f"E-BFMI {_fmt(bad['ebfmi'].value)} in {bad['ebfmi'].worst or 'a chain'}")
        if "tree_depth" not in bad:
            tries.append("a longer adaptation (--warmup 1000)")
    if mixing:
        worst = [_param(bad[k].worst) for k in mixing if bad[k].worst]
        named = f" of {', '.join(dict.fromkeys(worst))}" if worst else ""
        tries.append(
            f"more draws (--draws 2000: ESS grows with draws) for a slow-mixing parameter"
            f"{named}; if it belongs to a model with few sampled steps, more of its steps "
            "or --hierarchy pooled"
        )
    text = (
        "The fit failed its diagnostics gate: "
        + "; ".join(what)
        + ". What to try: "
        + "; ".join(tries)
        + ". --save-on-fail keeps the posterior for a look (e.g. az.plot_pair of the "
        "named parameters)."
    )
    return textwrap.fill(text, width=width)


def format_table(result: GateResult) -> str:
    """Plain-text table of the gate for the CLI (one row per check, then the verdict)."""
    header = ("check", "value", "threshold", "ok", "worst", "note")
    body = [
        (
            r.name,
            _fmt(r.value),
            f"{r.comparison} {_fmt(r.threshold)}",
            "ok" if r.ok else "FAIL",
            r.worst,
            r.note,
        )
        for r in result.rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)).rstrip() for b in body]
    lines.append(f"verdict: {result.verdict}")
    return "\n".join(lines)
