"""A vLLM-v1-like serving simulator writing the trace format users have on disk.

Public API::

    ExperimentSpec                       # one experiment (model, tp, limits, workload, load)
    simulate_experiment(spec, *, seed, step_time=None) -> SimResult    # pure, in memory
    write_experiment(result, root, *, truth_dir=None, gzip=False) -> Path
    simulate_recipe(recipe, out_root, *, truth_dir=None, seed=None, scale="default",
                    workers=None, gzip=False, progress=None) -> list[Path]
    StepBatch, TruthParams, TruthStepTime  # the step-time hook protocol and the default truth

The truth (true step durations, compositions, request timings) is written only
to ``truth_dir`` and exists for tests; the fit never sees it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from calib.io import worker_signals
from calib.simulate.scheduler import (
    ExperimentSpec,
    RequestPlan,
    SimResult,
    kv_capacity_blocks,
    padded_composition,
    simulate_experiment,
    summary_stats,
)
from calib.simulate.truth import StepBatch, StepTimeFn, TruthParams, TruthStepTime
from calib.simulate.workloads import load_recipe, recipe_specs
from calib.simulate.writer import experiment_dirname, truth_dataset, write_experiment, write_truth

__all__ = [
    "ExperimentSpec",
    "RequestPlan",
    "SimResult",
    "StepBatch",
    "StepTimeFn",
    "TruthParams",
    "TruthStepTime",
    "experiment_dirname",
    "kv_capacity_blocks",
    "load_recipe",
    "padded_composition",
    "recipe_specs",
    "simulate_experiment",
    "simulate_recipe",
    "summary_stats",
    "truth_dataset",
    "write_experiment",
    "write_truth",
    "merge_stats",
]


def _run_one(
    spec: ExperimentSpec, seed: int, out_root: str, truth_dir: str | None, gzip: bool
) -> tuple[str, dict]:
    import time

    t0 = time.perf_counter()
    res = simulate_experiment(spec, seed=seed)
    t1 = time.perf_counter()
    path = write_experiment(res, out_root, truth_dir=truth_dir, gzip=gzip)
    t2 = time.perf_counter()
    stats = dict(res.stats, simulate_s=t1 - t0, write_s=t2 - t1, name=path.name)
    return str(path), stats


def merge_stats(stats: list[dict]) -> dict:
    """Totals over experiments of :func:`summary_stats` dicts (+ timings)."""
    keys = (
        "experiments",
        "requests",
        "steps",
        "sampled",
        "preemptions",
        "cached_tokens",
        "prompt_tokens",
        "computed_prefill_tokens",
        "sum_step_us",
        "simulate_s",
        "write_s",
    )
    out = {k: sum(s.get(k, 0) for s in stats) for k in keys}
    out["prefix_hit_rate"] = (
        out["cached_tokens"] / out["prompt_tokens"] if out["prompt_tokens"] else 0.0
    )
    out["mean_step_us"] = out["sum_step_us"] / out["steps"] if out["steps"] else float("nan")
    return out


def simulate_recipe(
    recipe_path_or_dict: str | Path | Mapping,
    out_root: str | Path,
    *,
    truth_dir: str | Path | None = None,
    seed: int | None = None,
    scale: str = "default",
    workers: int | None = None,
    gzip: bool = False,
    progress: Callable[[dict], None] | None = None,
) -> list[Path]:
    """Simulate and write every experiment of a recipe; return their directories.

    Parameters
    ----------
    recipe_path_or_dict : recipe YAML path or mapping (see :mod:`calib.simulate.workloads`).
    out_root : root folder receiving one directory per experiment.
    truth_dir : where to write the truth NetCDFs (None: not written).
    seed : overrides the recipe's seed.
    scale : a key of the recipe's ``scales`` (``default`` or ``real``).
    workers : processes (None: 1 on machines with <= 2 CPUs, else ``min(cpu_count,
        experiments)``; 1: in this process).
    gzip : write ``traces.json.gz`` instead of ``traces.json``.
    progress : called with each experiment's stats dict as it completes.

    Results are identical whatever ``workers`` is (each experiment has its own seed).
    """
    specs, recipe_seed = recipe_specs(recipe_path_or_dict, scale=scale)
    seed = recipe_seed if seed is None else int(seed)
    # validate every spec before any work (CalibError early)
    from calib.simulate.scheduler import _check_spec

    for s in specs:
        _check_spec(s)
    n = len(specs)
    if workers is None:
        # spawned workers cost ~2 s each to start, and on 2 (hyper-threaded) CPUs two
        # processes run no faster than one: parallelise only with more CPUs.
        cpus = os.cpu_count() or 1
        workers = 1 if cpus <= 2 else min(cpus, n)
    workers = max(1, int(workers))
    out_root, tdir = str(out_root), None if truth_dir is None else str(truth_dir)
    paths: list[str] = [""] * n  # every slot is filled below
    if workers == 1:
        for i, s in enumerate(specs):
            paths[i], st = _run_one(s, seed, out_root, tdir, gzip)
            if progress:
                progress(st)
    else:
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=get_context("spawn"), initializer=worker_signals
        ) as ex:
            futs = {
                ex.submit(_run_one, s, seed, out_root, tdir, gzip): i for i, s in enumerate(specs)
            }
            for f in as_completed(futs):
                paths[futs[f]], st = f.result()
                if progress:
                    progress(st)
    return [Path(p) for p in paths]
