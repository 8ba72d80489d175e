"""Validation harness (calib/validate.py, scripts/validate.py).

Fast tests use a tiny simulated dataset imported through the real importer and a mock
sampler (prior draws shaped as chains) for the I/O path. The slow test simulates
experiments whose step times come from the model family itself (the simulator's
``step_time=`` hook), imports them and validates with real NUTS fits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures.posteriors import mock_fit

from calib import config, noise
from calib import validate as V
from calib.simulate import ExperimentSpec, simulate_experiment, write_experiment

ROOT = Path(__file__).resolve().parent.parent
SP = dict(
    num_unique_system_prompts=3,
    num_users_per_system_prompt=5,
    system_prompt_len=100,
    question_len=300,
    output_len=40,
)
MODELS = (("meta-llama/Llama-2-7b-hf", 1), ("mistralai/Mixtral-8x7B-v0.1", 2))
WORKLOADS = ("general", "codegen")


def _simulate(
    root: Path,
    *,
    step_time=None,
    stages=((8.0, 4.0),),
    output_len=40,
    models=MODELS,
    workloads=WORKLOADS,
    seed=3,
    truth_params=None,
):
    from calib.traces import import_root

    for i, (model, tp) in enumerate(models):
        for j, w in enumerate(workloads):
            spec = ExperimentSpec(
                model=model,
                tp=tp,
                workload=w,
                shared_prefix=dict(SP, output_len=output_len + 20 * j),
                stages=stages,
                seed_offset=10 * i + j,
                started=f"20261101-{i:02d}{j:02d}00",
            )
            write_experiment(
                simulate_experiment(
                    spec, seed=seed, step_time=step_time, truth_params=truth_params
                ),
                root,
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return import_root(root, workers=1, progress=False, use_cache=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _simulate(tmp_path_factory.mktemp("val"))


# ------------------------------------------------------------------------ splits
def test_temporal_split_order_and_fractions(tiny):
    step_part, req_part = V.temporal_split(tiny)
    assert step_part.shape == (tiny.sizes["step"],)
    assert req_part.shape == (tiny.sizes["request"],)
    assert set(np.unique(step_part)) <= {0, 1, 2}  # every step labelled
    exp = tiny["step_experiment"].values
    ids = tiny["step_id"].values
    for e in range(tiny.sizes["experiment"]):
        sel = exp == e
        p, i = step_part[sel], ids[sel]
        assert i[p == 0].max() < i[p == 1].min() <= i[p == 1].max() < i[p == 2].min()
        frac = np.bincount(p, minlength=3) / p.size
        assert np.allclose(frac, config.VALIDATE_TEMPORAL, atol=2.0 / p.size)
    # a request's part holds both its QUEUED and FINISHED steps; straddlers are excluded
    q, f = tiny["req_queued_step"].values, tiny["req_finished_step"].values
    r_exp = tiny["req_experiment"].values
    for r in range(req_part.size):
        window = (exp == r_exp[r]) & (ids >= q[r]) & (ids <= f[r])
        labels = set(np.unique(step_part[window]).tolist())
        if req_part[r] >= 0:  # every step of the window lies in the request's part
            assert labels <= {int(req_part[r])}
        else:
            assert len(labels) > 1 or q[r] < 0
    assert (req_part == -1).sum() > 0 and (req_part == 2).sum() > 0


def test_request_hash_bucket_known_value_and_fractions():
    import hashlib

    rid = "cmpl-abc"
    want = int(hashlib.sha256(rid.encode()).hexdigest(), 16) % 100
    assert V.request_hash_bucket([rid])[0] == want
    n = 20000
    b = V.request_hash_bucket([f"cmpl-{i:08x}" for i in range(n)])
    lo, hi = config.VALIDATE_HASH_SPLIT
    for frac, got in (
        (lo / 100, (b < lo).mean()),
        ((hi - lo) / 100, ((b >= lo) & (b < hi)).mean()),
        (1 - hi / 100, (b >= hi).mean()),
    ):
        sd = np.sqrt(frac * (1 - frac) / n)
        assert abs(got - frac) < 4 * sd, (frac, got)


def test_request_hash_split_steps_follow_lead_request(tiny):
    step_part, req_part = V.request_hash_split(tiny)
    b = V.request_hash_bucket(tiny["req_id"].values)
    assert np.array_equal(req_part, np.where(b < 70, 0, np.where(b < 85, 1, 2)))
    mask = tiny["slot_mask"].values
    sreq = tiny["slot_request"].values
    tok = np.where(mask, tiny["slot_new_tokens"].values, -1)
    for s in range(0, tiny.sizes["step"], 7):
        if not mask[s].any():
            assert step_part[s] == -1
            continue
        lead = sreq[s, int(np.argmax(tok[s]))]
        assert step_part[s] == req_part[lead]
        assert tok[s, int(np.argmax(tok[s]))] == tok[s].max()
    assert set(np.unique(step_part[mask.any(axis=1)])) == {0, 1, 2}


@pytest.mark.parametrize("split,key", [("workload", "exp_workload"), ("model", "exp_model")])
def test_leave_one_out_partitions_everything(tiny, split, key):
    folds = V.make_folds(tiny, split)
    labels = tiny[key].values.astype(str)
    assert [f.held_out for f in folds] == list(dict.fromkeys(labels.tolist()))
    test_count_steps = np.zeros(tiny.sizes["step"], int)
    test_count_req = np.zeros(tiny.sizes["request"], int)
    exp = tiny["step_experiment"].values
    for f in folds:
        assert set(np.unique(f.step_part)) == {0, 2}
        held = labels == f.held_out
        assert np.array_equal(f.step_part == 2, held[exp])  # disjoint: test = held-out exps
        test_count_steps += f.step_part == 2
        test_count_req += f.request_part == 2
    assert np.all(test_count_steps == 1) and np.all(test_count_req == 1)


def test_unknown_split_is_a_user_error(tiny):
    from calib.errors import CalibError

    with pytest.raises(CalibError, match="unknown split"):
        V.make_folds(tiny, "random")


# ------------------------------------------------------------------------ metrics
def test_step_metrics_numbers():
    obs = np.array([100.0, 200.0, 400.0, 800.0])
    pred = np.array([110.0, 180.0, 400.0, 880.0])
    m = V.step_metrics(pred, obs)
    assert m["n_steps"] == 4
    assert m["mape_pct"] == pytest.approx((10 + 10 + 0 + 10) / 4)
    assert m["median_ape_pct"] == pytest.approx(10.0)
    assert m["mspe_pct"] == pytest.approx((10 - 10 + 0 + 10) / 4)
    assert m["pearson_r"] == pytest.approx(np.corrcoef(pred, obs)[0, 1])
    assert np.isnan(V.step_metrics([], [])["mape_pct"])


def test_fold_model_data_drops_held_out_model(tiny):
    """A model held out of a fold is absent from the fold's coordinates (population level)."""
    from calib.predict import StepFeatures
    from calib.roofline import dataset_components

    meta = V._meta(tiny)
    feats = StepFeatures.from_components(dataset_components(tiny))
    fold = V.make_folds(tiny, "model")[0]
    data, coords, _ = V._fold_model_data(meta, feats, fold.steps(V.TRAIN, meta.sampled))
    assert coords["model"] == ["mixtral-8x7b"] and data.n_models == 1
    assert data.n_experiments == 2


