#!/usr/bin/env python
"""Import vLLM journey/step traces (experiment directories) into a canonical dataset.

    python scripts/import_traces.py ROOT --out traces/NAME.nc [--hardware H]
        [--model-config PATH] [--workers N] [--no-cache] [--cache-dir DIR] [--quiet]

ROOT is one experiment directory (exp-config.yaml + traces.json[.gz]) or a folder of
them. Per-experiment results are cached under ROOT/.calib-cache/ keyed by the input's
SHA-256, so re-importing unchanged input is fast. Errors print one line and exit 2;
no output file is written unless the import succeeds.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from calib import cli
from calib.cli import Parser as _Parser
from calib.cli import positive_int as _positive_int
from calib.cli import user_error as _user_error
from calib.errors import CalibError


def _summary(ds, out: Path, seconds: float) -> str:
    import numpy as np

    def tot(name):
        return int(ds[name].values.sum())

    def rate(name):
        v = ds[name].values.astype(float)
        v = v[np.isfinite(v)]
        return "n/a" if v.size == 0 else f"{v.mean():.2%} (max {v.max():.2%})"

    lines = [
        f"wrote {out}  ({seconds:.1f} s)",
        f"  experiments   {ds.sizes['experiment']}",
        f"  steps         {tot('exp_num_steps')}  (slot width {ds.sizes.get('slot', 0)})",
        f"  sampled steps {tot('exp_num_sampled')}",
        f"  requests      {tot('exp_num_requests')}  (failed {tot('exp_num_failed')})",
        f"  bad lines     {tot('exp_num_bad_lines')}",
        f"  x-check BATCH_SUMMARY disagreement     {rate('exp_xcheck_batch_rate')}",
        f"  x-check REQUEST_SNAPSHOT disagreement  {rate('exp_xcheck_snapshot_rate')}",
    ]
    models = sorted(set(ds["exp_model"].values.tolist()))
    lines.append(f"  models        {', '.join(models)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ap.add_argument("root", type=Path, help="experiment directory or a folder of them")
    ap.add_argument("--out", type=Path, required=True, help="output NetCDF (traces/NAME.nc)")
    ap.add_argument("--hardware", help="accelerator name or YAML (overrides exp-config)")
    ap.add_argument(
        "--model-config",
        type=Path,
        help="Hugging Face config.json for a model calib does not bundle",
    )
    ap.add_argument("--workers", type=_positive_int, help="parallel processes (default: CPU count)")
    ap.add_argument("--no-cache", action="store_true", help="ignore and do not write the cache")
    ap.add_argument("--cache-dir", type=Path, help="cache directory (default ROOT/.calib-cache)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        cli.check_output(args.out, flag="--out", suffix=".nc")
        cli.check_input(
            args.root, flag="root", fix="give an experiment directory or a folder of them"
        )
        if args.cache_dir is not None:
            cli.check_output(args.cache_dir, flag="--cache-dir", folder=True, track=False)
        if args.model_config is not None:
            cli.check_input(args.model_config, flag="--model-config")
        from calib.traces import import_root, save_dataset
        from calib.traces.otlp import TraceWarning

        warnings.simplefilter("always", TraceWarning)
        warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
        t0 = time.time()
        ds = import_root(
            args.root,
            hardware=args.hardware,
            model_config=args.model_config,
            workers=args.workers,
            progress=not args.quiet,
            cache_dir=args.cache_dir,
            use_cache=not args.no_cache,
        )
        save_dataset(ds, args.out)
    except CalibError as exc:
        return _user_error(exc)
    print(_summary(ds, args.out, time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_script(main))
