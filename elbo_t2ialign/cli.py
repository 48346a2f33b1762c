"""What every command-line entry point and config validator shares.

- `to_container`, `check_known`, `check_integer`, `check_device`: a config as a plain dict, and
  checks whose messages name the key, what was given and what is accepted.
- `cli_errors`: expected errors, a full disk, a damaged record (`DamagedFileError`) and Ctrl-C or
  SIGTERM print one line `error: ...` and exit with a status that tells them apart (`EXIT_*`, the
  table in docs/reliability.md); the traceback too with `--debug` or HYDRA_FULL_ERROR=1.
- `compose_config`, `override_message`, `check_overrides`: Hydra's composition with its errors as one
  line; a key the config does not have gets the nearest one ("did you mean elbo.strength?").
- `config_dir`, `hydra_config_dir`: where the YAML configs are, for a checkout and an installed wheel,
  with a `configs/` folder in the working directory taking precedence.
"""

from __future__ import annotations

import difflib
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

from elbo_t2ialign.core.errors import RESTORE, DamagedFileError, damaged, one_line  # noqa: F401 (re-exported)

# Exit statuses of every entry point (docs/reliability.md); 1 is Python's own for an unexpected error
# (and prepare_data's "some data is missing").
EXIT_BAD_INPUT = 2  # a bad option, input or config, or a run folder that contradicts this launch
EXIT_DAMAGED = 3  # a file the command reads is damaged or missing: restore it, or start a new folder
EXIT_NO_SPACE = 4  # the disk (or the quota) is full: free space and rerun the same command
EXIT_REFUSED = 5  # the file system refuses: read-only, permission denied, a path through a regular file
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT): rerun the same command to resume
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM), e.g. a scheduler's kill: rerun to resume
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
REFUSED = (errno.EROFS, errno.EACCES, errno.EPERM)  # the file system refuses access (not the data)


def disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in NO_SPACE


