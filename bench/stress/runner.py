"""The stress suite runner: simulate -> write traces -> import -> fit (defaults) -> table.

Each set of :mod:`calib.simulate.stress` is simulated once, written in the real
on-disk trace format, imported by :func:`calib.traces.import_root` and saved as a
canonical dataset, all cached under ``--cache`` keyed by the recipe's content hash
(:func:`calib.simulate.stress.recipe_hash`). Each (set, seed) is then fitted by
:func:`calib.fit.fit` with the library's default settings (only the seed differs, and
``--chains/--warmup/--draws`` when given) and one row is reported:

gate verdict, failed checks, wall time of the fit call, sampling time, leapfrog steps
per iteration (mean), the adapted step size (median over chains), divergences, % of
draws at the maximum tree depth, min bulk and tail ESS per chain (the gate's), min
ESS/s (smallest total bulk ESS / sampling time), worst R-hat, the parameters at the
worst R-hat / bulk / tail ESS, and where the divergent and saturated draws sit (the
parameter whose values on those draws are furthest from its posterior mean, in
posterior standard deviations of log|value|).
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import sys
import time
from pathlib import Path

from calib import cli, config
from calib.errors import CalibError

DEFAULT_CACHE = config.PROJECT_ROOT / "bench" / "out" / "stress-cache"
DEFAULT_OUT = config.PROJECT_ROOT / "bench" / "out" / "stress"

COLUMNS = (
    "set",
    "seed",
    "models",
    "sampled",
    "min_model_sampled",
    "gate",
    "failed",
    "wall_s",
    "sampling_s",
    "leapfrog_per_iter",
    "step_size",
    "divergences",
    "saturated_pct",
    "min_ess_bulk_pc",
    "min_ess_tail_pc",
    "min_ess_per_s",
    "max_rhat",
    "worst_rhat",
    "worst_ess_bulk",
    "worst_ess_tail",
    "divergent_at",
    "saturated_at",
    "data_s",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from calib.simulate.stress import HELD_BACK, SETS

    s = config.SAMPLER
    p = cli.Parser(
        description="Fit every stress set at each seed with the fit's defaults; "
        "print one row per set x seed."
    )
    p.add_argument(
        "--sets",
        nargs="+",
        metavar="NAME",
        default=None,
        help="sets to run (default: all; names: "
        + ", ".join(x.name for x in SETS + HELD_BACK)
        + ")",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=cli.nonneg_int,
        default=[0, 1, 2],
        help="fit seeds (default: 0 1 2)",
    )
    p.add_argument(
        "--held-back",
        action="store_true",
        help="run the held-back sets (fresh seeds, never used in tuning) instead",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: every stage shortened (calib.simulate.stress.QUICK_DURATION_FACTOR)",
    )
    p.add_argument("--chains", type=cli.positive_int, default=s.chains)
    p.add_argument("--warmup", type=cli.nonneg_int, default=s.warmup)
    p.add_argument("--draws", type=cli.positive_int, default=s.draws)
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="folder for the table (stress.csv / stress.md)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help="folder for generated traces and imported datasets",
    )
    args = p.parse_args(argv)
    pool = HELD_BACK if args.held_back else SETS
    if args.sets is None:
        args.sets = [x.name for x in pool]
    else:
        names = {x.name for x in pool}
        bad = [n for n in args.sets if n not in names]
        if bad:
            p.error(
                f"unknown {'held-back ' if args.held_back else ''}set(s) {', '.join(bad)}; "
                f"choose from {', '.join(x.name for x in pool)}"
            )
    return args


def prepare(stress_set, cache: Path, *, quick: bool) -> tuple[Path, float]:
    """The set's canonical dataset (generated, written and imported on first use)."""
    from calib.io import atomic_write_text
    from calib.simulate.stress import generate_set, recipe_hash
    from calib.traces import import_root, save_dataset

    key = recipe_hash(stress_set, quick=quick)[:12]
    d = cache / f"{stress_set.name}{'-quick' if quick else ''}-{key}"
    nc = d / "dataset.nc"
    if nc.is_file():
        return nc, 0.0
    t0 = time.perf_counter()
    raw = d / "raw"
    if raw.exists():  # a run interrupted before the dataset was saved
        shutil.rmtree(raw)
    generate_set(stress_set, raw, quick=quick)
    ds = import_root(raw, workers=1, progress=False, use_cache=False)
    save_dataset(ds, nc)
    atomic_write_text(d / "recipe.txt", f"{stress_set}\nrecipe_hash {key}\n")
    return nc, time.perf_counter() - t0


def _located(idata, mask) -> str:
    """Where the flagged draws sit, over the named parameters (calib.diagnostics.located)."""
    from calib.diagnostics import located
    from calib.model import PARAMETER_SITES

    post = idata.posterior
    return located(post[[n for n in PARAMETER_SITES if n in post]], mask)


