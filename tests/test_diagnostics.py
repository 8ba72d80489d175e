"""The diagnostics gate on hand-made InferenceData (thresholds from calib.config.GATE)."""

from __future__ import annotations

import json

import arviz as az
import numpy as np
import pytest

from calib import config
from calib.diagnostics import (
    GateResult,
    advice,
    check,
    format_table,
    gate_from_attr,
    gate_to_attr,
    located,
)

MAX_DEPTH = 8


def make_idata(
    seed=0,
    chains=4,
    draws=400,
    *,
    divergent=0,
    energy_walk=False,
    depth=3,
    saturated=0,
    chain_shift=0.0,
    constant=False,
):
    rng = np.random.default_rng(seed)
    b = rng.normal(1.0, 0.1, (chains, draws, 2, 3))
    b[1] += chain_shift
    alpha = rng.uniform(0, 1, (chains, draws))
    post = {"b": b, "alpha": alpha}
    if constant:
        post["fixed"] = np.ones((chains, draws, 2))
    energy = (
        np.cumsum(rng.normal(0, 1, (chains, draws)), axis=1)
        if energy_walk
        else rng.normal(100, 5, (chains, draws))
    )
    div = np.zeros((chains, draws), bool)
    div[0, :divergent] = True
    tree = np.full((chains, draws), depth)
    tree[1, :saturated] = MAX_DEPTH
    stats = {"diverging": div, "energy": energy, "tree_depth": tree}
    return az.from_dict(
        posterior=post,
        sample_stats=stats,
        coords={"model": ["llama-2-7b", "qwen-7b"], "component": ["pf_compute", "pf_kv", "weight"]},
        dims={"b": ["model", "component"]},
    )


def rows(result):
    return {r.name: r for r in result.rows}


def test_good_posterior_passes_with_config_thresholds():
    res = check(make_idata(), MAX_DEPTH)
    assert res.passed, format_table(res)
    assert res.verdict == "pass"
    r = rows(res)
    assert set(r) == {"rhat", "ess_bulk", "ess_tail", "divergences", "ebfmi", "tree_depth"}
    assert r["rhat"].threshold == config.GATE.max_rhat
    assert r["ess_bulk"].threshold == config.GATE.min_ess_bulk_per_chain
    assert r["ess_tail"].threshold == config.GATE.min_ess_tail_per_chain
    assert r["ebfmi"].threshold == config.GATE.min_ebfmi
    assert r["divergences"].threshold == config.GATE.max_divergences
    assert r["tree_depth"].threshold == config.GATE.max_treedepth_fraction
    assert r["rhat"].value < 1.01
    assert 200 < r["ess_bulk"].value < 800  # iid draws: ESS per chain ~ draws
    assert r["ebfmi"].value > 1.0  # iid energies: E-BFMI ~ 2


def test_divergences_fail():
    res = check(make_idata(divergent=3), MAX_DEPTH)
    assert not res.passed
    r = rows(res)["divergences"]
    assert not r.ok and r.value == 3 and r.worst == "chain 0"
    assert res.verdict.startswith("fail: divergences 3")


def test_low_ebfmi_fails():
    res = check(make_idata(energy_walk=True), MAX_DEPTH)
    r = rows(res)["ebfmi"]
    assert not r.ok and r.value < config.GATE.min_ebfmi
    assert not res.passed and "ebfmi" in res.verdict


def test_saturated_tree_depth_fails():
    res = check(make_idata(saturated=40), MAX_DEPTH)
    r = rows(res)["tree_depth"]
    assert not r.ok and r.value == pytest.approx(40 / 1600) and r.worst == "chain 1"
    assert check(make_idata(depth=MAX_DEPTH - 1), MAX_DEPTH).passed


def test_a_few_saturated_draws_pass():
    """Up to 1 % of draws at the maximum depth is an efficiency cost, not a failure."""
    res = check(make_idata(saturated=4), MAX_DEPTH)
    r = rows(res)["tree_depth"]
    assert r.ok and res.passed and r.value == pytest.approx(4 / 1600)
    assert not check(make_idata(saturated=17), MAX_DEPTH).passed  # 17 / 1600 > 1 %


def test_rhat_fails_and_names_worst_parameter():
    res = check(make_idata(chain_shift=0.5), MAX_DEPTH)
    r = rows(res)["rhat"]
    assert not r.ok and r.value > 1.1
    assert r.worst.startswith("b[") and ", " in r.worst  # b[llama-2-7b, pf_compute] style
    assert r.worst.split("[")[1].split(",")[0] in ("llama-2-7b", "qwen-7b")


def test_low_ess_fails():
    res = check(make_idata(draws=60), MAX_DEPTH)  # < 100 draws per chain cannot reach 100
    assert not rows(res)["ess_bulk"].ok and not res.passed


def test_constant_elements_are_skipped():
    res = check(make_idata(constant=True), MAX_DEPTH)
    assert res.passed
    assert "2 constant element(s) skipped" in rows(res)["rhat"].note


def test_missing_stats_fail():
    idata = make_idata()
    del idata.sample_stats["energy"]
    res = check(idata, MAX_DEPTH)
    assert not rows(res)["ebfmi"].ok and "not recorded" in rows(res)["ebfmi"].note


def test_json_round_trip_and_table():
    res = check(make_idata(divergent=1), MAX_DEPTH)
    text = gate_to_attr(res)
    assert isinstance(text, str) and json.loads(text)["verdict"] == res.verdict
    back = gate_from_attr(text)
    assert isinstance(back, GateResult) and back.verdict == res.verdict
    table = format_table(res)
    for name in ("rhat", "ess_bulk", "ess_tail", "divergences", "ebfmi", "tree_depth"):
        assert name in table
    assert table.splitlines()[-1] == f"verdict: {res.verdict}"


def test_located_names_the_parameter_the_flagged_draws_sit_at():
    """Divergent draws at the low tail of one element: that element, with a negative z."""
    idata = make_idata(divergent=0)
    b = idata.posterior["b"].values
    order = np.argsort(b[0, :, 1, 2])[:5]  # the 5 lowest draws of b[qwen-7b, weight], chain 0
    mask = np.zeros(b.shape[:2], bool)
    mask[0, order] = True
    where = located(idata.posterior, mask)
    assert where.startswith("b[qwen-7b, weight] (z -"), where
    assert float(where.split("z ")[1].rstrip(")")) < -1.5
    assert located(idata.posterior, np.zeros_like(mask)) == ""
    assert located(idata.posterior, np.ones_like(mask)) == "most draws"


def test_advice_names_failed_parameters_and_what_to_try():
    assert advice(check(make_idata(), MAX_DEPTH)) == ""
    res = check(make_idata(divergent=3, chain_shift=0.5), MAX_DEPTH)
    r = rows(res)
    assert r["divergences"].where  # located on the three divergent draws
    wrapped = advice(res)
    assert "\n\n" not in wrapped and max(map(len, wrapped.splitlines())) <= 88
    text = " ".join(wrapped.split())
    assert text.startswith("The fit failed its diagnostics gate:")
    assert "3 divergent transition(s), sitting at" in text and "--seed" in text
    assert r["rhat"].worst in text and "--draws 2000" in text
    sat = " ".join(advice(check(make_idata(saturated=40), MAX_DEPTH)).split())
    assert "2.5 % of draws hit the maximum tree depth" in sat and "--warmup 1000" in sat
    # the paragraph comes from the rows alone: same text after a round trip through attrs
    assert advice(gate_from_attr(gate_to_attr(res))) == wrapped
