"""What every run folder records about how it was made: git revision, log file, resolved config."""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Callable
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


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config fingerprints."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += fingerprint_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def save_or_check_config(path: Path, conf: dict[str, Any], fingerprint: Callable[[dict], dict],
                         error: type[Exception]) -> None:
    """First launch: write the resolved config (atomically). Later launches: refuse a config whose
    result-determining part (`fingerprint`) differs, so one folder never mixes two settings."""
    from omegaconf import OmegaConf

    if path.is_file():
        old = OmegaConf.to_container(OmegaConf.load(path))
        diff = fingerprint_diff(fingerprint(old), fingerprint(conf))  # type: ignore[arg-type]
        if diff:
            shown = "; ".join(diff[:6]) + ("; ..." if len(diff) > 6 else "")
            raise error(f"{path.parent} holds a run with another config ({shown}); "
                        "set output_dir=<new folder> or restore those values")
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    OmegaConf.save(OmegaConf.create(conf), tmp)
    os.replace(tmp, path)


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
