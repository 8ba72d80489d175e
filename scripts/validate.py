#!/usr/bin/env python
"""Held-out validation of the step-time model against the blackbox and NNLS baselines.

Examples::

    python scripts/validate.py --split all                       # embedded default data
    python scripts/validate.py --split model --chains 4 --warmup 500 --draws 500
    python scripts/validate.py --split temporal --traces traces/mine.nc --out reports/mine

Splits: temporal 60/20/20 within each experiment (step-id order), leave-one-workload-out,
leave-one-model-out (held-out model predicted from the population level) and the
request-hash split (SHA-256(req_id) mod 100: 70/15/15; a step follows its lead request).
See calib/validate.py for the exact rules. Writes into --out (atomically): validation.md
(tables), summary.csv, steps.csv, e2e.csv and manifest.json (settings, per-fold gate
verdicts, file hashes). The reports are rewritten after every fold (a partial run says
which folds are missing), one line per fold on stderr; the one-fold splits and the
first fold of each leave-one-out split run first.

Sampler defaults are smaller than scripts/fit.py's (one fit per fold):
calib.config.VALIDATE_SAMPLER (4 chains, 500 warmup, 500 draws), and at most
--max-train-steps sampled steps are fitted per fold (seeded random subset).
Exit status: 0 done, 2 a user error (one line ``error: ...`` on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from calib import cli, config
from calib.cli import Parser as _Parser
from calib.cli import int_at_least as _int
from calib.cli import probability as _probability
from calib.cli import user_error as _user_error
from calib.vocab import HIERARCHIES, SPLITS  # JAX-free


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    s = config.VALIDATE_SAMPLER
    p = _Parser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--split", choices=(*SPLITS, "all"), default="all", help="which split to run")
    p.add_argument(
        "--traces",
        type=Path,
        default=config.DEFAULT_TRACES,
        help="canonical dataset (NetCDF) or a folder of experiment directories "
        "(imported and cached on first use)",
    )
    p.add_argument(
        "--out", type=Path, default=config.REPORTS_DIR / "validate", help="output directory"
    )
    p.add_argument("--hierarchy", choices=HIERARCHIES, default="per-model")
    p.add_argument("--priors", type=Path, default=config.DEFAULT_PRIORS, help="prior YAML file")
    p.add_argument("--chains", type=_int(1), default=s.chains)
    p.add_argument(
        "--warmup",
        type=_int(1),
        default=s.warmup,
        help="adaptation draws per chain (>= 1: NUTS needs a tuned step size)",
    )
    p.add_argument("--draws", type=_int(1), default=s.draws)
    p.add_argument("--seed", type=_int(0), default=s.seed)
    p.add_argument(
        "--chain-method", choices=("parallel", "sequential", "vectorized"), default=s.chain_method
    )
    p.add_argument("--target-accept", type=_probability, default=s.target_accept)
    p.add_argument("--max-tree-depth", type=_int(1), default=s.max_tree_depth)
    p.add_argument(
        "--pred-draws",
        type=_int(1),
        default=config.VALIDATE_DRAWS,
        help="posterior draws used for predictions and intervals",
    )
    p.add_argument(
        "--prob",
        type=_probability,
        default=config.INTERVAL_PROB,
        help="central interval probability",
    )
    p.add_argument(
        "--max-train-steps",
        type=_int(0),
        default=config.VALIDATE_MAX_TRAIN_STEPS,
        help="sampled train steps fitted per fold at most (0: all)",
    )
    p.add_argument(
        "--device", choices=tuple(cli.DEVICES), default="cpu", help="JAX platform (gpu: CUDA)"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p.parse_args(argv)


def setup_jax(args: argparse.Namespace) -> None:
    """Platform, host device count and float64, before JAX does any work."""
    cli.setup_jax(device=args.device, chain_method=args.chain_method, chains=args.chains, x64=True)


def run(args: argparse.Namespace) -> int:
    from calib.priors import load_priors
    from calib.traces import load_dataset
    from calib.traces.dataset import dataset_hash
    from calib.validate import (
        default_settings,
        inv_m6_line,
        run_validation,
        summary_table,
        write_reports,
    )

    priors = load_priors(args.priors)
    ds = load_dataset(args.traces, progress=args.progress)
    settings = default_settings(
        chains=args.chains,
        warmup=args.warmup,
        draws=args.draws,
        seed=args.seed,
        chain_method=args.chain_method,
        target_accept=args.target_accept,
        max_tree_depth=args.max_tree_depth,
    )
    splits = SPLITS if args.split == "all" else (args.split,)
    data_hash = dataset_hash(ds)
    command = [Path(sys.argv[0]).name, *sys.argv[1:]]

    def partial(res) -> None:
        write_reports(res, args.out, data_hash=data_hash, command=command)
        f = max(res.folds, key=lambda x: x["run_order"])  # the fold just finished
        print(
            f"fold {f['fold']} done ({len(res.folds)}/{len(res.settings['folds_planned'])}, "
            f"{f['wall_s']:.0f} s, gate {f['gate'][:60]}): reports in {args.out}",
            file=sys.stderr,
            flush=True,
        )

    result = run_validation(
        ds,
        splits,
        hierarchy=args.hierarchy,
        priors=priors,
        settings=settings,
        draws=args.pred_draws,
        prob=args.prob,
        seed=args.seed,
        max_train_steps=args.max_train_steps or None,
        progress=args.progress,
        on_fold=partial,
    )
    paths = write_reports(result, args.out, data_hash=data_hash, command=command)
    sm = summary_table(result)
    cols = [
        "fold",
        "part",
        "n_steps",
        "calib_mape_pct",
        "blis_mape_pct",
        "blackbox_mape_pct",
        "nnls_mape_pct",
        "calib_mspe_pct",
        "step_coverage_pct",
        "e2e_mean_abs_err_pct",
        "e2e_coverage",
    ]
    print(sm[cols].to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    print(inv_m6_line(sm))
    for f in result.folds:
        if f["gate"] != "pass":
            print(f"warning: fold {f['fold']}: diagnostics gate {f['gate'][:200]}", file=sys.stderr)
    for name, p in paths.items():
        print(f"wrote {p}" if name != "manifest" else f"wrote {p} (manifest)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from calib.errors import CalibError

    try:
        if not (args.traces.is_file() or args.traces.is_dir()):
            raise CalibError(
                "dataset not found",
                path=args.traces,
                fix="pass --traces <dataset.nc or folder of experiment directories>",
            )
        cli.check_input(args.traces, flag="--traces")
        cli.check_input(args.priors, flag="--priors")
        cli.check_output(args.out, flag="--out", folder=True)
        setup_jax(args)
        return run(args)
    except CalibError as err:
        return _user_error(err)


if __name__ == "__main__":
    sys.exit(cli.run_script(main))
