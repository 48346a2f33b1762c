"""The error every layer raises for a damaged file (the core's model-folder checks, the runners'
records); `elbo_t2ialign.cli` maps it to exit status 3. It lives in the core so that the core imports
nothing above it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

RESTORE = "restore it from a copy, or start a new run with output_dir=<new folder>"


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


class DamagedFileError(ValueError):
    """A file a command reads (a model's weights, a run folder's record, a finished output) cannot be
    parsed or lacks what it must hold. The message names the file and how to recover; exit status
    EXIT_DAMAGED."""

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


def damaged(path: str | os.PathLike, why: Any, remedy: str = RESTORE) -> DamagedFileError:
    """The standard message: `<path> is damaged (<why>); <remedy>`."""
    why = f"{type(why).__name__}: {why}" if isinstance(why, BaseException) else why
    return DamagedFileError(f"{path} is damaged ({one_line(why)}); {remedy}", path)
