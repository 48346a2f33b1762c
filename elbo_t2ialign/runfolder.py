"""Plumbing shared by the segmentation and generation run folders.

- `RunLock`: one process per run folder (per shard when sharded), held with `flock` so a killed
  holder never blocks the folder; the lock file names the holder (pid, host, start time).
- `model_identity` / `check_identity`: what produced a folder (weight digests or hub revision,
  dataset split and class digests, data paths), recorded at the first launch; a relaunch that
  differs is refused with the differences named.
- `remove_stale_temps`: temporary files and folders of killed launches.
- `cli_errors`: expected errors print one line `error: ...` and exit non-zero; the traceback
  only with `--debug` or HYDRA_FULL_ERROR=1.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from elbo_t2ialign.runinfo import fingerprint_diff

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
IDENTITY_FILE = "identity.json"
_TEMP_FILE = re.compile(r"^\..+\.(\d+)\.tmp(\.\w+)?$")  # .<name>.<pid>.tmp[.png] of write_*_atomic


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


def cache_dir() -> Path:
    """This project's cache: $ELBO_T2IALIGN_CACHE, else $XDG_CACHE_HOME/elbo_t2ialign, else ~/.cache/elbo_t2ialign."""
    if os.environ.get("ELBO_T2IALIGN_CACHE"):
        return Path(os.environ["ELBO_T2IALIGN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "elbo_t2ialign"


def write_json_atomic(path: Path, data: Any, **dump: Any) -> None:
    """JSON to a temporary name in the same folder, then renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, **dump) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------ lock
def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class RunLock:
    """Exclusive lock of a run folder (or of one shard of it) for the life of a launch. `conflicts`:
    glob patterns of other locks that must not be held meanwhile (an unsharded launch and shards)."""

    def __init__(self, path: Path, error: type[Exception], conflicts: tuple[str, ...] = ()) -> None:
        self.path, self.error, self.conflicts, self.fd = Path(path), error, conflicts, None

    def _busy(self, fd: int, path: Path) -> Exception:
        holder = _read_holder(fd)
        os.close(fd)
        who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}" if holder \
            else "another process"
        return self.error(f"{path.parent} is in use by {who} (lock {path}); wait for that run to finish, or give "
                          "this one another output_dir")

    def _check_conflicts(self) -> None:
        """Called while holding our own lock, so of two conflicting launches at least one sees the other."""
        for pattern in self.conflicts:
            for other in self.path.parent.glob(pattern):
                if other == self.path:
                    continue
                try:
                    fd = os.open(other, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    self.release()
                    raise self._busy(fd, other) from None
                os.close(fd)  # not held: a leftover of a killed launch

    def acquire(self) -> RunLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(fd, self.path) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder released and removed the file between our open and flock
                break
            os.close(fd)
        old = _read_holder(fd)
        if old:  # the kernel dropped that holder's flock: it is no longer running
            log.warning("taking over the stale lock %s of pid %s on %s (started %s), which is no longer running",
                        self.path, old.get("pid"), old.get("host"), old.get("started"))
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self.fd = fd
        self._check_conflicts()
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # removed while still locked: a waiting opener sees the inode change
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


TEMP_PREFIXES = (".tmp-", ".prepare-partial")  # staging folders: never results


def discard_temp_dir(path: Path) -> None:
    """Delete a staging folder (an image in flight, a damaged archive's extraction) file by file.
    Refuses any folder whose name is not a staging name, so no result folder can be removed."""
    if not path.name.startswith(TEMP_PREFIXES):
        raise ValueError(f"refusing to delete {path}: not a staging folder ({', '.join(TEMP_PREFIXES)}...)")
    if not path.is_dir():
        return
    for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):  # deepest first
        if sub.is_dir() and not sub.is_symlink():
            sub.rmdir()
        else:
            sub.unlink()
    path.rmdir()


def remove_stale_temps(folder: Path, temp_dirs: list[Path] = ()) -> list[Path]:
    """Delete the given temporary image folders and every `.<name>.<pid>.tmp` file under `folder`
    whose writer is not running: leftovers of killed launches, never finished output."""
    removed = []
    for tmp in temp_dirs:
        if tmp.is_dir():
            discard_temp_dir(tmp)  # an unfinished image; finished ones are renamed out of .tmp-<name>
            removed.append(tmp)
    if folder.is_dir():
        for path in folder.rglob(".*.tmp*"):
            m = _TEMP_FILE.match(path.name)
            if m and path.is_file() and (int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1)))):
                path.unlink()
                removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted launch in %s", len(removed), folder)
    return removed


# ------------------------------------------------------------------ identity
def _sha256_cached(path: Path, cache: dict[str, Any]) -> str:
    st = path.stat()
    key = str(path.resolve())
    hit = cache.get(key)
    if hit and hit[:2] == [st.st_size, st.st_mtime_ns]:
        return hit[2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    cache[key] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
    return h.hexdigest()


def folder_digest(folder: Path) -> str:
    """SHA-256 over (relative path, size, content SHA-256) of every file of a model folder; file
    digests are cached by (size, mtime), so an unchanged folder costs a stat per file."""
    cache_file = cache_dir() / "file_digests.json"
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    before = dict(cache)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0{_sha256_cached(path, cache)}\n"
                 .encode())
    if cache != before:
        try:
            write_json_atomic(cache_file, cache)
        except OSError as err:
            log.warning("cannot cache file digests in %s: %s", cache_file, err)
    return h.hexdigest()


def hub_revision(model_id: str) -> str | None:
    """The commit of a hub model in the local Hugging Face cache (None when not cached)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_id, "model_index.json")
    except Exception:  # noqa: BLE001  (an id that is no valid repo name has no revision)
        return None
    m = re.search(r"snapshots[/\\]([0-9a-f]{40})[/\\]", found) if isinstance(found, str) else None
    return m.group(1) if m else None


def model_identity(model_id: str) -> dict[str, Any]:
    """A local folder (relative: from the working directory, else the repository root, as the
    model loader resolves it) -> its path and weight digest; a hub id -> the id and cached revision."""
    local = Path(model_id).expanduser()
    if not local.is_absolute() and not local.exists() and (REPO_ROOT / local).is_dir():
        local = REPO_ROOT / local
    if local.is_dir():  # the digest, not the path: a moved checkout holds the same model
        return {"id": model_id, "digest": folder_digest(local)}
    return {"id": model_id, "revision": hub_revision(model_id)}


def check_identity(root: Path, identity: dict[str, Any], error: type[Exception], write: bool) -> None:
    """Refuse a folder whose recorded identity differs from this launch's (an unknown hub revision
    on either side is not compared); record it when `write` and none is recorded yet."""
    path = root / IDENTITY_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise error(f"{path} is unreadable ({err}); restore it or move the run folder away") from None
        old_model, new_model = old.get("model") or {}, identity.get("model") or {}
        if None in (old_model.get("revision"), new_model.get("revision")):  # not in the hub cache: unknown
            old = {**old, "model": {k: v for k, v in old_model.items() if k != "revision"}}
            identity = {**identity, "model": {k: v for k, v in new_model.items() if k != "revision"}}
        diff = fingerprint_diff(old, identity)
        if diff:
            raise error(f"{root} was made from other inputs ({'; '.join(diff[:6])}); restore them, or set "
                        "output_dir=<new folder> for a new run")
    elif write:
        write_json_atomic(path, identity, indent=1, sort_keys=True)


def list_digest(items: list[str]) -> str:
    """SHA-256 of a list of names, one per line."""
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def discard_fresh(root: Path, own_files: list[str]) -> None:
    """After a failed launch that created `root`: remove the files it wrote there (glob patterns
    `own_files`) and the folder, so a failed launch leaves no empty run. When anything else is there
    (an image, a skip record), everything is kept."""
    own = {path for pattern in own_files for path in root.glob(pattern) if path.is_file()}
    if not root.is_dir() or any(path not in own for path in root.iterdir()):
        return
    for path in own:
        path.unlink()
    os.rmdir(root)


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
        raise error(f"{key} must be an integer >= {minimum}{f' (or null for {none})' if none else ''}, got {value!r}")


# ------------------------------------------------------------------ command line
def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(--debug given or HYDRA_FULL_ERROR=1, argv without --debug)."""
    rest = [a for a in argv if a != "--debug"]
    return len(rest) < len(argv) or os.environ.get("HYDRA_FULL_ERROR") == "1", rest


def cli_errors(fn: Callable[[], Any], expected: tuple[type[BaseException], ...], debug: bool, status: int = 2) -> Any:
    """Run `fn`; an expected error prints `error: <one line>` to stderr and exits with `status`."""
    try:
        return fn()
    except expected as err:
        if debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(status)
