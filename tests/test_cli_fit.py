"""scripts/fit.py: exit codes, one-line errors, no partial files, a tiny real run."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from fixtures.checks import run_script

from calib import config

SCRIPT = config.PROJECT_ROOT / "scripts" / "fit.py"


def run(*args, cwd=None, timeout=600):
    return run_script(SCRIPT, *args, timeout=timeout, cwd=cwd)


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small canonical dataset: simulated experiment -> OTLP files -> importer -> NetCDF."""
    from calib.simulate import ExperimentSpec, simulate_experiment, write_experiment
    from calib.traces import concat_experiments, import_experiment, save_dataset

    root = tmp_path_factory.mktemp("cli")
    sp = dict(
        num_unique_system_prompts=3,
        num_users_per_system_prompt=5,
        system_prompt_len=100,
        question_len=447,
        output_len=60,
    )
    res = simulate_experiment(
        ExperimentSpec(
            model="meta-llama/Llama-2-7b-hf",
            tp=1,
            workload="general",
            shared_prefix=sp,
            stages=((8.0, 2.0),),
        ),
        seed=3,
        batch_summary_rate=1.0,
    )
    d = write_experiment(res, root / "exps")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = concat_experiments([import_experiment(d)])
    return save_dataset(ds, root / "small.nc")


def test_bad_flag(tmp_path):
    proc = run("--chains", "zero", "--out", tmp_path / "x.nc")
    assert_user_error(proc, "--chains")
    proc = run("--hierarchy", "flat", "--out", tmp_path / "x.nc")
    assert_user_error(proc, "--hierarchy")
    proc = run("--target-accept", "1.5", "--out", tmp_path / "x.nc")
    assert_user_error(proc, "--target-accept")
    assert list(tmp_path.iterdir()) == []


def test_gpu_without_a_gpu_is_a_user_error(tmp_path):
    # --device gpu reaches NumPyro as the "cuda" platform (NumPyro rejects "gpu"); where
    # JAX has no CUDA backend (here JAX_PLATFORMS=cpu) the user gets one line, not a
    # traceback from JAX's backend initialisation.
    proc = run("--device", "gpu", "--prior-only", "--out", tmp_path / "x.nc")
    assert_user_error(proc, "--device", "cuda", "--device cpu")
    assert list(tmp_path.iterdir()) == []


def test_missing_traces(tmp_path):
    proc = run("--traces", tmp_path / "nope.nc", "--out", tmp_path / "x.nc")
    assert_user_error(proc, "nope.nc", "not found")
    assert list(tmp_path.iterdir()) == []


def test_bad_priors_file(tmp_path, dataset):
    bad = tmp_path / "bad.yaml"
    bad.write_text("b_pop: [1, 2\n")
    out = tmp_path / "x.nc"
    proc = run("--traces", dataset, "--priors", bad, "--out", out)
    assert_user_error(proc, "bad.yaml")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("b_pop: {}\n")
    proc = run("--traces", dataset, "--priors", wrong, "--out", out)
    assert_user_error(proc, "wrong.yaml")
    assert not out.exists()


def test_unreadable_dataset(tmp_path):
    junk = tmp_path / "junk.nc"
    junk.write_text("not a dataset")
    proc = run("--traces", junk, "--out", tmp_path / "x.nc")
    assert_user_error(proc, "junk.nc")
    assert not (tmp_path / "x.nc").exists()


@pytest.mark.slow
def test_tiny_real_fit_through_cli(tmp_path, dataset):
    """Real NUTS (2 runs, ~3 min on 2 cores, mostly compilation): 30 draws per chain cannot
    pass the ESS check -> exit 1; the file is written only with --save-on-fail, and its
    verdict says fail."""
    out = tmp_path / "post.nc"
    common = [
        "--traces",
        dataset,
        "--out",
        out,
        "--chains",
        "2",
        "--warmup",
        "30",
        "--draws",
        "30",
        "--max-tree-depth",
        "4",
        "--chain-method",
        "parallel",
        "--no-progress",
        "--seed",
        "3",
    ]
    proc = run(*common)
    assert proc.returncode == 1, proc.stderr
    assert "verdict: fail:" in proc.stdout and "ess_bulk" in proc.stdout
    said = " ".join(proc.stdout.split())  # the advice paragraph, unwrapped
    assert "The fit failed its diagnostics gate:" in said and "What to try:" in said
    assert "--draws 2000" in said  # 30 draws per chain: the ESS advice
    assert not out.exists()
    proc = run(*common, "--save-on-fail", "--log-likelihood")
    assert proc.returncode == 1, proc.stderr
    assert out.is_file() and f"wrote {out}" in proc.stdout
    from calib.posterior import load_posterior

    idata = load_posterior(out)
    m = json.loads(idata.attrs["manifest"])
    assert m["diagnostics"].startswith("fail:")
    assert m["sampler"]["chain_method_run"] == "parallel"  # 2 host devices were set up
    assert m["data_hash"] and len(m["data_hash"]) == 64
    assert m["data_path"] == str(Path(dataset).resolve())  # product commands read it
    assert "log_likelihood" in idata.groups()
    assert list(idata.posterior["model"].values) == ["llama-2-7b"]


def test_prior_only(tmp_path, dataset):
    png = tmp_path / "prior.png"
    proc = run(
        "--traces", dataset, "--prior-only", "--prior-check-out", png, "--hierarchy", "pooled"
    )
    assert proc.returncode == 0, proc.stderr
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "prior" in proc.stdout and "observed" in proc.stdout and "q50_us" in proc.stdout


def test_user_error_is_one_line_exit_2(capsys):
    from calib.cli import user_error
    from calib.errors import CalibError

    err = CalibError("bad value\n  in two lines", field="--x", fix="pass a good one")
    assert user_error(err) == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.splitlines()
    assert lines == ["error: field '--x': bad value in two lines (fix: pass a good one)"]


def test_target_accept_default_follows_the_precision():
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("fit_cli", SCRIPT)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    ns = argparse.Namespace
    assert (
        cli._target_accept(ns(target_accept=None, precision="float64"))
        == config.SAMPLER.target_accept
    )
    assert (
        cli._target_accept(ns(target_accept=None, precision="float32"))
        == config.FLOAT32_TARGET_ACCEPT
        < config.SAMPLER.target_accept
    )
    assert cli._target_accept(ns(target_accept=0.9, precision="float32")) == 0.9
