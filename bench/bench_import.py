"""Benchmark: trace import throughput (steps/s, MB/s) and peak memory.

Data: the default recipe simulated by ``calib.simulate`` (what ``python
scripts/simulate.py --scale real --out DIR`` writes): at ``--scale real`` about 1.2
million scheduler steps (122,752 sampled) in 16 experiment directories. The simulated
set is kept under ``--root`` (default ``bench/out/import-data/<scale>``, git-ignored) and
reused when its recipe/scale marker matches.

Each repeat imports the whole root in a fresh Python process
(``calib.traces.import_root(root, use_cache=False, progress=False)``) so that the peak
resident memory (``ru_maxrss`` of the importer and of its worker processes) belongs to
that import alone. Reports medians over ``--repeats``: wall seconds, steps/s, MB/s of
uncompressed traces.json, peak RSS (MiB).

Run from the repository root::

    python bench/bench_import.py [--scale real] [--repeats 3] [--workers N]
    python bench/bench_import.py --quick      # smoke run: --scale default, 1 repeat
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CHILD = r"""
import json, os, resource, sys, time, warnings
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from calib.traces import import_root
root, workers = sys.argv[1], (None if sys.argv[2] == "auto" else int(sys.argv[2]))
t0 = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ds = import_root(root, workers=workers, progress=False, use_cache=False)
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "steps": int(ds.sizes["step"]),
                  "sampled": int(ds["sampled"].values.sum()),
                  "requests": int(ds.sizes["request"]), "experiments": int(ds.sizes["experiment"]),
                  "slots": int(ds.sizes["slot"]), "dataset_mib": ds.nbytes / 2**20,
                  "rss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_children_mib":
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def trace_bytes(root: Path) -> int:
    """Uncompressed bytes of every traces.json[.gz] under root."""
    total = 0
    for p in root.rglob("traces.json*"):
        if p.name.endswith(".gz"):
            with gzip.open(p, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    total += len(chunk)
        else:
            total += p.stat().st_size
    return total


def ensure_data(root: Path, scale: str, recipe: Path) -> float:
    """Simulate the recipe into root unless a matching marker exists; return seconds spent."""
    from calib.io import file_sha256

    marker = root / ".bench-marker.json"
    want = {"recipe_sha256": file_sha256(recipe), "scale": scale}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return 0.0
    import shutil

    from calib.io import atomic_write_text
    from calib.simulate import simulate_recipe

    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    print(f"simulating {recipe} at scale {scale} into {root} ...")
    sys.stdout.flush()
    t0 = time.perf_counter()
    simulate_recipe(recipe, root, scale=scale)
    spent = time.perf_counter() - t0
    atomic_write_text(marker, json.dumps(want))
    return spent


def main(argv: list[str] | None = None) -> int:
    from calib import config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="real", help="recipe scale: real (~1.2 M steps) or default")
    ap.add_argument("--recipe", type=Path, default=config.DEFAULT_RECIPE)
    ap.add_argument(
        "--root",
        type=Path,
        default=None,
        help="experiment root to import as it is (default: the recipe simulated "
        "into bench/out/import-data/<scale>, reused while unchanged)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", default="auto", help="import processes (auto: calib default)")
    ap.add_argument("--quick", action="store_true", help="smoke run: --scale default --repeats 1")
    args = ap.parse_args(argv)
    if args.quick:
        args.scale, args.repeats = "default", 1
    root = args.root or HERE / "out" / "import-data" / args.scale

    from _common import header, machine_cell

    info = header("calib trace import benchmark")
    if args.root is None:  # our own cache: (re)simulate when the recipe or scale changed
        sim_s = ensure_data(root, args.scale, args.recipe)
        if sim_s:
            print(f"simulated in {sim_s:.0f} s")
    elif not root.is_dir():
        print(f"error: --root {root} is not a directory", file=sys.stderr)
        return 2
    nbytes = trace_bytes(root)
    print(
        f"{'data':>9}: {root} ({args.scale} scale), {nbytes / 1e6:.0f} MB of traces.json; "
        f"workers {args.workers}; {args.repeats} repeat(s), each in a fresh process"
    )
    runs = []
    for i in range(args.repeats):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(root), str(args.workers)],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(r)
        print(
            f"repeat {i + 1}: {r['wall_s']:.1f} s, {r['steps'] / r['wall_s']:,.0f} steps/s, "
            f"{nbytes / 1e6 / r['wall_s']:.1f} MB/s, peak RSS importer "
            f"{r['rss_self_mib']:.0f} MiB, largest child {r['rss_children_mib']:.0f} MiB"
        )
        sys.stdout.flush()
    wall = statistics.median(r["wall_s"] for r in runs)
    r0 = runs[0]
    rss = statistics.median(r["rss_self_mib"] for r in runs)
    rss_kids = statistics.median(r["rss_children_mib"] for r in runs)
    print(
        f"\n{r0['experiments']} experiments, {r0['steps']:,} steps ({r0['sampled']:,} sampled), "
        f"{r0['requests']:,} requests, {r0['slots']} slots; dataset in memory "
        f"{r0['dataset_mib']:.0f} MiB"
    )
    print(
        f"median: {wall:.1f} s, {r0['steps'] / wall:,.0f} steps/s, "
        f"{nbytes / 1e6 / wall:.1f} MB/s; peak RSS importer {rss:.0f} MiB, "
        f"largest child process {rss_kids:.0f} MiB (a forked child reports at least the "
        "parent's RSS at fork time)"
    )

    print("\n# lines for BENCHMARKS.md")
    print(
        "| benchmark | steps | MB traces | median wall (s) | steps/s | MB/s | peak RSS importer "
        "(MiB) | peak RSS largest child (MiB) | machine | date |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| import_root ({args.scale} scale, workers {args.workers}, n={len(runs)}) | "
        f"{r0['steps']:,} | {nbytes / 1e6:.0f} | {wall:.1f} | {r0['steps'] / wall:,.0f} | "
        f"{nbytes / 1e6 / wall:.1f} | {rss:.0f} | {rss_kids:.0f} | {machine_cell(info)} | "
        f"{info['date']} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
