#!/usr/bin/env python
"""Closed-loop comparisons: which coefficients make calib's scheduler reproduce the workloads.

Every experiment of the posterior's data is replayed through calib's vLLM-like
scheduler by :func:`calib.closed_loop.closed_loop` (the code path of
``scripts/check_closed_loop.py``) with these coefficient sets:

* ``calib``   the posterior's export (betas and alphas, what ``scripts/export.py``
  writes; with ``--draws K`` also K posterior draws for the band);
* ``iter29``  BLIS's shipped trained-physics coefficients (``priors/blis-iter29.yaml``,
  ``blis:`` block; provenance in :data:`ITER29_SOURCE`), one global set for every model;
* ``nnls``    per model, non-negative least squares of the same roofline terms on the
  posterior data's sampled steps (:func:`calib.baselines.nnls_model_fits`, BLIS's
  additive form), with calib's exported alphas (NNLS fits step times only);
* ``+gap``    calib's export with the measured host gap between steps (the
  teacher-forced check's, mean over the model's experiments) added to the per-step
  beta β₇: the scheduler runs steps back to back, the traces' engine does not;
* ``a0=0``, ``a1=0``, ``a2=0``  calib's export with one alpha set to 0.

Next to them: the teacher-forced check (:func:`calib.e2e.replay`, what
``scripts/check_e2e.py`` prints: observed batches, measured host gaps) with its
``step-bias%`` column (the step model's misfit on the steps that dominate the metric)
and its NNLS baseline. Prints one block per metric (E2E, TTFT, decode interval;
error % of the experiment mean), summaries (median |err|, worst, count within the
targets of ``calib.config.CLOSED_LOOP_*``), how far the step-time bias explains the
closed-loop error (least squares of the closed-loop error on the step bias across
experiments) and what each alpha contributes (closed-loop error minus the error with
that alpha at 0, percentage points).

    python bench/bench_closed_loop.py                      # posteriors/per-model.nc, its data
    python bench/bench_closed_loop.py --posterior posteriors/NAME.nc --draws 20
    python bench/bench_closed_loop.py --quick              # one experiment per model

Exit status 0 (a measurement, not a gate); 2 on a user error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from _common import header  # noqa: E402

from calib import cli, config  # noqa: E402

#: Where the ``iter29`` set comes from (the values are ``priors/blis-iter29.yaml``'s).
ITER29_SOURCE = (
    "inference-sim/inference-sim training/iterations/iter29/inner_loop_results.json "
    "@ fd8354e5944c32c4bc6b19556a47bcda743a11b8 (best_params: 3 alphas, 10 betas; loss "
    "34.57 % on BLIS's 15 training experiments); BLIS ships them as defaults.yaml "
    "trained_physics_coefficients with an 11th beta = beta[3] (MoE dispatch, DP > 1 only). "
    "One global set, not fitted to these traces, models or accelerator"
)
METRIC_LABELS = {
    "e2e": "E2E (ARRIVED→DEPARTED)",
    "ttft": "TTFT (ARRIVED→FIRST_TOKEN)",
    "itl": "decode interval (E2E−TTFT)/(output−1)",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument(
        "--posterior",
        default=str(config.POSTERIORS_DIR / "per-model.nc"),
        help="posterior NetCDF (default %(default)s)",
    )
    p.add_argument(
        "--traces", default=None, help="dataset to replay (default: the posterior's data)"
    )
    p.add_argument(
        "--draws",
        type=cli.nonneg_int,
        default=0,
        help="posterior draws replayed for calib's band (default %(default)s: point only)",
    )
    p.add_argument(
        "--tf-draws",
        type=cli.positive_int,
        default=config.E2E_DRAWS,
        help="posterior draws of the teacher-forced check (default %(default)s)",
    )
    p.add_argument(
        "--workers", type=cli.positive_int, default=None, help="replay processes (default: CPUs)"
    )
    p.add_argument(
        "--csv", default=None, help="also write every error as a long CSV table (with manifest)"
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: one experiment per model, 100 TF draws"
    )
    return p.parse_args(argv)


def iter29_coefficients() -> tuple[list[float], list[float]]:
    """(alphas, betas) of BLIS iter29, from ``priors/blis-iter29.yaml``."""
    import yaml

    raw = yaml.safe_load((config.PROJECT_ROOT / "priors" / "blis-iter29.yaml").read_text())
    blis = raw["blis"]
    return [float(a) for a in blis["alpha_coeffs_us"]], [float(b) for b in blis["beta_coeffs"]]


def variant_sets(
    plans, export_point: dict, nnls_fits: dict, gap_us: dict[str, float]
) -> dict[str, dict]:
    """Per variant (besides ``calib``): model -> (alphas, betas) for every replayed model.

    ``gap_us``: per model, the measured host gap between steps (µs) that the ``+gap``
    variant adds to calib's per-step beta (β₇).
    """
    from calib.closed_loop import Coefficients, set_name
    from calib.predict import BLIS_BETA_NAMES, betas_from_params

    calib = Coefficients(point=export_point, draws=[])
    names = {p.model: set_name(p, calib)[0] for p in plans}  # model -> export set
    a29, b29 = iter29_coefficients()
    out: dict[str, dict] = {
        "iter29": {m: (a29, b29) for m in names},
        "nnls": {},
    }
    for m, set_ in names.items():
        coef = nnls_fits.get(m)
        if coef is None or not np.all(np.isfinite(coef)):
            continue  # too few sampled steps: the model is left out of this variant
        out["nnls"][m] = (export_point[set_][0], betas_from_params(coef[:6], *coef[6:]))
    step = BLIS_BETA_NAMES.index("per_step_us")
    out["+gap"] = {}
    for m, set_ in names.items():
        betas = list(export_point[set_][1])
        betas[step] += gap_us.get(m, 0.0)
        out["+gap"][m] = (export_point[set_][0], betas)
    for k in range(3):
        out[f"a{k}=0"] = {
            m: (
                [0.0 if i == k else a for i, a in enumerate(export_point[s][0])],
                export_point[s][1],
            )
            for m, s in names.items()
        }
    return out


def short(name: str, width: int = 40) -> str:
    """Experiment name without a leading date-time stamp (``YYYYMMDD-HHMMSS-``)."""
    import re

    return re.sub(r"^\d{8}-\d{6}-", "", str(name))[:width]


def fmt(v: float) -> str:
    return f"{v:+7.1f}" if np.isfinite(v) else f"{'—':>7}"


def summarize(col: pd.Series, target: float) -> tuple[str, str, str]:
    c = col.dropna()
    if c.empty:
        return "—", "—", "—"
    worst = c.iloc[int(np.argmax(c.abs().values))]
    return (
        f"{c.abs().median():.1f}",
        f"{worst:+.1f}",
        f"{int((c.abs() < target).sum())}/{len(c)}",
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    from calib.errors import CalibError

    t0 = time.perf_counter()
    info = header("closed loop: calib's export vs BLIS iter29 vs NNLS vs alphas zeroed")
    try:
        cli.check_output(args.csv, flag="--csv")
        data = cli.DataChoice(args.posterior, args.traces)
        cli.setup_jax_cpu()
        from calib.baselines import nnls_model_fits
        from calib.closed_loop import experiment_plans, exported_coefficients
        from calib.e2e import replay
        from calib.io import file_sha256
        from calib.posterior import load_posterior
        from calib.predict import StepFeatures
        from calib.traces import dataset_hash, load_dataset

        idata = load_posterior(args.posterior)
        ds = load_dataset(data.path)
        note = data.verify(ds)
        if note:
            print(note, file=sys.stderr)
    except CalibError as err:
        return cli.user_error(err)
    print(f"posterior: {args.posterior} (sha256 {file_sha256(args.posterior)[:12]})")
    print(f"     data: {data.path} (hash {dataset_hash(ds)[:12]})")
    print(f"   iter29: {ITER29_SOURCE}")
    sys.stdout.flush()

    plans = experiment_plans(ds)
    tf_draws = args.tf_draws
    if args.quick:
        seen: set[str] = set()
        plans = [p for p in plans if not (p.model in seen or seen.add(p.model))]
        tf_draws = min(tf_draws, 100)
    times: dict[str, float] = {}

    t = time.perf_counter()
    feats = StepFeatures.from_dataset(ds)
    tf = replay(
        idata,
        ds,
        features=feats,
        draws=tf_draws,
        baselines=True,
        new_experiments=data.new_experiments,
    ).table
    times["teacher-forced"] = time.perf_counter() - t

    t = time.perf_counter()
    coeffs, _ = exported_coefficients(idata, draws=args.draws)
    fits = nnls_model_fits(ds, feats)
    times["export + NNLS fits"] = time.perf_counter() - t
    print("\nexported alphas (µs; queueing α₀, post-decode α₁, per output token α₂):")
    for name, (alphas, _betas) in coeffs.point.items():
        print(f"  {name:<24} " + ", ".join(f"{a:9.1f}" for a in alphas))
    e2e_rows = tf[tf.metric == "e2e"]
    gaps = e2e_rows.groupby("model").gap_us.mean().to_dict()
    print(
        "measured host gap between steps (µs, mean of the model's experiments): "
        + ", ".join(f"{m} {g:.1f}" for m, g in gaps.items())
    )
    print("NNLS betas per model (BLIS order):")
    sets = variant_sets(plans, coeffs.point, fits, gaps)
    for m, (_a, b) in sets["nnls"].items():
        print(f"  {m:<24} " + ", ".join(f"{v:.4g}" for v in b))
    sys.stdout.flush()

    tables = {}
    t = time.perf_counter()
    from calib.closed_loop import Coefficients, closed_loop

    tables["calib"] = closed_loop(plans, coeffs, workers=args.workers).table
    times["calib"] = time.perf_counter() - t
    print(f"\nreplayed calib ({args.draws} draws): {times['calib']:.0f} s", flush=True)
    for name, point in sets.items():
        t = time.perf_counter()
        sub = [p for p in plans if p.model in point]
        tables[name] = closed_loop(
            sub, Coefficients(point=point, draws=[]), workers=args.workers
        ).table
        times[name] = time.perf_counter() - t
        print(f"replayed {name}: {times[name]:.0f} s", flush=True)

    def row(variant, r, predicted, error, inside, observed=None):
        return {
            "variant": variant,
            "experiment": r.experiment,
            "metric": r.metric,
            "observed_us": r.observed_us if observed is None else observed,
            "predicted_us": predicted,
            "error_pct": error,
            "inside": inside,
        }

    rows = []
    for name, tab in tables.items():
        for r in tab.itertuples():
            rows.append(row(name, r, r.predicted_us, r.error_pct, r.inside))
    for r in tf.itertuples():
        rows.append(row("tf", r, r.predicted_us, r.error_pct, r.inside))
        rows.append(row("tf-nnls", r, r.nnls_us, r.nnls_error_pct, False))
        rows.append(row("step-bias", r, np.nan, r.step_bias_pct, False, observed=np.nan))
    long = pd.DataFrame(rows)
    order = [
        "step-bias",
        "tf",
        "calib",
        "iter29",
        "nnls",
        "tf-nnls",
        "+gap",
        "a0=0",
        "a1=0",
        "a2=0",
    ]
    exps = [p.name for p in plans]
    targets = {
        "e2e": config.CLOSED_LOOP_E2E_TARGET_PCT,
        "ttft": config.CLOSED_LOOP_TTFT_ITL_TARGET_PCT,
        "itl": config.CLOSED_LOOP_TTFT_ITL_TARGET_PCT,
    }
    model_of = {p.name: p.model for p in plans}
    summary = {}
    print(
        "\ncolumns: step-bias = teacher-forced step-level bias %; tf = teacher-forced error; "
        "calib/iter29/nnls/+gap/aK=0 = closed loop in calib's scheduler; tf-nnls = teacher-forced "
        "NNLS baseline"
    )
    for m in ("e2e", "ttft", "itl"):
        wide = (
            long[long.metric == m]
            .pivot(index="experiment", columns="variant", values="error_pct")
            .reindex(index=exps, columns=order)
        )
        print(f"\n== {METRIC_LABELS[m]}: error % (target |err| < {targets[m]:g} %) ==")
        print(f"{'experiment':<40} {'model':<14}" + "".join(f" {c:>9}" for c in order))
        for e, r in wide.iterrows():
            print(
                f"{short(e):<40} {model_of[e][:14]:<14}"
                + "".join(f" {fmt(r[c]):>9}" for c in order)
            )
        stats = {c: summarize(wide[c], targets[m]) for c in order}
        summary[m] = stats
        for i, label in enumerate(("median |err|", "worst", "within target")):
            print(
                f"{label:<55}"
                + "".join(f" {stats[c][i] if c != 'step-bias' else '':>9}" for c in order)
            )
        if args.draws:
            cal = long[(long.variant == "calib") & (long.metric == m)]
            print(f"calib inside its {args.draws}-draw band: {int(cal.inside.sum())}/{len(cal)}")
        # how far the step-time bias explains the closed-loop error
        ok = wide[["step-bias", "tf", "calib"]].dropna()
        if len(ok) >= 3:
            x, y = ok["step-bias"].values, ok["calib"].values
            slope, icpt = np.polyfit(x, y, 1)
            resid = y - (icpt + slope * x)
            r2 = 1.0 - resid.var() / y.var() if y.var() > 0 else float("nan")
            print(
                f"step bias → closed loop: calib = {icpt:+.2f} + {slope:.2f}·bias "
                f"(R² {r2:.2f}, residual sd {resid.std():.2f} pp); median |closed − tf| "
                f"{np.median(np.abs(ok['calib'] - ok['tf'])):.2f} pp, median |tf| "
                f"{np.median(np.abs(ok['tf'])):.2f} %"
            )
        for k in range(3):
            d = (wide["calib"] - wide[f"a{k}=0"]).dropna()
            if len(d):
                print(
                    f"α{k} contributes (calib − a{k}=0): median {d.median():+.2f} pp, "
                    f"range {d.min():+.2f} … {d.max():+.2f} pp"
                )

    shown = Path(args.posterior).resolve()
    if shown.is_relative_to(config.PROJECT_ROOT):
        shown = shown.relative_to(config.PROJECT_ROOT)
    print("\n# lines for BENCHMARKS.md")
    print(
        f"# {info['date']}, {info['cpu']}, {info['cores']} cores, load {info['load']}; "
        f"`python bench/bench_closed_loop.py --posterior {shown} --draws {args.draws}"
        + (" --quick`" if args.quick else "`")
    )
    print("| variant | E2E median \\|err\\| / worst / within 10 % | TTFT | decode interval |")
    print("|---|---|---|---|")
    for c in order[1:]:
        cells = [" / ".join(summary[m][c]) for m in ("e2e", "ttft", "itl")]
        print(f"| {c} | " + " | ".join(cells) + " |")
    print("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    if args.csv:
        import json

        from calib.io import atomic_write_text, manifest

        m = manifest(
            kind="closed-loop-bench",
            data_hash=dataset_hash(ds),
            settings={"draws": args.draws, "tf_draws": tf_draws, "quick": args.quick},
            source_posterior_sha256=file_sha256(args.posterior),
            iter29_source=ITER29_SOURCE,
        )
        atomic_write_text(
            args.csv, f"# manifest: {json.dumps(m, sort_keys=True)}\n" + long.to_csv(index=False)
        )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_script(main))
