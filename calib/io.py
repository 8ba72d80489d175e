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
from calib.errors import CalibError

#: Libraries whose versions are recorded in every manifest.
TRACKED_LIBRARIES = (
    "jax",
    "jaxlib",
    "numpyro",
    "arviz",
    "pymc",
    "numpy",
    "xarray",
    "pandas",
    "netCDF4",
    "scipy",
)


#: Temporary files of :func:`atomic_path` not yet renamed into place (this process).
#: An interrupt handler (``calib.cli.run_script``) removes them before exiting.
PENDING_TEMPS: set[Path] = set()
#: Outputs :func:`atomic_path` has renamed into place in this process (caches excluded),
#: so an interrupt can say truthfully whether anything was written.
WRITTEN: list[Path] = []


def _os_error(err: OSError, path: Path, what: str) -> CalibError:
    reason = err.strerror or type(err).__name__
    return CalibError(
        f"cannot {what} ({reason})",
        path=path,
        fix="choose a writable location or fix its permissions",
    )


@contextlib.contextmanager
def atomic_path(path: str | Path, *, record: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place on success.

    On any exception the temporary file is removed and ``path`` is untouched. A
    folder or file that cannot be created (permissions, a file where a folder
    should be, a read-only file system) raises :class:`~calib.errors.CalibError`
    naming the path. ``record=False`` (caches) leaves the file out of :data:`WRITTEN`.
    """
    path = Path(path)
    if path.is_dir():
        raise CalibError(
            "is a directory, expected a file path", path=path, fix="name a file inside it"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _os_error(err, path.parent, "create the folder") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _os_error(err, path.parent, "write in the folder") from None
    os.close(fd)
    tmp_path = Path(tmp)
    PENDING_TEMPS.add(tmp_path)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the usual permissions (umask).
        umask = os.umask(0)
        os.umask(umask)
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~umask)
        try:
            os.replace(tmp_path, path)
        except OSError as err:
            raise _os_error(err, path, "write the file") from None
        if record:
            WRITTEN.append(path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    finally:
        PENDING_TEMPS.discard(tmp_path)


def remove_pending_temps() -> None:
    """Delete the temporary files of unfinished :func:`atomic_path` writes (interrupts)."""
    for tmp in list(PENDING_TEMPS):
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        PENDING_TEMPS.discard(tmp)


def worker_signals() -> None:
    """Initializer of calib's worker processes: the parent handles Ctrl-C.

    SIGINT is ignored (the parent stops its workers); SIGTERM removes the worker's
    unfinished temporary files and exits at once.
    """
    import signal

    def _term(signum, frame):
        remove_pending_temps()
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _term)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes (CalibError naming the file if unreadable)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except OSError as err:
        raise CalibError(
            f"cannot read ({err.strerror or type(err).__name__})",
            path=path,
            fix="fix its permissions or copy it somewhere readable",
        ) from None
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
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def manifest(
    *,
    kind: str,
    seed: int | None = None,
    data_hash: str | None = None,
    priors_hash: str | None = None,
    command: list[str] | None = None,
    diagnostics: str | None = None,
    **extra,
) -> dict:
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
