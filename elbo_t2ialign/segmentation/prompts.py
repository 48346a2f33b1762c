"""The reference's AEP prompts (`prompts.pkl`) -> per-image phrase files (method.md §9).

The pickle maps an image name to `{"subject": [class, ...], "phrase": [phrase, ...]}`
(the i-th phrase describes the i-th subject). It is read with an unpickler that
refuses every global, so only dicts, lists, strings and numbers can come out of
it, and the result is checked against that shape before anything is written.
Each image gets `<phrases_dir>/<image>.json` = `{"subject": [...], "phrase": [...]}` in the pickle's
order, the format `SegDataset.phrases_for` and `SegDataset.phrase_lists` read.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from elbo_t2ialign.runfolder import write_json_atomic
from elbo_t2ialign.segmentation.config import InputError

LFS_POINTER = b"version https://git-lfs"


class RestrictedUnpickler(pickle.Unpickler):
    """Builds only built-in containers and scalars: any class or function reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refused to load {module}.{name}: only dicts, lists, strings and numbers allowed"
        )


def read_prompts(path: Path) -> dict[str, dict[str, list[str]]]:
    """Load and validate the prompts pickle; a clear InputError for anything else."""
    try:
        with open(path, "rb") as f:
            if f.read(len(LFS_POINTER)) == LFS_POINTER:
                raise InputError(
                    f"{path} is a Git LFS pointer, not the pickle: run `git lfs pull` in the "
                    "reference checkout (or download the file) and retry"
                )
            f.seek(0)
            data = RestrictedUnpickler(f).load()
    except OSError as err:
        raise InputError(f"cannot read {path}: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as err:
        raise InputError(f"{path} is not a plain prompts pickle: {err}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a dict image name -> prompts, got {type(data).__name__}")
    for name, entry in data.items():
        ok = (
            isinstance(name, str)
            and isinstance(entry, dict)
            and all(
                isinstance(entry.get(k), list) and all(isinstance(x, str) for x in entry[k])
                for k in ("subject", "phrase")
            )
        )
        if not ok or len(entry["subject"]) != len(entry["phrase"]):
            raise InputError(
                f"{path}: entry {name!r} is not {{'subject': [str, ...], 'phrase': [str, ...]}} "
                "with one phrase per subject"
            )
    return data


def convert_aep_prompts(path: Path, phrases_dir: Path, class_names: list[str]) -> int:
    """Write one `{"subject": [...], "phrase": [...]}` JSON per image, the pickle's entry in its order
    (the collection prompt lists every phrase, as the reference builds it); returns the number of files."""
    data = read_prompts(path)
    known = set(class_names)
    unknown = sorted({s for e in data.values() for s in e["subject"]} - known)
    if unknown:
        raise InputError(f"{path} names subject(s) {unknown[:10]} that are not AEP classes (classes.json)")
    for name, entry in data.items():
        write_json_atomic(
            phrases_dir / f"{Path(name).stem if name.endswith(('.png', '.jpg')) else name}.json",
            {"subject": list(entry["subject"]), "phrase": list(entry["phrase"])},
        )
    return len(data)
