"""Run folders: the plumbing shared by the segmentation and generation runs.

- `RunFolder`: the paths every run folder has (config, run.json, launches, identity, lock, log);
  each experiment's folder class adds its own (`segmentation/layout.py`, `generation/layout.py`).
- `launch`: open a run folder for one launch: lock it, refuse a config or inputs that contradict
  what it holds, record the launch, log to its file; a failed first launch leaves nothing behind.
- `atomic_path` and the writers on it (`write_json_atomic`, `write_text_atomic`, `save_image_atomic`,
  `save_figure_atomic`): every file is written under a temporary name and renamed, so a killed run or
  a full disk never leaves half a file where a finished one belongs (the temporary is removed on any
  error, and a full disk is reported with the file's name); one JSON format for every file.
- `read_record`, `read_config`: a record of a run folder (JSON, config.yaml) that cannot be parsed
  raises `cli.DamagedFileError`, which names the file and how to recover.
- `RunLock`: one process per run folder (per shard when sharded), held with `flock` so a killed
  holder never blocks the folder; the lock file names the holder (pid, host, start time).
- `model_identity` / `check_identity`: what produced a folder (weight digests or hub revision,
  dataset split and class digests, data paths), recorded at the first launch; a relaunch that
  differs is refused with the differences named.
- `remove_stale_temps`, `discard_temp_dir`: temporary files and folders of killed launches.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elbo_t2ialign.cli import NO_SPACE, REFUSED, RESTORE, damaged

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """This process's part of a run: images with index % count == index."""

    index: int
    count: int

    def owns(self, image_index: int) -> bool:
        return image_index % self.count == self.index

    @property
    def tag(self) -> str:
        return "" if self.count == 1 else f".shard{self.index}-of-{self.count}"


def parse_shard(spec: Any, env: dict[str, str] | None = None, error: type[Exception] = ValueError) -> Shard:
    """`"i/n"` from the config, else RANK/WORLD_SIZE set by `accelerate launch`, else 0/1; a bad
    spec raises `error`."""
    env = os.environ if env is None else env
    if spec in (None, ""):
        world = int(env.get("WORLD_SIZE", "1"))
        return Shard(int(env.get("RANK", "0")), world) if world > 1 else Shard(0, 1)
    try:
        index, count = (int(part) for part in str(spec).split("/"))
    except ValueError:
        raise error(f"shard must look like 'i/n' (e.g. 0/2), got {spec!r}") from None
    if not 0 <= index < count:
        raise error(f"shard {spec!r}: need 0 <= i < n")
    return Shard(index, count)


REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout; site-packages for an installed wheel
IDENTITY_FILE = "identity.json"
_TEMP_FILE = re.compile(r"^\..+\.(\d+)\.tmp(\.\w+)?$")  # .<name>.<pid>.tmp[.png] of write_*_atomic


