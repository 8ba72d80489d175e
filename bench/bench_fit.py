"""Benchmark: fit wall time and minimum ESS per second vs number of steps, per sampler.

Data: ``calib.model.synthetic_model_data`` (4 models x 4 experiments, realistic roofline
magnitudes) with durations simulated from the model itself (``simulate_from_model``,
fixed truth), so every sampler sees the same data and a posterior that exists. Sizes
default to 5,000, 20,000 and 122,752 steps (the real trace collection's sampled steps).

Samplers, all through ``calib.fit.fit_model_data`` on the same data in one run:
NumPyro NUTS with each chain method (``parallel``: one XLA host device per chain,
``vectorized``, ``sequential``), PyMC's default NUTS (``--backend pymc``), and nutpie
when installed (skipped with a note otherwise). Wall time = the sampler call,
compilation included (``FitResult.sampling_s``); min ESS = smallest bulk ESS
(ArviZ, rank-normalised) over every element of the named parameters
(``calib.model.PARAMETER_SITES``); ESS/s = min ESS / wall time. Ratios NumPyro/PyMC and
NumPyro/nutpie (wall, ESS/s, min ESS) are from this run. nutpie (``pip install -e
'.[nutpie]'``) runs the PyMC model compiled by its JAX backend, with its low-rank mass
matrix standing in for the dense one. Medians over ``--repeats`` runs (different seeds).
``--pymc-cap SECONDS`` stops a PyMC/nutpie cell that has not finished by then (SIGALRM
in the sampling loop; the worker processes are terminated) and reports it as
"> SECONDS": the ratio is then a bound.

Run from the repository root::

    python bench/bench_fit.py [--steps 5000 20000 122752] [--samplers parallel vectorized
        sequential pymc nutpie] [--chains 2] [--warmup 300] [--draws 300] [--repeats 1]
        [--pymc-cap 2700]
    python bench/bench_fit.py --quick        # smoke run: 2,000 steps, 150 + 150 draws

Prints a table and markdown lines for BENCHMARKS.md; ``--out FILE`` also writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SAMPLERS = ("parallel", "vectorized", "sequential", "pymc", "nutpie")
TRUTH_B = [
    [1.5, 1.3, 2.0, 1.2, 1.2, 1.0],
    [1.3, 1.6, 1.7, 1.5, 1.3, 1.6],
    [1.1, 1.4, 1.9, 1.3, 1.1, 1.2],
    [1.7, 1.2, 2.2, 1.1, 1.4, 1.4],
]


class CellTimeout(Exception):
    """A capped cell ran past its time limit."""


@contextlib.contextmanager
def time_cap(seconds: float | None):
    """Raise :class:`CellTimeout` in this (main) thread after ``seconds`` (None: no cap).

    Python delivers the alarm between bytecodes, so it stops PyMC's sampling loop (which
    waits on its worker processes in Python) promptly, but not one long XLA call.
    """
    if not seconds:
        yield
        return

    def _raise(signum, frame):
        raise CellTimeout

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[5000, 20000, 122752])
    p.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    p.add_argument("--hierarchy", default="per-model")
    p.add_argument("--chains", type=int, default=2)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--draws", type=int, default=300)
    p.add_argument("--repeats", type=int, default=1, help="runs per cell (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pymc-cap",
        type=float,
        default=2700.0,
        metavar="SECONDS",
        help="stop a PyMC/nutpie cell after this long and report it as a bound "
        "(0: no cap; PyMC's 122,752-step cell takes over an hour on 2 cores)",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: --steps 2000 --warmup 150 --draws 150"
    )
    p.add_argument("--out", default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.draws = [2000], 150, 150
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # JAX set-up before JAX is imported: one host device per chain (parallel), float64
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    ).strip()
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.chains}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_enable_x64", True)
    import arviz as az
    import numpy as np
    from _common import header, machine_cell

    from calib.fit import SamplerSettings, fit_model_data
    from calib.model import PARAMETER_SITES, model_coords, simulate_from_model, synthetic_model_data
    from calib.priors import load_priors

    info = header("calib fit benchmark: wall time and min ESS/s vs N")
    print(
        f"{'setup':>9}: {args.hierarchy}, {args.chains} chains, {args.warmup} warmup + "
        f"{args.draws} draws, synthetic design (4 models x 4 experiments), durations from "
        f"the model; jax devices {jax.local_device_count()}; repeats {args.repeats}"
    )
    sys.stdout.flush()
    priors = load_priors()
    truth = {
        "b": np.array(TRUTH_B),
        "per_layer_us": 6.0,
        "per_request_us": 4.0,
        "per_step_us": 300.0,
        "alpha": 0.3,
        "sigma": np.array([0.05, 0.07, 0.06, 0.08]),
        "stall_prob": 0.02,
        "stall_log_mult": 0.7,
        "stall_log_sd": 0.3,
    }
    results = []
    for n in args.steps:
        design = synthetic_model_data(
            n, n_models=4, experiments_per_model=4, seed=args.seed, tp2_models=(1, 3)
        )
        y, _ = simulate_from_model(args.hierarchy, design, params=truth, seed=args.seed)
        data = design._replace(duration_us=y, log_duration=np.log(y))
        coords = model_coords(
            data, [f"m{i}" for i in range(4)], [f"e{i}" for i in range(16)], np.arange(n)
        )
        for sampler in args.samplers:
            backend = sampler if sampler in ("pymc", "nutpie") else "numpyro"
            method = sampler if backend == "numpyro" else "parallel"
            cap = args.pymc_cap if backend != "numpyro" else None
            walls, esss, divs, verdicts, note, capped = [], [], [], [], "", None
            for r in range(args.repeats):
                settings = SamplerSettings(
                    chains=args.chains,
                    warmup=args.warmup,
                    draws=args.draws,
                    seed=args.seed + r,
                    chain_method=method,
                )
                try:
                    with time_cap(cap):
                        fit = fit_model_data(
                            data,
                            coords,
                            hierarchy=args.hierarchy,
                            priors=priors,
                            backend=backend,
                            settings=settings,
                            progress=False,
                            step_index=np.arange(n),
                        )
                except CellTimeout:
                    capped, note = cap, f"not finished in {cap:.0f} s (capped)"
                    break
                except Exception as exc:  # noqa: BLE001 (report and go on: a missing backend)
                    note = f"unavailable: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
                    break
                post = fit.idata.posterior
                names = [v for v in PARAMETER_SITES if v in post]
                ess = az.ess(post[names], method="bulk")
                vals = np.concatenate([np.asarray(ess[v].values).ravel() for v in names])
                # fixed elements (inactive components) have no ESS
                vals = vals[np.isfinite(vals)]
                walls.append(fit.sampling_s)
                esss.append(float(vals.min()))
                divs.append(int(np.asarray(fit.idata.sample_stats["diverging"]).sum()))
                verdicts.append(fit.gate.verdict.split(":")[0])
            row = {
                "steps": n,
                "sampler": sampler,
                "backend": backend,
                "note": note,
                "capped_s": capped,
            }
            if walls:
                wall = statistics.median(walls)
                ess_min = statistics.median(esss)
                row.update(
                    wall_s=wall,
                    min_ess=ess_min,
                    ess_per_s=ess_min / wall,
                    divergences=int(statistics.median(divs)),
                    gate="/".join(verdicts),
                    walls=walls,
                )
            results.append(row)
            print(
                f"N={n:>7} {sampler:<10} "
                + (
                    f"wall {row['wall_s']:8.1f} s  min ESS {row['min_ess']:7.0f}  ESS/s "
                    f"{row['ess_per_s']:7.2f}  div {row['divergences']}  gate {row['gate']}"
                    if walls
                    else note
                )
            )
            sys.stdout.flush()

    for ref_name in ("pymc", "nutpie"):
        print(
            f"\n# NumPyro / {ref_name} in this run (wall-time ratio < 1: NumPyro faster; "
            "ESS/s ratio > 1: NumPyro better)"
        )
        for n in args.steps:
            ref = next(
                (
                    r
                    for r in results
                    if r["steps"] == n and r["sampler"] == ref_name and "wall_s" in r
                ),
                None,
            )
            capped = next(
                (
                    c["capped_s"]
                    for c in results
                    if c["steps"] == n and c["sampler"] == ref_name and c["capped_s"]
                ),
                None,
            )
            for r in results:
                if r["steps"] != n or r["backend"] != "numpyro" or "wall_s" not in r:
                    continue
                if ref is None:
                    print(
                        f"N={n}: numpyro-{r['sampler']} / {ref_name}: "
                        + (
                            f"wall < {r['wall_s'] / capped:.2f}x ({ref_name} not finished in "
                            f"{capped:.0f} s)"
                            if capped
                            else f"no {ref_name} result to compare"
                        )
                    )
                    continue
                print(
                    f"N={n}: numpyro-{r['sampler']} / {ref_name}: wall "
                    f"{r['wall_s'] / ref['wall_s']:.2f}x, ESS/s "
                    f"{r['ess_per_s'] / ref['ess_per_s']:.2f}x, min ESS "
                    f"{r['min_ess'] / ref['min_ess']:.2f}x"
                )

    print("\n# lines for BENCHMARKS.md")
    print(
        "| steps | sampler | chains x (warmup + draws) | wall (s) | min bulk ESS | ESS/s | "
        "divergences | machine | date |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    m = machine_cell(info)
    for r in results:
        label = r["sampler"] if r["backend"] != "numpyro" else f"numpyro {r['sampler']}"
        if "wall_s" in r:
            print(
                f"| {r['steps']:,} | {label} | {args.chains} x ({args.warmup} + {args.draws}) | "
                f"{r['wall_s']:.1f} | {r['min_ess']:.0f} | {r['ess_per_s']:.2f} | "
                f"{r['divergences']} | {m} | {info['date']} |"
            )
        elif r["capped_s"]:
            print(
                f"| {r['steps']:,} | {label} | {args.chains} x ({args.warmup} + {args.draws}) | "
                f"> {r['capped_s']:.0f} (capped) | - | - | - | {m} | {info['date']} |"
            )
        else:
            print(
                f"| {r['steps']:,} | {label} | - | - | - | - | - | {r['note']} | {info['date']} |"
            )
    if args.out:
        from calib.io import atomic_write_text

        atomic_write_text(
            args.out,
            json.dumps({"machine": info, "args": vars(args), "results": results}, indent=2),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