def storage_fault(err: BaseException) -> bool:
    """A full disk or a file system that refuses access: the machine's fault, never the file's, so
    never a reason to call a file damaged or to skip an image."""
    return isinstance(err, OSError) and err.errno in NO_SPACE + REFUSED


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread while `cli_errors` runs a command, so that the command
    cleans up (releases its lock, removes temporaries) as it does on Ctrl-C."""


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
    refused = _refused(err)
    if refused:
        return f"{refused} and rerun the same command: finished outputs are kept", EXIT_REFUSED
    if isinstance(err, DamagedFileError):
        return one_line(err), EXIT_DAMAGED
    if expected and isinstance(err, expected):
        return one_line(err), status
    return None


def _refused(err: BaseException) -> str | None:
    """What a file system's refusal says (the first half of the line), None for any other error."""
    if not isinstance(err, OSError) or err.errno not in (*REFUSED, errno.ENOTDIR, errno.EEXIST):
        return None
    path = err.filename or "a file"
    if err.errno == errno.EROFS:
        return (
            f"read-only file system: cannot write {path}; choose a folder on a writable disk (or remount it)"
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {path}; give this user access to it (or choose another folder)"
    if err.errno == errno.ENOTDIR:
        return f"{path}: a part of this path is a regular file, not a folder; choose another folder"
    if isinstance(err, FileExistsError) and err.filename and Path(err.filename).is_file():
        return f"{path} is a regular file, not a folder; choose another folder (or move the file away)"
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


def started_as_command() -> bool:
    """This process is `python -m elbo_t2ialign.<command>` (not a program that imports the package)."""
    argv = getattr(sys, "orig_argv", [])
    return any(a == "-m" and b.startswith("elbo_t2ialign") for a, b in zip(argv, argv[1:], strict=False))


def one_line_interrupt_at_startup() -> None:
    """In a command, Ctrl-C or SIGTERM outside `cli_run` (while the libraries import, while Hydra
    composes the config) prints one line and exits 130 / 143 instead of a traceback; every other
    uncaught error keeps Python's traceback. Nothing is done for a program that imports the package."""
    if not started_as_command() or getattr(sys.excepthook, "one_line_interrupt", False):
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], err: BaseException, tb: Any) -> None:
        if not issubclass(kind, KeyboardInterrupt) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            previous(kind, err, tb)
            return
        status = EXIT_TERMINATED if issubclass(kind, Terminated) else EXIT_INTERRUPTED
        what = "terminated (SIGTERM)" if status == EXIT_TERMINATED else "interrupted"
        print(f"error: {what} while starting; nothing was run: start the command again", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    hook.one_line_interrupt = True  # type: ignore[attr-defined]
    sys.excepthook = hook


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


class OverrideError(ValueError):
    """A command-line override Hydra cannot apply (a key the config lacks, a group option that does not
    exist, bad syntax); exit status EXIT_BAD_INPUT."""


def _compose(config_name: str, overrides: list[str], hydra_keys: bool = False) -> Any:
    """Hydra's compose, inside an initialization of the config folder unless one is active."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name, overrides=overrides, return_hydra_config=hydra_keys)
    with initialize_config_dir(config_dir=hydra_config_dir(), version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=hydra_keys)


def dotted_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every key of a (nested) config as `a.b.c`, the sections included (`a`, `a.b`)."""
    from omegaconf import DictConfig

    keys = []
    for key in cfg.keys() if isinstance(cfg, DictConfig) else cfg:
        name = f"{prefix}{key}"
        keys.append(name)
        value = cfg._get_node(key) if isinstance(cfg, DictConfig) else cfg[key]
        if isinstance(value, (DictConfig, dict)):
            keys += dotted_keys(value, f"{name}.")
    return keys


def override_message(err: BaseException, config_name: str, overrides: list[str]) -> str:
    """One line for a Hydra composition error; a key the config does not have is named with the
    nearest key of the config the other overrides compose (difflib)."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = err.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        key = str(cause.full_key)
        line = next((o for o in overrides if o.split("=", 1)[0] == key), f"{key}=<value>")
        try:  # the keys there are once the other overrides (model=..., a group) are applied
            known = dotted_keys(_compose(config_name, [o for o in overrides if o != line]))
        except Exception:  # noqa: BLE001  (another bad override: the shipped config's keys)
            known = dotted_keys(_compose(config_name, []))
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]}?)" if near else ""
        return f"{key} is not a setting of {config_name}.yaml{hint}; to add a new key anyway, give +{line}"
    text = one_line(err).split(" Config search path:")[0]
    missing = re.search(r"Could not find '([\w/]+)/([^']+)' Available options in '[^']+': (.*)", text)
    if missing:  # a group option that does not exist, say model=sd51
        group, choice, options = missing.group(1), missing.group(2), missing.group(3).split()
        near = difflib.get_close_matches(choice, options, n=1, cutoff=0.6)
        hint = f" (did you mean {group}={near[0]}?)" if near else ""
        return f"{group}={choice}: there is no configs/{group}/{choice}.yaml{hint}; available: {' '.join(options)}"
    if cause is not None and one_line(cause) not in text:
        text = f"{text}: {one_line(cause).split(' full_key:')[0]}"
    return f"bad override: {text}"


def compose_config(config_name: str, overrides: list[str], error: type[Exception] = OverrideError) -> Any:
    """`configs/<config_name>.yaml` with the overrides; Hydra's errors as `error(override_message)`."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return _compose(config_name, overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise error(override_message(err, config_name, overrides)) from err


def check_overrides(config_name: str, argv: list[str], debug: bool) -> None:
    """For a `hydra.main` entry point, before Hydra runs: compose its config with the command line's
    overrides; an override Hydra cannot apply prints one line and exits with EXIT_BAD_INPUT (Hydra's
    own flags, `--cfg` and the like, are left to Hydra)."""
    if any(arg.startswith("-") for arg in argv):
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        _compose(config_name, argv, hydra_keys=True)
    except (HydraException, OmegaConfBaseException) as err:
        if debug:
            traceback.print_exc()
        print(f"error: {override_message(err, config_name, argv)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
