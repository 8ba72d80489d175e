#!/usr/bin/env python
"""Benchmark the teacher-forced E2E check (calib.e2e.replay).

Two cases, both 16 experiments × 1000 posterior draws, posterior-predictive noise
on, both baselines, host timing measured from the step timestamps (the check_e2e
defaults). Times ``replay`` (design and host timing, per-draw step predictions in
chunks, noise, experiment means, step-level bias, baselines) with the roofline terms
precomputed (their cost is printed once), repeated; prints the median.
Target: ≤ 30 s.

* synthetic (default): 4 models × 4 workloads of steps drawn from the model itself,
  ~60 µs host gaps, a mock-sampler posterior of 4 chains × 250 draws;
* ``--posterior posteriors/per-model.nc``: the embedded default dataset
  (``traces/default.nc``, ~125,000 steps) and a real posterior (1000 draws thinned
  evenly) — what ``scripts/check_e2e.py posteriors/per-model.nc`` runs.

    python bench/bench_e2e.py                       # synthetic, ~7,500 steps per experiment
    python bench/bench_e2e.py --posterior posteriors/per-model.nc
    python bench/bench_e2e.py --steps-per-exp 20000 --repeats 3
    python bench/bench_e2e.py --quick               # smoke run: 2,000 steps per experiment
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import header, peak_rss_mib  # noqa: E402

from calib.e2e import replay  # noqa: E402


def _synthetic(args):
    from fixtures.posteriors import make_replay_dataset, mock_posterior

    truth = {
        "b": np.array(
            [
                [1.6, 1.2, 2.5, 1.4, 1.15, 1.0],
                [1.3, 1.5, 2.0, 1.8, 1.25, 1.8],
                [1.4, 1.3, 2.2, 1.6, 1.2, 1.5],
                [1.5, 1.4, 2.4, 1.5, 1.1, 1.2],
            ]
        ),
        "per_layer_us": 8.0,
        "per_request_us": 3.0,
        "per_step_us": 150.0,
        "alpha": 0.3,
        "sigma": np.array([0.08, 0.1, 0.09, 0.07]),
        "stall_prob": 0.02,
        "stall_log_mult": 0.7,
        "stall_log_sd": 0.3,
    }
    ds, features, truth = make_replay_dataset(
        seed=0,
        n_models=2,
        exps_per_model=8,
        steps_per_exp=args.steps_per_exp,
        requests_per_exp=args.requests_per_exp,
        truth=truth,
        gap_us=60.0,
        gap_sd_us=18.0,
    )
    idata = mock_posterior(ds, features, truth, draws=args.draws // 4, chains=4)
    return ds, features, idata


def _real(args):
    from calib import config
    from calib.posterior import load_posterior
    from calib.predict import StepFeatures
    from calib.traces import load_dataset

    ds = load_dataset(args.traces or config.DEFAULT_TRACES)
    idata = load_posterior(args.posterior)
    t = time.perf_counter()
    features = StepFeatures.from_dataset(ds)
    print(f"roofline terms of all steps (once per check): {time.perf_counter() - t:.2f} s")
    return ds, features, idata


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--posterior",
        default=None,
        help="a real posterior: bench on its dataset (--traces) instead of synthetic",
    )
    p.add_argument("--traces", default=None, help="dataset for --posterior (default: embedded)")
    p.add_argument("--steps-per-exp", type=int, default=7500)
    p.add_argument("--requests-per-exp", type=int, default=400)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke run: --steps-per-exp 2000")
    args = p.parse_args(argv)
    if args.quick:
        args.steps_per_exp = 2000
    header("bench_e2e: teacher-forced E2E check (calib.e2e.replay)")
    t0 = time.perf_counter()
    ds, features, idata = _real(args) if args.posterior else _synthetic(args)
    case = f"posterior {args.posterior}" if args.posterior else "synthetic"
    print(
        f"setup ({case}): {ds.sizes['experiment']} experiments, {ds.sizes['step']} steps, "
        f"{ds.sizes['request']} requests, {args.draws} draws "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        res = replay(idata, ds, features=features, draws=args.draws, noise=True)
        times.append(time.perf_counter() - t)
    print(
        f"replay (noise, baselines, measured host timing): median "
        f"{statistics.median(times):.2f} s over {args.repeats} repeats "
        f"(min {min(times):.2f}, max {max(times):.2f}); target <= 30 s"
    )
    print(
        f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"peak RSS {peak_rss_mib()[0]:.0f} MiB"
    )
    print(res.timing.describe())
    print(res.message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
