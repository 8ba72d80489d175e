"""Closed-loop replay: observed requests through calib's scheduler with the exported coefficients.

The teacher-forced check (:mod:`calib.e2e`) keeps every observed batch, so queueing
feedback never appears. Here every experiment's observed requests (arrival times,
prompt and output tokens, shared-prefix groups) go through the vLLM-like scheduler
of :mod:`calib.simulate.scheduler` with the experiment's limits (``max_num_seqs``,
``max_num_batched_tokens``, the observed KV-cache size): the batches come from the
scheduler, so a step-time bias feeds back into queueing as it does in BLIS.

Step durations and API-side delays are the **exported** BLIS coefficients: the
``trained_physics_coefficients`` block that :func:`calib.export.export_posterior`
writes (betas) with the alphas of the API-overhead fit
(the fit's API-overhead estimate, :mod:`calib.overheads`), the same numbers BLIS receives.
The step time of a batch is :func:`calib.predict.blis_step_time_us` of its roofline
terms (:func:`calib.roofline.step_components`), truncated to whole µs (at least 1) as
BLIS does. Both are linear in five per-step slot sums (prefill tokens, prefill
attention token², decode requests, decode context tokens, batch size) plus a constant,
so :func:`step_time_weights` evaluates them once per experiment and coefficient set on
probe batches and the scheduler applies the resulting weights (exact: a non-linear
set is refused).

Latency accounting follows BLIS (``sim/simulator.go``, ``recordRequestCompletion``;
``sim/latency/trained_physics_model.go``): a request enters the queue α₀ after its
arrival; engine steps run back to back; every generated token costs α₂ more on the
client side (TTFT gets one α₂, every inter-token latency one more); E2E adds α₁ once::

    TTFT = α₀ + (FIRST_TOKEN − QUEUED) + α₂
    ITL  = (FINISHED − FIRST_TOKEN)/(output − 1) + α₂
    E2E  = α₀ + (FINISHED − QUEUED) + output·α₂ + α₁

Observed values are the client-side view of the same requests: ARRIVED→DEPARTED
(``req_api_queue_us + req_e2e_us + req_api_depart_us``), ARRIVED→FIRST_TOKEN
(``req_api_queue_us + req_ttft_us``) and the decode interval
``(E2E − TTFT)/(output − 1)`` (``req_decode_interval_us``), averaged over the
experiment's completed requests. A request without API labels is compared
server-side (QUEUED→...; the α₀/α₁ terms are left out of its prediction).

Prefix groups: the traces do not say which shared system prompt a request used; the
experiment's profile (``data.shared_prefix``) gives the number of prompts and their
length, and each request draws one uniformly (seeded), as the load generator does.
Without a shared-prefix profile no prefix-cache hits are replayed.

Band: with ``draws = K``, one replay per posterior draw (thinned evenly): that draw's
betas through the export's own mapping (:func:`calib.predict.betas_from_params`) and
the API fit's draw of the alphas (clipped at 0 as the export does), with the step
times of each experiment multiplied by a new experiment's structural discrepancy
``exp(δ)``, ``δ ~ N(mu, tau)`` of E2E (:mod:`calib.discrepancy`; BLIS never sees
the workload, so no conditioning on it). The band is the central ``prob`` interval of
the K replayed means: parameter uncertainty and the discrepancy (the replay is
deterministic given the coefficients, so no step noise; a posterior without the
record gives parameter uncertainty only).

Verdict per experiment and metric: ``|err| <`` the target
(:data:`calib.config.CLOSED_LOOP_E2E_TARGET_PCT`, ``..._TTFT_ITL_TARGET_PCT``) and, with
draws, the observed mean inside the band. :func:`closed_loop` fails when any experiment
misses either.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from calib import config
from calib.errors import CalibError

if TYPE_CHECKING:
    from calib.simulate import ExperimentSpec

__all__ = [
    "ClosedLoopResult",
    "Coefficients",
    "ExperimentPlan",
    "LinearStepTime",
    "closed_loop",
    "exported_coefficients",
    "experiment_plans",
    "format_table",
    "judge",
    "latency_means",
    "probe_features",
    "set_name",
    "add_check_arguments",
    "write_table_csv",
    "replay_experiment",
    "step_time_weights",
]

METRICS = ("e2e", "ttft", "itl")
#: Probe batches for :func:`step_time_weights`: (phase, new_tokens, progress, prompt_len) rows.
_PROBES = (
    ((1, 7, 0, 7),),
    ((1, 300, 16, 316), (2, 1, 50, 40)),
    ((2, 1, 900, 500),),
    ((2, 1, 30, 20), (2, 1, 4000, 3000), (2, 1, 77, 60)),
    ((1, 1000, 512, 2000), (1, 64, 0, 64)),
    ((1, 5, 3, 9), (2, 1, 12, 11), (2, 1, 2000, 1999)),
    ((1, 2048, 0, 2048),),
    ((2, 1, 1, 1), (2, 1, 1, 1), (2, 1, 1, 1), (2, 1, 1, 1)),
)


# ------------------------------------------------------------------ step time of a coefficient set
def _slot_sums(phase, new_tokens, progress, prompt_len, mask) -> np.ndarray:
    """(n, 6) per-step sums: T_pf, Σ t(s + t/2), T_dc, Σ c, B, 1 (roofline notation)."""
    pf = mask & (phase == 1)
    dc = mask & (phase == 2)
    t = np.where(pf, new_tokens, 0).astype(np.float64)
    s = np.where(pf, prompt_len, 0).astype(np.float64)
    c = np.where(dc, progress, 0).astype(np.float64)
    return np.column_stack(
        [
            t.sum(-1),
            (t * (s + 0.5 * t)).sum(-1),
            dc.sum(-1),
            c.sum(-1),
            mask.sum(-1),
            np.ones(len(t)),
        ]
    )


def _probe_arrays():
    width = max(len(p) for p in _PROBES)
    arr = np.zeros((4, len(_PROBES), width), np.int64)
    mask = np.zeros((len(_PROBES), width), bool)
    for i, probe in enumerate(_PROBES):
        for j, slot in enumerate(probe):
            arr[:, i, j] = slot
            mask[i, j] = True
    return arr[0], arr[1], arr[2], arr[3], mask


def probe_features(arch, hardware, tp: int):
    """Roofline features of the probe batches for one model/accelerator/TP (JAX, once)."""
    from calib.predict import StepFeatures
    from calib.roofline import arch_consts, step_components

    phase, new, prog, plen, mask = _probe_arrays()
    comps = step_components(arch_consts(arch, hardware, tp), new, prog, plen, phase, mask)
    mat = np.column_stack([np.asarray(getattr(comps, c), np.float64) for c in config.COMPONENTS])
    feats = StepFeatures(
        mat,
        np.asarray(comps.num_layers, np.float64),
        np.asarray(comps.batch_size, np.float64),
        np.asarray(comps.num_moe_layers, np.float64),
    )
    return feats, _slot_sums(phase, new, prog, plen, mask)


def step_time_weights(beta_coeffs: Sequence[float], probes) -> np.ndarray:
    """Weights ``w`` (6,) with BLIS step time = ``slot_sums · w`` for these betas.

    ``probes`` is :func:`probe_features` of the experiment. The step time is
    :func:`calib.predict.blis_step_time_us` of the probes' roofline terms; the weights
    solve it exactly (raises ``ValueError`` when the betas make it non-linear, e.g.
    fewer than 10 betas, where BLIS takes a max of two terms).
    """
    from calib.predict import blis_step_time_us

    feats, sums = probes
    y = blis_step_time_us(list(beta_coeffs), feats)
    w, *_ = np.linalg.lstsq(sums, y, rcond=None)
    if not np.allclose(sums @ w, y, rtol=1e-9, atol=1e-9):
        raise ValueError("the BLIS step time of these betas is not linear in the slot sums")
    return w


class LinearStepTime:
    """Scheduler step-time hook (:class:`calib.simulate.truth.StepTimeFn`): BLIS's integer µs."""

    def __init__(self, weights: np.ndarray):
        self.weights = np.asarray(weights, np.float64)

    def __call__(self, batch, arch, hardware, tp, rng) -> np.ndarray:
        if len(batch.phase) != 1:
            v = (
                _slot_sums(
                    batch.phase, batch.new_tokens, batch.progress, batch.prompt_len, batch.mask
                )
                @ self.weights
            )
            return np.maximum(1.0, np.trunc(v))
        # the scheduler's one-step call: the same sums on 1-D rows, without temporaries
        m = batch.mask[0]
        ph = np.where(m, batch.phase[0], 0)
        pf, dc = ph == 1, ph == 2
        t = batch.new_tokens[0][pf].astype(np.float64)
        s = batch.prompt_len[0][pf]
        w = self.weights
        v = (
            w[0] * t.sum()
            + w[1] * float(t @ (s + 0.5 * t))
            + w[2] * int(dc.sum())
            + w[3] * float(batch.progress[0][dc].sum())
            + w[4] * int(m.sum())
            + w[5]
        )
        return np.array([max(1.0, float(np.trunc(v)))])


