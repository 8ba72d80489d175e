"""The stress suite's trace sets: fixed recipes for data the fit was not built on.

Each :class:`StressSet` is a list of experiments (model, TP, workload, load stages,
prefix caching) plus a truth family (:data:`TRUTH_FAMILIES`: the shape of the true
step time) and a stall model (rate and magnitude of heavy-tailed hiccups), and a
seed. :func:`generate_set` simulates it with :func:`calib.simulate.simulate_experiment`
and writes the experiments in the real on-disk trace format; the runner
(``scripts/stress.py``) imports them through the real importer and fits them with
the fit library's defaults.

The recipes were fixed before any tuning of the model or the sampler. The
:data:`HELD_BACK` sets have seeds never used while tuning; report them separately.
Sizes (sampled steps, about 10 % of the scheduler steps) span 2k to 120k.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from calib.simulate.scheduler import ExperimentSpec, simulate_experiment
from calib.simulate.truth import TruthParams
from calib.simulate.writer import write_experiment

__all__ = [
    "HELD_BACK",
    "SETS",
    "TRUTH_FAMILIES",
    "QUICK_DURATION_FACTOR",
    "StressSet",
    "generate_set",
    "get_set",
    "recipe_hash",
    "set_specs",
    "set_truth",
]

#: Every stage duration is multiplied by this in ``--quick`` (smoke) runs.
QUICK_DURATION_FACTOR = 0.15

#: Step-time truth families (the stall model is set per set, on top).
TRUTH_FAMILIES: dict[str, TruthParams] = {
    # the embedded default's truth: hyperbolic GEMM/attention ramps, synchronous CPU
    "default": TruthParams(),
    # slower, sharper ramps (Hill exponents > 1), GEMMs padded to 64-token tiles,
    # attention poor up to ~1k of KV, a heavier synchronous CPU overhead
    "steep-sync": TruthParams(
        gemm_efficiency_max=0.62,
        gemm_knee_tokens=160.0,
        gemm_curve_power=1.6,
        gemm_tile_tokens=64,
        attn_efficiency_max=0.42,
        attn_knee_kv=900.0,
        attn_curve_power=1.8,
        kv_read_efficiency_max=0.70,
        kv_read_knee_tokens=400.0,
        step_overhead_us=650.0,
        request_overhead_us=9.0,
    ),
    # fast kernels (early ramps), a large jittery CPU overhead mostly hidden behind the
    # GPU (asynchronous scheduling), slower all-reduces
    "fast-async": TruthParams(
        gemm_efficiency_max=0.78,
        gemm_knee_tokens=48.0,
        attn_efficiency_max=0.60,
        attn_knee_kv=192.0,
        kv_read_knee_tokens=96.0,
        step_overhead_us=1100.0,
        step_overhead_sigma=0.35,
        cpu_overlap=0.85,
        allreduce_latency_us=12.0,
    ),
}

# workloads: shared_prefix profiles (token counts)
_W = {
    "general": dict(
        num_unique_system_prompts=10,
        num_users_per_system_prompt=20,
        system_prompt_len=100,
        question_len=447,
        output_len=248,
    ),
    "codegen": dict(
        num_unique_system_prompts=8,
        num_users_per_system_prompt=25,
        system_prompt_len=100,
        question_len=466,
        output_len=247,
    ),
    "roleplay": dict(
        num_unique_system_prompts=20,
        num_users_per_system_prompt=10,
        system_prompt_len=150,
        question_len=600,
        output_len=251,
    ),
    "reasoning": dict(
        num_unique_system_prompts=5,
        num_users_per_system_prompt=40,
        system_prompt_len=100,
        question_len=934,
        output_len=1448,
    ),
    # a long shared prefix (where prefix caching matters most), short questions
    "longprefix": dict(
        num_unique_system_prompts=4,
        num_users_per_system_prompt=50,
        system_prompt_len=1024,
        question_len=128,
        output_len=200,
    ),
    # many short requests (small steps, CPU-overhead dominated)
    "short": dict(
        num_unique_system_prompts=16,
        num_users_per_system_prompt=16,
        system_prompt_len=32,
        question_len=64,
        output_len=64,
    ),
}
# default load stages per workload: ((rate req/s, duration s), ...)
_STAGES = {
    "general": ((8.0, 60.0), (20.0, 60.0)),
    "codegen": ((5.0, 80.0), (10.0, 80.0)),
    "roleplay": ((6.0, 120.0),),
    "reasoning": ((4.0, 80.0),),
    "longprefix": ((6.0, 60.0), (14.0, 60.0)),
    "short": ((20.0, 40.0), (50.0, 40.0)),
}
# overloaded stages: arrival rates well above what the servers sustain
_OVERLOAD = {
    "general": ((10.0, 30.0), (60.0, 30.0)),
    "reasoning": ((10.0, 45.0),),
    "short": ((150.0, 30.0),),
}


@dataclass(frozen=True)
class Exp:
    """One experiment of a set (stage durations in seconds before any scaling)."""

    model: str  # Hugging Face id (a bundled architecture)
    tp: int
    workload: str  # a key of the workload table
    stages: tuple[tuple[float, float], ...]
    prefix_caching: bool = True


@dataclass(frozen=True)
class StressSet:
    """A fixed trace-set recipe."""

    name: str
    description: str
    seed: int
    family: str  # a key of TRUTH_FAMILIES
    stall_rate: float  # hiccup probability per step
    stall_low: float  # hiccup multiplier range (most are near the low end)
    stall_high: float
    experiments: tuple[Exp, ...]
    held_back: bool = False


def _grid(
    models,
    workloads,
    *,
    scale: float = 1.0,
    model_scale: dict | None = None,
    overload: bool = False,
    prefix_caching: bool = True,
) -> tuple[Exp, ...]:
    """Experiments models x workloads; ``model_scale`` multiplies one model's durations."""
    out = []
    for hf, tp in models:
        f = scale * (model_scale or {}).get(hf, 1.0)
        for w in workloads:
            stages = (_OVERLOAD if overload else _STAGES)[w]
            out.append(Exp(hf, tp, w, tuple((r, d * f) for r, d in stages), prefix_caching))
    return tuple(out)


