"""Reviewable prior files for the step-time model.

A prior file is YAML. Every parameter of the model has one entry with a
``family``, that family's parameters, its ``units`` and a one-line
``rationale``; per-component parameters (``b_pop``, ``tau``, ``tau_exp``) hold
one such entry per component (``calib.config.COMPONENTS``)::

    description: weakly informative, physically motivated   # optional
    b_pop:
      pf_compute: {family: lognormal, median: 1.5, log_sd: 1.0,
                   units: dimensionless, rationale: "..."}
      ...
    tau:        {pf_compute: {family: halfnormal, scale: 0.5, ...}, ...}
    tau_exp:    {...}                     # per-experiment spread (per-experiment hierarchy)
    per_layer_us:   {family: lognormal, median: 10, log_sd: 1.5,
                     units: "µs per layer per step", ...}
    per_request_us: {...}
    per_step_us:    {...}
    alpha:  {family: beta, a: 2, b: 2, ...}
    sigma:  {family: halfnormal, scale: 0.3, ...}
    stall_prob: {family: beta, a: 1.2, b: 14, ...}   # fraction of config.NOISE_MAX_TAIL_PROB
    stall_log_mult: {family: lognormal, ...}; stall_log_sd: {...}
    fast_prob: {...}; fast_log_mult: {...}; fast_log_sd: {...}   # per model (calib.noise)
    blis:   {...}    # optional free-form metadata (e.g. the BLIS coefficients a file is centred on)

:func:`load_priors` validates the file (unknown family or parameter, missing
field, unknown key, family not allowed for a parameter -> :class:`CalibError`
naming the file and key) and returns a frozen :class:`Priors`.
:func:`priors_hash` is the content hash recorded in manifests.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from calib.config import DEFAULT_PRIORS
from calib.errors import CalibError
from calib.vocab import COMPONENTS, SCALAR_PARAMETERS

#: Family -> its parameter names (all required, all positive reals except ``normal.loc``).
FAMILIES: dict[str, tuple[str, ...]] = {
    "lognormal": ("median", "log_sd"),
    "normal": ("loc", "scale"),
    "halfnormal": ("scale",),
    "halfcauchy": ("scale",),
    "exponential": ("rate",),
    "gamma": ("shape", "rate"),
    "beta": ("a", "b"),
}
#: Family -> (distribution class, the same name in NumPyro and PyMC; PyMC's keyword of
#: each argument of :func:`distribution_args`, which NumPyro takes positionally).
DISTRIBUTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lognormal": ("LogNormal", ("mu", "sigma")),
    "normal": ("Normal", ("mu", "sigma")),
    "halfnormal": ("HalfNormal", ("sigma",)),
    "halfcauchy": ("HalfCauchy", ("beta",)),
    "exponential": ("Exponential", ("lam",)),
    "gamma": ("Gamma", ("alpha", "beta")),
    "beta": ("Beta", ("alpha", "beta")),
}
#: Suffix of the constant ``pm.Potential`` that makes PyMC's Beta normaliser exact
#: (:func:`pymc_variable`); constant, so prior predictive sampling may ignore it.
EXACT_BETALN_SUFFIX = "_betaln"
#: Fields every entry carries besides the family parameters.
META_FIELDS = ("family", "units", "rationale")

#: Per-component parameters: one entry per component.
PER_COMPONENT = ("b_pop", "tau", "tau_exp")
#: Scalar parameters.
SCALARS = SCALAR_PARAMETERS

#: Families allowed for each parameter (the model's parameterisation needs them).
ALLOWED: dict[str, tuple[str, ...]] = {
    "b_pop": ("lognormal",),
    "tau": ("halfnormal", "halfcauchy", "exponential", "lognormal", "gamma"),
    "tau_exp": ("halfnormal", "halfcauchy", "exponential", "lognormal", "gamma"),
    "per_layer_us": ("lognormal",),
    "per_request_us": ("lognormal",),
    "per_step_us": ("lognormal",),
    "alpha": ("beta",),
    "sigma": ("halfnormal", "halfcauchy", "exponential", "lognormal", "gamma"),
    # the tail probabilities are Beta fractions of config.NOISE_MAX_TAIL_PROB
    "stall_prob": ("beta",),
    "fast_prob": ("beta",),
    "stall_log_mult": ("lognormal", "gamma"),
    # the multipliers' log sds are Beta fractions of config.NOISE_MAX_TAIL_LOG_SD
    "stall_log_sd": ("beta",),
    "fast_log_mult": ("lognormal", "gamma"),
    "fast_log_sd": ("beta",),
}
#: Optional top-level keys (free-form metadata).
OPTIONAL_KEYS = ("description", "blis")


@dataclass(frozen=True)
class Prior:
    """One prior: a family, its parameters (name, value), units and rationale."""

    family: str
    params: tuple[tuple[str, float], ...]
    units: str
    rationale: str

    def __getitem__(self, name: str) -> float:
        return dict(self.params)[name]

    @property
    def kwargs(self) -> dict[str, float]:
        return dict(self.params)

    def numpyro(self):
        """The prior as a NumPyro distribution (scalar)."""
        return numpyro_distribution((self,))

    def pymc(self, name: str, **kw):
        """The prior as a PyMC random variable (inside a model context)."""
        return pymc_variable(name, (self,), **kw)

    def mean(self) -> float:
        """Prior mean (inf for half-Cauchy)."""
        p = self.kwargs
        f = self.family
        if f == "lognormal":
            return p["median"] * math.exp(p["log_sd"] ** 2 / 2)
        if f == "normal":
            return p["loc"]
        if f == "halfnormal":
            return p["scale"] * math.sqrt(2 / math.pi)
        if f == "halfcauchy":
            return math.inf
        if f == "exponential":
            return 1 / p["rate"]
        if f == "gamma":
            return p["shape"] / p["rate"]
        if f == "beta":
            return p["a"] / (p["a"] + p["b"])
        raise AssertionError(f)


def distribution_args(priors, asarray=None, log=None) -> tuple[str, tuple]:
    """(family, arguments) of one or more priors of one family, in the order of
    :data:`DISTRIBUTIONS` (the family's parameters, ``median`` as its log).

    One prior gives Python floats; several give one array per argument (``asarray``,
    default ``numpy.asarray``; ``log`` default ``numpy.log``) with one entry per prior.

    Raises
    ------
    CalibError
        The priors do not share a family.
    """
    fam = {p.family for p in priors}
    if len(fam) != 1:
        raise CalibError(
            f"priors of one parameter must share a family, got {sorted(fam)}",
            fix="use the same family for every component",
        )
    family = fam.pop()
    if len(priors) == 1:
        cols = {n: v for n, v in priors[0].params}
        log = math.log
    else:
        import numpy as np

        asarray = np.asarray if asarray is None else asarray
        log = np.log if log is None else log
        cols = {n: asarray([p[n] for p in priors]) for n in FAMILIES[family]}
    args = tuple(log(cols[n]) if n == "median" else cols[n] for n in FAMILIES[family])
    return family, args


def numpyro_distribution(priors):
    """One NumPyro distribution of one prior, or with batch shape (len,) of several of
    one family (e.g. the per-component priors of one parameter)."""
    import jax.numpy as jnp
    import numpyro.distributions as dist

    family, args = distribution_args(priors, jnp.asarray, jnp.log)
    return getattr(dist, DISTRIBUTIONS[family][0])(*args)


def pymc_variable(name: str, priors, **kw):
    """One PyMC random variable of one prior (or of one prior per ``dims`` entry)."""
    import numpy as np
    import pymc as pm

    family, args = distribution_args(priors)
    cls, names = DISTRIBUTIONS[family]
    rv = getattr(pm, cls)(name, **dict(zip(names, args, strict=True)), **kw)
    if family == "beta":
        # PyMC's Beta normaliser uses PyTensor's gammaln, off by ~1e-7 from the exact
        # log Beta function (NumPyro's and SciPy's agree to 1e-15): replace that constant
        # by the exact one, so both backends have the same joint density to 1e-9.
        import pytensor.tensor as pt
        from scipy.special import betaln

        a, b = (float(v) for v in args)
        n = int(np.prod(rv.shape.eval())) if rv.ndim else 1
        pm.Potential(
            name + EXACT_BETALN_SUFFIX,
            n * (pt.gammaln(a) + pt.gammaln(b) - pt.gammaln(a + b) - betaln(a, b)),
        )
    return rv


@dataclass(frozen=True)
class Priors:
    """A validated prior file: entries keyed ``"alpha"`` or ``"b_pop.pf_compute"``.

    Attributes
    ----------
    source : str
        Path of the file (or ``"<dict>"``).
    entries : tuple of (key, Prior)
    metadata_json : str
        JSON of the optional free-form keys (``description``, ``blis``).
    """

    source: str
    entries: tuple[tuple[str, Prior], ...]
    metadata_json: str = "{}"

    def __getitem__(self, key: str) -> Prior:
        for k, v in self.entries:
            if k == key:
                return v
        raise KeyError(key)

    def component(self, name: str) -> tuple[Prior, ...]:
        """The per-component priors of ``name`` in ``COMPONENTS`` order."""
        return tuple(self[f"{name}.{c}"] for c in COMPONENTS)

    def lognormal_loc_scale(self, name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(log-median, log-sd) per component of a log-normal per-component prior."""
        ps = self.component(name)
        return (tuple(math.log(p["median"]) for p in ps), tuple(p["log_sd"] for p in ps))

    @property
    def metadata(self) -> dict[str, Any]:
        return json.loads(self.metadata_json)

    @property
    def blis(self) -> dict[str, Any] | None:
        """The optional ``blis`` section (e.g. BLIS alpha/beta coefficients), or None."""
        return self.metadata.get("blis")

    def to_dict(self) -> dict[str, Any]:
        """The canonical nested dict (what :func:`priors_hash` hashes)."""
        out: dict[str, Any] = {}
        for key, p in self.entries:
            entry = {
                "family": p.family,
                **dict(p.params),
                "units": p.units,
                "rationale": p.rationale,
            }
            if "." in key:
                top, comp = key.split(".", 1)
                out.setdefault(top, {})[comp] = entry
            else:
                out[key] = entry
        out.update(self.metadata)
        return out


def _number(value: Any, path: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CalibError(
            f"parameter must be a number, got {value!r}",
            path=path,
            field=key,
            fix="write a plain number",
        )
    v = float(value)
    if not math.isfinite(v):
        raise CalibError(f"parameter must be finite, got {value!r}", path=path, field=key)
    return v


def _parse_entry(raw: Any, path: str, key: str, top: str) -> Prior:
    if not isinstance(raw, Mapping):
        raise CalibError(
            "expected a mapping with family, its parameters, units and rationale",
            path=path,
            field=key,
        )
    for meta in META_FIELDS:
        if meta not in raw:
            raise CalibError(
                f"missing field {meta!r}", path=path, field=key, fix=f"add `{meta}:` to the entry"
            )
    family = raw["family"]
    if family not in FAMILIES:
        raise CalibError(
            f"unknown family {family!r}",
            path=path,
            field=f"{key}.family",
            fix=f"use one of {sorted(FAMILIES)}",
        )
    if family not in ALLOWED[top]:
        raise CalibError(
            f"family {family!r} is not supported for {top}",
            path=path,
            field=f"{key}.family",
            fix=f"use one of {list(ALLOWED[top])}",
        )
    names = FAMILIES[family]
    for extra in raw:
        if extra not in names and extra not in META_FIELDS:
            raise CalibError(
                f"unknown parameter {extra!r} for family {family!r}",
                path=path,
                field=f"{key}.{extra}",
                fix=f"{family} takes {list(names)}",
            )
    params = []
    for n in names:
        if n not in raw:
            raise CalibError(
                f"missing parameter {n!r} of family {family!r}",
                path=path,
                field=key,
                fix=f"{family} takes {list(names)}",
            )
        v = _number(raw[n], path, f"{key}.{n}")
        if n != "loc" and v <= 0:
            raise CalibError(f"parameter {n!r} must be > 0, got {v}", path=path, field=f"{key}.{n}")
        params.append((n, v))
    for meta in ("units", "rationale"):
        if not isinstance(raw[meta], str) or not raw[meta].strip():
            raise CalibError(
                f"{meta!r} must be a non-empty string", path=path, field=f"{key}.{meta}"
            )
    return Prior(family, tuple(params), raw["units"].strip(), raw["rationale"].strip())


def priors_from_dict(raw: Any, source: str = "<dict>") -> Priors:
    """Validate a parsed prior file (see module docstring) into :class:`Priors`."""
    if not isinstance(raw, Mapping):
        raise CalibError("a prior file must be a YAML mapping", path=source)
    known = set(PER_COMPONENT) | set(SCALARS) | set(OPTIONAL_KEYS)
    for key in raw:
        if key not in known:
            raise CalibError(
                f"unknown key {key!r}", path=source, field=str(key), fix=f"keys are {sorted(known)}"
            )
    entries: list[tuple[str, Prior]] = []
    for top in PER_COMPONENT:
        if top not in raw:
            raise CalibError(
                f"missing key {top!r}",
                path=source,
                field=top,
                fix=f"give one entry per component {list(COMPONENTS)}",
            )
        block = raw[top]
        if not isinstance(block, Mapping):
            raise CalibError("expected one entry per component", path=source, field=top)
        for comp in block:
            if comp not in COMPONENTS:
                raise CalibError(
                    f"unknown component {comp!r}",
                    path=source,
                    field=f"{top}.{comp}",
                    fix=f"components are {list(COMPONENTS)}",
                )
        for comp in COMPONENTS:
            if comp not in block:
                raise CalibError(f"missing component {comp!r}", path=source, field=f"{top}.{comp}")
            entries.append(
                (f"{top}.{comp}", _parse_entry(block[comp], source, f"{top}.{comp}", top))
            )
    for top in SCALARS:
        if top not in raw:
            raise CalibError(f"missing key {top!r}", path=source, field=top)
        entries.append((top, _parse_entry(raw[top], source, top, top)))
    meta = {k: raw[k] for k in OPTIONAL_KEYS if k in raw}
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except TypeError as exc:
        raise CalibError(f"metadata is not JSON-serialisable: {exc}", path=source) from None
    return Priors(str(source), tuple(entries), meta_json)


def load_priors(path: str | Path | None = None) -> Priors:
    """Load and validate a prior file (default: ``calib.config.DEFAULT_PRIORS``).

    Raises
    ------
    CalibError
        Missing/unreadable file, bad YAML, unknown key/family/parameter, missing field.
    """
    path = Path(DEFAULT_PRIORS if path is None else path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CalibError(
            f"cannot read prior file: {exc.strerror}",
            path=path,
            fix="pass an existing YAML file to --priors",
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise CalibError(
            f"invalid YAML: {getattr(exc, 'problem', exc)}",
            path=path,
            line=None if line is None else line + 1,
        ) from None
    return priors_from_dict(raw, str(path))


def priors_hash(priors: Priors) -> str:
    """SHA-256 of the canonical JSON of the priors' content (not of the file's bytes)."""
    text = json.dumps(priors.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