# ------------------------------------------------------------------ the observed workloads
@dataclass(frozen=True)
class ExperimentPlan:
    """One experiment's replay input and observed means (picklable; no dataset inside)."""

    name: str
    model: str
    spec: ExperimentSpec
    arrived_us: np.ndarray  # (N,) observed (or inferred) arrival, µs
    has_api: np.ndarray  # (N,) bool: API labels present (client-side basis)
    prompt_len: np.ndarray
    output_len: np.ndarray
    prefix_group: np.ndarray
    prefix_len: int
    kv_blocks_total: int | None
    compared: np.ndarray  # (N,) bool: completed, finite labels
    observed_us: dict = field(default_factory=dict)  # metric -> observed mean, µs


def experiment_plans(ds, *, seed: int = config.E2E_SEED) -> list[ExperimentPlan]:
    """Per experiment of a canonical dataset: its requests, limits and observed means."""
    from calib.simulate import ExperimentSpec

    names = [str(x) for x in np.asarray(ds["experiment"].values)]
    req_exp = np.asarray(ds["req_experiment"].values)
    step_exp = np.asarray(ds["step_experiment"].values)
    kv_total = (
        np.asarray(ds["bs_kv_blocks_total_gpu"].values) if "bs_kv_blocks_total_gpu" in ds else None
    )
    rng = np.random.default_rng(seed)

    def v(name):
        return np.asarray(ds[name].values)

    plans = []
    for e, name in enumerate(names):
        sel = np.nonzero(req_exp == e)[0]
        profile = (
            json.loads(str(v("exp_profile_json")[e]) or "{}") if "exp_profile_json" in ds else {}
        )
        sp = (profile.get("data") or {}).get("shared_prefix") or {}
        n_groups = int(sp.get("num_unique_system_prompts") or 1)
        prefix_len = int(sp.get("system_prompt_len") or 0)
        out = np.where(
            v("req_output_len")[sel] > 0, v("req_output_len")[sel], v("req_max_tokens")[sel]
        ).astype(np.int64)
        plen = v("req_prompt_len")[sel].astype(np.int64)
        q_ts = v("req_queued_ts_us")[sel].astype(np.float64)
        api_q = v("req_api_queue_us")[sel].astype(np.float64)
        api_d = v("req_api_depart_us")[sel].astype(np.float64)
        has_api = np.isfinite(api_q) & np.isfinite(api_d)
        keep = np.isfinite(q_ts) & (plen > 0) & (out > 0)
        if not keep.any():
            raise CalibError(
                "no request with a QUEUED time and token counts",
                path=name,
                field="req_queued_ts_us",
            )
        e2e, ttft = v("req_e2e_us")[sel], v("req_ttft_us")[sel]
        itl = v("req_decode_interval_us")[sel]
        compared = keep & ~v("req_failed")[sel] & np.isfinite(e2e) & np.isfinite(ttft)
        client = np.where(has_api, 1.0, 0.0)
        obs = {
            "e2e": float(
                np.mean(
                    (np.nan_to_num(api_q) * client + e2e + np.nan_to_num(api_d) * client)[compared]
                )
            ),
            "ttft": float(np.mean((np.nan_to_num(api_q) * client + ttft)[compared])),
            "itl": float(np.nanmean(np.where(compared & (out >= 2), itl, np.nan))),
        }
        arrived = np.where(has_api, q_ts - np.nan_to_num(api_q), q_ts)
        kv = None
        if kv_total is not None:
            k = kv_total[step_exp == e]
            k = k[k > 0]
            kv = int(k.max()) if k.size else None
        stages = tuple(
            (float(s["rate"]), float(s["duration"]))
            for s in (profile.get("load") or {}).get("stages") or []
        ) or ((1.0, 1.0),)
        total = int((plen[keep] + out[keep]).max())
        # the spec's own workload is not replayed (the RequestPlan replaces it); these
        # values only pass its checks
        shared = {
            "num_unique_system_prompts": n_groups,
            "num_users_per_system_prompt": 1,
            "system_prompt_len": prefix_len,
            "question_len": 1,
            "output_len": 1,
        }
        spec = ExperimentSpec(
            model=str(v("exp_model_id")[e]),
            tp=int(v("exp_tp")[e]),
            workload=str(v("exp_workload")[e]),
            shared_prefix=shared,
            stages=stages,
            hardware=str(v("exp_hardware")[e]),
            max_num_batched_tokens=int(v("exp_max_num_batched_tokens")[e]),
            max_num_seqs=int(v("exp_max_num_seqs")[e]),
            max_model_len=max(int(v("exp_max_model_len")[e]), total),
        )
        plans.append(
            ExperimentPlan(
                name=name,
                model=str(v("exp_model")[e]),
                spec=spec,
                arrived_us=arrived[keep],
                has_api=has_api[keep],
                prompt_len=plen[keep],
                output_len=out[keep],
                prefix_group=rng.integers(0, n_groups, size=int(keep.sum())),
                prefix_len=prefix_len if prefix_len < int(plen[keep].min()) else 0,
                kv_blocks_total=kv,
                compared=compared[keep],
                observed_us=obs,
            )
        )
    return plans


