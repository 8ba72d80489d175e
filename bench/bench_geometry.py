"""Benchmark the sampling geometry of the step-time model (calib/model.py).

Synthetic data of realistic size and magnitude (4 models, 16 experiments; see
``calib.model.synthetic_model_data``), durations simulated from the model itself,
then NUTS with 2 chains per variant: centred vs non-centred per-model corrections,
diagonal vs dense mass matrix. Reports wall time (compile + warmup + sampling),
mean leapfrog steps per iteration (sampling phase), min bulk ESS over the named
parameters, min bulk ESS per second of wall time and divergences.

Run::

    python bench/bench_geometry.py --steps 20000 122752 \\
        --warmup 500 --draws 500 [--variants centered:dense noncentered:diag ...]

Results are printed as a table and, with ``--out``, written as JSON. ``--quick``: a
smoke run (2,000 steps, 150 + 150 draws, the first two variants).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[20000, 122752])
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--experiments-per-model", type=int, default=4)
    p.add_argument("--hierarchy", default="per-model")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["centered:dense", "centered:diag", "noncentered:dense", "noncentered:diag"],
        help="PARAM:MASS[:OVERHEAD_COORDS[:PINNED]] (PINNED: components joined "
        "by '+', or 'none'; defaults: calib.config), e.g. "
        "centered:dense:softplus:weight+dc_compute or noncentered:diag:log:none",
    )
    p.add_argument("--chains", type=int, default=2)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--draws", type=int, default=500)
    p.add_argument("--max-tree-depth", type=int, default=8)
    p.add_argument("--target-accept", type=float, default=0.85)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--priors", default=None)
    p.add_argument("--out", default=None)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: --steps 2000 --warmup 150 --draws 150, two variants",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.draws = [2000], 150, 150
        args.variants = args.variants[:2]

    # JAX set-up before any JAX import (library code never does this)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpyro

    numpyro.set_host_device_count(args.chains)
    import jax

    jax.config.update("jax_enable_x64", True)
    import arviz as az
    import numpy as np
    from numpyro.infer import MCMC, NUTS, init_to_median

    import calib.config as cfg
    from calib.model import (
        PARAMETER_SITES,
        SITE_DIMS,
        get_model,
        make_model_data,
        model_coords,
        simulate_from_model,
        synthetic_model_data,
    )
    from calib.priors import load_priors

    default_overheads, default_pinned = cfg.OVERHEAD_COORDINATES, cfg.PINNED_COMPONENTS
    priors = load_priors(args.priors)
    rows = []
    for n in args.steps:
        design = synthetic_model_data(
            n, args.models, args.experiments_per_model, seed=args.seed, tp2_models=(1, 3)
        )
        M = args.models
        base = np.array([1.8, 1.5, 2.5, 1.6, 1.15, 2.0])
        rng = np.random.default_rng(args.seed + 1)
        truth = dict(
            b=base * np.exp(rng.normal(0, 0.2, (M, 6))),
            per_layer_us=8.0,
            per_request_us=12.0,
            per_step_us=150.0,
            alpha=0.6,
            sigma=rng.uniform(0.04, 0.12, M),
            stall_prob=0.02,
            stall_log_mult=0.7,
            stall_log_sd=0.3,
        )
        y, _ = simulate_from_model(args.hierarchy, design, params=truth, seed=args.seed + 2)
        data = make_model_data(
            design.components,
            design.num_layers,
            design.batch_size,
            design.model_idx,
            design.experiment_idx,
            y,
            n_models=design.n_models,
            n_experiments=design.n_experiments,
            experiment_model=design.experiment_model,
        )
        model = get_model(args.hierarchy)
        for variant in args.variants:
            param, mass, *coords_ = variant.split(":")
            centered = param == "centered"
            # variants override the model's coordinate choices (config defaults otherwise)
            cfg.OVERHEAD_COORDINATES = coords_[0] if coords_ else default_overheads
            cfg.PINNED_COMPONENTS = (
                default_pinned
                if len(coords_) < 2
                else ()
                if coords_[1] == "none"
                else tuple(coords_[1].split("+"))
            )
            coords = model_coords(
                data, [f"m{i}" for i in range(M)], [f"e{i}" for i in range(data.n_experiments)]
            )
            kernel = NUTS(
                model,
                dense_mass=(mass == "dense"),
                target_accept_prob=args.target_accept,
                max_tree_depth=args.max_tree_depth,
                init_strategy=init_to_median,
            )
            mcmc = MCMC(
                kernel,
                num_warmup=args.warmup,
                num_samples=args.draws,
                num_chains=args.chains,
                chain_method="parallel",
                progress_bar=False,
            )
            t0 = time.perf_counter()
            mcmc.run(
                jax.random.key(args.seed),
                data,
                priors,
                centered=centered,
                extra_fields=("num_steps", "diverging", "energy"),
            )
            jax.block_until_ready(mcmc.get_samples())
            wall = time.perf_counter() - t0
            extra = mcmc.get_extra_fields(group_by_chain=True)
            samples = mcmc.get_samples(group_by_chain=True)
            names = [k for k in PARAMETER_SITES if k in samples]
            dims = {k: list(v) for k, v in SITE_DIMS.items() if k in samples}
            idata = az.from_dict(
                posterior={k: np.asarray(samples[k]) for k in names},
                coords=coords,
                dims={k: dims[k] for k in names},
            )
            # b entries of inactive pairs equal b_pop: drop them from the ESS minimum
            summ = az.summary(idata, kind="diagnostics")
            summ = summ[~summ.index.str.contains("tp\\]") | summ.index.str.startswith("b_pop")]
            ess = float(np.nanmin(summ["ess_bulk"].values))
            rhat = float(np.nanmax(summ["r_hat"].values))
            energy = np.asarray(extra["energy"])
            ebfmi = float(
                np.min(
                    np.sum(np.diff(energy, axis=1) ** 2, axis=1)
                    / np.sum((energy - energy.mean(1, keepdims=True)) ** 2, axis=1)
                )
            )
            row = dict(
                steps=n,
                variant=variant,
                wall_s=round(wall, 1),
                mean_leapfrog=round(float(np.mean(extra["num_steps"])), 1),
                min_ess_bulk=round(ess, 1),
                min_ess_per_s=round(ess / wall, 2),
                max_rhat=round(rhat, 4),
                divergences=int(np.sum(extra["diverging"])),
                min_ebfmi=round(ebfmi, 2),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        from calib.io import atomic_write_text

        atomic_write_text(args.out, json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
