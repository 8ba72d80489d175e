#!/usr/bin/env python
"""Write the README results block from the outputs of scripts/validate.py.

Examples::

    python scripts/validate.py --split all          # writes reports/validate/
    python scripts/results_section.py               # updates README.md from it

Reads steps.csv, e2e.csv and manifest.json of --reports and writes a markdown block
(per split family: held-out coverage, bias and band half-width; per fold: errors,
coverage, MSPE / INV-M-6; leave-one-model-out bands) between the
markers ``<!-- results:start -->`` and ``<!-- results:end -->`` of --readme; without the
markers a section "## Results on the embedded data" holding them is added just before
"## Testing". Nothing else in the README changes. The block names the commands that
produced it and when. Exit status: 0 done, 2 a user error (one line ``error: ...``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from calib import cli, config
from calib.cli import Parser as _Parser
from calib.cli import user_error as _user_error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--reports",
        type=Path,
        default=config.REPORTS_DIR / "validate",
        help="output folder of scripts/validate.py",
    )
    p.add_argument(
        "--readme", type=Path, default=config.PROJECT_ROOT / "README.md", help="README to update"
    )
    p.add_argument("--print", dest="show", action="store_true", help="also print the block")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from calib.errors import CalibError
    from calib.validate import write_results_section

    cmd = " ".join(["python scripts/results_section.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        cli.check_input(args.readme, flag="--readme", fix="pass --readme <file>")
        cli.check_output(args.readme, flag="--readme")
        block = write_results_section(args.reports, args.readme, generator=cmd)
    except CalibError as err:
        return _user_error(err)
    if args.show:
        print(block)
    print(f"wrote the results section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_script(main))