# ------------------------------------------------------------------ one replay
def latency_means(plan: ExperimentPlan, res, alphas: Sequence[float]) -> dict[str, float]:
    """Mean E2E, TTFT and decode interval (µs) of a scheduler result, BLIS accounting."""
    a0, a1, a2 = (float(a) for a in alphas)
    rq = res.requests
    q, ft, fin = (
        rq[k].astype(np.float64) / 1e3 for k in ("queued_ns", "first_token_ns", "finished_ns")
    )
    out = plan.output_len.astype(np.float64)
    api = np.where(plan.has_api, 1.0, 0.0)
    c = plan.compared
    ttft = api * a0 + (ft - q) + a2
    e2e = api * a0 + (fin - q) + out * a2 + api * a1
    itl_ok = c & (out >= 2)
    itl = (fin - ft) / np.maximum(out - 1.0, 1.0) + a2
    return {
        "e2e": float(e2e[c].mean()),
        "ttft": float(ttft[c].mean()),
        "itl": float(itl[itl_ok].mean()) if itl_ok.any() else float("nan"),
    }


def replay_experiment(
    plan: ExperimentPlan, weights: np.ndarray, alphas: Sequence[float], seed: int = config.E2E_SEED
) -> dict[str, float]:
    """Replay one experiment with one coefficient set; its mean latencies (µs)."""
    from calib.simulate import RequestPlan, simulate_experiment

    a0 = float(alphas[0])
    rp = RequestPlan(
        queued_us=plan.arrived_us + np.where(plan.has_api, a0, 0.0),
        prompt_len=plan.prompt_len,
        output_len=plan.output_len,
        prefix_group=plan.prefix_group,
        prefix_len=plan.prefix_len,
        kv_blocks_total=plan.kv_blocks_total,
    )
    res = simulate_experiment(
        plan.spec,
        seed=seed,
        step_time=LinearStepTime(weights),
        requests=rp,
        batch_summary_rate=0.0,
        snapshot_rate=0.0,
    )
    return latency_means(plan, res, alphas)


