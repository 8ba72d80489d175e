#!/usr/bin/env python
"""Export a posterior as BLIS trained-physics coefficients (per LLM and population).

Examples::

    python scripts/export.py posteriors/per-model.nc --out blis/
    python scripts/export.py posteriors/per-model.nc --out blis/ --alpha-coeffs 15563,777,46

Writes ``<model>.yaml`` (BLIS block + flags + uncertainty + manifest) and
``<model>.defaults.yaml`` (the trained_physics section of a BLIS defaults file, for
``--defaults-filepath``) for every model and for ``population``; prints the BLIS flags.
The alpha coefficients are the API-overhead estimate the fit stored in the posterior
(from the posterior's own dataset), unless ``--alpha-coeffs`` gives them. A pure
posterior -> YAML step: no inference, no other data. Exit status 0, or 2 with
``error: ...`` on a user error.
"""

from __future__ import annotations

import argparse
import sys

from calib import cli, config
from calib.cli import Parser as _Parser
from calib.cli import probability as _probability
from calib.cli import user_error as _user_error


def _alphas(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 3 comma-separated numbers, got {text!r}"
        ) from None
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected 3 comma-separated numbers, got {len(vals)}")
    return vals


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("posterior", help="posterior NetCDF written by scripts/fit.py")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--alpha-coeffs",
        type=_alphas,
        default=None,
        metavar="A0,A1,A2",
        help="give the 3 alpha coefficients (µs) instead of the posterior's API-overhead estimate",
    )
    p.add_argument(
        "--prob",
        type=_probability,
        default=config.INTERVAL_PROB,
        help="interval probability of the uncertainty section (default %(default)s)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from calib.errors import CalibError

    try:
        cli.check_output(args.out, flag="--out", folder=True)
        cli.check_input(args.posterior, flag="posterior")
        from calib.export import export_posterior
        from calib.posterior import load_posterior

        idata = load_posterior(args.posterior)
        res = export_posterior(
            idata,
            args.out,
            alpha_coeffs=args.alpha_coeffs,
            source_path=args.posterior,
            prob=args.prob,
            command=sys.argv if argv is None else ["export.py", *argv],
        )
    except CalibError as err:
        return _user_error(err)
    for name, flags in res.flags.items():
        print(f"{name}: {flags}")
    print(f"wrote {len(res.paths)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_script(main))
