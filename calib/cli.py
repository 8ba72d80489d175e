"""Shared pieces of the command-line doors in ``scripts/`` (argparse only; no JAX).

The contract every script keeps (``tests/test_cli_contract.py``):

* a bad flag or any user error: one line ``error: ...`` on stderr, exit status 2;
* outputs are checked by :func:`check_output` right after the flags are parsed,
  before any data is loaded or JAX imported;
* Ctrl-C (SIGINT) at any point, also inside JAX compilation, sampling or a parallel
  import: one line ``interrupted: ...`` on stderr, exit status 130, unfinished
  temporary files removed (:func:`run_script`).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from calib import config
from calib.errors import CalibError

#: ``--device`` choices of the sampling scripts -> JAX platform names
#: (``numpyro.set_platform`` accepts "cuda", not "gpu").
DEVICES = {"cpu": "cpu", "gpu": "cuda"}
#: ``--traces`` help of the scripts that replay a posterior (:func:`add_posterior_arguments`).
REPLAY_TRACES = "dataset to replay: .nc or a folder of experiment directories"


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


def finite_float(lo: float | None = None, hi: float | None = None) -> Callable[[str], float]:
    """argparse type: a finite number in ``[lo, hi]`` (a missing bound: unbounded)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            lo_s = "-inf" if lo is None else f"{lo:g}"
            hi_s = "inf" if hi is None else f"{hi:g}"
            raise argparse.ArgumentTypeError(f"expected a number in [{lo_s}, {hi_s}], got {v:g}")
        return v

    return parse


def probability(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1), got {v}")
    return v


def add_posterior_arguments(
    p: argparse.ArgumentParser,
    *,
    traces: str | None = None,
    prob: str | None = None,
    csv: bool = False,
) -> None:
    """The positional ``posterior`` and, where asked, the flags that go with it:
    ``--traces`` (``traces``: what the data are for), ``--prob`` (``prob``: what the
    central probability is of) and ``--csv``."""
    p.add_argument("posterior", help="posterior NetCDF written by scripts/fit.py")
    if traces is not None:
        p.add_argument(
            "--traces",
            default=None,
            help=f"{traces} (default: the data the posterior was fitted on, from its manifest)",
        )
    if prob is not None:
        p.add_argument(
            "--prob",
            type=probability,
            default=config.INTERVAL_PROB,
            help=f"{prob} probability (default %(default)s)",
        )
    if csv:
        p.add_argument("--csv", default=None, help="also write the table as CSV (with manifest)")


def add_replay_draws_arguments(p: argparse.ArgumentParser, *, draws: str) -> None:
    """``--draws`` (``draws``: what the posterior draws are for) and ``--seed`` of the
    E2E replay."""
    p.add_argument(
        "--draws",
        type=positive_int,
        default=config.E2E_DRAWS,
        help=f"{draws} (default %(default)s)",
    )
    p.add_argument(
        "--seed", type=nonneg_int, default=config.E2E_SEED, help="seed (default %(default)s)"
    )


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
        flags = re.sub(
            r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
        ).strip()
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={chains}".strip()
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
            raise CalibError(
                f"JAX finds no {DEVICES[device]} device here ({detail})",
                field="--device",
                fix="use --device cpu, or install JAX with CUDA support "
                "(pip install 'jax[cuda13]')",
            ) from None


# ------------------------------------------------------------------ output checks
#: Outputs named to :func:`check_output` in this process (looked at on an interrupt).
_OUTPUTS: list[Path] = []
_START_TIME = time.time()


