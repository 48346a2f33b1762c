"""Extract the published split archive (`dataset.tar.gz.00`, `.01`, ...) into datasets/.

The parts are read one after the other, in name order, as a single gzip stream:
the joined archive is never written to disk. Only members under the requested
dataset roots are extracted, the leading `datasets_copy/` is stripped, and every
member passes the tarfile `data` filter (no absolute paths, no `..`, no links
leaving the target, no device files); refused members are reported, not written.

Files are written to `<datasets_dir>/.prepare-partial/` first and moved into place
once the whole stream has been read and every part's sha256 matched: a run never
reads a half-extracted file. An interrupted extraction resumes: files already in
place (or already complete in the partial folder) with the member's size are kept.
A damaged stream or a checksum mismatch empties the partial folder (our own staging
area, never a dataset folder), so nothing from damaged parts survives into a rerun.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from elbo_t2ialign.runfolder import discard_temp_dir
from elbo_t2ialign.segmentation.config import SegmentationError

PREFIX = "datasets_copy/"
PARTIAL = ".prepare-partial"
CHUNK = 1 << 20


class PartsReader(io.RawIOBase):
    """The concatenation of several files, read sequentially; sha256 of each part on the way."""

    def __init__(self, parts: Iterable[Path]) -> None:
        self.parts = list(parts)
        self.digests: dict[Path, str] = {}
        self._index, self._file, self._hash = -1, None, None
        self._next()

    def _next(self) -> None:
        if self._file is not None:
            self._file.close()
            self.digests[self.parts[self._index]] = self._hash.hexdigest()  # type: ignore[union-attr]
        self._index += 1
        if self._index < len(self.parts):
            self._file, self._hash = open(self.parts[self._index], "rb"), hashlib.sha256()  # noqa: SIM115
        else:
            self._file = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while self._file is not None:
            n = self._file.readinto(buffer)
            if n:
                self._hash.update(memoryview(buffer)[:n])  # type: ignore[union-attr]
                return n
            self._next()
        return 0

    def drain(self) -> None:
        """Read to the end, so every part's digest covers the whole file."""
        while self.read(CHUNK):
            pass


@dataclass
class ExtractResult:
    extracted: dict[str, int] = field(default_factory=dict)  # dataset root -> files now in place
    kept: dict[str, int] = field(default_factory=dict)  # dataset root -> files already there
    refused: list[str] = field(default_factory=list)  # "member: reason"
    digests: dict[str, str] = field(default_factory=dict)  # part name -> sha256


def member_root(name: str, roots: Iterable[str]) -> str | None:
    """The requested root (a relative folder, or a top-level file name) that holds `name`."""
    for root in roots:
        if name == root or name.startswith(root.rstrip("/") + "/"):
            return root
    return None


def extract_parts(
    parts: list[Path],
    datasets_dir: Path,
    roots: list[str],
    expected_sha256: dict[str, str] | None = None,
    hint: str = "delete that file and rerun",
) -> ExtractResult:
    """Stream `parts` (sorted by name) through tar extraction of the members under `roots`.

    `expected_sha256`: part name -> sha256 (the hub's LFS listing, or digests recorded by an earlier run);
    `hint`: what the mismatch message tells the user to do.
    """
    parts = sorted(parts, key=lambda p: p.name)
    partial = datasets_dir / PARTIAL
    partial.mkdir(parents=True, exist_ok=True)
    result = ExtractResult()
    reader = PartsReader(parts)
    try:
        with tarfile.open(fileobj=io.BufferedReader(reader, CHUNK), mode="r|gz") as tar:
            for member in tar:
                _extract_member(tar, member, datasets_dir, partial, roots, result)
        stream_error = None
    except (tarfile.TarError, EOFError, zlib.error) as err:  # damaged or missing data (not a full disk)
        stream_error = err
    try:
        reader.drain()
    finally:
        reader.close()
    result.digests = {p.name: reader.digests[p] for p in parts}
    bad = {n: w for n, w in (expected_sha256 or {}).items() if result.digests.get(n, w) != w}
    if bad or stream_error is not None:
        discard_temp_dir(partial)  # staged from damaged parts: nothing there may be kept by a rerun
    if bad:
        name, want = next(iter(bad.items()))
        raise SegmentationError(
            f"archive part {name}: sha256 {result.digests[name]} differs from the expected {want}; {hint} "
            f"(nothing from this archive was moved into {datasets_dir})"
        )
    if stream_error is not None:
        raise SegmentationError(
            f"archive parts {[p.name for p in parts]} are not one complete .tar.gz ({type(stream_error).__name__}: "
            f"{stream_error}); check that every part is present and fully downloaded, then rerun "
            "(finished files are kept)"
        )
    for root in roots:
        result.extracted[root] = move_into_place(partial / root, datasets_dir / root)
    _remove_empty_dirs(partial)
    return result


def _extract_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    datasets_dir: Path,
    partial: Path,
    roots: list[str],
    result: ExtractResult,
) -> None:
    original = member.name
    name = original.removeprefix(PREFIX) if original.startswith(PREFIX) else original
    if not name or name in (".", PREFIX.rstrip("/")):
        return
    try:
        member = tarfile.data_filter(member.replace(name=name, deep=False), str(partial))
    except tarfile.FilterError as err:
        result.refused.append(f"{original}: {err}")
        return
    root = member_root(member.name, roots)
    if root is None or member.isdir():
        return
    final, staged = datasets_dir / member.name, partial / member.name
    for done in (final, staged):
        if member.isfile() and done.is_file() and done.stat().st_size == member.size:
            result.kept[root] = result.kept.get(root, 0) + 1
            return
    tar.extract(member, str(partial), filter="fully_trusted")  # `member` has passed the data filter above


def move_into_place(src: Path, dst: Path) -> int:
    """Move staged files to `dst` (a folder or one file). Returns the number of files moved."""
    if not src.exists():
        return 0
    if not src.is_dir():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        return 1
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        count = sum(1 for p in src.rglob("*") if not p.is_dir())
        os.replace(src, dst)  # a whole dataset appears at once
        return count
    moved = 0  # merge: a staged file exists only where dst lacked it or held another size
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        moved += 1
    return moved


def _remove_empty_dirs(folder: Path) -> None:
    """Remove the partial folder once empty."""
    for path in sorted(
        (p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
    ):
        if not any(path.iterdir()):
            path.rmdir()
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
