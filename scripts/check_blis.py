#!/usr/bin/env python
"""Closed-loop check in the user's BLIS: ``blis replay`` of every experiment's observed requests.

Examples::

    python scripts/check_blis.py posteriors/per-model.nc --blis ~/inference-sim/blis
    CALIB_BLIS=~/inference-sim/blis python scripts/check_blis.py posteriors/per-model.nc
    python scripts/check_blis.py posteriors/per-model.nc --blis ./blis --draws 10 --keep out/

The posterior is exported (scripts/export.py's library, in memory) and every
experiment is written as a BLIS TraceV2 trace (header YAML + CSV, calib/blis.py) and
replayed with ``blis replay --latency-model trained-physics --defaults-filepath
<model>.defaults.yaml --alpha-coeffs ... --beta-coeffs ...`` and the experiment's
limits; BLIS's per-request results give the same table as check_closed_loop.py.
BLIS is found from --blis, $CALIB_BLIS, or ``blis`` on PATH. Exit status: 0 every
experiment within the target (and band), 1 otherwise, 2 a user error (``error: ...``,
also when no BLIS binary is found).
"""

from __future__ import annotations

import argparse
import sys
import time

from calib import cli
from calib.cli import Parser as _Parser
from calib.cli import nonneg_int as _nonneg_int
from calib.cli import setup_jax_cpu
from calib.cli import user_error as _user_error
from calib.closed_loop import add_check_arguments, write_table_csv


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_check_arguments(p)
    p.add_argument("--blis", default=None, help="BLIS binary (default: $CALIB_BLIS, then PATH)")
    p.add_argument(
        "--draws",
        type=_nonneg_int,
        default=0,
        help="posterior draws replayed for the band (one BLIS run each per "
        "experiment); 0: the exported point only (default %(default)s)",
    )
    p.add_argument(
        "--keep",
        default=None,
        metavar="DIR",
        help="write the export, traces and BLIS results here (default: a "
        "temporary directory, removed)",
    )
    p.add_argument(
        "--blis-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument passed to every blis replay (repeatable), e.g. "
        "--blis-arg=--horizon --blis-arg=1000000000",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from calib.errors import CalibError

    try:
        from calib.blis import find_blis

        blis = find_blis(args.blis)
        cli.check_output(args.csv, flag="--csv")
        cli.check_output(args.keep, flag="--keep", folder=True)
        data = cli.DataChoice(args.posterior, args.traces)
    except CalibError as err:
        return _user_error(err)
    setup_jax_cpu()
    t0 = time.perf_counter()
    try:
        import tempfile
        from pathlib import Path

        import numpy as np

        from calib.blis import blis_closed_loop
        from calib.closed_loop import experiment_plans, exported_coefficients, format_table, judge
        from calib.posterior import load_posterior
        from calib.traces import load_dataset

        idata = load_posterior(args.posterior)
        ds = load_dataset(data.path)
        note = data.verify(ds)
        if note:
            print(note, file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="calib-blis-") as tmp:
            work = Path(args.keep or tmp)
            coeffs, export = exported_coefficients(idata, draws=args.draws, out_dir=work / "export")
            plans = experiment_plans(ds)
            arch = (
                [str(a) for a in np.asarray(ds["exp_arch_json"].values)]
                if "exp_arch_json" in ds
                else None
            )
            results, basis = blis_closed_loop(
                blis, plans, coeffs, export, work / "replay", arch_json=arch, extra=args.blis_arg
            )
        res = judge(
            plans,
            results,
            basis,
            prob=args.prob,
            e2e_target_pct=args.e2e_target,
            ttft_itl_target_pct=args.ttft_itl_target,
        )
        if args.csv:
            write_table_csv(args.csv, res, args.posterior, ds, "blis-closed-loop-check")
    except CalibError as err:
        return _user_error(err)
    print(format_table(res, simulator=f"BLIS ({blis})"))
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    return 0 if res.passed else 1


if __name__ == "__main__":
    sys.exit(cli.run_script(main))
