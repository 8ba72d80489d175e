"""Prior files: validation errors name the file and key; bundled files load."""

from __future__ import annotations

import copy

import pytest
import yaml

from calib.config import COMPONENTS, DEFAULT_PRIORS, PROJECT_ROOT
from calib.errors import CalibError
from calib.priors import load_priors, priors_from_dict, priors_hash


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(DEFAULT_PRIORS.read_text(encoding="utf-8"))


def _write(tmp_path, raw):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def test_bundled_files_load_and_hash_differs():
    d = load_priors()
    b = load_priors(PROJECT_ROOT / "priors" / "blis-iter29.yaml")
    assert d["b_pop.weight"].family == "lognormal"
    assert d["alpha"].kwargs == {"a": 2.0, "b": 2.0}
    assert len(d.component("tau")) == len(COMPONENTS)
    assert priors_hash(d) != priors_hash(b)
    assert len(priors_hash(d)) == 64
    assert b.blis["alpha_coeffs_us"] == [15563.199579, 777.3455, 45.907545]
    assert b["b_pop.weight"]["median"] == pytest.approx(1.36252915)
    assert b["per_step_us"]["median"] == pytest.approx(126.024825)
    # zeros in BLIS cannot centre a log-normal: small median, wide spread
    assert b["b_pop.pf_kv"]["median"] == pytest.approx(0.05)
    assert b["b_pop.pf_kv"]["log_sd"] >= 2.0


def test_hash_is_content_not_formatting(tmp_path, raw):
    assert priors_hash(load_priors(_write(tmp_path, raw))) == priors_hash(load_priors())
    changed = copy.deepcopy(raw)
    changed["stall_log_sd"]["a"] = 4.0
    assert priors_hash(priors_from_dict(changed)) != priors_hash(load_priors())


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda r: r["alpha"].__setitem__("family", "weibull"), "alpha.family"),
        (lambda r: r["b_pop"]["tp"].pop("units"), "b_pop.tp"),
        (lambda r: r.__setitem__("gamma_shape", 1), "gamma_shape"),
        (lambda r: r["sigma"].__setitem__("loc", 0.1), "sigma.loc"),
        (lambda r: r["b_pop"].__setitem__("ep", r["b_pop"]["tp"]), "b_pop.ep"),
        (lambda r: r["tau"].pop("weight"), "tau.weight"),
        (lambda r: r.pop("stall_prob"), "stall_prob"),
        (lambda r: r["per_step_us"].__setitem__("median", -3), "per_step_us.median"),
        (lambda r: r["per_step_us"].__setitem__("median", "big"), "per_step_us.median"),
        (lambda r: r["per_step_us"].pop("log_sd"), "per_step_us"),
        (lambda r: r["b_pop"]["weight"].__setitem__("family", "halfnormal"), "b_pop.weight.family"),
        (lambda r: r["alpha"].__setitem__("rationale", ""), "alpha.rationale"),
    ],
)
def test_validation_errors_name_file_and_key(tmp_path, raw, mutate, where):
    bad = copy.deepcopy(raw)
    mutate(bad)
    path = _write(tmp_path, bad)
    with pytest.raises(CalibError) as err:
        load_priors(path)
    msg = str(err.value)
    assert str(path) in msg
    assert where in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(CalibError, match="cannot read"):
        load_priors(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("alpha: [1, 2\n", encoding="utf-8")
    with pytest.raises(CalibError, match="invalid YAML"):
        load_priors(p)
    p.write_text("- 1\n", encoding="utf-8")
    with pytest.raises(CalibError, match="mapping"):
        load_priors(p)


def test_priors_are_frozen_and_hashable():
    d = load_priors()
    with pytest.raises(AttributeError):
        d.source = "x"  # type: ignore[misc]
    assert hash(d) == hash(load_priors())