def cache_dir() -> Path:
    """This project's cache: $ELBO_T2IALIGN_CACHE, else $XDG_CACHE_HOME/elbo_t2ialign, else ~/.cache/elbo_t2ialign."""
    if os.environ.get("ELBO_T2IALIGN_CACHE"):
        return Path(os.environ["ELBO_T2IALIGN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "elbo_t2ialign"


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """A full disk (or a read-only one, permission denied) inside the block that names no file (a library failing on flush or close: PIL,
    numpy, matplotlib) or only a temporary one (a dot-name) is re-raised naming `path`, the file or
    folder being written."""
    try:
        yield
    except OSError as err:
        named = str(err.filename or "")
        temporary = not named or "/." in named or named.startswith(".")
        if err.errno in NO_SPACE + REFUSED and temporary and named != str(path):
            raise OSError(err.errno, os.strerror(err.errno), str(path)) from err
        raise


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary name beside `path` (`.<name>.<pid>.tmp<suffix>`) to write to: renamed over `path`
    when the block ends, removed when it raises (Ctrl-C too). A full disk is re-raised naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    with writing(path):
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                tmp.unlink()
            raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """JSON (indent 1, sorted keys, UTF-8) to a temporary name in the same folder, then renamed over `path`."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def save_image_atomic(image: Any, path: str | os.PathLike) -> None:
    """PIL image as PNG to a temporary name, then renamed: a killed run never leaves half an image."""
    with atomic_path(path, ".png") as tmp:
        image.save(tmp, format="PNG")


def save_figure_atomic(fig: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """A matplotlib figure, in the format of the file's suffix, through a temporary name."""
    path = Path(path)
    with atomic_path(path, path.suffix) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log-like file; when the write fails (a full disk), the file is cut back
    to its former length, so it never ends in half a line."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException as err:
            with suppress(OSError):
                os.ftruncate(fd, size)
            if isinstance(err, OSError) and not err.filename:
                raise OSError(err.errno, os.strerror(err.errno or 0), str(path)) from err
            raise
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_record(
    path: str | os.PathLike, kind: type | tuple[type, ...] = (dict, list), remedy: str = RESTORE
) -> Any:
    """A JSON record a command needs; one that cannot be parsed, or is not of `kind`, raises
    `DamagedFileError` naming it and `remedy`."""
    try:
        data = read_json(path)
    except (UnicodeDecodeError, ValueError) as err:
        raise damaged(path, err, remedy) from None
    if not isinstance(data, kind):
        raise damaged(path, f"holds {type(data).__name__}, not the expected {_kind_name(kind)}", remedy)
    return data


def read_config(
    path: str | os.PathLike, resolve: bool = False, keys: tuple[str, ...] = (), remedy: str = RESTORE
) -> dict[str, Any]:
    """A run folder's config.yaml as a plain dict; garbage, half a file, anything but a mapping or a
    mapping without `keys` raises `DamagedFileError` naming it and `remedy`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=resolve)
    except (YAMLError, UnicodeDecodeError, OmegaConfBaseException, ValueError) as err:
        raise damaged(path, err, remedy) from None
    if not isinstance(data, dict) or not data:
        raise damaged(path, "empty or not a mapping of settings", remedy)
    lacking = [k for k in keys if not isinstance(data.get(k), dict)]
    if lacking:
        raise damaged(path, f"no {', '.join(lacking)} section", remedy)
    return data  # type: ignore[return-value]


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {dict: "object", list: "list"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


# ------------------------------------------------------------------ folder and launch
class RunFolder:
    """The paths every run folder has; an experiment's folder class adds its own. Creating one never
    touches the disk."""

    log_name = "run.log"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"  # resolved config of the first launch
        self.run_info = self.root / "run.json"  # git revision, seed, model, creation time
        self.launches = self.root / "launches.jsonl"  # one line per launch
        self.identity = self.root / IDENTITY_FILE  # what produced the outputs

    def lock(self, shard_tag: str = "") -> Path:
        return self.root / f".lock{shard_tag}"

    def log(self, shard_tag: str = "") -> Path:
        stem, suffix = self.log_name.rsplit(".", 1)
        return self.root / f"{stem}{shard_tag}.{suffix}"

    def launch_files(self) -> list[str]:
        """Glob patterns of what every launch writes before any result."""
        stem, suffix = self.log_name.rsplit(".", 1)
        return [
            self.config.name,
            self.run_info.name,
            self.launches.name,
            self.identity.name,
            ".lock*",
            f"{stem}*.{suffix}",
        ]


@dataclass
class Launch:
    """What one launch records in its folder, and how its config and inputs are checked."""

    conf: dict[str, Any]  # the resolved config (config.yaml)
    fingerprint: Callable[[dict], dict]  # the part of a config that decides the results
    identity: dict[str, Any]  # what produced the outputs (identity.json)
    run_info: dict[str, Any]  # run.json of the first launch (git revision and "created" are added)
    details: dict[str, Any]  # this launch's line of launches.jsonl (time, argv, host, pid, git are added)
    own_files: list[str]  # files of the experiment written before any result (glob patterns)
    error: type[Exception]  # raised for a folder that contradicts this launch
    shard_tag: str = ""  # "" or ".shard<i>-of-<n>": lock and log of this shard
    conflicts: tuple[str, ...] = ()  # other locks that must not be held meanwhile


@contextmanager
def launch(folder: RunFolder, spec: Launch) -> Iterator[None]:
    """Lock the folder (this shard's lock), check and record the config, identity and launch, and send
    the package's log to the folder's log file for the duration. When the launch fails and the folder
    was new, the files it wrote are removed (never a result)."""
    fresh = not folder.root.exists()
    folder.root.mkdir(parents=True, exist_ok=True)
    lock = RunLock(folder.lock(spec.shard_tag), spec.error, conflicts=spec.conflicts)
    handler, ok, locked = None, False, False
    try:
        lock.acquire()
        locked = True  # from here the folder is this launch's; before, another launch's files may be there
        save_or_check_config(folder.config, spec.conf, spec.fingerprint, spec.error)
        check_identity(folder.root, spec.identity, spec.error, write=True)
        git = git_revision()
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if not folder.run_info.is_file():
            info = {
                "git_revision": git["revision"],
                "git_dirty": git["dirty"],
                "version": git["version"],
                **spec.run_info,
                "created": now,
            }
            write_json_atomic(folder.run_info, info)
        line = {
            "time": now,
            **spec.details,
            "argv": sys.argv,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **git,
        }
        append_line(folder.launches, json.dumps(line))
        handler = attach_log(folder.log(spec.shard_tag))
        yield
        ok = True
    finally:
        if handler is not None:
            logging.getLogger("elbo_t2ialign").removeHandler(handler)
            handler.close()
        lock.release()
        if fresh and not ok and locked:
            discard_fresh(folder.root, folder.launch_files() + spec.own_files)


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

    def __init__(
        self,
        path: Path,
        error: type[Exception],
        conflicts: tuple[str, ...] = (),
        hint: str = "wait for that run to finish, or give this one another output_dir",
    ) -> None:
        self.path, self.error, self.conflicts, self.fd = Path(path), error, conflicts, None
        self.hint = hint

    def _busy(self, fd: int, path: Path) -> Exception:
        """The error of a lock another launch holds; its `lock_holder` attribute tells it apart."""
        holder = _read_holder(fd)
        os.close(fd)
        who = (
            f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
            if holder
            else "another process"
        )
        err = self.error(f"{path.parent} is in use by {who} (lock {path}); {self.hint}")
        err.lock_holder = holder or {"lock": str(path)}  # type: ignore[attr-defined]
        return err

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
        self.fd = fd  # held from here: release() (also after an interruption below) lets go
        old = _read_holder(fd)
        if old:  # the kernel dropped that holder's flock: it is no longer running
            log.warning(
                "taking over the stale lock %s of pid %s on %s (started %s), which is no longer running",
                self.path,
                old.get("pid"),
                old.get("host"),
                old.get("started"),
            )
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError:  # a full disk: the flock holds all the same, only the holder's name is missing
            pass
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


def lock_held(root: Path) -> bool:
    """Whether a live launch holds a lock of the run folder `root` (`.lock` or a shard's): a run
    still running. Read-only: a shared flock tried on each lock file, never created."""
    for path in sorted(Path(root).glob(".lock*")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            continue
        finally:
            os.close(fd)  # closing releases a shared lock taken here
    return False


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
        h.update(
            f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0{_sha256_cached(path, cache)}\n".encode()
        )
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
        old = read_record(path, dict)
        old_model, new_model = old.get("model") or {}, identity.get("model") or {}
        if None in (old_model.get("revision"), new_model.get("revision")):  # not in the hub cache: unknown
            old = {**old, "model": {k: v for k, v in old_model.items() if k != "revision"}}
            identity = {**identity, "model": {k: v for k, v in new_model.items() if k != "revision"}}
        diff = fingerprint_diff(old, identity)
        if diff:
            raise error(
                f"{root} was made from other inputs ({'; '.join(diff[:6])}); restore them, or set "
                "output_dir=<new folder> for a new run"
            )
    elif write:
        write_json_atomic(path, identity)


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


# ------------------------------------------------------------------ provenance
def git_revision() -> dict[str, Any]:
    """The package version, and HEAD of the checkout this package runs from with whether it has local
    changes ("unknown" for an installed wheel: its folder is site-packages, not a checkout)."""
    from elbo_t2ialign import __version__

    repo = REPO_ROOT
    if not (repo / ".git").exists():  # a folder (checkout) or a file (worktree)
        return {"revision": "unknown", "dirty": None, "version": __version__}

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "--no-optional-locks", *args], cwd=repo, capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    revision = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if revision else None
    return {
        "revision": revision or "unknown",
        "dirty": None if status is None else bool(status),
        "version": __version__,
    }


class RunLogHandler(logging.FileHandler):
    """The run's log file. A record it cannot write (a full disk: the log shares the run folder's
    disk) is dropped quietly instead of logging's traceback per record; the command's next write
    in the folder fails the same way and says what is wrong in one line."""

    dropped = 0

    def handleError(self, record: logging.LogRecord | None) -> None:  # noqa: N802  (logging's name)
        self.dropped += 1

    def flush(self) -> None:
        try:
            super().flush()
        except OSError:
            self.handleError(None)

    def close(self) -> None:
        with suppress(OSError):  # the text still buffered cannot be written either
            super().close()


def attach_log(path: Path) -> logging.Handler:
    """Send the package's INFO log to `path` too; the caller removes the handler when done."""
    handler = RunLogHandler(path, encoding="utf-8")
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


def save_or_check_config(
    path: Path, conf: dict[str, Any], fingerprint: Callable[[dict], dict], error: type[Exception]
) -> None:
    """First launch: write the resolved config (atomically). Later launches: refuse a config whose
    result-determining part (`fingerprint`) differs, so one folder never mixes two settings."""
    from omegaconf import OmegaConf

    if path.is_file():
        old = read_config(path)
        try:
            recorded = fingerprint(old)
        except (KeyError, TypeError, AttributeError) as err:  # a mapping that lacks what a config holds
            raise damaged(path, f"no complete config: {type(err).__name__} {err}") from None
        diff = fingerprint_diff(recorded, fingerprint(conf))
        if diff:
            shown = "; ".join(diff[:6]) + ("; ..." if len(diff) > 6 else "")
            raise error(
                f"{path.parent} holds a run with another config ({shown}); "
                "set output_dir=<new folder> or restore those values"
            )
        return
    with atomic_path(path) as tmp:
        OmegaConf.save(OmegaConf.create(conf), tmp)
