"""Benchmark: single-step prediction latency of the exported plug-in predictor (INV-M-4).

BLIS's contract asks < 1 ms per prediction at batch size 128. Measured for one step
whose batch holds 128 requests (8 prefill chunks + 120 decodes, realistic lengths):

* ``predict``  ``calib.predict.blis_step_time_us`` on the step's roofline terms (the
  exported BLIS formula; what BLIS evaluates after its own roofline);
* ``plugin``   ``calib.predict.plugin_step_time_us`` (the fitted form with ``alpha``);
* ``roofline+predict``  the full path from the batch composition: ``calib.roofline.
  step_components`` on a (1, 128) batch (jitted, warm) and then ``blis_step_time_us``;
* ``amortised`` per-step cost of ``blis_step_time_us`` on 10,000 steps at once.

Coefficients: BLIS iter29 betas. Run from the repository root::

    python bench/bench_predict.py [--repeats 15] [--quick]

Prints medians of ``--repeats`` timings (each averaging many calls) and markdown
lines for BENCHMARKS.md. Exit 1 if the median single-step latency of ``predict`` or
``roofline+predict`` exceeds 1 ms.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_ENABLE_X64"] = "1"  # before JAX is imported (the fit's precision)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import header, machine_cell, median_time  # noqa: E402

BUDGET_MS = 1.0
ITER29 = [
    0.152128,
    0.0,
    1.36252915,
    0.752037,
    32.09546717,
    4.41684444,
    126.024825,
    481.8613888,
    0.0,
    1.94710771,
    0.752037,
]


def batch_128(rng: np.random.Generator, n_steps: int = 1, width: int = 128):
    """(n_steps, width) schema arrays: 120 decodes then 8 prefill chunks per step."""
    n_dc, n_pf = width - 8, 8
    prompt = rng.integers(200, 3000, (n_steps, width)).astype(np.int32)
    new = np.ones((n_steps, width), np.int32)
    prog = (prompt + rng.integers(0, 800, (n_steps, width))).astype(np.int32)
    phase = np.full((n_steps, width), 2, np.int8)
    pf = slice(n_dc, n_dc + n_pf)
    done = (rng.random((n_steps, n_pf)) * prompt[:, pf]).astype(np.int32)
    new[:, pf] = np.minimum(prompt[:, pf] - done, 256)
    prog[:, pf] = done
    phase[:, pf] = 1
    return new, prog, prompt, phase, np.ones((n_steps, width), bool)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15, help="timings (median reported)")
    ap.add_argument("--inner", type=int, default=2000, help="calls averaged per timing")
    ap.add_argument("--model", default="llama-2-70b")
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="smoke run (5 x 200 calls)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.inner = 5, 200

    import jax

    from calib import config
    from calib.arch import load_architecture
    from calib.hardware import load_hardware
    from calib.predict import StepFeatures, blis_step_time_us, plugin_step_time_us
    from calib.roofline import arch_consts, step_components

    info = header("calib prediction latency benchmark (INV-M-4)")
    print(
        f"{'setup':>9}: {args.model} TP{args.tp} on H100-SXM, batch 128 (120 decodes + 8 "
        f"prefill chunks), BLIS iter29 betas; median of {args.repeats} x {args.inner} calls"
    )
    consts = arch_consts(load_architecture(args.model), load_hardware("H100-SXM"), args.tp)
    rng = np.random.default_rng(0)
    one = batch_128(rng)
    dev_one = jax.device_put(one)

    def feats_of(arrays):
        c = step_components(consts, *arrays, dtype=np.float64)
        return StepFeatures(
            np.stack([np.asarray(getattr(c, k)) for k in config.COMPONENTS], axis=1),
            np.asarray(c.num_layers),
            np.asarray(c.batch_size),
            np.asarray(c.num_moe_layers),
        )

    f1 = feats_of(one)
    results = {}
    results["predict"], _ = median_time(
        lambda: blis_step_time_us(ITER29, f1), args.repeats, args.inner
    )
    b = np.array([0.62, 0.35, 0.48, 1.21, 1.08, 0.83])
    results["plugin"], _ = median_time(
        lambda: plugin_step_time_us(b, 7.9, 3.1, 148.0, 0.31, f1), args.repeats, args.inner
    )
    feats_of(one)  # compile
    inner_rf = max(1, args.inner // 10)
    results["roofline+predict"], _ = median_time(
        lambda: blis_step_time_us(ITER29, feats_of(dev_one)), args.repeats, inner_rf
    )
    many = batch_128(rng, n_steps=10_000)
    fm = feats_of(many)
    t_many, _ = median_time(lambda: blis_step_time_us(ITER29, fm), args.repeats, 3)
    results["amortised (10k steps/call)"] = t_many / 10_000
    value = float(blis_step_time_us(ITER29, f1)[0])
    print(f"{'check':>9}: predicted step time {value:.0f} µs for the benchmark batch")

    print("\n| path | median µs per step prediction | budget |")
    print("|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {v * 1e6:.3g} | < {BUDGET_MS * 1e3:.0f} µs |")
    ok = max(results["predict"], results["roofline+predict"]) * 1e3 < BUDGET_MS
    print(
        f"\nINV-M-4: {'PASS' if ok else 'FAIL'} (single-step predict "
        f"{results['predict'] * 1e6:.1f} µs, with roofline "
        f"{results['roofline+predict'] * 1e6:.1f} µs; budget 1000 µs)"
    )

    print("\n# lines for BENCHMARKS.md")
    print("| benchmark | median | machine | date |")
    print("|---|---|---|---|")
    m = machine_cell(info)
    for k, v in results.items():
        print(f"| prediction latency, batch 128, {k} | {v * 1e6:.3g} µs | {m} | {info['date']} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
