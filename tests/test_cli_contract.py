"""The command-line contract of every script, tried as a user would (subprocesses).

* a bad flag, a bad output path or bad input: one line ``error: ...``, exit 2, no
  traceback, nothing created -- and for outputs, before any data is loaded;
* Ctrl-C (SIGINT) at any point, also inside JAX compilation/sampling and a parallel
  import: one line ``interrupted: ...``, exit 130, no temporary or partial file;
* product commands use the data the posterior was fitted on unless ``--traces``
  names other data, and refuse data whose content hash has changed;
* permissions (read-only folders, unreadable trace files) as a non-root user: run
  through ``setpriv`` as ``nobody`` when the tests run as root.

Fast: the datasets are tiny; the only sampling is the interrupted one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
from fixtures.trace_builder import good_lines, write_experiment

from calib import config

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = (
    "check_e2e",
    "export",
    "fit",
    "import_traces",
    "report",
    "results_section",
    "simulate",
    "validate",
)
NOBODY = 65534


def _env(home: Path | None = None) -> dict:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "MPLBACKEND": "Agg",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    if home is not None:
        env.update(HOME=str(home), MPLCONFIGDIR=str(home / "mpl"))
    return env


def run(
    script: str, *args, as_user: int | None = None, timeout: float = 300, home: Path | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts" / f"{script}.py"), *map(str, args)]
    if as_user is not None:
        cmd = [
            shutil.which("setpriv"),
            f"--reuid={as_user}",
            f"--regid={as_user}",
            "--clear-groups",
            *cmd,
        ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=_env(home)
    )


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ------------------------------------------------------------------ output paths
@pytest.fixture
def place(tmp_path):
    """A folder with a regular file ``afile``, a folder ``adir`` and a posterior stand-in."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "keep.txt").write_text("k")
    return tmp_path