def _replay_job(job) -> tuple[int, int, dict]:
    k, e, plan, weights, alphas = job
    return k, e, replay_experiment(plan, weights, alphas)


# ------------------------------------------------------------------ coefficients
@dataclass(frozen=True)
class Coefficients:
    """Exported BLIS coefficients per model: the point set and per-draw sets."""

    point: dict[str, tuple[list[float], list[float]]]  # model -> (alphas, betas)
    draws: list[dict[str, tuple[list[float], list[float]]]]  # per draw, same shape
    discrepancy: dict | None = None  # the posterior's record (calib.discrepancy)


def exported_coefficients(
    idata, *, draws: int, out_dir=None, seed: int = config.E2E_SEED, alpha_coeffs=None
) -> tuple[Coefficients, object]:
    """The export's coefficients (in memory) and ``draws`` evenly thinned posterior sets.

    Runs :func:`calib.export.export_posterior` (files into ``out_dir``, a temporary
    directory when None; the alphas are the posterior's own API-overhead estimate, or
    ``alpha_coeffs``) and returns its ``trained_physics_coefficients`` per model plus,
    per draw, the mean-consistent betas of that draw (``mean_factor`` times the draw's
    coefficients, as the export averages them; through :func:`calib.predict.betas_from_params`)
    and alphas drawn from the estimate's normal approximation (mean, sd; clipped at 0
    as exported). Returns ``(coefficients, export_result)``.
    """
    import tempfile

    from calib import noise
    from calib.export import BLIS_BLOCK, export_posterior, population_name
    from calib.overheads import alphas as overhead_alphas
    from calib.posterior import api_overheads, flat_draws, model_coords
    from calib.predict import betas_from_params

    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="calib-closed-loop-")
        out_dir = tmp.name
    try:
        res = export_posterior(idata, out_dir, alpha_coeffs=alpha_coeffs)
    finally:
        if tmp is not None:
            tmp.cleanup()
    api = None if alpha_coeffs is not None else api_overheads(idata)
    rng = np.random.default_rng(seed)
    point = {
        name: (list(doc[BLIS_BLOCK]["alpha_coeffs"]), list(doc[BLIS_BLOCK]["beta_coeffs"]))
        for name, doc in res.documents.items()
    }
    post = flat_draws(idata)
    models = model_coords(idata)["model"]
    n = post["b"].shape[0]
    idx: np.ndarray = (
        np.unique(np.linspace(0, n - 1, num=min(draws, n)).round().astype(int))
        if draws
        else np.zeros(0, dtype=int)
    )
    # per draw, the same quantity the export's point averages: the predictive mean step
    # time, mean_factor·coefficients (a new model: b_pop·exp(tau·z), the models' mean F)
    factor = noise.mean_factor(*noise.posterior_params(post, len(models)))  # (draws, models)
    tau = post.get("tau", np.zeros_like(post["b_pop"]))
    z = rng.standard_normal(tau.shape)
    sets = []
    for d in idx:
        one = {}
        for m, name in enumerate([*models, population_name()]):
            if m < len(models):
                b, f = post["b"][d, m], factor[d, m]
            else:
                b, f = post["b_pop"][d] * np.exp(tau[d] * z[d]), factor[d].mean()
            betas = betas_from_params(
                f * b,
                f * post["per_layer_us"][d],
                f * post["per_request_us"][d],
                f * post["per_step_us"][d],
            )
            if api is None:
                alphas = point[name][0]
            else:
                a = overhead_alphas(api, name if m < len(models) else None)
                alphas = [max(0.0, float(v)) for v in rng.normal(a["raw_mean"], a["sd"])]
            one[name] = (alphas, betas)
        sets.append(one)
    from calib import discrepancy

    return Coefficients(point=point, draws=sets, discrepancy=discrepancy.load(idata)), res