L2_7, L2_70, CL34 = (
    "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-70b-hf",
    "codellama/CodeLlama-34b-Instruct-hf",
)
MIX, L31_8, L31_70 = (
    "mistralai/Mixtral-8x7B-v0.1",
    "meta-llama/Llama-3.1-8B-Instruct",
    "meta-llama/Llama-3.1-70B-Instruct",
)
QW7 = "Qwen/Qwen2.5-7B-Instruct"

#: The stress sets, fixed before any tuning (sizes are approximate sampled steps).
SETS: tuple[StressSet, ...] = (
    StressSet(
        "s01-tiny",
        "2 models (dense MHA + GQA, TP1), ~2k sampled steps, no stalls",
        seed=1701,
        family="default",
        stall_rate=0.0,
        stall_low=2.0,
        stall_high=2.0,
        experiments=_grid([(L2_7, 1), (L31_8, 1)], ["general", "codegen"], scale=0.3),
    ),
    StressSet(
        "s02-nostall",
        "the default's 4 models, default truth without stalls",
        seed=1702,
        family="default",
        stall_rate=0.0,
        stall_low=2.0,
        stall_high=2.0,
        experiments=_grid([(L2_7, 1), (L2_70, 4), (CL34, 2), (MIX, 2)], ["general", "roleplay"]),
    ),
    StressSet(
        "s03-stall2pct",
        "3 models, 2 % stalls of 2-10x",
        seed=1703,
        family="default",
        stall_rate=0.02,
        stall_low=2.0,
        stall_high=10.0,
        experiments=_grid([(L2_7, 1), (CL34, 2), (MIX, 2)], ["general", "codegen"]),
    ),
    StressSet(
        "s04-steep",
        "4 models, steep-sync truth (tiled GEMMs, Hill ramps), 0.5 % stalls",
        seed=1704,
        family="steep-sync",
        stall_rate=0.005,
        stall_low=2.0,
        stall_high=5.0,
        experiments=_grid(
            [(L31_8, 1), (L2_70, 4), (QW7, 1), (MIX, 2)], ["general", "roleplay", "reasoning"]
        ),
    ),
    StressSet(
        "s05-async",
        "4 models, fast-async truth (CPU overhead overlapped), 1 % stalls",
        seed=1705,
        family="fast-async",
        stall_rate=0.01,
        stall_low=2.0,
        stall_high=8.0,
        experiments=_grid(
            [(L2_7, 1), (L31_70, 4), (CL34, 2), (MIX, 2)], ["general", "codegen", "roleplay"]
        ),
    ),
    StressSet(
        "s06-noprefix",
        "3 models, prefix caching off (long shared prefixes recomputed)",
        seed=1706,
        family="default",
        stall_rate=0.005,
        stall_low=2.0,
        stall_high=5.0,
        experiments=_grid(
            [(L31_8, 1), (L2_70, 4), (QW7, 2)], ["general", "longprefix"], prefix_caching=False
        ),
    ),
    StressSet(
        "s07-overload",
        "3 models (TP1/2/8), overloaded stages (queueing, preemptions)",
        seed=1707,
        family="steep-sync",
        stall_rate=0.005,
        stall_low=2.0,
        stall_high=5.0,
        experiments=_grid(
            [(L2_7, 1), (CL34, 2), (L31_70, 8)], ["general", "reasoning", "short"], overload=True
        ),
    ),
    StressSet(
        "s08-fewsteps",
        "4 models, one (Qwen2.5-7B) with very few sampled steps",
        seed=1708,
        family="default",
        stall_rate=0.005,
        stall_low=2.0,
        stall_high=5.0,
        experiments=_grid(
            [(L2_7, 1), (L2_70, 4), (MIX, 2), (QW7, 1)],
            ["general", "codegen", "roleplay"],
            model_scale={QW7: 0.03},
        ),
    ),
    StressSet(
        "s09-tp8-moe",
        "4 large models at TP4/TP8 incl. MoE, fast-async truth",
        seed=1709,
        family="fast-async",
        stall_rate=0.005,
        stall_low=2.0,
        stall_high=6.0,
        experiments=_grid(
            [(L2_70, 8), (L31_70, 8), (MIX, 4), (CL34, 4)], ["general", "longprefix", "short"]
        ),
    ),
    StressSet(
        "s10-seven",
        "all 7 bundled models (TP 1, 2, 4, 8), 1 % stalls of 2-10x",
        seed=1710,
        family="default",
        stall_rate=0.01,
        stall_low=2.0,
        stall_high=10.0,
        experiments=_grid(
            [(L2_7, 1), (L2_70, 4), (CL34, 2), (MIX, 2), (L31_8, 2), (L31_70, 8), (QW7, 1)],
            ["general", "codegen", "roleplay"],
        ),
    ),
    StressSet(
        "s11-large",
        "5 models, steep-sync truth, 1.5 % stalls, ~60k sampled steps",
        seed=1711,
        family="steep-sync",
        stall_rate=0.015,
        stall_low=2.0,
        stall_high=6.0,
        experiments=_grid(
            [(L2_7, 1), (L2_70, 4), (CL34, 2), (MIX, 2), (L31_8, 1)],
            ["general", "codegen", "roleplay", "reasoning"],
            scale=4.6,
        ),
    ),
    StressSet(
        "s12-real",
        "the default's 4 models at the real size (~120k sampled), fast-async",
        seed=1712,
        family="fast-async",
        stall_rate=0.005,
        stall_low=2.0,
        stall_high=5.0,
        experiments=_grid(
            [(L2_7, 1), (L2_70, 4), (CL34, 2), (MIX, 2)],
            ["general", "codegen", "roleplay", "reasoning"],
            scale=10.5,
        ),
    ),
)

