"""What every command-line entry point and config validator shares.

- `to_container`, `check_known`, `check_integer`, `check_device`: a config as a plain dict, and
  checks whose messages name the key, what was given and what is accepted.
- `cli_errors`: expected errors print one line `error: ...` and exit non-zero; the traceback
  only with `--debug` or HYDRA_FULL_ERROR=1.
- `config_dir`, `hydra_config_dir`: where the YAML configs are, for a checkout and an installed wheel,
  with a `configs/` folder in the working directory taking precedence.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


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


def cli_errors(
    fn: Callable[[], Any], expected: tuple[type[BaseException], ...], debug: bool, status: int = 2
) -> Any:
    """Run `fn`; an expected error prints `error: <one line>` to stderr and exits with `status`."""
    try:
        return fn()
    except expected as err:
        if debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(status)


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
