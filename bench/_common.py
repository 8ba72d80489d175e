"""Shared helpers of the calib benchmarks: machine facts, medians, markdown lines.

Every benchmark prints :func:`header` first (machine, CPU model, cores, load, date,
library versions) and reports medians of repeats (the machine may be shared).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata

LIBRARIES = (
    "jax",
    "jaxlib",
    "numpyro",
    "pymc",
    "nutpie",
    "arviz",
    "numpy",
    "scipy",
    "xarray",
    "pandas",
    "netCDF4",
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine() -> dict[str, str]:
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "os": platform.platform(),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)",
    }


def header(title: str) -> dict[str, str]:
    """Print the benchmark header; return the machine facts."""
    info = machine()
    print(f"# {title}")
    for k, v in info.items():
        print(f"{k:>9}: {v}")
    print(f"{'versions':>9}: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    sys.stdout.flush()
    return info


def machine_cell(info: dict[str, str]) -> str:
    return f"{info['cpu']}, {info['cores']} cores"


def median_time(
    fn: Callable[[], object], repeats: int, inner: int = 1
) -> tuple[float, list[float]]:
    """Median seconds per call of ``fn`` over ``repeats`` timings of ``inner`` calls each."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times), times


def peak_rss_mib() -> tuple[float, float]:
    """Peak resident memory (MiB) of this process and of its waited-for children."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return self_kb / 1024.0, kids_kb / 1024.0
