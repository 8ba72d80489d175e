#!/usr/bin/env python
"""Fit the BLIS step-time model to a canonical step dataset with NUTS.

Examples::

    python scripts/fit.py                                   # default data, per-model
    python scripts/fit.py --hierarchy pooled --chains 2 --draws 300
    python scripts/fit.py --prior-only                      # prior predictive check only
    python scripts/fit.py --backend pymc --chain-method sequential

Prints the diagnostics gate. Exit status: 0 the gate passed (posterior written),
1 the gate failed (posterior written only with --save-on-fail, verdict "fail"),
2 a user error (one line ``error: ...`` on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from calib import cli, config
from calib.cli import Parser as _Parser
from calib.cli import nonneg_int as _nonneg_int
from calib.cli import positive_int as _positive_int
from calib.cli import probability as _probability
from calib.cli import user_error as _user_error
from calib.vocab import HIERARCHIES  # JAX-free


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    s = config.SAMPLER
    p = _Parser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--hierarchy",
        choices=HIERARCHIES,
        default="per-model",
        help="pooling structure of the corrections",
    )
    p.add_argument(
        "--traces",
        type=Path,
        default=config.DEFAULT_TRACES,
        help="canonical step dataset (NetCDF from scripts/import_traces.py)",
    )
    p.add_argument("--priors", type=Path, default=config.DEFAULT_PRIORS, help="prior YAML file")
    p.add_argument(
        "--out", type=Path, default=None, help="posterior file (default posteriors/<hierarchy>.nc)"
    )
    p.add_argument("--backend", choices=("numpyro", "pymc", "nutpie"), default="numpyro")
    p.add_argument("--chains", type=_positive_int, default=s.chains)
    p.add_argument(
        "--warmup",
        type=_positive_int,
        default=s.warmup,
        help="adaptation draws per chain (>= 1: NUTS needs a tuned step size)",
    )
    p.add_argument("--draws", type=_positive_int, default=s.draws)
    p.add_argument("--seed", type=_nonneg_int, default=s.seed)
    p.add_argument(
        "--chain-method", choices=("parallel", "sequential", "vectorized"), default=s.chain_method
    )
    p.add_argument(
        "--target-accept",
        type=_probability,
        default=None,
        help=f"NUTS target acceptance (default {s.target_accept}; "
        f"{config.FLOAT32_TARGET_ACCEPT} with --precision float32)",
    )
    p.add_argument("--max-tree-depth", type=_positive_int, default=s.max_tree_depth)
    p.add_argument(
        "--init",
        choices=config.INIT_METHODS,
        default=s.init,
        help="where chains start: laplace (draws around the posterior mode, in "
        "coordinates whitened by its covariance) or median (the prior median)",
    )
    mass = p.add_mutually_exclusive_group()
    mass.add_argument(
        "--dense-mass",
        dest="dense_mass",
        action="store_true",
        default=config.DENSE_MASS,
        help="full mass matrix",
    )
    mass.add_argument(
        "--diag-mass", dest="dense_mass", action="store_false", help="diagonal mass matrix"
    )
    par = p.add_mutually_exclusive_group()
    par.add_argument(
        "--centered",
        dest="centered",
        action="store_true",
        default=None,
        help="centred log corrections (default: calib.config.MODEL_CENTERED)",
    )
    par.add_argument("--noncentered", dest="centered", action="store_false")
    p.add_argument(
        "--log-likelihood",
        action="store_true",
        help="store pointwise log-likelihood (for az.loo; chains x draws x steps)",
    )
    p.add_argument(
        "--prior-draws",
        type=_nonneg_int,
        default=0,
        help="store this many prior draws in a `prior` group",
    )
    p.add_argument(
        "--ppc-draws",
        type=_nonneg_int,
        default=config.PPC_DRAWS,
        help="draws in the posterior_predictive group for az.plot_ppc (draws x "
        "steps in the file); 0 leaves it out (default %(default)s)",
    )
    p.add_argument(
        "--save-on-fail",
        action="store_true",
        help="write the posterior even when the diagnostics gate fails",
    )
    p.add_argument(
        "--prior-only",
        action="store_true",
        help="prior predictive check only: plot + table, no sampling",
    )
    p.add_argument(
        "--prior-check-out",
        type=Path,
        default=None,
        help="prior check plot (default reports/prior_check/<hierarchy>.png)",
    )
    p.add_argument(
        "--device", choices=tuple(cli.DEVICES), default="cpu", help="JAX platform (gpu: CUDA)"
    )
    p.add_argument(
        "--precision",
        choices=("float32", "float64"),
        default=config.FIT_PRECISION,
        help="JAX float precision of the sampler (float32 is faster on CPUs)",
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (faster for small problems)",
    )
    args = p.parse_args(argv)
    if args.out is None:
        args.out = config.POSTERIORS_DIR / f"{args.hierarchy}.nc"
    if args.prior_check_out is None:
        args.prior_check_out = config.REPORTS_DIR / "prior_check" / f"{args.hierarchy}.png"
    return args


def setup_jax(args: argparse.Namespace) -> None:
    """Platform, host device count and precision, before JAX does any work."""
    cli.setup_jax(
        device=args.device,
        chain_method=args.chain_method if args.backend == "numpyro" else "sequential",
        chains=args.chains,
        x64=args.precision == "float64",
    )


def _check_paths(args: argparse.Namespace) -> None:
    """Inputs readable, the output writable: before JAX is imported or data loaded."""
    from calib.errors import CalibError

    if not (args.traces.is_file() or args.traces.is_dir()):
        raise CalibError(
            "traces not found",
            path=args.traces,
            fix="pass --traces <dataset.nc> or a folder of experiment directories",
        )
    cli.check_input(args.traces, flag="--traces")
    if not args.priors.is_file():
        raise CalibError(
            "prior file not found",
            path=args.priors,
            fix="pass --priors <file.yaml> (priors/default.yaml is the default)",
        )
    cli.check_input(args.priors, flag="--priors")
    if args.prior_only:
        cli.check_output(args.prior_check_out, flag="--prior-check-out")
    else:
        cli.check_output(args.out, flag="--out")


def run_prior_only(args: argparse.Namespace) -> int:
    from calib.fit import prior_check
    from calib.model import build_model_data
    from calib.priors import load_priors
    from calib.traces import load_dataset

    priors = load_priors(args.priors)
    data, coords = build_model_data(load_dataset(args.traces))
    table = prior_check(
        data,
        coords,
        hierarchy=args.hierarchy,
        priors=priors,
        seed=args.seed,
        out_png=args.prior_check_out,
    )
    print("prior predictive check (step time quantiles, µs):")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"wrote {args.prior_check_out}")
    return 0


def _target_accept(args: argparse.Namespace) -> float:
    """``--target-accept``, else the default of the chosen precision."""
    if args.target_accept is not None:
        return args.target_accept
    if args.precision == "float32":
        return config.FLOAT32_TARGET_ACCEPT
    return config.SAMPLER.target_accept


def run_fit(args: argparse.Namespace) -> int:
    from calib.diagnostics import advice, format_table
    from calib.fit import SamplerSettings, fit

    settings = SamplerSettings(
        chains=args.chains,
        warmup=args.warmup,
        draws=args.draws,
        seed=args.seed,
        chain_method=args.chain_method,
        target_accept=_target_accept(args),
        max_tree_depth=args.max_tree_depth,
        dense_mass=args.dense_mass,
        centered=args.centered,
        init=args.init,
    )
    result = fit(
        args.traces,
        hierarchy=args.hierarchy,
        priors_path=args.priors,
        backend=args.backend,
        settings=settings,
        out_path=args.out,
        save_on_fail=args.save_on_fail,
        log_likelihood=args.log_likelihood,
        prior_draws=args.prior_draws,
        progress=args.progress,
        ppc_draws=args.ppc_draws,
        command=[Path(sys.argv[0]).name, *sys.argv[1:]],
    )
    print(f"sampling took {result.sampling_s:.1f} s")
    print(format_table(result.gate))
    if result.path is not None:
        print(f"wrote {result.path}")
    else:
        print(f"not written: the diagnostics gate failed (use --save-on-fail to keep {args.out})")
    if not result.passed:
        print(advice(result.gate))
    return 0 if result.passed else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from calib.errors import CalibError

    try:
        _check_paths(args)
        setup_jax(args)
        return run_prior_only(args) if args.prior_only else run_fit(args)
    except CalibError as err:
        return _user_error(err)


if __name__ == "__main__":
    sys.exit(cli.run_script(main))