#: (script, args with {t} = the temporary folder, words the error line must hold)
OUTPUT_CASES = {
    "fit_out_parent_is_file": ("fit", ["--out", "{t}/afile/post.nc"], ["--out", "is a file"]),
    "fit_out_is_dir": ("fit", ["--out", "{t}/adir"], ["--out", "is a directory"]),
    "fit_out_deep_under_file": ("fit", ["--out", "{t}/afile/a/b/post.nc"], ["is a file"]),
    "fit_prior_check_out_is_dir": (
        "fit",
        ["--prior-only", "--prior-check-out", "{t}/adir"],
        ["--prior-check-out", "is a directory"],
    ),
    "validate_out_is_file": ("validate", ["--out", "{t}/afile"], ["--out", "not a directory"]),
    "validate_out_parent_is_file": ("validate", ["--out", "{t}/afile/rep"], ["is a file"]),
    "export_out_is_file": (
        "export",
        ["{t}/p.nc", "--out", "{t}/afile"],
        ["--out", "not a directory"],
    ),
    "export_out_parent_is_file": ("export", ["{t}/p.nc", "--out", "{t}/afile/blis"], ["is a file"]),
    "report_out_is_file": (
        "report",
        ["{t}/p.nc", "--out", "{t}/afile"],
        ["--out", "not a directory"],
    ),
    "check_e2e_csv_is_dir": (
        "check_e2e",
        ["{t}/p.nc", "--csv", "{t}/adir"],
        ["--csv", "is a directory"],
    ),
    "check_e2e_csv_parent_is_file": (
        "check_e2e",
        ["{t}/p.nc", "--csv", "{t}/afile/x.csv"],
        ["--csv", "is a file"],
    ),
    "import_out_is_dir": ("import_traces", ["{t}/adir", "--out", "{t}/adir"], ["--out"]),
    "import_out_not_nc": ("import_traces", ["{t}/adir", "--out", "{t}/x.csv"], ["--out", ".nc"]),
    "import_out_parent_is_file": (
        "import_traces",
        ["{t}/adir", "--out", "{t}/afile/x.nc"],
        ["is a file"],
    ),
    "import_cache_dir_is_file": (
        "import_traces",
        ["{t}/adir", "--out", "{t}/x.nc", "--cache-dir", "{t}/afile"],
        ["--cache-dir", "not a directory"],
    ),
    "simulate_out_is_file": ("simulate", ["--out", "{t}/afile"], ["--out", "not a directory"]),
    "simulate_truth_is_file": (
        "simulate",
        ["--out", "{t}/new", "--truth", "{t}/afile"],
        ["--truth", "not a directory"],
    ),
    "results_readme_is_dir": ("results_section", ["--readme", "{t}/adir"], ["--readme"]),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_bad_output_is_one_line_before_any_work(place, case):
    script, args, needles = OUTPUT_CASES[case]
    (place / "p.nc").write_text("not used: outputs are checked first")
    before = tree(place)
    t0 = time.perf_counter()
    proc = run(script, *[a.format(t=place) for a in args])
    wall = time.perf_counter() - t0
    assert_user_error(proc, *needles)
    assert tree(place) == before  # nothing created, not even an empty folder
    assert wall < 20, wall  # no data loaded, no JAX work (measured: ~1-3 s each)


def test_fit_bad_out_fails_fast_before_jax(place):
    t0 = time.perf_counter()
    proc = run("fit", "--out", place / "afile" / "post.nc")
    wall = time.perf_counter() - t0
    assert_user_error(proc, "--out")
    assert wall < 5.0, wall


# ------------------------------------------------------------------ parser bounds
BOUND_CASES = {
    "fit_warmup_0": ("fit", ["--warmup", "0"], "--warmup"),
    "fit_draws_0": ("fit", ["--draws", "0"], "--draws"),
    "fit_chains_negative": ("fit", ["--chains", "-1"], "--chains"),
    "fit_target_accept_1": ("fit", ["--target-accept", "1"], "--target-accept"),
    "fit_seed_negative": ("fit", ["--seed", "-1"], "--seed"),
    "fit_tree_depth_0": ("fit", ["--max-tree-depth", "0"], "--max-tree-depth"),
    "fit_prior_draws_negative": ("fit", ["--prior-draws", "-2"], "--prior-draws"),
    "validate_warmup_0": ("validate", ["--warmup", "0"], "--warmup"),
    "validate_prob_1": ("validate", ["--prob", "1.0"], "--prob"),
    "validate_pred_draws_0": ("validate", ["--pred-draws", "0"], "--pred-draws"),
    "validate_max_train_negative": ("validate", ["--max-train-steps", "-1"], "--max-train-steps"),
    "export_prob_0": ("export", ["p.nc", "--out", "x", "--prob", "0"], "--prob"),
    "export_alpha_two_numbers": (
        "export",
        ["p.nc", "--out", "x", "--alpha-coeffs", "1,2"],
        "--alpha-coeffs",
    ),
    "report_draws_0": ("report", ["p.nc", "--out", "x", "--draws", "0"], "--draws"),
    "report_seed_negative": ("report", ["p.nc", "--out", "x", "--seed", "-3"], "--seed"),
    "check_e2e_prob_nan": ("check_e2e", ["p.nc", "--prob", "nan"], "--prob"),
    "check_e2e_draws_0": ("check_e2e", ["p.nc", "--draws", "0"], "--draws"),
    "check_e2e_weight_above_1": (
        "check_e2e",
        ["p.nc", "--queued-step-weight", "1.5"],
        "--queued-step-weight",
    ),
    "check_e2e_gap_negative": ("check_e2e", ["p.nc", "--step-gap-us", "-1"], "--step-gap-us"),
    "check_e2e_gap_inf": ("check_e2e", ["p.nc", "--step-gap-us", "inf"], "--step-gap-us"),
    "check_e2e_seed_negative": ("check_e2e", ["p.nc", "--seed", "-1"], "--seed"),
    "import_workers_0": ("import_traces", ["r", "--out", "x.nc", "--workers", "0"], "--workers"),
    "import_missing_out": ("import_traces", ["r"], "--out"),
    "simulate_workers_0": ("simulate", ["--out", "x", "--workers", "0"], "--workers"),
    "simulate_seed_negative": ("simulate", ["--out", "x", "--seed", "-1"], "--seed"),
}


@pytest.mark.parametrize("case", sorted(BOUND_CASES))
def test_numeric_flag_bounds(tmp_path, case):
    script, args, flag = BOUND_CASES[case]
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / f"{script}.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=_env(),
    )
    assert_user_error(proc, flag)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_uses_the_one_line_parser(script, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / f"{script}.py"), "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=_env(),
    )
    assert_user_error(proc)  # the unknown flag or a missing required argument, one line
    text = (REPO / "scripts" / f"{script}.py").read_text(encoding="utf-8")
    assert "sys.path.insert" not in text and "cli.run_script(main)" in text


