"""What every command-line entry point and config validator shares.

- `to_container`, `check_known`, `check_integer`, `check_device`: a config as a plain dict, and
  checks whose messages name the key, what was given and what is accepted.
- `cli_errors`: expected errors, a full disk, a damaged record (`DamagedFileError`) and Ctrl-C or
  SIGTERM print one line `error: ...` and exit with a status that tells them apart (`EXIT_*`, the
  table in docs/reliability.md); the traceback too with `--debug` or HYDRA_FULL_ERROR=1.
- `config_dir`, `hydra_config_dir`: where the YAML configs are, for a checkout and an installed wheel,
  with a `configs/` folder in the working directory taking precedence.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Exit statuses of every entry point (docs/reliability.md); 1 is Python's own for an unexpected error
# (and prepare_data's "some data is missing").
EXIT_BAD_INPUT = 2  # a bad option, input or config, or a run folder that contradicts this launch
EXIT_DAMAGED = 3  # a file the command reads is damaged or missing: restore it, or start a new folder
EXIT_NO_SPACE = 4  # the disk (or the quota) is full: free space and rerun the same command
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT): rerun the same command to resume
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM), e.g. a scheduler's kill: rerun to resume
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
RESTORE = "restore it from a copy, or start a new run with output_dir=<new folder>"


class DamagedFileError(ValueError):
    """A file a command reads (a run folder's record, a finished output) cannot be parsed or lacks
    what it must hold. The message names the file and how to recover; exit status EXIT_DAMAGED."""

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


def damaged(path: str | os.PathLike, why: Any, remedy: str = RESTORE) -> DamagedFileError:
    """The standard message: `<path> is damaged (<why>); <remedy>`."""
    why = f"{type(why).__name__}: {why}" if isinstance(why, BaseException) else why
    return DamagedFileError(f"{path} is damaged ({one_line(why)}); {remedy}", path)


def disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in NO_SPACE


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread while `cli_errors` runs a command, so that the command
    cleans up (releases its lock, removes temporaries) as it does on Ctrl-C."""


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


def to_container(cfg: Any, error: type[Exception] = ValueError) -> dict[str, Any]:
    """A resolved plain dict from an OmegaConf config (or any mapping); a value left unset (`???`)
    or an interpolation that cannot be resolved raises `error` with a one-line message."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    if not isinstance(cfg, DictConfig):
        return dict(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as err:  # also an interpolation that reaches a missing value
        missing = re.search(r"Missing mandatory value: ([\w.]+)", str(err))
        if missing or isinstance(err, MissingMandatoryValue):
            key = missing.group(1) if missing else err.full_key
            raise error(f"{key} is not set; give it on the command line ({key}=...)") from None
        raise error(f"config value {err.full_key}: {str(err).splitlines()[0]}") from None


def check_known(section: str, got: set[str], known: set[str], error: type[Exception]) -> None:
    """Unknown keys are an error that names them and lists the known ones."""
    extra = sorted(got - known)
    if extra:
        raise error(f"unknown key(s) in {section}: {extra}; known keys: {sorted(known)}")


def check_device(name: Any, error: type[Exception]) -> None:
    """A device name torch accepts and this machine has ('auto' always passes)."""
    if name in (None, "", "auto"):
        return
    import torch

    try:
        device = torch.device(str(name))
    except RuntimeError:
        raise error(f"device must be auto, cpu, cuda, cuda:<i> or mps, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device={name} but torch sees no CUDA device here; use device=auto or device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise error(f"device={name} but only {torch.cuda.device_count()} CUDA device(s) are visible")


def check_integer(key: str, value: Any, minimum: int, error: type[Exception], none: str = "") -> None:
    """An integer (not a bool) >= minimum; None passes when `none` says what it means."""
    if value is None and none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise error(
            f"{key} must be an integer >= {minimum}{f' (or null for {none})' if none else ''}, got {value!r}"
        )


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(--debug given or HYDRA_FULL_ERROR=1, argv without --debug)."""
    rest = [a for a in argv if a != "--debug"]
    return len(rest) < len(argv) or os.environ.get("HYDRA_FULL_ERROR") == "1", rest


def fault(
    err: BaseException, expected: tuple[type[BaseException], ...] = (), status: int = EXIT_BAD_INPUT
) -> tuple[str, int] | None:
    """(the one line to print, the exit status) of an error the user can act on; None for a bug."""
    resume = "rerun the same command to resume: finished outputs are kept"
    if isinstance(err, Terminated):
        return f"terminated (SIGTERM); {resume}", EXIT_TERMINATED
    if isinstance(err, KeyboardInterrupt):
        return f"interrupted; {resume}", EXIT_INTERRUPTED
    if isinstance(err, OSError) and err.errno in NO_SPACE:
        what = "disk quota exceeded" if err.errno == errno.EDQUOT else "no space left on device"
        where = f" writing {err.filename}; free space there" if err.filename else "; free space"
        return (
            f"{what}{where} (or choose a folder on another disk) and rerun the same command: finished "
            "outputs are kept, nothing half-written is left",
            EXIT_NO_SPACE,
        )
    if isinstance(err, DamagedFileError):
        return one_line(err), EXIT_DAMAGED
    if expected and isinstance(err, expected):
        return one_line(err), status
    return None


def cli_errors(
    fn: Callable[[], Any],
    expected: tuple[type[BaseException], ...],
    debug: bool,
    status: int = EXIT_BAD_INPUT,
) -> Any:
    """`cli_run`, then `sys.exit` with the status of a fault; returns what `fn` returned."""
    result, code = cli_run(fn, expected, debug, status)
    if code:
        sys.exit(code)
    return result


def cli_run(
    fn: Callable[[], Any],
    expected: tuple[type[BaseException], ...],
    debug: bool,
    status: int = EXIT_BAD_INPUT,
) -> tuple[Any, int]:
    """Run `fn` with SIGTERM raising `Terminated` -> (its result, 0). An expected error, a full disk,
    a damaged file or an interruption prints `error: <one line>` to stderr (after the traceback when
    `debug`) -> (None, its exit status) (`fault`); any other error propagates with its traceback."""
    previous = _raise_on_sigterm()
    try:
        return fn(), 0
    except BaseException as err:  # noqa: BLE001  (KeyboardInterrupt included; others are re-raised)
        found = fault(err, expected, status)
        if found is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"error: {found[0]}", file=sys.stderr)
        return None, found[1]
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_on_sigterm() -> Any:
    """Install a SIGTERM handler that raises `Terminated`; returns the previous handler (None when
    not in the main thread, where Python allows no handler)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated()

    return signal.signal(signal.SIGTERM, terminate)


def config_dir() -> Path:
    """The project's YAML configs: `elbo_t2ialign/configs` in an installed wheel, the checkout's
    top-level `configs/` otherwise (a source tree or an editable install)."""
    package = Path(__file__).resolve().parent
    packaged = package / "configs"
    return packaged if packaged.is_dir() else package.parent / "configs"


def hydra_config_dir() -> str:
    """`config_dir()` for `hydra.main` / `initialize_config_dir`, with `./configs` of the working
    directory searched first: a user's `configs/model/mine.yaml` adds `model=mine`, and a file of
    the same name as a shipped one (say `configs/segment.yaml`) replaces it."""
    from hydra.core.plugins import Plugins

    Plugins.instance().register(_working_directory_configs())
    return str(config_dir())


@functools.cache
def _working_directory_configs() -> type:
    from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    class WorkingDirectoryConfigs(SearchPathPlugin):
        """Puts `./configs` before the shipped configs (Hydra's search path: the first source that has a
        config name wins)."""

        def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
            user = Path.cwd() / "configs"
            if user.is_dir() and user.resolve() != config_dir().resolve():
                search_path.prepend(
                    "elbo-t2ialign ./configs", f"file://{user}", SearchPathQuery(provider="main")
                )

    return WorkingDirectoryConfigs
