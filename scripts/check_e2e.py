#!/usr/bin/env python
"""Teacher-forced E2E / TTFT / decode-interval check of a posterior against its dataset.

Examples::

    python scripts/check_e2e.py posteriors/per-model.nc
    python scripts/check_e2e.py posteriors/per-model.nc --traces traces/other.nc --prob 0.9
    python scripts/check_e2e.py posteriors/per-model.nc --population-models llama-2-7b
    python scripts/check_e2e.py posteriors/per-experiment.nc --new-experiments --csv out.csv

Every request's predicted E2E is the sum of the predicted durations of the steps
from its QUEUED to its FINISHED step (teacher forcing: batches as observed).
Wall time also holds the host gaps between steps: by default they are measured
per experiment from the timestamps of consecutive sampled steps (``--step-gap-us``
overrides), and so is the share of the QUEUED step a request waits for
(``--queued-step-weight``); the settings line says which values were used.
Prints one table per metric with the blackbox and NNLS baselines and, per
experiment, the step model's bias on its sampled steps (``step-bias%``) and the band's
half-width (``±%``; bands: parameters, step noise and the structural discrepancy,
calib/discrepancy.py). Exit status:
0 pass, 1 the check fails (coverage of the intervals below a binomial lower
bound of the nominal rate; see calib/e2e.py) or is INCONCLUSIVE (too few experiments
for the coverage test), 2 a user error (``error: ...``), 130 interrupted.

Data: without --traces the dataset the posterior records in its manifest (the data
it was fitted on); that data must still hash to the posterior's data_hash. Other data
given with --traces is replayed as an out-of-sample check (a note says so): every
experiment is then predicted as a new workload, whatever its name.
"""

from __future__ import annotations

import argparse
import sys

from calib import cli, config
from calib.cli import Parser as _Parser
from calib.cli import finite_float as _finite_float
from calib.cli import setup_jax_cpu
from calib.cli import user_error as _user_error


def _measured_or(lo: float, hi: float | None):
    """argparse type: ``measured`` or a finite number in ``[lo, hi]``."""
    number = _finite_float(lo, hi)

    def parse(text: str):
        return text if text == "measured" else number(text)

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    cli.add_posterior_arguments(
        p,
        traces=cli.REPLAY_TRACES,
        prob="central interval",
        csv=True,
    )
    cli.add_replay_draws_arguments(p, draws="posterior draws, thinned evenly")
    p.add_argument(
        "--no-noise",
        action="store_true",
        help="leave out the step noise (intervals of sums of the body median mu only)",
    )
    p.add_argument(
        "--new-experiments",
        action="store_true",
        help="predict every experiment as a new workload (any hierarchy: the "
        "structural discrepancy is a new experiment's N(mu, tau); per-experiment fits "
        "also draw new workload effects)",
    )
    p.add_argument(
        "--population-models",
        nargs="*",
        default=[],
        metavar="MODEL",
        help="predict these models from the population level (held out)",
    )
    p.add_argument("--no-baselines", action="store_true", help="skip blackbox and NNLS")
    p.add_argument(
        "--step-gap-us",
        type=_measured_or(0.0, None),
        default="measured",
        help="host time between consecutive steps, µs: 'measured' (default: per "
        "experiment from the step timestamps of consecutive sampled steps) "
        "or a number (e.g. BLIS's alpha_coeffs[2])",
    )
    p.add_argument(
        "--queued-step-weight",
        type=_measured_or(0.0, 1.0),
        default="measured",
        help="share of the QUEUED step counted in E2E/TTFT: 'measured' (default: "
        "from the QUEUED and step timestamps, else "
        f"{config.E2E_QUEUED_STEP_WEIGHT}) or a number in [0, 1]",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from calib.errors import CalibError

    try:
        cli.check_output(args.csv, flag="--csv")
        data = cli.DataChoice(args.posterior, args.traces)
        setup_jax_cpu()
        from calib.e2e import format_table, replay
        from calib.posterior import load_posterior
        from calib.traces import load_dataset

        idata = load_posterior(args.posterior)
        ds = load_dataset(data.path)
        note = data.verify(ds)
        if note:
            print(note, file=sys.stderr)
        res = replay(
            idata,
            ds,
            prob=args.prob,
            draws=args.draws,
            noise=not args.no_noise,
            new_experiments=args.new_experiments or data.new_experiments,
            population_models=args.population_models,
            seed=args.seed,
            baselines=not args.no_baselines,
            step_gap_us=args.step_gap_us,
            queued_step_weight=args.queued_step_weight,
        )
        if args.csv:
            import json

            from calib.io import atomic_write_text, file_sha256, manifest
            from calib.traces import dataset_hash

            m = manifest(
                kind="e2e-check",
                seed=args.seed,
                data_hash=dataset_hash(ds),
                diagnostics=res.message,
                settings=res.settings,
                source_posterior_sha256=file_sha256(args.posterior),
            )
            atomic_write_text(
                args.csv,
                f"# manifest: {json.dumps(m, sort_keys=True)}\n" + res.table.to_csv(index=False),
            )
    except CalibError as err:
        return _user_error(err)
    print(format_table(res))
    return 0 if res.passed else 1


if __name__ == "__main__":
    sys.exit(cli.run_script(main))