# ------------------------------------------------------------------------ I/O path
def test_run_validation_tables_and_atomic_files(tiny, tmp_path):
    from calib.io import file_sha256
    from calib.priors import load_priors

    settings = V.default_settings(chains=2, warmup=0, draws=25)
    seen = []
    res = V.run_validation(
        tiny,
        ["model", "temporal", "workload"],
        priors=load_priors(),
        settings=settings,
        draws=50,
        progress=False,
        fit_fn=mock_fit,
        on_fold=lambda r: seen.append(sorted(f["fold"] for f in r.folds)),
    )
    assert list(res.steps.columns) == list(V.STEP_COLUMNS)
    assert list(res.e2e.columns) == list(V.E2E_COLUMNS)
    # temporal: val + test, 4 predictors each; model, workload: 2 folds x test x 4
    assert len(res.steps) == 2 * 4 + 2 * 4 + 2 * 4
    # every split's first fold runs first; the tables stay in split and fold order, and
    # the callback sees the partial result after each fold
    planned = ["model=llama-2-7b", "model=mixtral-8x7b", "temporal"]
    planned += ["workload=general", "workload=codegen"]
    assert res.settings["folds_planned"] == planned
    assert [f["fold"] for f in res.folds] == planned
    assert [f["run_order"] for f in res.folds] == [1, 4, 2, 3, 5]
    assert list(dict.fromkeys(res.steps.fold)) == planned
    assert list(dict.fromkeys(res.e2e.fold)) == planned
    assert [len(x) for x in seen] == [1, 2, 3, 4, 5]
    assert seen[2] == sorted(["model=llama-2-7b", "temporal", "workload=general"])
    # a held-out workload is a new workload (not the fitted basis), whatever the hierarchy
    assert (res.e2e[res.e2e.split == "workload"].basis == "new-experiment").all()
    assert set(res.steps.predictor) == set(V.PREDICTORS)
    assert (res.steps.n_steps > 0).all()
    cal = res.steps[res.steps.predictor == "calib"]
    assert cal.coverage_pct.between(0, 100).all()
    assert res.steps[res.steps.predictor != "calib"].coverage_pct.isna().all()
    # the held-out model is predicted from the population level
    lomo = res.e2e[res.e2e.split == "model"]
    assert len(lomo) and (lomo.basis == "population").all()
    for f in ("model=llama-2-7b", "model=mixtral-8x7b"):
        assert set(lomo[lomo.fold == f].model) == {f.split("=")[1]}
    assert (res.e2e[res.e2e.split == "temporal"].basis == "fitted").all()
    assert set(res.e2e.metric) == {"e2e", "ttft", "itl"}
    assert (res.e2e.lower_us <= res.e2e.upper_us).all()

    out = tmp_path / "rep"
    paths = V.write_reports(res, out, data_hash="x" * 64, command=["validate"])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["e2e.csv", "manifest.json", "steps.csv", "summary.csv", "validation.md"]
    assert not list(out.glob(".*.tmp"))
    back = pd.read_csv(paths["steps"])
    assert list(back.columns) == list(V.STEP_COLUMNS) and len(back) == len(res.steps)
    m = json.loads(paths["manifest"].read_text())
    assert m["kind"] == "validation" and m["data_hash"] == "x" * 64
    for name in ("steps.csv", "e2e.csv", "summary.csv", "validation.md"):
        assert m["files"][name] == file_sha256(out / name)
    md = paths["markdown"].read_text()
    assert "| split | fold | part |" in md and "Leave-one-model-out" in md
    # an error while writing leaves the previous file in place (atomic)
    before = paths["steps"].read_bytes()
    bad = V.ValidationResult(steps=res.steps, e2e=None, folds=res.folds, settings=res.settings)
    with pytest.raises(AttributeError):
        V.write_reports(bad, out)
    assert paths["steps"].read_bytes() == before
    assert not list(out.glob(".*.tmp"))


