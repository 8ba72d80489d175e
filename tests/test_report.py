"""Report: figures and summary written, readable, non-trivial; CLI."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.posteriors import make_replay_dataset, mock_posterior

from calib import config


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from calib.report import make_report

    ds, features, truth = make_replay_dataset(seed=5, steps_per_exp=400, requests_per_exp=30)
    idata = mock_posterior(ds, features, truth)
    out = tmp_path_factory.mktemp("report")
    paths = make_report(idata, out, ds=ds, features=features, draws=100)
    return out, paths


def _image_stats(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    return img.shape, float(np.var(img[..., :3]))


def test_report_writes_all_figures_with_content(report):
    out, paths = report
    for name in ("trace", "rank", "forest", "ppc", "e2e"):
        p = paths[name]
        assert p.exists() and p.stat().st_size > 20_000, name
        shape, var = _image_stats(p)
        assert shape[0] > 300 and shape[1] > 600, name
        assert var > 1e-3, name  # not a blank canvas


def test_report_png_carries_manifest(report):
    from PIL import Image

    _, paths = report
    desc = Image.open(paths["forest"]).text["Description"]
    assert '"kind": "report"' in desc


def test_summary_links_figures_and_carries_manifest(report):
    out, paths = report
    md = paths["summary"].read_text(encoding="utf-8")
    for name in ("trace", "rank", "forest", "ppc", "e2e"):
        assert f"]({paths[name].name})" in md
    assert "## Manifest" in md and '"kind": "report"' in md
    assert "## Teacher-forced E2E check" in md and "PASS" in md
    assert "b[model-0, pf_compute]" in md


def test_report_cli_without_e2e(tmp_path):
    import importlib.util

    from calib.posterior import save_posterior

    ds, features, truth = make_replay_dataset(seed=6, steps_per_exp=300, requests_per_exp=10)
    post = save_posterior(mock_posterior(ds, features, truth, draws=50), tmp_path / "p.nc")
    spec = importlib.util.spec_from_file_location("report_cli", "scripts/report.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(post), "--out", str(tmp_path / "rep"), "--no-e2e"]) == 0
    assert (tmp_path / "rep" / "summary.md").exists()
    assert (tmp_path / "rep" / "ppc_step_durations.png").stat().st_size > 20_000
    assert not (tmp_path / "rep" / "e2e.png").exists()


@pytest.mark.skipif(
    not config.DEFAULT_TRACES.exists() or not (config.POSTERIORS_DIR / "per-model.nc").exists(),
    reason="needs the embedded default dataset and posteriors/per-model.nc "
    "(make it with: python scripts/fit.py --hierarchy per-model)",
)
def test_report_on_default_data(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("report_cli", "scripts/report.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "default"
    assert (
        cli.main([str(config.POSTERIORS_DIR / "per-model.nc"), "--out", str(out), "--draws", "200"])
        == 0
    )
    for name in (
        "trace.png",
        "rank.png",
        "forest.png",
        "ppc_step_durations.png",
        "e2e.png",
        "summary.md",
    ):
        assert (out / name).stat().st_size > 2_000
    shape, var = _image_stats(out / "e2e.png")
    assert var > 1e-3