def check_output(
    path: str | Path | None,
    *,
    flag: str,
    folder: bool = False,
    suffix: str | None = None,
    track: bool = True,
) -> None:
    """Check an output path before any work; raise CalibError (one line) if unusable.

    A file output (``folder=False``) must not be an existing directory; a folder output
    must not be an existing non-directory. Either way the nearest existing ancestor
    must be a directory (no file in the way) that this user may write into (the
    missing folders are created at write time, not here, so a failed run leaves no
    empty folders). ``suffix`` (".nc") is the required file name ending. None: no
    output requested. ``track=False`` (caches): not reported by an interrupt.
    """
    if path is None:
        return
    p = Path(path)
    if track:
        _OUTPUTS.append(p)
    if str(path).strip() == "":
        raise CalibError("empty output path", field=flag)
    if suffix is not None and p.suffix != suffix:
        raise CalibError(
            f"output must be a {suffix} file", path=p, field=flag, fix=f"e.g. {flag} NAME{suffix}"
        )
    if folder:
        if p.exists() and not p.is_dir():
            raise CalibError(
                "exists and is not a directory, but a folder is expected",
                path=p,
                field=flag,
                fix="name a new or existing folder",
            )
    elif p.is_dir():
        raise CalibError(
            "is a directory, but a file is expected",
            path=p,
            field=flag,
            fix=f"name a file, e.g. {p / ('out' + (suffix or ''))}",
        )
    target = p if folder and p.is_dir() else p.parent
    probe = target.absolute()
    while not probe.exists():
        if probe.is_symlink():  # a dangling link in the way
            raise CalibError("is a broken symbolic link", path=probe, field=flag)
        probe = probe.parent
    if not probe.is_dir():
        raise CalibError(
            f"{probe} is a file, so the output folder cannot be created",
            path=p,
            field=flag,
            fix="choose a path whose folders are folders",
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "the output folder" if probe == target.absolute() else "the nearest existing folder"
        raise CalibError(
            f"{what} {probe} is not writable",
            path=p,
            field=flag,
            fix="choose a writable location or fix the folder's permissions",
        )


def check_input(path: str | Path, *, flag: str, fix: str | None = None) -> None:
    """An input file or folder must exist and be readable (one-line CalibError)."""
    p = Path(path)
    if not p.exists():
        raise CalibError("not found", path=p, field=flag, fix=fix)
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        raise CalibError(
            "not readable (permission denied)",
            path=p,
            field=flag,
            fix="fix its permissions or copy it somewhere readable",
        )


# ------------------------------------------------------------------ interrupts
_MAIN_PID: int | None = None
_EXIT_LOCK = threading.Lock()


def _interrupted() -> None:
    """Exit 130 at once: remove unfinished temporary files, stop workers, one line."""
    if os.getpid() != _MAIN_PID:  # a forked worker that kept the handler: exit quietly
        os._exit(130)
    _EXIT_LOCK.acquire()
    from calib import io

    io.remove_pending_temps()
    try:
        import multiprocessing as mp

        children = mp.active_children()
        for c in children:
            c.terminate()  # calib's workers remove their own temporary files on SIGTERM
        for c in children:
            c.join(timeout=2.0)
    except Exception:  # noqa: BLE001 - exiting anyway; never a traceback on Ctrl-C
        pass
    io.remove_pending_temps()
    written = list(dict.fromkeys([*io.WRITTEN, *_new_files(_OUTPUTS)]))
    if not written:
        msg = "interrupted: nothing written"
    else:
        msg = (
            f"interrupted: {len(written)} file(s) already complete (last {written[-1]}); "
            "the rest not written"
        )
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001
        pass
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None and getattr(tqdm.tqdm, "_instances", None):
        msg = "\n" + msg  # a progress bar holds the current line
    os.write(2, (msg + "\n").encode())
    os._exit(130)


def _new_files(outputs: list[Path], limit: int = 10_000) -> list[Path]:
    """Files under the named outputs modified since this process started (workers' too)."""
    found: list[Path] = []
    seen = 0
    for out in outputs:
        try:
            paths = [out] if out.is_file() else (out.rglob("*") if out.is_dir() else [])
            for f in paths:
                seen += 1
                if seen > limit:
                    return found
                if f.is_file() and not f.name.endswith(".tmp") and f.stat().st_mtime >= _START_TIME:
                    found.append(f)
        except OSError:
            continue
    return found


def _on_sigint(signum, frame) -> None:
    _interrupted()


def _watch_wakeup(fd: int) -> None:
    # Python runs signal handlers only when the main thread returns to the interpreter,
    # which JAX compilation or a pmap-ed sampler may not do for minutes. The C-level
    # handler writes the signal number to the wakeup fd at once; this thread exits.
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:
            return
        if signal.SIGINT in data:
            _interrupted()


def install_interrupt_handler() -> None:
    """Make Ctrl-C end the process with one line and exit 130, at any point."""
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    import multiprocessing  # noqa: F401 - imported now: the handler must not import

    from calib import io  # noqa: F401

    # multiprocessing's resource tracker (a helper process of spawn/forkserver workers)
    # frees the semaphores of workers stopped on an interrupt and would warn about them.
    filt = "ignore::UserWarning:multiprocessing.resource_tracker"
    if filt not in os.environ.get("PYTHONWARNINGS", ""):
        os.environ["PYTHONWARNINGS"] = ",".join(
            x for x in (os.environ.get("PYTHONWARNINGS"), filt) if x
        )
    signal.signal(signal.SIGINT, _on_sigint)
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    threading.Thread(target=_watch_wakeup, args=(r,), daemon=True, name="calib-interrupt").start()


def run_script(main: Callable[[], int]) -> int:
    """Run a script's ``main`` under the CLI contract; returns the exit status.

    Installs the interrupt handler, turns a CalibError that escaped ``main`` into the
    one ``error:`` line (exit 2) and a KeyboardInterrupt (raised by code that replaced
    the handler) into the interrupt line (exit 130).
    """
    install_interrupt_handler()
    try:
        return main()
    except CalibError as err:
        return user_error(err)
    except KeyboardInterrupt:
        _interrupted()
        return 130


# ------------------------------------------------------------------ data provenance
def posterior_manifest_of(path: str | Path) -> dict:
    """The manifest of a posterior file, read from its root attributes (no ArviZ, no JAX).

    Raises CalibError when the file is missing, unreadable or has no JSON manifest.
    """
    import json

    p = Path(path)
    check_input(p, flag="posterior", fix="run scripts/fit.py to create it")
    if not p.is_file():
        raise CalibError("is not a file", path=p, fix="pass a posterior written by scripts/fit.py")
    try:
        import netCDF4

        with netCDF4.Dataset(str(p), "r") as f:
            text = f.getncattr("manifest") if "manifest" in f.ncattrs() else None
    except OSError as err:
        raise CalibError(
            f"cannot read as a NetCDF posterior ({err})",
            path=p,
            fix="pass a file written by scripts/fit.py",
        ) from None
    try:
        m = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        m = None
    if not isinstance(m, dict):
        raise CalibError(
            "manifest attribute missing or not JSON",
            path=p,
            field="manifest",
            fix="re-fit with scripts/fit.py",
        )
    return m


class DataChoice:
    """Which dataset a product command (check_e2e, report, ...) reads, and why.

    ``--traces`` given: that dataset (``named``). Otherwise the dataset the posterior
    records in its manifest (``data_path``); a posterior without one (written before
    calib recorded it) falls back to the embedded default, which must then be the data
    it was fitted on. :meth:`verify` compares the loaded dataset's content hash with
    the posterior's ``data_hash``; :attr:`new_experiments` then says at which basis a
    replay predicts the experiments.
    """

    def __init__(self, posterior: str | Path, traces: str | Path | None, *, flag: str = "--traces"):
        from calib import config

        m = posterior_manifest_of(posterior)
        self.posterior = Path(posterior)
        self.flag = flag
        self.fitted_hash: str | None = m.get("data_hash")
        self.fitted_path: str | None = m.get("data_path")
        self.named = traces is not None
        self._other_data: bool | None = None  # set by verify()
        if traces is not None:
            self.path = Path(traces)
        elif self.fitted_path:
            self.path = Path(self.fitted_path)
            if not self.path.exists():
                raise CalibError(
                    f"the posterior was fitted on {self.fitted_path}, which no longer exists",
                    path=self.posterior,
                    field="data_path",
                    fix=f"pass {flag} <the same data>",
                )
        else:
            self.path = config.DEFAULT_TRACES
        if not self.path.exists():
            raise CalibError(
                "dataset not found",
                path=self.path,
                field=flag,
                fix="pass a dataset (.nc) or a folder of experiment directories",
            )
        check_input(self.path, flag=flag)

    def verify(self, ds, *, need_same: bool = False) -> str | None:
        """Raise CalibError when ``ds`` may not be used; else a note for the user or None.

        Data the user did not name must be the data the posterior was fitted on (same
        ``data_hash``). Named data that differs is refused when ``need_same``, else
        accepted with a note (an out-of-sample check).
        """
        from calib.traces import dataset_hash

        h = dataset_hash(ds)
        fitted = self.fitted_hash
        self._other_data = fitted is not None and h != fitted
        if fitted is None or h == fitted:
            return None
        if not self.named:
            where = (
                "the data the posterior records"
                if self.fitted_path
                else "the embedded default data (the posterior records no data path)"
            )
            raise CalibError(
                f"{self.path} is {where} but its content hash {h[:12]} differs "
                f"from the posterior's data_hash {fitted[:12]}",
                path=self.posterior,
                field="data_hash",
                fix=f"pass {self.flag} <the data it was fitted on>, or re-fit",
            )
        if need_same:
            raise CalibError(
                f"not the data the posterior was fitted on (content hash "
                f"{h[:12]}, posterior data_hash {fitted[:12]})",
                path=self.path,
                field=self.flag,
                fix="pass the fitted data, or re-fit on this data",
            )
        return (
            f"note: {self.path} is not the data the posterior was fitted on "
            f"(data_hash differs): an out-of-sample check; every experiment is "
            f"predicted as a new workload"
        )

    @property
    def new_experiments(self) -> bool:
        """Whether a replay of the verified data predicts every experiment as a new workload.

        The one rule for data other than the fit's: no experiment's own structural
        discrepancy (or workload effect) was learned from them, whatever its name, so
        every experiment is predicted at the ``new-experiment`` basis (a new
        experiment's ``N(mu, tau)``; ``calib.e2e.replay(new_experiments=True)``).
        The fitted data keep the fitted basis. Not a rule of the replay itself:
        validate's temporal and request-hash folds replay other data on purpose, at
        the fitted basis. Call :meth:`verify` first.
        """
        if self._other_data is None:
            raise RuntimeError("DataChoice.verify(ds) must run before new_experiments")
        return self._other_data
