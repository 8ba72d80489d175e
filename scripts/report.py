#!/usr/bin/env python
"""Write a posterior report: PNG plots and a markdown summary.

Examples::

    python scripts/report.py posteriors/per-model.nc --out reports/per-model/
    python scripts/report.py posteriors/per-model.nc --out reports/x/ --traces traces/x.nc
    python scripts/report.py posteriors/per-model.nc --out reports/x/ --no-e2e

Figures: trace and rank plots of the key parameters, a forest plot of per-model
corrections with the population, a posterior predictive check of step durations
by batch type, and (with the dataset) observed vs predicted experiment latencies;
``summary.md`` links them. Headless (Agg). Exit status 0, or 2 with ``error: ...``.
"""

from __future__ import annotations

import argparse
import os
import sys

from calib import cli
from calib.cli import Parser as _Parser
from calib.cli import setup_jax_cpu
from calib.cli import user_error as _user_error


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    cli.add_posterior_arguments(p, traces="dataset for the E2E figure")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--no-e2e", action="store_true", help="skip the E2E replay figure")
    cli.add_replay_draws_arguments(p, draws="posterior draws for the E2E replay")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["MPLBACKEND"] = "Agg"
    from calib.errors import CalibError

    try:
        cli.check_output(args.out, flag="--out", folder=True)
        data = None if args.no_e2e else cli.DataChoice(args.posterior, args.traces)
        if data is None:
            cli.check_input(args.posterior, flag="posterior")
        setup_jax_cpu()
        from calib.posterior import load_posterior
        from calib.report import make_report

        idata = load_posterior(args.posterior)
        ds = None
        new_experiments = False
        if data is not None:
            from calib.traces import load_dataset

            ds = load_dataset(data.path)
            note = data.verify(ds)
            if note:
                print(note, file=sys.stderr)
            new_experiments = data.new_experiments
        paths = make_report(
            idata,
            args.out,
            ds=ds,
            new_experiments=new_experiments,
            source_path=args.posterior,
            seed=args.seed,
            draws=args.draws,
            command=sys.argv if argv is None else ["report.py", *argv],
        )
    except CalibError as err:
        return _user_error(err)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_script(main))
