"""What is wrong with a local diffusers pipeline folder, before and after diffusers tries to load it.

`check_pipeline_folder` reads only small files (model_index.json, the components' folders, the
safetensors headers and the files' sizes), so it runs before every load of a local folder and names
the file at fault: no model_index.json, a component it lists that is missing, a component without
weights, a safetensors file that is truncated or whose header does not parse. A bit flipped inside
the tensor data cannot be seen this way (safetensors holds no checksum); the non-finite checks of the
computation (docs/reliability.md) catch what such damage does to the numbers.

`mismatch` turns diffusers' and transformers' "size mismatch" errors (a config.json that does not
describe the weights beside it) into the same kind of line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from elbo_t2ialign.core.errors import DamagedFileError, damaged

WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def _again(folder: Path) -> str:
    return (
        f"download the model again into a new folder (`hf download <repo id> --local-dir <folder>`) or "
        f"restore {folder} from a copy"
    )


def check_safetensors(path: Path, remedy: str) -> None:
    """A safetensors file whose header parses and whose size is what its header says."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise damaged(path, f"{size} bytes: not a safetensors file (empty or cut off)", remedy)
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise damaged(
                path,
                f"truncated or not a safetensors file: its header needs {length} bytes, {size - 8} are there",
                remedy,
            )
        try:
            header = json.loads(f.read(length))
            end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
            )
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise damaged(
                path, f"its header is not valid safetensors JSON: {type(err).__name__}", remedy
            ) from None
    if size != 8 + length + end:
        raise damaged(path, f"truncated: {size} bytes, its header describes {8 + length + end}", remedy)


def check_pipeline_folder(folder: Path) -> None:
    """Raise `DamagedFileError` naming the file or folder of a local pipeline that cannot load."""
    index = folder / "model_index.json"
    remedy = _again(folder)
    if not index.is_file():
        singles = sorted(p.name for p in folder.glob("*.safetensors"))[:3]
        what = (
            f" (it holds {', '.join(singles)}: a single-file checkpoint, not a diffusers folder)"
            if singles
            else ""
        )
        raise DamagedFileError(
            f"{folder} has no model_index.json{what}: it is not a complete diffusers pipeline folder; "
            f"check the path, or {remedy}",
            index,
        )
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
        listed = {k: v for k, v in components.items() if isinstance(v, list) and len(v) == 2 and v[0]}
    except (ValueError, AttributeError) as err:
        raise damaged(index, err, remedy) from None
    for name, (library, cls) in sorted(listed.items()):
        sub = folder / name
        if not sub.is_dir():
            raise DamagedFileError(
                f"{sub} is missing (model_index.json lists {name}: {library} {cls}); {remedy}", sub
            )
        weights = [p for pattern in WEIGHTS for p in sub.glob(pattern)]
        if (sub / "config.json").is_file() and not weights:
            raise DamagedFileError(f"{sub} holds no weights file (*.safetensors or *.bin); {remedy}", sub)
        for path in sorted(sub.glob("*.safetensors")):
            check_safetensors(path, remedy)


MISMATCH = re.compile(r"size mismatch|expected shape .* but got|shape mismatch", re.IGNORECASE)


def mismatch(folder: Path, err: BaseException) -> DamagedFileError | None:
    """A load error that says the weights do not fit the config beside them, as one line naming the
    component's config.json; None for any other error."""
    text = " ".join(str(err).split())
    if not MISMATCH.search(text):
        return None
    tensor = re.search(r"([\w.]+\.(?:weight|bias))", text)
    component = next(
        (
            p.parent
            for p in sorted(folder.glob("*/config.json"))
            if tensor and _holds(p.parent, tensor.group(1))
        ),
        None,
    )
    where = component / "config.json" if component else folder / "<component>/config.json"
    detail = re.sub(r"\. If you want to .*", "", text)[:300]
    return DamagedFileError(
        f"{where} does not match the weights beside it ({detail}); the config and the weights come from "
        f"different models: {_again(folder)}",
        where,
    )


def _holds(component: Path, tensor: str) -> bool:
    """Whether a safetensors file of `component` names `tensor` in its header."""
    for path in component.glob("*.safetensors"):
        try:
            with open(path, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                if tensor in json.loads(f.read(length)):
                    return True
        except (OSError, ValueError):
            continue
    return False
