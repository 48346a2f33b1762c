"""Injected faults for the reliability tests: a disk that fills up, an interruption at a write.

`WriteFault(root, at_call=k)` meters every write into files under `root` made through Python's
file objects (`open`, `io.open`, `Path.write_text`, PIL, numpy, matplotlib, OmegaConf, tarfile) and
`os.write` / `os.pwrite`. The k-th write call (or the one that passes `limit` bytes) writes half of
its data (what fits) and raises: `OSError(ENOSPC)` without a file name, as a full disk does on a
write or a flush, and every later write fails too, until `free()`; or, with `error=KeyboardInterrupt`
(or `cli.Terminated`), an interruption, once. Writes elsewhere (the label cache, the log through
logging's own `open`) pass untouched. `calls` lists the file of every metered write call, so a
test can place the fault at the first write of every file in turn (`first_writes`).

    with WriteFault(out, at_call=3):
        run(cfg)               # OSError: [Errno 28] No space left on device
"""

from __future__ import annotations

import builtins
import errno
import io
import math
import os
import tarfile
from pathlib import Path
from typing import Any


class _Metered:
    """A writable file object whose writes are counted against the fault's budget."""

    def __init__(self, fault: WriteFault, file: Any, path: str) -> None:
        self._fault, self._file, self._path = fault, file, path

    def write(self, data: Any) -> int:
        size = len(data)
        allowed = self._fault.take(size, self._path)
        if allowed < size:
            if allowed:
                self._file.write(data[:allowed])
                self._file.flush()
            raise self._fault.failure()
        return self._file.write(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def fileno(self) -> int:  # writers fall back to write(), which is metered
        raise io.UnsupportedOperation("fileno")

    def __enter__(self) -> _Metered:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()

    def __iter__(self) -> Any:
        return iter(self._file)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


class WriteFault:
    """Meters the writes under `root`; the `at_call`-th call, or the one past `limit` bytes, fails
    with `error` (neither given: nothing fails, `calls` records what a run writes)."""

    def __init__(
        self,
        root: str | os.PathLike,
        limit: float | None = None,
        at_call: int | None = None,
        error: type = OSError,
    ) -> None:
        self.root = os.path.realpath(root)
        self.limit = math.inf if limit is None else limit
        self.at_call = at_call
        self.error = error
        self.written = 0
        self.calls: list[str] = []  # the file of every metered write call
        self.fired = 0
        self._saved: dict[tuple[Any, str], Any] = {}

    # ---- the budget
    def take(self, size: int, path: str) -> int:
        """How many of `size` bytes this write may put on the disk."""
        self.calls.append(path)
        armed = not self.fired or self.error is OSError  # an interruption fires once, a full disk stays
        if armed and self.at_call is not None and len(self.calls) >= self.at_call:
            self.limit = min(self.limit, self.written + size // 2)
        allowed = size if not armed else int(max(0, min(size, self.limit - self.written)))
        self.written += allowed
        return allowed

    def failure(self) -> BaseException:
        self.fired += 1
        if self.error is OSError:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.error()

    def free(self) -> None:
        """Space again (an interruption is disarmed already once it fired)."""
        self.limit, self.at_call = math.inf, None

    def first_writes(self) -> list[int]:
        """1-based call numbers of the first write into each file, in order."""
        seen: dict[str, int] = {}
        for i, path in enumerate(self.calls, 1):
            seen.setdefault(path, i)
        return sorted(seen.values())

    # ---- what is metered
    def _inside(self, path: Any) -> bool:
        try:
            real = os.path.realpath(os.fspath(path))
        except TypeError:  # an int file descriptor, a file object
            return False
        return real == self.root or real.startswith(self.root + os.sep)

    def _open(self, real_open: Any) -> Any:
        def metered_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            handle = real_open(file, mode, *args, **kwargs)
            if any(c in mode for c in "wax+") and self._inside(file):
                return _Metered(self, handle, os.path.realpath(os.fspath(file)))
            return handle

        return metered_open

    def _fd_path(self, fd: int) -> str | None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        return path if self._inside(path) else None

    def _os_write(self, real_write: Any) -> Any:
        def metered_write(fd: int, data: Any, *args: Any) -> int:
            path = self._fd_path(fd)
            if path is None:
                return real_write(fd, data, *args)
            size = len(data)
            allowed = self.take(size, path)
            if allowed < size:
                if allowed:
                    real_write(fd, bytes(data[:allowed]), *args)
                raise self.failure()
            return real_write(fd, data, *args)

        return metered_write

    def __enter__(self) -> WriteFault:
        targets = [
            (builtins, "open", self._open),
            (io, "open", self._open),
            (tarfile, "bltn_open", self._open),
            (os, "write", self._os_write),
            (os, "pwrite", self._os_write),
        ]
        for module, name, wrap in targets:
            original = getattr(module, name)
            self._saved[(module, name)] = original
            setattr(module, name, wrap(original))
        return self

    def __exit__(self, *exc: Any) -> None:
        for (module, name), original in self._saved.items():
            setattr(module, name, original)
        self._saved.clear()


def whole_files(root: str | os.PathLike) -> list[str]:
    """What under `root` is half-written or temporary: temporary names of the atomic writers,
    staging folders, and files that do not parse as their kind (JSON, JSON lines, YAML, PNG, NPY).
    Empty when every file there is whole."""
    import json

    import numpy as np
    import yaml
    from PIL import Image

    bad = []
    for path in sorted(Path(root).rglob("*")):
        rel = str(path.relative_to(root))
        if path.name.startswith((".tmp-", ".prepare-partial")) or (
            path.name.startswith(".") and ".tmp" in path.name
        ):
            bad.append(f"{rel}: temporary")
            continue
        if not path.is_file() or path.name.startswith(".lock"):
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".jsonl":
                for line in path.read_text(encoding="utf-8").splitlines():
                    json.loads(line)
                if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
                    raise ValueError("ends in half a line")
            elif path.suffix == ".yaml":
                if not isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict):
                    raise ValueError("not a mapping")
            elif path.suffix in (".png", ".jpg"):
                with Image.open(path) as img:
                    img.load()
            elif path.suffix == ".npy":
                np.load(path)
        except Exception as err:  # noqa: BLE001  (any parse failure is what this looks for)
            bad.append(f"{rel}: {type(err).__name__}: {err}")
    return bad