# ------------------------------------------------------------------ missing inputs
def test_missing_inputs_are_one_line(tmp_path):
    assert_user_error(run("check_e2e", tmp_path / "nope.nc"), "nope.nc", "not found")
    assert_user_error(
        run("export", tmp_path / "nope.nc", "--out", tmp_path / "o"), "nope.nc", "not found"
    )
    assert_user_error(
        run("report", tmp_path / "nope.nc", "--out", tmp_path / "o", "--no-e2e"),
        "nope.nc",
        "not found",
    )
    assert_user_error(
        run("import_traces", tmp_path / "nope", "--out", tmp_path / "x.nc"), "nope", "not found"
    )
    assert_user_error(
        run("simulate", "--out", tmp_path / "o", "--recipe", tmp_path / "r.yaml"),
        "r.yaml",
        "not found",
    )
    assert_user_error(
        run("results_section", "--readme", tmp_path / "README.md"), "README.md", "not found"
    )
    (tmp_path / "junk.nc").write_text("not netcdf")
    assert_user_error(run("check_e2e", tmp_path / "junk.nc"), "junk.nc")
    assert list(tmp_path.iterdir()) == [tmp_path / "junk.nc"]


# ------------------------------------------------------------------ data provenance
@pytest.fixture(scope="module")
def provenance(tmp_path_factory):
    """Two saved datasets and mock-sampler posteriors recording where their data came from."""
    import numpy as np
    from fixtures.posteriors import mock_posterior
    from fixtures.trace_builder import simulate

    from calib.io import manifest
    from calib.posterior import save_posterior
    from calib.predict import StepFeatures
    from calib.roofline import dataset_components
    from calib.traces import dataset_hash, import_experiment, save_dataset

    t = tmp_path_factory.mktemp("prov")
    sets = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in (1, 2):
            d = t / "exps" / f"20260101-00000{seed}-llama-2-7b-tp1-s{seed}"
            simulate(d, n_requests=80, seed=seed, rate_per_s=50.0, summary_rate=0.3)
            ds = import_experiment(d)
            save_dataset(ds, t / f"ds{seed}.nc")
            sets.append(ds)
        ds1, ds2 = sets
        h1 = dataset_hash(ds1)
        assert h1 != dataset_hash(ds2)
        truth = {
            "b": np.array([[1.2, 1.5, 2.0, 1.5, 1.2, 1.0]]),
            "per_layer_us": 5.0,
            "per_request_us": 5.0,
            "per_step_us": 100.0,
            "alpha": 0.2,
            "sigma": np.array([0.05]),
            "stall_prob": 0.02,
            "stall_log_mult": 0.7,
            "stall_log_sd": 0.3,
        }
        features = StepFeatures.from_components(dataset_components(ds1))
        idata = mock_posterior(ds1, features, truth, draws=20)

    def post(name, **fields):
        idata.attrs["manifest"] = manifest(kind="posterior", seed=0, **fields)
        return save_posterior(idata, t / name)

    return {
        "t": t,
        "h1": h1,
        "recorded": post("recorded.nc", data_hash=h1, data_path=str(t / "ds1.nc")),
        "moved": post("moved.nc", data_hash=h1, data_path=str(t / "gone.nc")),
        "changed": post("changed.nc", data_hash=h1, data_path=str(t / "ds2.nc")),
        "unrecorded": post("unrecorded.nc", data_hash=h1),
    }


def test_check_e2e_uses_the_posteriors_data_by_default(provenance):
    p = provenance
    proc = run("check_e2e", p["recorded"], "--draws", "20", "--no-baselines")
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "note:" not in proc.stderr
    assert len([ln for ln in proc.stdout.splitlines() if ln.startswith("2026")]) == 3


def test_product_commands_refuse_data_that_is_not_the_fitted_data(provenance):
    p = provenance
    assert_user_error(run("check_e2e", p["moved"]), "gone.nc", "no longer exists", "--traces")
    assert_user_error(
        run("check_e2e", p["changed"], "--draws", "20"), "ds2.nc", "differs", "--traces"
    )
    # no recorded path: the embedded default is not what it was fitted on -> refused
    assert_user_error(
        run("report", p["unrecorded"], "--out", p["t"] / "rep", "--draws", "20"),
        "embedded default",
        "differs",
    )
    assert not (p["t"] / "rep").exists()


