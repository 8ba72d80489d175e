#!/usr/bin/env python
"""Simulate vLLM experiments from a recipe and write them as instrumented-vLLM traces.

    python scripts/simulate.py --out traces/raw [--recipe traces/default.yaml]
        [--scale default|real] [--truth DIR] [--seed N] [--gzip] [--workers N]

Writes one experiment directory per (model, workload) under --out, and the truth
NetCDFs (for tests only) under --truth. Exit 2 with one line on a user error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from calib import cli
from calib.cli import Parser as _Parser
from calib.cli import nonneg_int as _nonneg_int
from calib.cli import positive_int as _positive_int
from calib.cli import user_error as _user_error
from calib.config import DEFAULT_RECIPE
from calib.errors import CalibError


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ap.add_argument(
        "--recipe", default=str(DEFAULT_RECIPE), help="recipe YAML (default: %(default)s)"
    )
    ap.add_argument("--scale", default="default", help="recipe scale: default or real")
    ap.add_argument("--out", required=True, help="root folder for the experiment directories")
    ap.add_argument("--truth", default=None, help="folder for the truth NetCDFs (tests only)")
    ap.add_argument("--seed", type=_nonneg_int, default=None, help="override the recipe's seed")
    ap.add_argument("--gzip", action="store_true", help="write traces.json.gz")
    ap.add_argument(
        "--workers", type=_positive_int, default=None, help="processes (default: CPU count)"
    )
    args = ap.parse_args(argv)
    try:
        cli.check_output(args.out, flag="--out", folder=True)
        cli.check_output(args.truth, flag="--truth", folder=True)
        cli.check_input(args.recipe, flag="--recipe")
        from tqdm import tqdm

        from calib.simulate import merge_stats, recipe_specs, simulate_recipe

        specs, _ = recipe_specs(args.recipe, scale=args.scale)
        stats: list[dict] = []
        t0 = time.perf_counter()
        with tqdm(total=len(specs), unit="exp", desc="simulate") as bar:

            def progress(st: dict) -> None:
                stats.append(st)
                bar.set_postfix_str(st["name"][-40:])
                bar.update(1)

            paths = simulate_recipe(
                args.recipe,
                args.out,
                truth_dir=args.truth,
                seed=args.seed,
                scale=args.scale,
                workers=args.workers,
                gzip=args.gzip,
                progress=progress,
            )
        wall = time.perf_counter() - t0
    except CalibError as exc:
        return _user_error(exc)
    tot = merge_stats(stats)
    size = sum(f.stat().st_size for p in paths for f in Path(p).rglob("*") if f.is_file())
    print(f"experiments      {tot['experiments']}")
    print(f"requests         {tot['requests']}")
    print(f"steps            {tot['steps']}")
    print(f"sampled steps    {tot['sampled']}")
    print(f"preemptions      {tot['preemptions']}")
    print(f"prefix-cache hit {tot['prefix_hit_rate']:.3f} of prompt tokens")
    print(f"mean step time   {tot['mean_step_us']:.0f} µs")
    print(
        f"speed            {tot['steps'] / max(tot['simulate_s'], 1e-9):.0f} steps/s simulate, "
        f"{tot['steps'] / max(tot['write_s'], 1e-9):.0f} steps/s write (per process); "
        f"wall {wall:.1f} s"
    )
    print(f"written          {len(paths)} dirs, {size / 2**20:.1f} MiB under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_script(main))
