#!/usr/bin/env python
"""Export a posterior as BLIS trained-physics coefficients (per LLM and population).

Examples::

    python scripts/export.py posteriors/per-model.nc --out blis/
    python scripts/export.py posteriors/per-model.nc --out blis/ --traces traces/default.nc
    python scripts/export.py posteriors/per-model.nc --out blis/ --alpha-coeffs 15563,777,46

Writes ``<model>.yaml`` (BLIS block + flags + uncertainty + manifest) and
``<model>.defaults.yaml`` (the trained_physics section of a BLIS defaults file, for
``--defaults-filepath``) for every model and for ``population``; prints the BLIS flags.
The alpha coefficients come from a Bayesian fit of the API overheads on the
dataset's journey labels (``--traces``, default the embedded dataset), unless
``--alpha-coeffs`` gives them. Exit status 0, or 2 with ``error: ...`` on a user error.
"""

from __future__ import annotations

import argparse
import sys

from calib import cli, config
from calib.cli import Parser as _Parser
from calib.cli import probability as _probability
from calib.cli import setup_jax_cpu
from calib.cli import user_error as _user_error


def _alphas(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 3 comma-separated numbers, got {text!r}") from None
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected 3 comma-separated numbers, got {len(vals)}")
    return vals


def _host_gaps(ds) -> dict:
    """Measured host gap between steps per model (mean over its experiments); None: all."""
    import numpy as np

    from calib.e2e import measure_host_timing

    t = measure_host_timing(ds)
    if set(t.gap_source) == {"none"}:
        return {}
    models = np.asarray(ds["exp_model"].values).astype(str)
    out = {str(m): float(t.gap_us[models == m].mean()) for m in np.unique(models)}
    out[None] = float(t.gap_us.mean())
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("posterior", help="posterior NetCDF written by scripts/fit.py")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--traces", default=str(config.DEFAULT_TRACES),
                   help="canonical dataset for the API-overhead (alpha) fit "
                        "(default: %(default)s)")
    p.add_argument("--alpha-coeffs", type=_alphas, default=None, metavar="A0,A1,A2",
                   help="give the 3 alpha coefficients (µs) instead of fitting them")
    p.add_argument("--prob", type=_probability, default=config.INTERVAL_PROB,
                   help="interval probability of the uncertainty section (default %(default)s)")
    p.add_argument("--progress", action="store_true", help="sampler progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from calib.errors import CalibError

    try:
        cli.check_output(args.out, flag="--out", folder=True)
        cli.check_input(args.posterior, flag="posterior")
        setup_jax_cpu()
        from calib.export import export_posterior, plugin_mean_step_us
        from calib.posterior import load_posterior

        idata = load_posterior(args.posterior)
        api = gaps = None
        if args.alpha_coeffs is None:
            from calib.api_overheads import fit_api_overheads
            from calib.posterior import posterior_manifest
            from calib.traces import dataset_hash, load_dataset

            ds = load_dataset(args.traces)
            fitted_on = posterior_manifest(idata).get("data_hash")
            if fitted_on and fitted_on != dataset_hash(ds):
                print(f"warning: {args.traces} is not the dataset the posterior was fitted on "
                      "(data_hash differs); the alphas come from it anyway", file=sys.stderr)
            api = fit_api_overheads(ds, step_us=plugin_mean_step_us(idata, ds),
                                    progress_bar=args.progress)
            gaps = _host_gaps(ds)
        res = export_posterior(idata, args.out, api=api, alpha_coeffs=args.alpha_coeffs,
                               source_path=args.posterior, prob=args.prob,
                               command=sys.argv if argv is None else ["export.py", *argv],
                               host_gap_us=gaps)
    except CalibError as err:
        return _user_error(err)
    for name, flags in res.flags.items():
        print(f"{name}: {flags}")
    print(f"wrote {len(res.paths)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_script(main))