#: Sets with fresh seeds, never looked at while tuning (reported separately).
HELD_BACK: tuple[StressSet, ...] = (
    StressSet(
        "h01-mixed",
        "5 models, steep-sync truth, 1.5 % stalls of 3-9x, prefix on+off",
        seed=90211,
        family="steep-sync",
        stall_rate=0.015,
        stall_low=3.0,
        stall_high=9.0,
        experiments=(
            _grid([(L2_7, 2), (L31_8, 1), (CL34, 4)], ["general", "codegen"])
            + _grid([(MIX, 2), (QW7, 1)], ["general", "longprefix"], prefix_caching=False)
        ),
        held_back=True,
    ),
    StressSet(
        "h02-async-overload",
        "3 models, fast-async truth, overloaded, 0.3 % stalls",
        seed=90212,
        family="fast-async",
        stall_rate=0.003,
        stall_low=2.0,
        stall_high=4.0,
        experiments=_grid([(L31_8, 1), (L2_70, 4), (MIX, 2)], ["general", "short"], overload=True),
        held_back=True,
    ),
    StressSet(
        "h03-six",
        "6 models, default truth, 2 % stalls of 2-10x, ~20k sampled",
        seed=90213,
        family="default",
        stall_rate=0.02,
        stall_low=2.0,
        stall_high=10.0,
        experiments=_grid(
            [(L2_7, 1), (L2_70, 8), (CL34, 2), (MIX, 4), (L31_70, 4), (QW7, 2)],
            ["general", "codegen", "reasoning"],
            scale=1.2,
        ),
        held_back=True,
    ),
)