def test_named_other_data_is_an_out_of_sample_check_with_a_note(provenance):
    p = provenance
    proc = run(
        "check_e2e", p["recorded"], "--traces", p["t"] / "ds2.nc", "--draws", "20", "--no-baselines"
    )
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    assert "note:" in proc.stderr and "out-of-sample" in proc.stderr
    # nothing was learned from this data: no experiment keeps the "fitted" basis
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith("2026")]
    assert rows and {r[1] for r in rows} == {"new-experiment"}, proc.stdout[-2000:]


def test_report_on_other_data_predicts_new_experiments(provenance):
    # the same rule as check_e2e (cli.DataChoice.new_experiments): the report's E2E
    # figure and table predict other data as new workloads, never at the fitted basis
    p = provenance
    out = p["t"] / "rep-other"
    proc = run(
        "report", p["recorded"], "--traces", p["t"] / "ds2.nc", "--out", out, "--draws", "20"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "out-of-sample" in proc.stderr and "new workload" in proc.stderr
    md = (out / "summary.md").read_text(encoding="utf-8")
    rows = [ln.split(" | ") for ln in md.splitlines() if ln.startswith("| e2e |")]
    assert rows and {r[2] for r in rows} == {"new-experiment"}, md[-3000:]
    assert "new-experiment prediction for llama-2-7b" in md


# ------------------------------------------------------------------ Ctrl-C
def _interrupt(
    cmd_script: str, args: list, *, after: float, cwd: Path, wait_for: Path | None = None
) -> tuple[int, str, float]:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / f"{cmd_script}.py"), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=_env(),
    )
    t_end = time.time() + after
    while time.time() < t_end and proc.poll() is None:
        if wait_for is not None and wait_for.exists():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "finished before the interrupt: " + proc.stderr.read()[-2000:]
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err, time.perf_counter() - t0


def _assert_interrupted(rc: int, err: str, took: float, *, nothing: bool = True) -> None:
    assert rc == 130, (rc, err[-3000:])
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    if nothing:
        assert last == "interrupted: nothing written", err[-2000:]
    else:
        assert last.startswith("interrupted: "), err[-2000:]
    assert took < 10.0, took  # promptly, even inside a long XLA call


def test_ctrl_c_during_jax_compilation_or_sampling(provenance, tmp_path):
    """fit.py on a small dataset, interrupted 10 s in (JAX compiling or sampling)."""
    out = tmp_path / "post" / "x.nc"
    rc, err, took = _interrupt(
        "fit",
        [
            "--traces",
            provenance["t"] / "ds1.nc",
            "--out",
            out,
            "--no-progress",
            "--chains",
            "2",
            "--warmup",
            "2000",
            "--draws",
            "2000",
            "--chain-method",
            "parallel",
        ],
        after=10.0,
        cwd=tmp_path,
    )
    _assert_interrupted(rc, err, took)
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))


def test_ctrl_c_during_parallel_import(tmp_path):
    """import_traces of linked experiment directories with 2 workers, interrupted."""
    root = tmp_path / "root"
    root.mkdir()
    for d in sorted(config.DEFAULT_TRACES.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            (root / d.name).symlink_to(d, target_is_directory=True)
    out = tmp_path / "out" / "ds.nc"
    rc, err, took = _interrupt(
        "import_traces",
        [root, "--out", out, "--workers", "2", "--quiet", "--cache-dir", tmp_path / "cache"],
        after=4.0,
        cwd=tmp_path,
    )
    _assert_interrupted(rc, err, took)
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))
    time.sleep(0.5)  # the workers were stopped: nothing appears afterwards either
    assert not list(tmp_path.rglob("*.tmp"))


def test_ctrl_c_during_simulation_says_what_was_written(tmp_path):
    import yaml

    recipe = yaml.safe_load(config.DEFAULT_RECIPE.read_text(encoding="utf-8"))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    out = tmp_path / "raw"
    rc, err, took = _interrupt(
        "simulate",
        ["--recipe", tmp_path / "recipe.yaml", "--out", out, "--workers", "2"],
        after=6.0,
        cwd=tmp_path,
    )
    _assert_interrupted(rc, err, took, nothing=False)
    last = err.strip().splitlines()[-1]
    files = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert ("nothing written" in last) == (not files), (last, files[:3])
    assert not [p for p in files if p.name.endswith(".tmp")]


def test_ctrl_c_while_loading(provenance, tmp_path):
    """check_e2e interrupted early (importing JAX, loading the posterior and dataset)."""
    csv = tmp_path / "e2e.csv"
    rc, err, took = _interrupt(
        "check_e2e", [provenance["recorded"], "--csv", csv], after=1.5, cwd=tmp_path
    )
    _assert_interrupted(rc, err, took)
    assert not csv.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ as a non-root user