def test_baseline_e2e_uses_the_replay_host_gaps(tiny):
    """Baselines' E2E means get the same measured host gaps as the model (calib.e2e)."""
    from calib.e2e import experiment_means, means_with_host_time, replay_design
    from calib.predict import StepFeatures
    from calib.priors import load_priors

    fold = V.make_folds(tiny, "temporal")[0]
    feats = StepFeatures.from_dataset(tiny)
    r = V.evaluate_fold(
        tiny,
        fold,
        features=feats,
        priors=load_priors(),
        settings=V.default_settings(chains=1, warmup=0, draws=20),
        draws=20,
        fit_fn=mock_fit,
    )
    meta = V._meta(tiny)
    train = fold.steps(V.TRAIN, meta.sampled)
    rows = pd.DataFrame(r.e2e_rows)
    for part in (V.VAL, V.TEST):
        reqs = np.flatnonzero(fold.request_part == part)
        sub = tiny.isel(request=reqs)
        design = replay_design(sub)
        assert design.timing.gap_us.min() > 1.0  # the simulator leaves host gaps
        targets = np.unique(meta.step_exp)
        bb = V._baseline_predictions(meta, feats, train, targets)["blackbox"][design.order]
        with_gap = means_with_host_time(bb, design)[0]
        without = experiment_means(bb, design)[0]
        got = rows[rows.part == V.PARTS[part]]
        for k, metric in enumerate(("e2e", "ttft", "itl")):
            for row in got[got.metric == metric].itertuples():
                e = design.experiments.index(row.experiment)
                want = 100 * (with_gap[k, e] - row.observed_us) / row.observed_us
                assert row.blackbox_error_pct == pytest.approx(want, rel=1e-9, abs=1e-9)
                if metric == "e2e":
                    assert with_gap[k, e] - without[k, e] > 10 * design.timing.gap_us.min()


