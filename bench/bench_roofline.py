"""Benchmark of calib.roofline: roofline components for 122,752 steps × 128 slots.

Run from the repository root::

    python bench/bench_roofline.py [--steps N] [--slots S] [--repeats R]
    python bench/bench_roofline.py --quick     # smoke run: 20,000 steps, 5 repeats

Enables x64 before importing JAX (float64 is what the fit uses) and times both
float64 and float32 (``dtype=`` argument). Prints machine info, compile time,
the median of R repeats (``block_until_ready``) for device-resident inputs, for
host NumPy inputs (transfer included) and for ``dataset_components`` on an
in-memory xarray dataset, then markdown lines for BENCHMARKS.md. Exits 1 if the
float64 device-resident median exceeds the 1 s budget.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time

os.environ["JAX_ENABLE_X64"] = "1"  # before JAX is imported

import jax  # noqa: E402
import numpy as np  # noqa: E402

BUDGET_S = 1.0


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            kb = int(fh.readline().split()[1])
            mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "os": platform.platform(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem,
        "python": platform.python_version(),
        "jax": f"{jax.__version__} ({jax.default_backend()}: {jax.devices()[0].device_kind})",
        "x64": str(jax.config.jax_enable_x64),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)",
    }


def synthetic_batch(n_steps: int, n_slots: int, seed: int = 0):
    """Schema-shaped padded arrays: decode slots first, then prefill, then padding."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, n_slots + 1, n_steps)  # requests per step
    n_pf = np.minimum(b, rng.poisson(1.0, n_steps))  # a few prefills
    n_dc = b - n_pf
    slot = np.arange(n_slots)[None, :]
    is_dc = slot < n_dc[:, None]
    is_pf = (slot >= n_dc[:, None]) & (slot < b[:, None])
    mask = is_dc | is_pf
    prompt = rng.integers(1, 4096, (n_steps, n_slots)).astype(np.int32)
    done = (rng.random((n_steps, n_slots)) * prompt).astype(np.int32)  # < prompt
    chunk = np.minimum(prompt - done, rng.integers(1, 2048, (n_steps, n_slots))).astype(np.int32)
    out_k = rng.integers(1, 1024, (n_steps, n_slots)).astype(np.int32)
    phase = np.where(is_dc, 2, np.where(is_pf, 1, 0)).astype(np.int8)
    new_tokens = np.where(is_dc, 1, np.where(is_pf, chunk, 0)).astype(np.int32)
    progress = np.where(is_dc, prompt + out_k - 1, np.where(is_pf, done, 0)).astype(np.int32)
    prompt_len = np.where(mask, prompt, 0).astype(np.int32)
    return new_tokens, progress, prompt_len, phase, mask


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=122_752)
    ap.add_argument("--slots", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--model", default="llama-2-70b")
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="smoke run: --steps 20000 --repeats 5")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 20_000, 5
    if args.repeats < 5:
        ap.error("--repeats must be at least 5")

    import xarray as xr

    from calib import roofline
    from calib.arch import load_architecture
    from calib.hardware import load_hardware

    info = machine_info()
    print("# calib roofline benchmark")
    for k, v in info.items():
        print(f"{k:>8}: {v}")
    arch, hw = load_architecture(args.model), load_hardware("H100-SXM")
    consts = roofline.arch_consts(arch, hw, args.tp)
    host = synthetic_batch(args.steps, args.slots)
    nbytes = sum(a.nbytes for a in host)
    print(
        f"data    : {args.steps:,} steps x {args.slots} slots, {args.model} TP{args.tp}, "
        f"{int(host[4].sum()):,} requests, inputs {nbytes / 2**20:.0f} MiB"
    )
    dev = jax.device_put(host)
    jax.block_until_ready(dev)

    block_rows = roofline.config.ROOFLINE_CPU_BLOCK_ROWS if jax.default_backend() == "cpu" else 0
    print(f"blocks  : {block_rows} rows per loop iteration (0: single pass)")
    rows = []
    for dtype in (np.float64, np.float32):
        name = np.dtype(dtype).name
        t0 = time.perf_counter()
        compiled = roofline._components_jit.lower(
            consts, *dev, dtype=np.dtype(dtype), block_rows=block_rows
        ).compile()
        compile_s = time.perf_counter() - t0
        del compiled
        jax.block_until_ready(roofline.step_components(consts, *dev, dtype=dtype))  # warm
        t_dev = timed(
            lambda dtype=dtype: roofline.step_components(consts, *dev, dtype=dtype), args.repeats
        )
        t_host = timed(
            lambda dtype=dtype: roofline.step_components(consts, *host, dtype=dtype), args.repeats
        )
        med_dev, med_host = statistics.median(t_dev), statistics.median(t_host)
        print(
            f"{name}: compile {compile_s:.3f} s; step_components median {med_dev:.4f} s "
            f"(min {min(t_dev):.4f}, max {max(t_dev):.4f}, n={args.repeats}) device-resident; "
            f"{med_host:.4f} s from host NumPy"
        )
        rows.append((name, compile_s, med_dev, med_host))

    # the single-pass reduction, for comparison
    one_pass = timed(lambda: roofline.step_components(consts, *dev, block_rows=0), 1)
    one_pass = timed(lambda: roofline.step_components(consts, *dev, block_rows=0), args.repeats)
    print(f"float64: single pass (block_rows=0) median {statistics.median(one_pass):.4f} s")

    # dataset_components end to end (default float = float64 here), chunked
    ds = xr.Dataset(
        {
            "exp_arch_json": (
                ("experiment",),
                np.array([json.dumps(arch.to_dict())], dtype=object),
            ),
            "exp_hardware_json": (
                ("experiment",),
                np.array([json.dumps(hw.to_dict())], dtype=object),
            ),
            "exp_tp": (("experiment",), np.array([args.tp], np.int32)),
            "step_experiment": (("step",), np.zeros(args.steps, np.int32)),
            **{
                v: (("step", "slot"), a)
                for v, a in zip(
                    (
                        "slot_new_tokens",
                        "slot_progress",
                        "slot_prompt_len",
                        "slot_phase",
                        "slot_mask",
                    ),
                    host,
                    strict=True,
                )
            },
        }
    )
    roofline.dataset_components(ds)  # compile the chunk shapes
    t_ds = timed(lambda: roofline.dataset_components(ds), max(5, args.repeats // 2 + 1))
    med_ds = statistics.median(t_ds)
    print(
        f"float64: dataset_components (chunk {roofline.config.ROOFLINE_CHUNK_STEPS}) median "
        f"{med_ds:.4f} s (n={len(t_ds)})"
    )

    ok = rows[0][2] <= BUDGET_S
    print(
        f"budget  : float64 device-resident median {rows[0][2]:.4f} s "
        f"{'<=' if ok else '>'} {BUDGET_S} s -> {'PASS' if ok else 'FAIL'}"
    )

    print("\n# lines for BENCHMARKS.md")
    print(
        "| benchmark | dtype | compile (s) | median (s), device inputs | median (s), host "
        "inputs | machine | date |"
    )
    print("|---|---|---|---|---|---|---|")
    mach = f"{info['cpu']}, {info['cores']} cores, {info['jax']}"
    for name, compile_s, med_dev, med_host in rows:
        print(
            f"| roofline step_components {args.steps:,}x{args.slots} | {name} | "
            f"{compile_s:.2f} | {med_dev:.3f} | {med_host:.3f} | {mach} | {info['date']} |"
        )
    print(
        f"| roofline dataset_components {args.steps:,}x{args.slots} (xarray, chunked) | "
        f"float64 | - | - | {med_ds:.3f} | {mach} | {info['date']} |"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