def get_set(name: str) -> StressSet:
    """The set (regular or held back) called ``name``; KeyError if there is none."""
    for s in SETS + HELD_BACK:
        if s.name == name:
            return s
    raise KeyError(name)


def set_truth(s: StressSet) -> TruthParams:
    """The set's truth: its family with its stall model."""
    return replace(
        TRUTH_FAMILIES[s.family],
        hiccup_prob=s.stall_rate,
        hiccup_low=s.stall_low,
        hiccup_high=s.stall_high,
    )


def set_specs(s: StressSet, *, quick: bool = False) -> list[ExperimentSpec]:
    """The set's experiments as :class:`ExperimentSpec` (``quick``: shorter stages)."""
    f = QUICK_DURATION_FACTOR if quick else 1.0
    t0 = datetime(2026, 12, 1, 9, 0, 0, tzinfo=UTC)
    specs = []
    for i, e in enumerate(s.experiments):
        specs.append(
            ExperimentSpec(
                model=e.model,
                tp=e.tp,
                workload=e.workload,
                shared_prefix=_W[e.workload],
                stages=tuple((r, d * f) for r, d in e.stages),
                seed_offset=i,
                started=(t0 + timedelta(minutes=20 * i)).strftime("%Y%m%d-%H%M%S"),
                enable_prefix_caching=e.prefix_caching,
            )
        )
    return specs


def recipe_hash(s: StressSet, *, quick: bool = False) -> str:
    """Content hash of what :func:`generate_set` would write: the recipe, the truth, the
    simulator's source (a cache of generated traces is valid while this is unchanged)."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "set": asdict(s),
                "truth": asdict(set_truth(s)),
                "specs": [sp.to_dict() for sp in set_specs(s, quick=quick)],
            },
            sort_keys=True,
        ).encode()
    )
    for src in sorted(Path(__file__).parent.glob("*.py")):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    return h.hexdigest()


def generate_set(
    s: StressSet, root: str | Path, *, quick: bool = False, truth_dir: str | Path | None = None
) -> list[Path]:
    """Simulate every experiment of ``s`` and write it under ``root``; return the dirs."""
    truth = set_truth(s)
    paths = []
    for spec in set_specs(s, quick=quick):
        res = simulate_experiment(spec, seed=s.seed, truth_params=truth)
        paths.append(write_experiment(res, root, truth_dir=truth_dir))
    return paths
