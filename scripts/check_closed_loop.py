#!/usr/bin/env python
"""Closed-loop check: replay every experiment's observed requests in calib's scheduler.

Examples::

    python scripts/check_closed_loop.py posteriors/per-model.nc
    python scripts/check_closed_loop.py posteriors/per-model.nc --traces traces/other.nc --draws 20
    python scripts/check_closed_loop.py posteriors/per-model.nc --draws 0 --csv closed.csv

Unlike check_e2e (teacher forcing: observed batches), the batches here come from the
vLLM-like scheduler of calib.simulate, so a step-time bias feeds back into queueing
as it does in BLIS. Step durations and API-side delays are the exported BLIS
coefficients (betas of the posterior, alphas of the API-overhead fit: the numbers
scripts/export.py writes), with BLIS's latency accounting (calib/closed_loop.py).
One replay per posterior draw (``--draws``, parallel processes) gives the band.
Prints one table per metric (mean E2E ARRIVED→DEPARTED, TTFT, decode interval; ms).
Exit status: 0 every experiment within the target and inside its band, 1 otherwise,
2 a user error (``error: ...``).
"""

from __future__ import annotations

import argparse
import sys
import time

from calib import cli, config
from calib.cli import Parser as _Parser
from calib.cli import nonneg_int as _nonneg_int
from calib.cli import positive_int as _positive_int
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
    p.add_argument(
        "--draws",
        type=_nonneg_int,
        default=config.CLOSED_LOOP_DRAWS,
        help="posterior draws replayed for the band, thinned evenly; 0: point "
        "only (default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="replay processes (default: the CPU count)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from calib.errors import CalibError

    t0 = time.perf_counter()
    try:
        cli.check_output(args.csv, flag="--csv")
        data = cli.DataChoice(args.posterior, args.traces)
        setup_jax_cpu()
        from calib.closed_loop import (
            closed_loop,
            experiment_plans,
            exported_coefficients,
            format_table,
        )
        from calib.posterior import load_posterior
        from calib.traces import load_dataset

        idata = load_posterior(args.posterior)
        ds = load_dataset(data.path)
        note = data.verify(ds)
        if note:
            print(note, file=sys.stderr)
        coeffs, _ = exported_coefficients(idata, draws=args.draws)
        t1 = time.perf_counter()
        print(f"export: {t1 - t0:.0f} s", file=sys.stderr)

        def progress(done: int, total: int) -> None:
            if done == total or done % max(1, total // 10) == 0:
                print(f"replays {done}/{total} ({time.perf_counter() - t1:.0f} s)", file=sys.stderr)

        res = closed_loop(
            experiment_plans(ds),
            coeffs,
            prob=args.prob,
            e2e_target_pct=args.e2e_target,
            ttft_itl_target_pct=args.ttft_itl_target,
            workers=args.workers,
            progress=progress,
        )
        if args.csv:
            write_table_csv(args.csv, res, args.posterior, ds, "closed-loop-check")
    except CalibError as err:
        return _user_error(err)
    print(format_table(res))
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    return 0 if res.passed else 1


if __name__ == "__main__":
    sys.exit(cli.run_script(main))
