"""Shared pieces of the command-line doors in ``scripts/`` (argparse only; no JAX).

Every script reports a bad flag the way it reports any user error: one line
``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


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
    (``scripts/fit.py`` does its own, richer set-up: host devices per chain).
    """
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_enable_x64", True)
