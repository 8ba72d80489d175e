"""All defaults and thresholds of calib, in one place.

Library code and scripts read their defaults from here; nothing else hard-codes
a tunable number. Values are plain module-level constants (frozen dataclasses
where a group belongs together) so that they show up in ``help(calib.config)``
and can be recorded in manifests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# --------------------------------------------------------------------------- paths
#: Repository root when running from a checkout (scripts resolve defaults here).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: The embedded default data: 16 simulated experiment directories in the real trace
#: format (gzipped traces.json), imported through the real importer on first use.
DEFAULT_TRACES = PROJECT_ROOT / "traces" / "default"
#: The simulation recipe the default dataset is generated from.
DEFAULT_RECIPE = PROJECT_ROOT / "traces" / "default.yaml"
DEFAULT_PRIORS = PROJECT_ROOT / "priors" / "default.yaml"
POSTERIORS_DIR = PROJECT_ROOT / "posteriors"
REPORTS_DIR = PROJECT_ROOT / "reports"

# ------------------------------------------------------------------- trace import
#: Hardware assumed when exp-config.yaml carries no ``hardware`` key.
DEFAULT_HARDWARE = "H100-SXM"
#: vLLM KV-cache block size (tokens), used for REQUEST_SNAPSHOT cross-checks.
KV_BLOCK_TOKENS = 16
#: Cross-check disagreement rate above which import warns.
CROSSCHECK_WARN_RATE = 0.01
#: Worker processes for importing experiment directories (None: os.cpu_count()).
IMPORT_WORKERS: int | None = None

# ---------------------------------------------------------------------- roofline
#: Bytes per KV-cache / activation element (bf16/fp16).
KV_BYTES = 2
#: Component order of the roofline matrix (defined in :mod:`calib.vocab`).
from calib.vocab import COMPONENTS  # noqa: E402,F401  (re-exported)


# ------------------------------------------------------------------------ sampler
@dataclass(frozen=True)
class SamplerDefaults:
    chains: int = 4
    warmup: int = 500
    #: 1000 draws: the gate's tail ESS on the default fit (BENCHMARKS.md, config history).
    draws: int = 1000
    seed: int = 0
    #: The smallest value without divergences over seeds 0-3 on the default fit (0.98 left
    #: 1 in 3 of 4 runs); history in BENCHMARKS.md (config history). Float32: see below.
    target_accept: float = 0.99
    max_tree_depth: int = 8
    chain_method: str = "parallel"
    #: Where chains start and the coordinates NUTS samples (``--init``): "laplace"
    #: (coordinates whitened by the normal approximation at the posterior mode, chains
    #: at draws from it; calib.start) or "median" (the prior median, NumPyro's
    #: init_to_median, unwhitened).
    init: str = "laplace"


SAMPLER = SamplerDefaults()
#: Start strategies accepted by ``--init``.
INIT_METHODS = ("laplace", "median")


@dataclass(frozen=True)
class StartDefaults:
    """The Laplace start (calib.start.laplace_start)."""

    #: L-BFGS iterations that bring the start near the mode (the log density's Hessian is
    #: ill-conditioned, eigenvalues 0.3 to 2·10⁶ on the default data: L-BFGS alone crawls
    #: along the overhead ridge and stopped at its former 2,000-iteration cap unconverged).
    max_iter: int = 200
    #: Trust-region Newton iterations (exact Hessian) that then converge to the mode
    #: (10-13 on the default data, gradient norm ~1e-9; BENCHMARKS.md, config history).
    newton_iter: int = 100
    #: Hessian eigenvalues are floored here (unconstrained units): a flat or non-convex
    #: direction gets a standard deviation of at most 1/sqrt(floor) = 1, the prior's scale
    #: in this model's unconstrained coordinates (standardised raw sites, log spreads).
    #: Seen at the real data size with 1e-2 (sd 10): a chain's first adaptation window ran
    #: 255 leapfrog steps of size 1.6e-3; with 1 the first window's steps were ~5e-2
    #: (BENCHMARKS.md; the start is not the only cost of early warmup).
    eigen_floor: float = 1.0


START = StartDefaults()


@dataclass(frozen=True)
class AdaptationDefaults:
    """Pilot warmup (calib.fit.run_nuts).

    With ``chains > 1`` and ``warmup >= min_warmup``: one pilot chain runs NumPyro's full
    warmup (step size and dense mass matrix, ``warmup`` iterations); every chain then
    samples with the pilot's mass matrix from its own start after ``step_size_warmup``
    iterations that adapt only the step size. Otherwise every chain runs NumPyro's
    adaptation alone. Measured at the real data size (BENCHMARKS.md): NumPyro's early
    adaptation windows (25-100 draws for ~45 parameters) saturate the tree depth and
    were ~2/3 of each chain's time.
    """

    step_size_warmup: int = 150
    min_warmup: int = 300


ADAPTATION = AdaptationDefaults()


#: ``run_nuts`` clears JAX's caches first when the process holds more than this fraction
#: of ``vm.max_map_count`` (each fit leaves ~3,000 mappings; Linux aborts the process at
#: the limit inside XLA's compiler; measurements in BENCHMARKS.md, config history).
MAP_COUNT_CLEAR_FRACTION = 0.5

#: multiprocessing start method of PyMC's parallel chains (``calib.fit.run_pymc``):
#: not "fork", which copies JAX's runtime threads (and their locks) into each chain.
PYMC_MP_CONTEXT = "forkserver"

#: JAX float precision of ``scripts/fit.py`` (``--precision``). See BENCHMARKS.md.
FIT_PRECISION = "float64"
#: Default target acceptance of ``scripts/fit.py --precision float32``. The float32
#: round-off of the potential at ~10^5 steps (sd ≈ 0.1-0.2 in the log density,
#: BENCHMARKS.md) is a floor under the energy error of every trajectory, so a target
#: near 1 drives the step size toward 0: at the real size 0.98 had not finished after
#: 10 min (0.95: 4 min 15 s).
FLOAT32_TARGET_ACCEPT = 0.95


# -------------------------------------------------------------- diagnostics gate
@dataclass(frozen=True)
class GateThresholds:
    """Thresholds of the diagnostics gate (ArviZ rank-normalised statistics)."""

    max_rhat: float = 1.01
    min_ess_bulk_per_chain: float = 100.0
    min_ess_tail_per_chain: float = 100.0
    max_divergences: int = 0
    min_ebfmi: float = 0.3
    #: Fraction of draws allowed to hit the maximum tree depth. A saturated tree is an
    #: efficiency signal, not a validity one: NUTS's truncated trajectory is still a
    #: reversible transition (Stan's documentation says the same), and the ESS checks
    #: already bound what it costs. A sizeable fraction does flag a failed adaptation
    #: (a chain whose step size collapsed saturates on most draws), hence 1 %, not
    #: unlimited. Was 0: the real-size fit in float32 failed at seed 0 on one draw in
    #: 4,000 with ESS 1,083/718 per chain and no divergences.
    max_treedepth_fraction: float = 0.01


GATE = GateThresholds()

# ------------------------------------------------------------------ predictions
#: Central interval probability for bands and coverage checks.
INTERVAL_PROB = 0.9
#: Interval kind written into exports.
INTERVAL_KIND = "equal-tailed"
#: Posterior draws used by check_e2e (thinned evenly when the posterior has more).
E2E_DRAWS = 1000


# ------------------------------------------------------------------- simulation
@dataclass(frozen=True)
class SimulationDefaults:
    seed: int = 20261122
    #: Fraction of steps with a step.BATCH_SUMMARY event (as in the real traces).
    batch_summary_rate: float = 0.10
    #: Fraction of (step, request) pairs with a step.REQUEST_SNAPSHOT event.
    snapshot_rate: float = 0.01
    #: GPU memory fraction vLLM gives to weights + KV cache (gpu_memory_utilization).
    gpu_memory_utilization: float = 0.9


SIMULATION = SimulationDefaults()


# ------------------------------------------------- roofline (calib/roofline.py)
#: Bytes per activation element in the TP all-reduce term (bf16/fp16).
ROOFLINE_ACT_BYTES = 2
#: Steps per JAX call in calib.roofline.dataset_components (bounds memory on 1M-step data).
ROOFLINE_CHUNK_STEPS = 65536
#: Rows per loop iteration of the roofline slot reduction on the CPU backend (keeps the
#: temporaries in cache; measured ~8x faster than one pass on 122,752 x 128 inputs).
ROOFLINE_CPU_BLOCK_ROWS = 64

# ------------------------------------------------------- trace import (calib.traces)
#: Malformed traces.json lines warned about individually (the rest are summarised).
IMPORT_MAX_LINE_WARNINGS = 20
#: Per-experiment import cache directory, relative to the import root.
IMPORT_CACHE_DIRNAME = ".calib-cache"
#: zlib level for the step x slot variables of saved datasets (1 fast .. 9 small).
DATASET_ZLIB_LEVEL = 1
#: Uncompressed traces.json at least this large are parsed by several processes.
IMPORT_PARALLEL_MIN_BYTES = 64 * 2**20
#: Longest running interval (steps) a request may have; longer ones are damaged input.
IMPORT_MAX_INTERVAL_STEPS = 1_000_000
#: Longest physically possible scheduler step (µs): one hour. A vLLM step runs for
#: milliseconds to seconds; a longer step.duration_us is damaged input (not sampled).
IMPORT_MAX_STEP_DURATION_US = 3_600_000_000
#: Requests with impossible event order / negative labels named one by one in the
#: import warning (the rest are counted).
IMPORT_MAX_REQUEST_WARNINGS = 5


# ------------------------------------------------------- model geometry (model helper)
#: Parameterisation of the per-model / per-experiment log corrections (calib.model):
#: True = centred (``log_b_active ~ N(log b_pop, tau)``), False = non-centred (``z_b``).
#: Centred: with ~10^4 steps per model the likelihood pins each model's corrections
#: (bench/bench_geometry.py; table in BENCHMARKS.md, config history).
MODEL_CENTERED = True
#: Components kept non-centred even in centred mode: their basis is small next to the
#: step time (tp: the all-reduce; pf_kv: ~2 % of a prefill token's projection time), so
#: each model's correction is weakly pinned and the centred form funnels in tau.
NONCENTERED_COMPONENTS: tuple[str, ...] = ("tp", "pf_kv")
#: String form of the same choice, for manifests and reports.
MODEL_PARAMETERISATION = "centered" if MODEL_CENTERED else "noncentered"
#: Raw coordinates of the additive overheads (per_layer/request/step µs): "softplus"
#: (linear above the prior median: straight collinearity ridges) or "log".
OVERHEAD_COORDINATES = "softplus"
#: Per-model corrections sampled through the quantity the data pin within a model
#: (per-model / per-experiment), instead of log b directly (calib.geometry.pinned):
#:   "weight"     log of the per-step constant b_w·T_w + L·per_layer + per_step;
#:   "pf_compute" log of the prefill cost per unit of its basis, b_pf + the shares of
#:                pf_kv and tp (both multiples of the prefill tokens);
#:   "dc_compute" log of the decode cost per request b_dc·(dc_compute per request)
#:                + per_request + the share of tp (all grow with the decode count).
#: Each removes a curved ridge between a model's correction and the shared overheads
#: or a collinear correction (divergence counts in BENCHMARKS.md, config history).
PINNED_COMPONENTS: tuple[str, ...] = ("weight", "pf_compute", "dc_compute")
#: Population mean of each centred, non-pinned component (not in NONCENTERED_COMPONENTS)
#: sampled relative to its models' mean, as the pinned components' always are:
#: ``log b_pop[k] = mean_m log b[m, k] + tau[k]/sqrt(M)·z`` (calib.geometry._recentred_population).
#: When the data pin every model's log b, ``log b_pop`` is otherwise confined to
#: ``mean ± tau/sqrt(M)``: a funnel in tau (measured in BENCHMARKS.md, config history).
#: False: prior coordinates.
RECENTRED_POPULATION = True
#: Dense (full) mass matrix for NUTS (the fit runner's default).
DENSE_MASS = True

# ------------------------------------------------------ step-time noise (calib/noise.py)
#: Upper bound on the stall and fast probabilities (each sampled as this bound times a
#: Beta fraction): the body is the majority of steps by definition; without a bound a
#: tail component can play the body (a second posterior mode, found by NUTS from a random
#: start in tests/test_noise.py).
NOISE_MAX_TAIL_PROB = 0.25
#: Upper bound on the log sd of the stall and fast multipliers (each sampled as this bound
#: times a Beta fraction). A log-normal factor with log sd w has mean exp(w²/2), so an
#: unbounded prior on w makes the mean step time's prior expectation infinite, and where
#: the data do not pin w (a tail probability near 0) the posterior mean factor explodes
#: (seen on the default fit with a log-normal prior: mean_factor[codellama-34b] posterior
#: mean 47.7, sd 2950, from rare prior-only draws). 1.0: a stall varies by up to e^±2 at 2 sd.
NOISE_MAX_TAIL_LOG_SD = 1.0


# ------------------------ posterior products (calib/export, e2e, baselines, report)
#: Share of a request's QUEUED step counted in its predicted E2E/TTFT: a request queued
#: while step q runs (the QUEUED event carries scheduler.step = q) waits on average for
#: half of it under uniform arrivals. 1 counts the whole step, 0 none (QUEUED between steps).
E2E_QUEUED_STEP_WEIGHT = 0.5
#: check_e2e fails when P(Binomial(n_experiments, prob) <= n_inside) is below this
#: (coverage implausibly low for the nominal interval probability).
E2E_COVERAGE_FAIL_TAIL = 0.01
#: Metrics whose coverage decides check_e2e's exit code ("e2e", "ttft", "itl").
E2E_CHECK_METRICS = ("e2e",)
#: Largest (draws × steps) block evaluated at once (float64 elements; bounds memory).
E2E_CHUNK_ELEMENTS = 4_000_000
#: Seed of posterior thinning and predictive noise in check_e2e / report.
E2E_SEED = 0
#: Posterior draws used for the report's posterior predictive check.
REPORT_PPC_DRAWS = 200
#: PNG resolution of report figures.
REPORT_DPI = 110


#: Bootstrap replicates of the API-overhead estimate (calib/overheads.py): the Monte-Carlo
#: sd of a 5 % / 95 % quantile from 400 replicates is ~3 % of the 90 % band's width.
OVERHEAD_BOOTSTRAP = 400
#: Seed of that bootstrap (and of a new model's draws).
OVERHEAD_SEED = 0

#: Bootstrap replicates (over experiments) of the structural discrepancy's mu and tau
#: (calib/discrepancy.py); stored in the posterior, so kept at the overheads' size.
DISCREPANCY_BOOTSTRAP = 400
#: Seed of that bootstrap.
DISCREPANCY_SEED = 0
#: Fewest experiments with a metric for its between-experiment sd tau to be estimated:
#: DerSimonian-Laird on 2 has one degree of freedom (tau is then recorded as unknown).
DISCREPANCY_MIN_EXPERIMENTS = 3

# ------------------------------------------- validation (calib/validate.py, validation helper)
#: NUTS settings of each validation fold: fewer draws than :data:`SAMPLER` (one fit per
#: fold; ``scripts/validate.py`` flags override them); 4 chains because 2 short chains
#: failed the gate in every fold (BENCHMARKS.md, config history).
VALIDATE_SAMPLER = SamplerDefaults(chains=4, warmup=500, draws=500)
#: Temporal split fractions (train, val, test) within each experiment, by step id.
VALIDATE_TEMPORAL = (0.6, 0.2, 0.2)
#: Request-hash split: SHA-256(req_id) mod 100 < 70 train, < 85 val, else test.
VALIDATE_HASH_SPLIT = (70, 85)
#: Posterior draws used per fold for predictions and intervals (thinned evenly).
VALIDATE_DRAWS = 400
#: Train steps fitted per fold at most (seeded random subset beyond; None: all).
VALIDATE_MAX_TRAIN_STEPS: int | None = 30000

# ------------------------ E2E host timing (calib/e2e.py, posterior-products helper)
#: Host gap between steps (ts_start of step n+1 − ts_end of step n) is estimated per
#: experiment from pairs of consecutive sampled steps inside request windows; with fewer
#: pairs than this an experiment uses the pooled estimate of the whole dataset.
E2E_GAP_MIN_PAIRS = 10
#: The QUEUED step's share is measured from requests whose QUEUED step is sampled
#: ((ts_end − QUEUED ts)/(ts_end − ts_start), clipped to [0, 1]); with fewer such requests,
#: or when fewer than E2E_QUEUED_CLOCK_AGREE of the raw shares lie in [−0.5, 1.5] (journey
#: and step clocks disagree), E2E_QUEUED_STEP_WEIGHT is used instead.
E2E_QUEUED_MIN_REQUESTS = 20
E2E_QUEUED_CLOCK_AGREE = 0.9

# ------------------------------- validation, continued (calib/validate.py, validation helper)
#: Module contract INV-M-6: |signed MSPE| of held-out step predictions below this (%).
VALIDATE_MSPE_BOUND_PCT = 5.0
#: README markers between which ``scripts/results_section.py`` writes the results block.
RESULTS_MARKERS = ("<!-- results:start -->", "<!-- results:end -->")
#: Heading of the README section created (before "## Testing") when the markers are absent.
RESULTS_HEADING = "## Results on the embedded data"

# ---------------------------------------------------------------- closed loop (issue 20)
#: Closed-loop target: |predicted − observed| / observed of an experiment's mean E2E (%):
#: the research target of BLIS calibration (workload-level E2E error under 10 %).
CLOSED_LOOP_E2E_TARGET_PCT = 10.0
#: Same for mean TTFT and mean decode interval (%): the research target for both.
CLOSED_LOOP_TTFT_ITL_TARGET_PCT = 15.0
#: Posterior draws replayed for the band by default: 20 replays keep the check under
#: 3 minutes on 2 cores on the embedded default (one scheduler replay per draw).
CLOSED_LOOP_DRAWS = 20
#: Posterior draws (thinned evenly) in the saved posterior's ``posterior_predictive`` group
#: (draws × sampled steps of simulated durations) so ``az.plot_ppc`` works; 0 leaves it
#: out (``scripts/fit.py --ppc-draws 0``). 200 keeps it ~2x the size of observed_data·200.
PPC_DRAWS = 200
