"""BLIS export: strict loading rules on every file, YAML round trip, contents, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from blis_rules import BlisRuleError, load_defaults_text, load_export_block
from fixtures.posteriors import make_replay_dataset, mock_posterior

from calib.export import BLIS_BLOCK, export_posterior
from calib.predict import (
    BLIS_BETA_NAMES,
    blis_step_time_us,
    params_from_betas,
)

ALPHAS = [15563.2, 777.3, 45.9]


def config_default_ready() -> bool:
    from calib import config

    return config.DEFAULT_TRACES.exists() and (config.POSTERIORS_DIR / "per-model.nc").exists()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ds, features, truth = make_replay_dataset(seed=1, steps_per_exp=300, requests_per_exp=20)
    idata = mock_posterior(ds, features, truth)
    out = tmp_path_factory.mktemp("export")
    res = export_posterior(idata, out, alpha_coeffs=ALPHAS)
    return ds, features, truth, idata, out, res


def test_every_export_file_passes_blis_loading_rules(setup):
    *_, out, res = setup
    names = sorted(p.name for p in res.paths)
    assert names == sorted(
        f"{m}{suffix}"
        for m in ("model-0", "model-1", "population")
        for suffix in (".yaml", ".defaults.yaml")
    )
    for p in res.paths:
        text = p.read_text(encoding="utf-8")
        alphas, betas = (
            load_defaults_text(text)
            if p.name.endswith(".defaults.yaml")
            else load_export_block(text)
        )
        assert alphas == ALPHAS
        assert len(betas) == len(BLIS_BETA_NAMES) == 10
        assert all(math.isfinite(b) and b >= 0 for b in betas)


def test_defaults_file_has_only_the_blis_block_and_manifest_comments(setup):
    *_, out, _ = setup
    text = (out / "model-0.defaults.yaml").read_text(encoding="utf-8")
    assert list(yaml.safe_load(text)) == [BLIS_BLOCK]
    assert "# source posterior:" in text and "# diagnostics: pass (mock sampler)" in text


@pytest.mark.parametrize(
    "bad, match",
    [
        (
            "trained_physics_coefficients:\n"
            "  alpha_coeffs: [1, 2, 3]\n  beta_coeffs: [1, 2, 3, 4, 5, 6]\n",
            "at least 7",
        ),
        (
            "trained_physics_coefficients:\n"
            "  alpha_coeffs: [1, 2]\n  beta_coeffs: [1, 2, 3, 4, 5, 6, 7]\n",
            "exactly 3",
        ),
        (
            "trained_physics_coefficients:\n"
            "  alpha_coeffs: [1, 2, -3]\n  beta_coeffs: [1, 2, 3, 4, 5, 6, 7]\n",
            "non-negative",
        ),
        (
            "trained_physics_coefficients:\n"
            "  alpha_coeffs: [1, 2, .nan]\n  beta_coeffs: [1, 2, 3, 4, 5, 6, 7]\n",
            "NaN",
        ),
        (
            "trained_physics_coefficients:\n"
            "  alpha_coeffs: [1, 2, 3]\n  beta_coeffs: [1, 2, 3, .inf, 5, 6, 7]\n",
            "Inf",
        ),
        (
            "trained_physics_coefficients:\n"
            "  alpha_coeffs: [1, 2, 3]\n  beta_coeffs: [1, 2, 3, 4, 5, 6, 7]\n"
            "manifest: {a: 1}\n",
            "unknown top-level",
        ),
        (
            "trained_physics_coefficients:\n"
            "  alpha_coeffs: [1, 2, 3]\n  beta_coeffs: [1, 2, 3, 4, 5, 6, 7]\n"
            "  note: x\n",
            "unknown key",
        ),
        (
            "trained_physics_coefficients:\n  alpha_coeffs: [1, 2, 3]\n  alpha_coeffs: [1, 2, 3]\n"
            "  beta_coeffs: [1, 2, 3, 4, 5, 6, 7]\n",
            "duplicate",
        ),
        (
            "trained_physics_coefficients:\n"
            "  alpha_coeffs: [1, 2, '3']\n  beta_coeffs: [1, 2, 3, 4, 5, 6, 7]\n",
            "not a number",
        ),
    ],
)
def test_blis_rules_reject_what_blis_rejects(bad, match):
    with pytest.raises(BlisRuleError, match=match):
        load_defaults_text(bad)


def test_blis_rules_accept_blis_shipped_iter29_block():
    text = (
        "version: '1'\ntrained_physics_coefficients:\n"
        "  alpha_coeffs: [15563.199579, 777.3455, 45.907545]\n"
        "  beta_coeffs: [0.152128, 0.0, 1.36252915, 0.752037, 32.09546717, 4.41684444, "
        "126.024825, 481.8613888, 0.0, 1.94710771, 0.752037]\n"
    )
    alphas, betas = load_defaults_text(text)
    assert len(alphas) == 3 and len(betas) == 11


def test_yaml_round_trip_matches_the_mean_prediction_with_alpha_zero(setup):
    """BLIS on the exported YAML reproduces the posterior predictive mean step time with
    alpha = 0: the mean over draws of mean_factor·mu (mu the body median), to 1e-9."""
    from calib import noise
    from calib.posterior import flat_draws
    from calib.predict import step_time_draws_us

    ds, features, truth, idata, out, _ = setup
    p = flat_draws(idata)
    factor = noise.mean_factor(*noise.posterior_params(p, 2))  # (draws, models)
    assert np.all(factor > 1.0)
    d = factor.shape[0]
    for m, model in enumerate(["model-0", "model-1"]):
        _, betas = load_export_block((out / f"{model}.yaml").read_text(encoding="utf-8"))
        mu = step_time_draws_us(
            p["b"][:, m : m + 1],
            p["per_layer_us"],
            p["per_request_us"],
            p["per_step_us"],
            np.zeros(d),
            features,
            np.zeros(len(features), int),
        )
        want = np.mean(factor[:, m, None] * mu, axis=0)
        blis = blis_step_time_us(betas, features)
        np.testing.assert_allclose(blis, want, rtol=1e-9, atol=0)
        back = params_from_betas(betas)
        np.testing.assert_allclose(
            back["b"], np.mean(factor[:, m, None] * p["b"][:, m], axis=0), rtol=1e-12
        )
        # the body-median plug-in is kept for readers, below the mean by ~mean_factor
        doc = yaml.safe_load((out / f"{model}.yaml").read_text(encoding="utf-8"))
        med = doc["uncertainty"]["body_median_plugin_beta_coeffs"]["values"]
        np.testing.assert_allclose(med[:7], betas[:7] / factor[:, m].mean(), rtol=0.01)


def test_export_document_carries_uncertainty_approximation_and_manifest(setup):
    *_, out, res = setup
    doc = yaml.safe_load((out / "model-1.yaml").read_text(encoding="utf-8"))
    assert doc["statistic"].startswith("posterior predictive mean step time")
    unc = doc["uncertainty"]
    assert unc["interval"] == {"kind": "equal-tailed", "probability": 0.9}
    for name in BLIS_BETA_NAMES:
        s = unc["beta_coeffs"][name]
        assert s["lower"] <= s["median"] <= s["upper"]
        assert s["sd"] >= 0
    assert 0.2 < unc["mixing_alpha"]["mean"] < 0.4
    assert unc["noise"]["sigma"]["mean"] > 0 and unc["mean_factor"]["mean"] > 1
    assert unc["noise"]["stall_prob"]["mean"] == pytest.approx(0.02, rel=0.05)
    approx = doc["approximation"]
    assert approx["posterior_mean_alpha"] == pytest.approx(unc["mixing_alpha"]["mean"])
    rel = approx["blis_vs_fitted_step_time_pct"]
    assert rel["by_batch_type"]["decode-only"]["max_pct"] == pytest.approx(0.0, abs=1e-9)
    assert rel["by_batch_type"]["mixed"]["mean_pct"] > 0.1  # BLIS adds alpha·min back
    assert doc["manifest"]["kind"] == "blis-export"
    assert doc["source_posterior"]["diagnostics"] == "pass (mock sampler)"
    assert doc["blis_flags"].startswith("--latency-model trained-physics --alpha-coeffs ")
    flag_betas = [float(x) for x in doc["blis_flags"].split("--beta-coeffs ")[1].split(",")]
    assert flag_betas == doc[BLIS_BLOCK]["beta_coeffs"]
    pop = yaml.safe_load((out / "population.yaml").read_text(encoding="utf-8"))
    assert pop["model"] == "population"
    # population point = predictive mean of a new model's correction, b_pop·exp(tau²/2),
    # times the mean factor averaged over the fitted models (per draw), averaged over draws
    from calib import noise
    from calib.posterior import flat_draws

    p = flat_draws(setup[3])
    f = noise.mean_factor(*noise.posterior_params(p, 2)).mean(axis=1)
    want = np.mean(f * p["b_pop"][:, 0] * np.exp(0.5 * p["tau"][:, 0] ** 2))
    assert res.documents["population"][BLIS_BLOCK]["beta_coeffs"][0] == pytest.approx(
        want, rel=1e-12
    )
    assert "b_pop·exp(tau²/2)" in " ".join(pop["notes"])


def test_export_alphas_come_from_the_posterior_or_are_given(setup, tmp_path):
    from calib import overheads
    from calib.errors import CalibError
    from calib.posterior import API_OVERHEADS_ATTR

    ds, idata, out = setup[0], setup[3], setup[4]
    with pytest.raises(CalibError, match="no API-overhead estimate"):
        export_posterior(idata, tmp_path / "none")
    with pytest.raises(CalibError, match="3 finite non-negative"):
        export_posterior(idata, out, alpha_coeffs=[1.0, -2.0, 3.0])
    est = overheads.estimate(ds, replicates=50)
    idata.attrs[API_OVERHEADS_ATTR] = json.dumps(est)
    try:
        res = export_posterior(idata, tmp_path / "own")
    finally:
        del idata.attrs[API_OVERHEADS_ATTR]
    for name, doc in res.documents.items():
        want = overheads.alphas(est, None if name == "population" else name)["mean"]
        assert doc[BLIS_BLOCK]["alpha_coeffs"] == pytest.approx(want, rel=1e-12)
        unc = doc["uncertainty"]["alpha_coeffs"]["queueing_us"]
        assert unc["lower"] < doc[BLIS_BLOCK]["alpha_coeffs"][0] < unc["upper"]


def test_export_cli(setup, tmp_path, capsys):
    import importlib.util

    from calib.posterior import save_posterior

    idata = setup[3]
    post_path = save_posterior(idata, tmp_path / "mock.nc")
    spec = importlib.util.spec_from_file_location("export_cli", "scripts/export.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    rc = cli.main([str(post_path), "--out", str(tmp_path / "blis"), "--alpha-coeffs", "1,2,3"])
    assert rc == 0
    text = (tmp_path / "blis" / "model-0.defaults.yaml").read_text(encoding="utf-8")
    assert load_defaults_text(text)[0] == [1.0, 2.0, 3.0]
    doc = yaml.safe_load((tmp_path / "blis" / "model-0.yaml").read_text(encoding="utf-8"))
    from calib.io import file_sha256

    assert doc["source_posterior"]["sha256"] == file_sha256(post_path)
    capsys.readouterr()
    rc = cli.main(
        [str(tmp_path / "missing.nc"), "--out", str(tmp_path / "x"), "--alpha-coeffs", "1,2,3"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1


DEFAULT_REASON = (
    "needs the embedded default dataset and posteriors/per-model.nc (make it "
    "with: python scripts/fit.py --hierarchy per-model)"
)


def _export_default(tmp_path, *extra: str) -> list:
    import importlib.util

    from calib import config

    spec = importlib.util.spec_from_file_location("export_cli", "scripts/export.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert (
        cli.main([str(config.POSTERIORS_DIR / "per-model.nc"), "--out", str(tmp_path), *extra]) == 0
    )
    files = sorted(tmp_path.glob("*.yaml"))
    assert len(files) == 10  # 4 models + population, block and defaults file each
    alphas = {}
    for p in files:
        text = p.read_text(encoding="utf-8")
        if p.name.endswith(".defaults.yaml"):
            load_defaults_text(text)
        else:
            alphas[p.stem] = load_export_block(text)[0]
    return alphas


@pytest.mark.skipif(not config_default_ready(), reason=DEFAULT_REASON)
def test_export_default_posterior_with_given_alphas(tmp_path):
    alphas = _export_default(tmp_path, "--alpha-coeffs", ",".join(map(str, ALPHAS)))
    assert set(alphas) == {
        "llama-2-7b",
        "llama-2-70b",
        "codellama-34b",
        "mixtral-8x7b",
        "population",
    }
    assert all(a == ALPHAS for a in alphas.values())


@pytest.mark.skipif(not config_default_ready(), reason=DEFAULT_REASON)
def test_export_default_posterior_with_its_own_alphas(tmp_path):
    """The default export: alphas from the posterior's stored API-overhead estimate."""
    alphas = _export_default(tmp_path)
    for a in alphas.values():
        assert all(math.isfinite(x) and x >= 0 for x in a)
        assert 0 < a[0] < 1e5 and 0 < a[1] < 1e5 and 0 <= a[2] < 1e4
