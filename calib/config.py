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
#: The embedded default canonical dataset (16 simulated experiments).
DEFAULT_TRACES = PROJECT_ROOT / "traces" / "default.nc"
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
#: Component order of the roofline matrix (the model's correction factors).
COMPONENTS = ("pf_compute", "pf_kv", "dc_compute", "dc_kv", "weight", "tp")
#: Overheads fitted in µs per unit count.
OVERHEADS = ("per_layer", "per_request", "per_step")


# ------------------------------------------------------------------------ sampler
@dataclass(frozen=True)
class SamplerDefaults:
    chains: int = 4
    warmup: int = 500
    draws: int = 500
    seed: int = 0
    target_accept: float = 0.85
    max_tree_depth: int = 8
    chain_method: str = "parallel"


SAMPLER = SamplerDefaults()


# -------------------------------------------------------------- diagnostics gate
@dataclass(frozen=True)
class GateThresholds:
    """Thresholds of the diagnostics gate (ArviZ rank-normalised statistics)."""

    max_rhat: float = 1.01
    min_ess_bulk_per_chain: float = 100.0
    min_ess_tail_per_chain: float = 100.0
    max_divergences: int = 0
    min_ebfmi: float = 0.3
    #: Fraction of draws allowed to hit the maximum tree depth.
    max_treedepth_fraction: float = 0.0


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
