"""Accelerator specs for the roofline: peak compute and memory bandwidths.

Bundled specs live in ``calib/data/hardware.yaml``; a user YAML file with the
same fields describes any other accelerator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import yaml

from calib.errors import CalibError

_FIELDS = ("peak_tflops_bf16", "hbm_tb_per_s", "nvlink_gb_per_s", "memory_gib")


@dataclass(frozen=True)
class Hardware:
    """One accelerator. Rates are per GPU; the roofline uses them per µs."""

    name: str
    peak_tflops_bf16: float
    hbm_tb_per_s: float
    nvlink_gb_per_s: float
    memory_gib: float
    description: str = ""

    @property
    def flops_per_us(self) -> float:
        """Peak dense BF16 FLOP per µs (P in the roofline formulas)."""
        return self.peak_tflops_bf16 * 1e12 / 1e6

    @property
    def hbm_bytes_per_us(self) -> float:
        """HBM bytes per µs (W in the roofline formulas)."""
        return self.hbm_tb_per_s * 1e12 / 1e6

    @property
    def nvlink_bytes_per_us(self) -> float:
        return self.nvlink_gb_per_s * 1e9 / 1e6

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30

    def to_dict(self) -> dict:
        return asdict(self)


@cache
def _bundled() -> dict[str, dict]:
    text = resources.files("calib").joinpath("data/hardware.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def bundled_hardware() -> tuple[str, ...]:
    return tuple(_bundled())


def _from_mapping(name: str, entry: dict, source: str | Path) -> Hardware:
    vals = {}
    for key in _FIELDS:
        v = entry.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
            raise CalibError(
                f"must be a positive number, got {v!r}",
                path=source,
                field=key,
                fix=f"give {', '.join(_FIELDS)} for the accelerator",
            )
        vals[key] = float(v)
    return Hardware(name=name, description=str(entry.get("description", "")), **vals)


def load_hardware(name_or_path: str | Path) -> Hardware:
    """A bundled accelerator by name (case-insensitive), or one from a YAML file."""
    key = str(name_or_path)
    for name, entry in _bundled().items():
        if name.lower() == key.lower():
            return _from_mapping(name, entry, f"calib/data/hardware.yaml[{name}]")
    path = Path(key)
    if path.suffix in (".yaml", ".yml") and path.exists():
        try:
            entry = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise CalibError(f"not valid YAML ({exc})", path=path) from None
        if not isinstance(entry, dict):
            raise CalibError("hardware file must hold a mapping", path=path)
        return _from_mapping(str(entry.get("name", path.stem)), entry, path)
    raise CalibError(
        f"unknown hardware {key!r}; bundled: {', '.join(bundled_hardware())}",
        field="hardware",
        fix="name a bundled accelerator or give a YAML file path",
    )
