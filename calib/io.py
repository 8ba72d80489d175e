"""Atomic file writing, content hashes and the provenance manifest.

Every artifact calib writes (NetCDF, YAML, CSV, PNG) goes through
:func:`atomic_path` so a crash or a user error never leaves a partial file, and
carries :func:`manifest` in its attributes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from calib import __version__

#: Libraries whose versions are recorded in every manifest.
TRACKED_LIBRARIES = ("jax", "jaxlib", "numpyro", "arviz", "pymc", "numpy", "xarray",
                     "pandas", "netCDF4", "scipy")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place on success.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the usual permissions (umask).
        umask = os.umask(0)
        os.umask(umask)
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def text_sha256(text: str | bytes) -> str:
    """SHA-256 hex digest of a string (UTF-8) or bytes."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    return hashlib.sha256(text).hexdigest()


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape results."""
    out = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    jax = sys.modules.get("jax")
    if jax is not None:  # float precision shapes results as much as versions do
        out["jax_x64"] = str(bool(jax.config.jax_enable_x64))
    return out


def git_sha(cwd: str | Path | None = None) -> str | None:
    """The checkout's commit (with ``-dirty`` if modified), or None outside git."""
    cwd = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=cwd, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def manifest(*, kind: str, seed: int | None = None, data_hash: str | None = None,
             priors_hash: str | None = None, command: list[str] | None = None,
             diagnostics: str | None = None, **extra) -> dict:
    """Provenance record stored (as JSON) in every artifact calib writes.

    Parameters
    ----------
    kind : what the artifact is ("dataset", "posterior", "blis-export", ...).
    seed, data_hash, priors_hash : inputs that determine the result.
    command : the command line; defaults to ``sys.argv``.
    diagnostics : the diagnostics verdict ("pass", "fail: ...", or None).
    extra : further JSON-serialisable fields (sampler settings, ...).
    """
    return {
        "kind": kind,
        "calib_version": __version__,
        "git_sha": git_sha(),
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seed": seed,
        "data_hash": data_hash,
        "priors_hash": priors_hash,
        "libraries": library_versions(),
        "command": " ".join(command if command is not None else sys.argv),
        "diagnostics": diagnostics,
        **extra,
    }


def manifest_to_attr(m: dict) -> str:
    """Serialise a manifest for NetCDF attrs (which cannot hold dicts or None)."""
    return json.dumps(m, sort_keys=True, default=str)


def manifest_from_attr(text: str) -> dict:
    return json.loads(text)