# ------------------------------------------------------------------ the check
@dataclass
class ClosedLoopResult:
    """Per experiment and metric: observed, predicted (point), band, error, verdict."""

    table: pd.DataFrame
    prob: float
    draws: int
    passed: bool
    message: str
    settings: dict = field(default_factory=dict)


def _targets(e2e_pct: float, ttft_itl_pct: float) -> dict[str, float]:
    return {"e2e": e2e_pct, "ttft": ttft_itl_pct, "itl": ttft_itl_pct}


def closed_loop(
    plans: Sequence[ExperimentPlan],
    coeffs: Coefficients,
    *,
    prob: float = config.INTERVAL_PROB,
    e2e_target_pct: float = config.CLOSED_LOOP_E2E_TARGET_PCT,
    ttft_itl_target_pct: float = config.CLOSED_LOOP_TTFT_ITL_TARGET_PCT,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ClosedLoopResult:
    """Replay every experiment with the point coefficients and each draw; judge (see module)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from calib.arch import load_architecture
    from calib.hardware import load_hardware

    sets = [coeffs.point, *coeffs.draws]
    factor = discrepancy_factors(coeffs, plans)
    jobs, basis = [], []
    for e, plan in enumerate(plans):
        name, b = set_name(plan, coeffs)
        basis.append(b)
        arch = load_architecture(plan.spec.model)
        probes = probe_features(arch, load_hardware(plan.spec.hardware), plan.spec.tp)
        for k, s in enumerate(sets):
            alphas, betas = s[name]
            w = step_time_weights(betas, probes)  # linear in the betas
            jobs.append((k, e, plan, w * factor[k - 1, e] if k else w, alphas))
    jobs.sort(key=lambda j: -len(j[2].arrived_us))  # longest first: better packing
    results = np.full((len(sets), len(plans), len(METRICS)), np.nan)
    if workers is None:
        workers = min(os.cpu_count() or 1, len(jobs))
    done = 0
    it: Iterator[tuple[int, int, dict]]
    if workers <= 1:
        it = map(_replay_job, jobs)
        ex = None
    else:
        ex = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
        it = ex.map(_replay_job, jobs, chunksize=1)
    try:
        for k, e, means in it:
            results[k, e] = [means[m] for m in METRICS]
            done += 1
            if progress:
                progress(done, len(jobs))
    finally:
        if ex is not None:
            ex.shutdown(cancel_futures=True)
    return judge(
        plans,
        results,
        basis,
        prob=prob,
        e2e_target_pct=e2e_target_pct,
        ttft_itl_target_pct=ttft_itl_target_pct,
    )


def discrepancy_factors(coeffs: Coefficients, plans: Sequence[ExperimentPlan]) -> np.ndarray:
    """``exp(δ)`` (draws, experiments) multiplying each draw's step times of each experiment:
    a new experiment's structural discrepancy of E2E, ``δ ~ N(mu, tau)``
    (:func:`calib.discrepancy.draws`; BLIS never sees the workload); 1 without a record."""
    from calib import discrepancy

    delta = discrepancy.draws(
        coeffs.discrepancy,
        [p.name for p in plans],
        ["new"] * len(plans),
        len(coeffs.draws),
        np.random.default_rng(config.DISCREPANCY_SEED),
    )[0]
    return np.exp(delta[:, 0, :])


def set_name(plan: ExperimentPlan, coeffs: Coefficients) -> tuple[str, str]:
    """The coefficient set replaying ``plan`` and its basis ("fitted" or "population")."""
    from calib.export import population_name

    if plan.model in coeffs.point:
        return plan.model, "fitted"
    return population_name(), "population"


def judge(
    plans: Sequence[ExperimentPlan],
    results: np.ndarray,
    basis: Sequence[str],
    *,
    prob: float = config.INTERVAL_PROB,
    e2e_target_pct: float = config.CLOSED_LOOP_E2E_TARGET_PCT,
    ttft_itl_target_pct: float = config.CLOSED_LOOP_TTFT_ITL_TARGET_PCT,
) -> ClosedLoopResult:
    """Table and verdict from replayed means ``results`` (sets × experiments × METRICS, µs).

    Set 0 is the point (exported) coefficients, sets 1.. the posterior draws.
    """
    targets = _targets(e2e_target_pct, ttft_itl_target_pct)
    n_draws = results.shape[0] - 1
    rows = []
    for e, plan in enumerate(plans):
        for i, m in enumerate(METRICS):
            obs = plan.observed_us[m]
            pred = results[0, e, i]
            band = results[1:, e, i]
            lo, hi = (
                (float(np.quantile(band, (1 - prob) / 2)), float(np.quantile(band, (1 + prob) / 2)))
                if band.size
                else (float("nan"), float("nan"))
            )
            err = 100.0 * (pred - obs) / obs
            inside = bool(lo <= obs <= hi) if band.size else True
            ok = bool(abs(err) < targets[m]) and inside
            rows.append(
                {
                    "experiment": plan.name,
                    "model": plan.model,
                    "basis": basis[e],
                    "metric": m,
                    "observed_us": obs,
                    "predicted_us": pred,
                    "lower_us": lo,
                    "upper_us": hi,
                    "error_pct": err,
                    "target_pct": targets[m],
                    "inside": inside,
                    "passed": ok,
                }
            )
    table = pd.DataFrame(rows)
    failed = table[~table.passed]
    n_exp = len(plans)
    if failed.empty:
        msg = (
            f"PASS: all {n_exp} experiments within target (E2E < {e2e_target_pct:g} %, "
            f"TTFT/ITL < {ttft_itl_target_pct:g} %)"
            + (f" and inside their {100 * prob:.0f}% band" if n_draws else "")
        )
    else:
        bad = sorted(set(failed.experiment))
        why = []
        if (~failed.inside).any():
            why.append(f"{int((~failed.inside).sum())} outside the band")
        miss = failed[failed.error_pct.abs() >= failed.target_pct]
        if len(miss):
            why.append(f"{len(miss)} over the target")
        msg = f"FAIL: {len(bad)} of {n_exp} experiments miss ({', '.join(why)} experiment×metric)"
    return ClosedLoopResult(
        table=table,
        prob=prob,
        draws=n_draws,
        passed=failed.empty,
        message=msg,
        settings={
            "e2e_target_pct": e2e_target_pct,
            "ttft_itl_target_pct": ttft_itl_target_pct,
            "draws": n_draws,
            "prob": prob,
        },
    )


def format_table(result: ClosedLoopResult, simulator: str = "calib scheduler") -> str:
    """Plain-text per-experiment table (ms), one block per metric, then the verdict."""
    t = result.table
    pct = f"{100 * result.prob:.0f}%"
    band = f"{pct} band of {result.draws} draws" if result.draws else "no band (--draws 0)"
    lines = [f"closed loop in {simulator}: exported coefficients; {band}", ""]
    labels = {
        "e2e": "E2E latency, ARRIVED→DEPARTED",
        "ttft": "time to first token",
        "itl": "decode interval (E2E−TTFT)/(output−1)",
    }
    for m in METRICS:
        sub = t[t.metric == m]
        lines.append(f"== {labels[m]} (ms; target |err| < {sub.target_pct.iloc[0]:g} %) ==")
        lines.append(
            f"{'experiment':<44} {'basis':<10} {'observed':>10} {'predicted':>10} "
            f"{'lower':>10} {'upper':>10} {'err%':>7} {'in':>3} {'ok':>3}"
        )
        for _, r in sub.iterrows():
            lines.append(
                f"{str(r.experiment)[:44]:<44} {r.basis:<10} "
                f"{r.observed_us / 1e3:>10.2f} {r.predicted_us / 1e3:>10.2f} "
                f"{r.lower_us / 1e3:>10.2f} {r.upper_us / 1e3:>10.2f} "
                f"{r.error_pct:>+7.1f} {'yes' if r.inside else 'NO':>3} "
                f"{'yes' if r.passed else 'NO':>3}"
            )
        err = sub.error_pct.abs()
        lines.append(
            f"mean err {sub.error_pct.mean():+.1f} % (|err| mean "
            f"{err.mean():.1f} %, max {err.max():.1f} %); "
            f"inside band {int(sub.inside.sum())}/{len(sub)}; "
            f"within target {int((err < sub.target_pct).sum())}/{len(sub)}"
        )
        lines.append("")
    lines.append(result.message)
    return "\n".join(lines)


# ------------------------------------------------------------------ script helpers
def add_check_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by scripts/check_closed_loop.py and scripts/check_blis.py (argparse only)."""
    from calib.cli import REPLAY_TRACES, add_posterior_arguments, finite_float

    percent = finite_float(0.0, 1000.0)

    add_posterior_arguments(
        p,
        traces=REPLAY_TRACES,
        prob="central band",
        csv=True,
    )
    p.add_argument(
        "--e2e-target",
        type=percent,
        default=config.CLOSED_LOOP_E2E_TARGET_PCT,
        metavar="PCT",
        help="largest |E2E error| %% that passes (default %(default)s)",
    )
    p.add_argument(
        "--ttft-itl-target",
        type=percent,
        default=config.CLOSED_LOOP_TTFT_ITL_TARGET_PCT,
        metavar="PCT",
        help="largest |TTFT| and |decode-interval error| %% that passes (default %(default)s)",
    )


def write_table_csv(path: str, result, posterior: str, ds, kind: str) -> None:
    """Write ``result.table`` as CSV with a manifest line (atomic)."""
    import json

    from calib.io import atomic_write_text, file_sha256, manifest
    from calib.traces import dataset_hash

    m = manifest(
        kind=kind,
        data_hash=dataset_hash(ds),
        settings=result.settings,
        diagnostics=result.message,
        source_posterior_sha256=file_sha256(posterior),
    )
    atomic_write_text(
        path, f"# manifest: {json.dumps(m, sort_keys=True)}\n" + result.table.to_csv(index=False)
    )
