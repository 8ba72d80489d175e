"""BLIS's stated loading rules for trained-physics coefficients, as a test helper.

Implemented from BLIS (inference-sim) behaviour:

* the defaults file is decoded strictly (Go yaml.v3 with ``KnownFields(true)``):
  an unknown key at any level is an error; yaml.v3 also rejects duplicate keys.
  Known top-level keys: ``version`` (string), ``trained_physics_coefficients``,
  ``lora``; inside ``trained_physics_coefficients`` only ``alpha_coeffs`` and
  ``beta_coeffs`` (lists of floats);
* ``alpha_coeffs``: exactly 3 values (BLIS indexes α₀..α₂; we require exactly 3);
* ``beta_coeffs``: at least 7 values (BLIS: "BetaCoeffs requires at least 7
  elements"); at most 11 are read (β₁..β₁₀ and β_EP);
* every value finite (no NaN, no Inf) and non-negative;
* values are YAML numbers (a string or a boolean does not decode into float64).

:func:`load_defaults_text` applies the rules to a whole defaults file,
:func:`check_block` to the ``trained_physics_coefficients`` mapping alone
(e.g. inside a calib export YAML, where it sits beside other keys).
"""

from __future__ import annotations

import math

import yaml

TOP_LEVEL_KEYS = ("version", "trained_physics_coefficients", "lora")
BLOCK_KEYS = ("alpha_coeffs", "beta_coeffs")


class BlisRuleError(ValueError):
    """A file or block BLIS would refuse to load."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (as Go's yaml.v3 does)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise BlisRuleError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _numbers(name: str, values) -> list[float]:
    if not isinstance(values, list):
        raise BlisRuleError(f"{name} must be a list of numbers, got {type(values).__name__}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise BlisRuleError(f"{name}[{i}] = {v!r} is not a number")
        f = float(v)
        if math.isnan(f):
            raise BlisRuleError(f"{name}[{i}] is NaN")
        if math.isinf(f):
            raise BlisRuleError(f"{name}[{i}] is Inf")
        if f < 0:
            raise BlisRuleError(f"{name}[{i}] must be non-negative, got {f}")
        out.append(f)
    return out


def check_block(block) -> tuple[list[float], list[float]]:
    """Validate a ``trained_physics_coefficients`` mapping; return (alphas, betas)."""
    if not isinstance(block, dict):
        raise BlisRuleError("trained_physics_coefficients must be a mapping")
    unknown = [k for k in block if k not in BLOCK_KEYS]
    if unknown:
        raise BlisRuleError(f"unknown key(s) in trained_physics_coefficients: {unknown}")
    for k in BLOCK_KEYS:
        if k not in block:
            raise BlisRuleError(f"trained_physics_coefficients lacks {k}")
    alphas = _numbers("alpha_coeffs", block["alpha_coeffs"])
    betas = _numbers("beta_coeffs", block["beta_coeffs"])
    if len(alphas) != 3:
        raise BlisRuleError(f"alpha_coeffs needs exactly 3 values, got {len(alphas)}")
    if len(betas) < 7:
        raise BlisRuleError(f"beta_coeffs needs at least 7 values, got {len(betas)}")
    if len(betas) > 11:
        raise BlisRuleError(f"beta_coeffs has at most 11 values, got {len(betas)}")
    return alphas, betas


def load_defaults_text(text: str) -> tuple[list[float], list[float]]:
    """Load a BLIS defaults file strictly; return (alphas, betas) of its coefficient block."""
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as err:
        raise BlisRuleError(f"not valid YAML: {err}") from None
    if not isinstance(doc, dict):
        raise BlisRuleError("a defaults file must be a YAML mapping")
    unknown = [k for k in doc if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise BlisRuleError(f"unknown top-level key(s): {unknown} (strict parsing)")
    if "version" in doc and not isinstance(doc["version"], str):
        raise BlisRuleError("version must be a string")
    if "trained_physics_coefficients" not in doc:
        raise BlisRuleError("no trained_physics_coefficients block")
    return check_block(doc["trained_physics_coefficients"])


def load_export_block(text: str) -> tuple[list[float], list[float]]:
    """The BLIS block of a calib export YAML (other keys beside it are calib's), checked."""
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # noqa: S506
    except yaml.YAMLError as err:
        raise BlisRuleError(f"not valid YAML: {err}") from None
    if not isinstance(doc, dict) or "trained_physics_coefficients" not in doc:
        raise BlisRuleError("no trained_physics_coefficients block")
    return check_block(doc["trained_physics_coefficients"])