def _nobody_reason() -> str | None:
    if os.geteuid() != 0:
        return None  # already unprivileged: permission cases run directly
    if shutil.which("setpriv") is None:
        return "running as root and setpriv is not installed (cannot drop to nobody)"
    probe = subprocess.run(
        [
            shutil.which("setpriv"),
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-c",
            "import calib.cli, calib.traces",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd="/",
        timeout=120,
    )
    if probe.returncode != 0:
        return (
            "user nobody cannot import calib from this checkout "
            f"({(probe.stderr.strip().splitlines() or ['?'])[-1]})"
        )
    return None


@pytest.fixture(scope="module")
def unprivileged():
    reason = _nobody_reason()
    if reason:
        pytest.skip(reason)
    as_user = NOBODY if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="calib-perm-"))
    base.chmod(0o777)
    home = base / "home"
    home.mkdir()
    if as_user is not None:
        os.chown(home, NOBODY, NOBODY)
    yield base, as_user, home
    for p in [base, *base.rglob("*")]:
        try:
            p.chmod(0o777 if p.is_dir() else 0o666)
        except OSError:
            pass
    shutil.rmtree(base, ignore_errors=True)


def _mine(path: Path, as_user: int | None) -> Path:
    if as_user is not None:
        for p in [path, *path.rglob("*")]:
            os.chown(p, as_user, as_user)
    return path


def test_unreadable_trace_file_is_one_line(unprivileged):
    base, as_user, home = unprivileged
    d = write_experiment(base / "unreadable" / "exp", good_lines())
    (d / "traces.json").chmod(0o000)
    proc = run(
        "import_traces",
        d,
        "--out",
        base / "x1.nc",
        "--no-cache",
        "--quiet",
        as_user=as_user,
        home=home,
    )
    assert_user_error(proc, "traces.json")
    assert not (base / "x1.nc").exists()


def test_unreadable_exp_config_and_folder_are_one_line(unprivileged):
    base, as_user, home = unprivileged
    d = write_experiment(base / "cfg" / "exp", good_lines())
    (d / "exp-config.yaml").chmod(0o000)
    assert_user_error(
        run(
            "import_traces",
            d,
            "--out",
            base / "x2.nc",
            "--no-cache",
            "--quiet",
            as_user=as_user,
            home=home,
        ),
        "exp-config.yaml",
    )
    d2 = write_experiment(base / "closed" / "exp", good_lines())
    d2.chmod(0o000)
    assert_user_error(
        run(
            "import_traces",
            base / "closed",
            "--out",
            base / "x3.nc",
            "--quiet",
            as_user=as_user,
            home=home,
        ),
        "closed",
    )


@pytest.mark.parametrize(
    "script,args",
    [
        ("import_traces", ["{b}/ok", "--out", "{b}/ro/x.nc"]),
        ("fit", ["--out", "{b}/ro/post.nc"]),
        ("validate", ["--out", "{b}/ro/rep"]),
        ("simulate", ["--out", "{b}/ro/raw"]),
        ("export", ["{b}/p.nc", "--out", "{b}/ro"]),
        ("check_e2e", ["{b}/p.nc", "--csv", "{b}/ro/e2e.csv"]),
    ],
)
def test_read_only_output_folder_is_one_line(unprivileged, script, args):
    base, as_user, home = unprivileged
    ro = base / "ro"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    (base / "p.nc").write_text("x")
    if not (base / "ok").exists():
        _mine(write_experiment(base / "ok" / "exp", good_lines()).parent, as_user)
    t0 = time.perf_counter()
    proc = run(script, *[a.format(b=base) for a in args], as_user=as_user, home=home)
    line = assert_user_error(proc, "not writable", str(ro))
    assert time.perf_counter() - t0 < 20, line
    assert list(ro.iterdir()) == []


def test_read_only_trace_folder_imports_without_cache(unprivileged):
    base, as_user, home = unprivileged
    root = base / "ro-traces"
    write_experiment(root / "exp", good_lines())
    for p in [root, *root.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    out = _mine(base / "rw", as_user) if (base / "rw").mkdir() is None else None
    proc = run("import_traces", root, "--out", out / "ds.nc", "--quiet", as_user=as_user, home=home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cannot create or write the import cache" in proc.stderr
    assert (out / "ds.nc").is_file() and not (root / config.IMPORT_CACHE_DIRNAME).exists()