def measure(stress_set, nc: Path, seed: int, args) -> dict:
    """Fit ``nc`` at ``seed`` with the defaults; return the row."""
    import numpy as np

    from calib.fit import SamplerSettings, fit
    from calib.traces import load_dataset

    ds = load_dataset(nc, progress=False)
    sampled = ds["exp_num_sampled"].values
    models = ds["exp_model"].values
    per_model = {m: int(sampled[models == m].sum()) for m in sorted(set(models.tolist()))}
    settings = SamplerSettings(chains=args.chains, warmup=args.warmup, draws=args.draws, seed=seed)
    t0 = time.perf_counter()
    res = fit(ds, settings=settings, progress=False, out_path=None)
    wall = time.perf_counter() - t0
    st = res.idata.sample_stats
    rows = {r.name: r for r in res.gate.rows}
    div = np.asarray(st["diverging"].values, dtype=bool)
    sat = np.asarray(st["reached_max_treedepth"].values, dtype=bool)
    n_chains = div.shape[0]
    ess_b = rows["ess_bulk"].value
    return {
        "set": stress_set.name,
        "seed": seed,
        "models": len(per_model),
        "sampled": int(sum(per_model.values())),
        "min_model_sampled": min(per_model.values()),
        "gate": "pass" if res.passed else "FAIL",
        "failed": " ".join(r.name for r in res.gate.rows if not r.ok),
        "wall_s": round(wall, 1),
        "sampling_s": round(res.sampling_s, 1),
        "leapfrog_per_iter": round(float(np.mean(st["n_steps"].values)), 1),
        "step_size": float(f"{np.median(st['step_size'].values):.3g}"),
        "divergences": int(div.sum()),
        "saturated_pct": round(100.0 * float(sat.mean()), 2),
        "min_ess_bulk_pc": round(ess_b, 0),
        "min_ess_tail_pc": round(rows["ess_tail"].value, 0),
        "min_ess_per_s": round(ess_b * n_chains / res.sampling_s, 2),
        "max_rhat": round(rows["rhat"].value, 3),
        "worst_rhat": rows["rhat"].worst,
        "worst_ess_bulk": rows["ess_bulk"].worst,
        "worst_ess_tail": rows["ess_tail"].worst,
        "divergent_at": _located(res.idata, div),
        "saturated_at": _located(res.idata, sat),
    }


_SHORT = {
    "set": "set",
    "seed": "seed",
    "gate": "gate",
    "wall_s": "wall s",
    "sampling_s": "sampling s",
    "leapfrog_per_iter": "leapfrog/iter",
    "step_size": "step",
    "divergences": "div",
    "saturated_pct": "% sat",
    "min_ess_bulk_pc": "bulk ESS/ch",
    "min_ess_tail_pc": "tail ESS/ch",
    "min_ess_per_s": "ESS/s",
}


def markdown(rows: list[dict], title: str) -> str:
    out = io.StringIO()
    out.write(f"# {title}\n\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n")
    for r in rows:
        out.write("| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |\n")
    return out.getvalue()


def write_tables(rows: list[dict], out: Path, stem: str, title: str) -> None:
    from calib.io import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{stem}.csv", buf.getvalue())
    atomic_write_text(out / f"{stem}.md", markdown(rows, title))


def _line(r: dict) -> str:
    core = "  ".join(f"{_SHORT[k]} {r[k]}" for k in _SHORT if k not in ("set", "seed"))
    extra = (
        f"  failed [{r['failed']}] rhat {r['max_rhat']} {r['worst_rhat']}; "
        f"bulk {r['worst_ess_bulk']}; tail {r['worst_ess_tail']}"
        if r["failed"]
        else ""
    )
    where = "".join(f"  {k} {r[k]}" for k in ("divergent_at", "saturated_at") if r[k])
    return f"{r['set']:<20} seed {r['seed']}  {core}{extra}{where}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from calib.simulate.stress import get_set

    try:
        cli.setup_jax(
            device="cpu",
            chain_method=config.SAMPLER.chain_method,
            chains=args.chains,
            x64=config.FIT_PRECISION == "float64",
        )
        sys.path.insert(0, str(config.PROJECT_ROOT / "bench"))
        from _common import header

        title = (
            "calib stress suite (held-back sets)" if args.held_back else "calib stress suite"
        ) + (" --quick" if args.quick else "")
        info = header(title)
        stem = "stress-held-back" if args.held_back else "stress"
        rows: list[dict] = []
        for name in args.sets:
            s = get_set(name)
            nc, data_s = prepare(s, args.cache, quick=args.quick)
            for seed in args.seeds:
                r = measure(s, nc, seed, args)
                r["data_s"] = round(data_s, 1)
                rows.append(r)
                print(_line(r), flush=True)
                write_tables(
                    rows,
                    args.out,
                    stem,
                    f"{title}: {info['cpu']}, {info['cores']} "
                    f"cores, {info['date']}, load {info['load']}",
                )
    except CalibError as err:
        return cli.user_error(err)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    n_fail = sum(r["gate"] != "pass" for r in rows)
    print(f"{len(rows) - n_fail} of {len(rows)} rows pass; table in {args.out}/{stem}.md")
    return 0 if n_fail == 0 else 1
