"""What every run folder records about how it was made: git revision and a log file."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any


def git_revision() -> dict[str, Any]:
    """HEAD of the checkout this package runs from, and whether it has local changes."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "--no-optional-locks", *args], cwd=repo, capture_output=True,
                                 text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    revision = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if revision else None
    return {"revision": revision or "unknown", "dirty": None if status is None else bool(status)}


def attach_log(path: Path) -> logging.Handler:
    """Send the package's INFO log to `path` too; the caller removes the handler when done."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package = logging.getLogger("elbo_t2ialign")
    package.addHandler(handler)
    if package.level == logging.NOTSET or package.level > logging.INFO:
        package.setLevel(logging.INFO)
    return handler
