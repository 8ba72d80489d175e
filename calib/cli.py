"""Shared pieces of the command-line doors in ``scripts/`` (argparse only; no JAX).

Every script reports a bad flag the way it reports any user error: one line
``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable

#: ``--device`` choices of the sampling scripts -> JAX platform names
#: (``numpyro.set_platform`` accepts "cuda", not "gpu").
DEVICES = {"cpu": "cpu", "gpu": "cuda"}


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line and exit 2."""

    def error(self, message: str):  # argparse prints usage + 2 lines; we print one
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def user_error(err: Exception) -> int:
    """Print a user error as the one line ``error: ...`` on stderr; return exit status 2."""
    print("error: " + " ".join(str(err).split()), file=sys.stderr)
    return 2


def int_at_least(lo: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``lo``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v

    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def probability(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1), got {v}")
    return v


def setup_jax_cpu() -> None:
    """Configure JAX before its first import in a script: CPU platform, float64.

    Library code never changes global JAX state; the doors in ``scripts/`` call this
    (``scripts/fit.py`` and ``scripts/validate.py`` call :func:`setup_jax`).
    """
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_enable_x64", True)


def setup_jax(*, device: str, chain_method: str, chains: int, x64: bool) -> None:
    """Configure JAX before it does any work in a sampling script.

    ``device`` is a key of :data:`DEVICES` ("gpu" is JAX's "cuda" platform). With
    ``chain_method="parallel"`` on the CPU, one XLA host device per chain.
    """
    parallel_cpu = chain_method == "parallel" and device == "cpu"
    if parallel_cpu:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                       os.environ.get("XLA_FLAGS", "")).strip()
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={chains}".strip())
    import numpyro

    numpyro.set_platform(DEVICES[device])
    if parallel_cpu:
        numpyro.set_host_device_count(chains)
    import jax

    jax.config.update("jax_enable_x64", x64)
    if device != "cpu":
        try:
            jax.devices()
        except Exception as err:  # JAX raises RuntimeError or AssertionError here
            from calib.errors import CalibError

            detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CalibError(f"JAX finds no {DEVICES[device]} device here ({detail})",
                             field="--device",
                             fix="use --device cpu, or install JAX with CUDA support "
                                 "(pip install 'jax[cuda13]')") from None
