#!/usr/bin/env python
"""Time NumPyro chain methods (parallel / vectorized / sequential) on a realistic
synthetic fit problem (default 122,752 steps, 4 models, 16 experiments).

One chain method per process (the host device count must be set before JAX starts)::

    python bench/bench_fit_chain_methods.py --chain-method parallel --devices 2
    python bench/bench_fit_chain_methods.py --chain-method vectorized

Prints one JSON line: wall time, gradient evaluations (sum of NUTS leapfrog steps
over all chains), ms per gradient, and the implied time for 4 chains x (500+500).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--chain-method", default="vectorized",
                   choices=("parallel", "vectorized", "sequential"))
    p.add_argument("--devices", type=int, default=2, help="host devices for parallel")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--steps", type=int, default=122_752)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--draws", type=int, default=100)
    p.add_argument("--max-tree-depth", type=int, default=8)
    p.add_argument("--diag-mass", action="store_true")
    args = p.parse_args()
    if args.chain_method == "parallel":
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpy as np

    from calib import config
    from calib.fit import run_nuts
    from calib.model import get_model, make_model_data, model_coords, step_time_us
    from calib.priors import load_priors

    rng = np.random.default_rng(0)
    n, n_models, n_exp = args.steps, 4, 16
    exp = rng.integers(0, n_exp, n)
    midx = exp % n_models
    scale = np.array([1.0, 1.6, 2.5, 4.0])[midx]
    has_pf = rng.random(n) < 0.3
    pf_tok = np.where(has_pf, rng.integers(64, 2048, n), 0)
    n_dc = np.where(has_pf & (rng.random(n) < 0.3), 0, rng.integers(1, 128, n))
    ctx = rng.integers(200, 3000, n) * n_dc
    tp = (midx == 3).astype(float)
    comps = np.stack([pf_tok * 0.05 * scale, pf_tok * 0.004 * scale, n_dc * 0.3 * scale,
                      ctx * 0.0004 * scale, 4000.0 * scale, (pf_tok + n_dc) * 0.01 * tp], axis=1)
    layers = np.array([32.0, 28.0, 40.0, 80.0])[midx]
    batch = (n_dc + (pf_tok > 0)).astype(float)
    base = make_model_data(comps, layers, batch, midx, exp, None, n_models=n_models,
                           n_experiments=n_exp)
    truth = {"b": rng.uniform(1.1, 2.5, (n_models, 6)), "per_layer_us": 0.8,
             "per_request_us": 2.0, "per_step_us": 15.0, "alpha": 0.4}
    mu = np.asarray(step_time_us(truth, base))
    dur = mu * np.exp(0.08 * rng.standard_t(8.0, n))
    data = make_model_data(comps, layers, batch, midx, exp, dur, n_models=n_models,
                           n_experiments=n_exp, experiment_model=base.experiment_model)
    coords = model_coords(data, [f"m{i}" for i in range(n_models)],
                          [f"e{i}" for i in range(n_exp)])
    t0 = time.perf_counter()
    idata = run_nuts(get_model("per-model"), data, load_priors(config.DEFAULT_PRIORS),
                     coords=coords, chains=args.chains, warmup=args.warmup, draws=args.draws,
                     seed=0, chain_method=args.chain_method, target_accept=0.85,
                     max_tree_depth=args.max_tree_depth, dense_mass=not args.diag_mass,
                     progress=False)
    wall = time.perf_counter() - t0
    grads_sampling = int(idata.sample_stats["n_steps"].sum())
    out = {"chain_method": args.chain_method, "ran": idata.attrs.get("chain_method_run"),
           "devices": jax.local_device_count(), "chains": args.chains, "steps": n,
           "warmup": args.warmup, "draws": args.draws, "dense_mass": not args.diag_mass,
           "wall_s": round(wall, 1), "grads_sampling_phase": grads_sampling,
           "mean_tree_depth": float(idata.sample_stats["tree_depth"].mean()),
           "divergences": int(idata.sample_stats["diverging"].sum())}
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
