#!/usr/bin/env python
"""Benchmark the teacher-forced E2E check (calib.e2e.replay).

16 experiments (4 models × 4 workloads) of synthetic steps whose durations come
from the model itself, a mock-sampler posterior of 4 chains × 250 draws (1000
draws), posterior-predictive noise on, both baselines. Times ``replay`` (design,
per-draw step predictions in chunks, noise, experiment means, baselines) with the
roofline terms precomputed, repeated; prints the median. Target: ≤ 30 s.

    python bench/bench_e2e.py                       # ~7,500 steps per experiment
    python bench/bench_e2e.py --steps-per-exp 20000 --repeats 3
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

import numpy as np  # noqa: E402
from test_e2e_data import make_replay_dataset, mock_posterior  # noqa: E402

from calib.e2e import replay  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps-per-exp", type=int, default=7500)
    p.add_argument("--requests-per-exp", type=int, default=400)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    truth = {"b": np.array([[1.6, 1.2, 2.5, 1.4, 1.15, 1.0], [1.3, 1.5, 2.0, 1.8, 1.25, 1.8],
                            [1.4, 1.3, 2.2, 1.6, 1.2, 1.5], [1.5, 1.4, 2.4, 1.5, 1.1, 1.2]]),
             "per_layer_us": 8.0, "per_request_us": 3.0, "per_step_us": 150.0, "alpha": 0.3,
             "sigma": np.array([0.08, 0.1, 0.09, 0.07]), "nu": 6.0}
    t0 = time.perf_counter()
    ds, features, truth = make_replay_dataset(seed=0, n_models=2, exps_per_model=8,
                                              steps_per_exp=args.steps_per_exp,
                                              requests_per_exp=args.requests_per_exp,
                                              truth=truth)
    idata = mock_posterior(ds, features, truth, draws=args.draws // 4, chains=4)
    print(f"setup: {ds.sizes['experiment']} experiments, {ds.sizes['step']} steps, "
          f"{ds.sizes['request']} requests, {args.draws} draws ({time.perf_counter() - t0:.1f} s)")
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        res = replay(idata, ds, features=features, draws=args.draws, noise=True)
        times.append(time.perf_counter() - t)
    print(f"replay (noise, baselines): median {statistics.median(times):.2f} s over "
          f"{args.repeats} repeats (min {min(times):.2f}, max {max(times):.2f}); target <= 30 s")
    print(res.message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