def test_script_missing_traces_exits_2(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "validate.py"),
            "--traces",
            str(tmp_path / "nope.nc"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------ README results block
def _fixture_result():
    """A hand-made two-fold result (temporal test part, leave-one-model-out) with known numbers."""
    steps, e2e = [], []
    for fold, split, part, mspe in (
        ("temporal", "temporal", "test", -1.25),
        ("model=llama-2-7b", "model", "test", 7.5),
    ):
        for k, name in enumerate(V.PREDICTORS):
            steps.append(
                {
                    "split": split,
                    "fold": fold,
                    "part": part,
                    "predictor": name,
                    "n_steps": 120,
                    "mape_pct": 4.0 + k,
                    "median_ape_pct": 3.0,
                    "pearson_r": 0.99,
                    "mspe_pct": mspe if name == "calib" else 2.0,
                    "coverage_pct": 88.5 if name == "calib" else np.nan,
                }
            )
        for metric, obs in (("e2e", 2.0e6), ("ttft", 1.0e5), ("itl", 3.0e4)):
            e2e.append(
                {
                    "split": split,
                    "fold": fold,
                    "part": part,
                    "experiment": "exp-a",
                    "model": "llama-2-7b",
                    "workload": "general",
                    "basis": "population" if split == "model" else "fitted",
                    "metric": metric,
                    "n_requests": 50,
                    "observed_us": obs,
                    "predicted_us": obs * 1.024,
                    "lower_us": obs * 0.9,
                    "upper_us": obs * 1.1,
                    "error_pct": 2.4,
                    "inside": True,
                    "blis_error_pct": -6.0,
                    "blackbox_error_pct": 11.0,
                    "nnls_error_pct": -3.5,
                }
            )
    folds = [
        {
            "split": s,
            "fold": f,
            "held_out": "",
            "n_train_steps": 900,
            "gate": "pass",
            "sampling_s": 1.0,
            "wall_s": 2.0,
        }
        for s, f in (("temporal", "temporal"), ("model", "model=llama-2-7b"))
    ]
    return V.ValidationResult(
        steps=pd.DataFrame(steps, columns=list(V.STEP_COLUMNS)),
        e2e=pd.DataFrame(e2e, columns=list(V.E2E_COLUMNS)),
        folds=folds,
        settings={
            "hierarchy": "per-model",
            "sampler": {"chains": 2, "warmup": 300, "draws": 300},
            "draws": 400,
            "prob": 0.9,
            "seed": 0,
            "max_train_steps": 30000,
            "splits": ["temporal", "model"],
        },
    )


README = (
    "# calib\n\nIntro.\n\n## Validation and benchmarks\n\nText.\n\n"
    "## Testing\n\n```bash\npytest\n```\n"
)


def test_results_section_from_validate_outputs(tmp_path):
    from calib.errors import CalibError

    res = _fixture_result()
    rep = tmp_path / "reports" / "validate"
    V.write_reports(res, rep, data_hash="ab" * 32, command=["validate.py", "--split", "all"])
    readme = tmp_path / "README.md"
    readme.write_text(README)
    start, end = config.RESULTS_MARKERS
    block = V.write_results_section(rep, readme, generator="python scripts/results_section.py")
    text = readme.read_text()
    # the section is created just before "## Testing"; everything else is untouched
    head, tail = text.split(f"{config.RESULTS_HEADING}\n\n{start}\n")
    assert head == README.split("## Testing")[0]
    assert tail.split(f"{end}\n\n", 1)[1] == README[README.index("## Testing") :]
    assert text.count(start) == 1 and text.count(end) == 1
    # provenance: both commands, the validate run's time and data hash
    assert "`python scripts/results_section.py`" in block
    assert "`python scripts/validate.py --split all`" in block
    created = json.loads((rep / "manifest.json").read_text())["created_utc"]
    assert created in block and "data abababababab" in block
    assert "from `reports/validate/`" in block
    # numbers come from the tables: MAPE calib 4.0 / nnls 7.0, MSPE, step coverage, E2E
    assert (
        "| temporal | temporal | test | 120 | 4.0 | 5.0 | 6.0 | 7.0 | -1.25 | +2.00 | pass "
        "| 88.5 | 2.4 | 6.0 | 11.0 | 3.5 | +2.40 | 1/1 | 9.8 | 2.4 | 2.4 |"
    ) in block
    # per split family: coverage, mean signed error and median half-width (band ±10 %
    # of the observed around a point 2.4 % high: 100·0.1/1.024 = 9.77 %) and basis
    fam = "1/1 (100 %) | +2.40 | 9.8"
    assert f"| temporal | 1 | {fam} | 2.4 | {fam} | {fam} | fitted 1 |" in block
    assert f"| model | 1 | {fam} | 2.4 | {fam} | {fam} | population 1 |" in block
    assert "Partial run" not in block
    # INV-M-6 is judged on the exported predictor (blis, MSPE +2.00 in both parts)
    assert "| model | model=llama-2-7b | test | 120 |" in block
    assert "| +7.50 | +2.00 | pass |" in block
    assert (
        "INV-M-6 (|MSPE| < 5 % on held-out steps) — exported BLIS predictor: PASS, 2/2 "
        "held-out parts within the bound"
    ) in block
    assert (
        "calib posterior predictive mean: 1/2 held-out parts within the bound, worst +7.50 % "
        "(model=llama-2-7b, test)" in block
    )
    # leave-one-model-out: observed, predicted and the population-level band in ms
    assert "| llama-2-7b | exp-a | 2000.0 | 2048.0 | [1800.0, 2200.0] | +2.4 | yes |" in block
    assert "pass in all folds" in block
    res.folds[1]["gate"] = "fail: rhat 1.02"
    V.write_reports(res, rep, data_hash="ab" * 32, command=["validate.py", "--split", "all"])
    block = V.write_results_section(rep, readme, generator="python scripts/results_section.py")
    assert (
        "not passed in 1/2 folds (model=llama-2-7b; reasons in `reports/validate/validation.md`)"
    ) in block
    # a second run replaces only the block
    readme.write_text(text.replace("Intro.", "Intro, edited by the lead."))
    V.write_results_section(rep, readme, generator="python scripts/results_section.py")
    again = readme.read_text()
    assert again.count(start) == 1 and "Intro, edited by the lead." in again
    assert again.count(config.RESULTS_HEADING) == 1
    # broken markers and missing inputs are user errors naming the file
    readme.write_text(README + end + "\n")
    with pytest.raises(CalibError, match="exactly one"):
        V.write_results_section(rep, readme, generator="x")
    assert readme.read_text() == README + end + "\n"
    with pytest.raises(CalibError, match="steps.csv"):
        V.write_results_section(tmp_path / "nope", readme, generator="x")


def test_family_table_and_partial_run_line(tmp_path):
    """Per split family: inside count, mean signed error, median half-width, basis; a
    run that has not finished every planned fold says which are missing."""
    res = _fixture_result()
    extra = res.e2e[res.e2e.split == "temporal"].copy()
    extra["part"] = "val"
    extra["error_pct"] = -1.0
    extra["inside"] = False
    extra["predicted_us"] = extra.observed_us * 0.99
    extra["lower_us"] = extra.observed_us * 0.95
    extra["upper_us"] = extra.observed_us * 0.98
    res.e2e = pd.concat([res.e2e, extra], ignore_index=True)
    fam = V.family_table(res.e2e).set_index("split")
    t = fam.loc["temporal"]
    assert t.e2e_n == 2 and t.e2e_inside == 1 and t.e2e_coverage_pct == 50.0
    assert t.e2e_mean_signed_err_pct == pytest.approx((2.4 - 1.0) / 2)
    hw = np.median([100 * 0.1 / 1.024, 100 * 0.015 / 0.99])
    assert t.e2e_median_half_width_pct == pytest.approx(hw)
    assert t.e2e_max_abs_err_pct == pytest.approx(2.4) and t.e2e_basis == "fitted 2"
    assert fam.loc["model"].e2e_basis == "population 1"
    res.settings["folds_planned"] = ["temporal", "workload=general", "model=llama-2-7b"]
    rep = tmp_path / "rep"
    paths = V.write_reports(res, rep, data_hash="d" * 64, command=["validate.py"])
    line = "**Partial run: 2 of 3 folds done; missing workload=general.**"
    assert line in paths["markdown"].read_text()
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert line in V.write_results_section(rep, readme, generator="x")


def test_results_section_script_exit_codes(tmp_path):
    res = _fixture_result()
    rep = tmp_path / "rep"
    V.write_reports(res, rep, data_hash="c" * 64, command=["validate.py"])
    readme = tmp_path / "README.md"
    readme.write_text(README)
    script = str(ROOT / "scripts" / "results_section.py")
    r = subprocess.run(
        [sys.executable, script, "--reports", str(rep), "--readme", str(readme)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "--reports" in readme.read_text() and config.RESULTS_MARKERS[0] in readme.read_text()
    r = subprocess.run(
        [sys.executable, script, "--reports", str(tmp_path / "none"), "--readme", str(readme)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------ slow: truth in family
TRUE = {
    "b": {
        "llama-2-7b": [1.5, 1.3, 2.0, 1.2, 1.2, 1.0],
        "mixtral-8x7b": [1.3, 1.6, 1.7, 1.5, 1.3, 1.6],
    },
    "per_layer_us": 6.0,
    "per_request_us": 4.0,
    "per_step_us": 300.0,
    "alpha": 0.3,
    "sigma": 0.06,
    "stall_prob": 0.02,
    "stall_log_mult": 0.7,
    "stall_log_sd": 0.3,
}


class ModelFamilyStepTime:
    """Simulator hook: the model's own body-median step time with its noise (calib.noise)."""

    def __init__(self, truth):
        self.truth = truth

    def __call__(self, batch, arch, hardware, tp, rng):
        from calib import roofline
        from calib.predict import StepFeatures, plugin_step_time_us

        W = batch.mask.shape[1]
        width = 8
        while width < W:
            width *= 2
        pad = [
            np.pad(np.asarray(a), ((0, 0), (0, width - W)))
            for a in (batch.new_tokens, batch.progress, batch.prompt_len, batch.phase, batch.mask)
        ]
        c = roofline.step_components(
            roofline.arch_consts(arch, hardware, tp), *pad, dtype=np.float64, block_rows=0
        )
        feats = StepFeatures(
            np.stack([np.asarray(getattr(c, k)) for k in config.COMPONENTS], axis=1),
            np.asarray(c.num_layers),
            np.asarray(c.batch_size),
            np.asarray(c.num_moe_layers),
        )
        key = "mixtral-8x7b" if arch.num_local_experts else "llama-2-7b"
        t = self.truth
        mu = plugin_step_time_us(
            np.asarray(t["b"][key]),
            t["per_layer_us"],
            t["per_request_us"],
            t["per_step_us"],
            t["alpha"],
            feats,
        )
        return noise.sample(rng, mu, *(t[k] for k in noise.NOISE_PARAMS[:4]))


@pytest.mark.slow
def test_truth_in_family_held_out_e2e_and_coverage(tmp_path):
    from calib.priors import load_priors
    from calib.simulate import TruthParams

    # the simulator's host gaps between steps (lognormal, mean 60 µs) stay in: the replay
    # adds the gap measured from the step timestamps (calib.e2e.measure_host_timing)
    ds = _simulate(
        tmp_path,
        step_time=ModelFamilyStepTime(TRUE),
        stages=((6.0, 30.0),),
        output_len=200,
        workloads=("general", "codegen", "roleplay"),
        truth_params=TruthParams(),
    )
    settings = V.default_settings(chains=2, warmup=300, draws=300)
    res = V.run_validation(
        ds,
        ["temporal", "request-hash"],
        priors=load_priors(),
        settings=settings,
        draws=300,
        progress=False,
    )
    # the per-step constants (weight, per-layer, per-step) form a ridge, so short chains may
    # miss the strict gate; the held-out predictions are what this test judges
    assert all(f["n_train_steps"] > 1000 for f in res.folds), res.folds
    e2e = res.e2e[(res.e2e.metric == "e2e") & np.isfinite(res.e2e.observed_us)]
    print("\n" + V.summary_table(res).to_string())
    print(
        e2e[
            [
                "fold",
                "part",
                "experiment",
                "observed_us",
                "predicted_us",
                "lower_us",
                "upper_us",
                "error_pct",
                "inside",
                "blackbox_error_pct",
                "nnls_error_pct",
            ]
        ].to_string()
    )
    assert len(e2e) >= 12
    assert e2e.error_pct.abs().max() < 3.0, e2e[["fold", "part", "experiment", "error_pct"]]
    # nominal 90 %: at least 2/3 of the experiment intervals contain the observed mean
    assert e2e.inside.mean() >= 2 / 3
    cal = res.steps[res.steps.predictor == "calib"]
    assert cal.coverage_pct.between(83.0, 96.0).all(), cal
    assert (cal.mspe_pct.abs() < 3.0).all()


def test_calib_step_point_is_the_predictive_mean(tiny):
    """The ``calib`` step prediction is the posterior predictive mean (as calib.e2e's
    point): the mean over draws of ``mean_factor·mu``. It was the median of ``mu``, which
    sits below the mean step time by the noise's mean factor and, for a right-skewed
    spread of corrections (an unseen model), by the log-normal's exp(tau²/2) too: sums of
    step times predicted from it were biased low (issue 16)."""
    from calib.predict import StepFeatures, step_time_draws_us
    from calib.validate import _calib_step_predictions, _meta

    meta = _meta(tiny)
    feats = StepFeatures.from_dataset(tiny)
    steps = np.flatnonzero(meta.sampled)[:200]
    rng = np.random.default_rng(0)
    d, E = 400, len(meta.experiments)
    b = np.exp(rng.normal(0.3, 0.4, (d, E, 6)))  # log-normal: mean well above median
    params = {
        "per_layer_us": np.full(d, 5.0),
        "per_request_us": np.full(d, 3.0),
        "per_step_us": np.full(d, 200.0),
        "alpha": np.full(d, 0.5),
    }
    noise_params = (
        np.full((d, E), 0.05),
        np.full((d, E), 0.02),
        np.full((d, E), 0.7),
        np.full((d, E), 0.3),
    )
    point, inside = _calib_step_predictions(params, b, noise_params, feats, steps, meta, 0.9, rng)
    D = step_time_draws_us(
        b,
        params["per_layer_us"],
        params["per_request_us"],
        params["per_step_us"],
        params["alpha"],
        feats.take(steps),
        meta.step_exp[steps],
    )
    # the point is the posterior predictive mean: mean over draws of mean_factor·mu
    factor = noise.mean_factor(0.05, 0.02, 0.7, 0.3)
    np.testing.assert_allclose(point, factor * D.mean(axis=0), rtol=1e-12)
    assert np.all(point > 1.02 * np.median(D, axis=0)) and inside.dtype == bool
