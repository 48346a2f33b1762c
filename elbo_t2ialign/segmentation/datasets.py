"""Segmentation datasets: class metadata, split lists, images, ground truth.

Every dataset (VOC, PASCAL Context, COCO-Object, ADE20K, AEP, or any folder in
the same layout) is one `SegDataset` built from its YAML config and a metadata
folder holding `classes.json` and split lists `<split>_id.txt`. Differences in
ground-truth conventions are data (`GroundTruthConvention`), not branches.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from elbo_t2ialign.cli import storage_fault
from elbo_t2ialign.core.adapters.base import to_rgb
from elbo_t2ialign.runfolder import cache_dir, list_digest, read_json, write_json_atomic
from elbo_t2ialign.segmentation.config import ConfigError, InputError

WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # more than 8 bits per pixel: rescaled, not clipped
log = logging.getLogger(__name__)

IGNORE = -1  # label of ignored ground-truth pixels after conversion
BUILTIN = ("voc", "context", "coco", "ade20k", "aep")
LABEL_CACHE_FORMAT = "elbo_t2ialign label cache 1"


@dataclass(frozen=True)
class GroundTruthConvention:
    """How raw mask values become labels 0 (background), 1..C (classes), IGNORE."""

    num_classes: int  # without background
    ignore_index: int | None = None  # raw value that is ignored (VOC: 255)
    id_shift: int = 0  # added to raw ids (COCO-Object: 1)
    max_id: int | None = None  # shifted ids above this become background (COCO-Object: 80)

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """(H, W) raw ids -> (H, W) int32 labels; ids outside 0..C are an error."""
        raw = raw.astype(np.int64)
        labels = raw + self.id_shift
        if self.max_id is not None:
            labels[labels > self.max_id] = 0
        if self.ignore_index is not None:
            labels[raw == self.ignore_index] = IGNORE
        bad = (labels != IGNORE) & ((labels < 0) | (labels > self.num_classes))
        if bad.any():
            ids = sorted(set((raw[bad]).tolist()))[:10]
            raise InputError(
                f"raw id(s) {ids} map to no class: classes.json has ids 1..{self.num_classes}"
                f" (ignore_index={self.ignore_index}, id_shift={self.id_shift}, max_id={self.max_id})"
            )
        return labels.astype(np.int32)


@dataclass(frozen=True)
class ImageInfo:
    class_ids: list[int]  # ground-truth ids present in the mask, ascending, background excluded
    size: tuple[int, int]  # (H, W) of the mask


def metadata_dir(value: str) -> Path:
    """A built-in dataset name (`voc`, ...) or a folder holding classes.json."""
    path = Path(value).expanduser()
    if (path / "classes.json").is_file():
        return path
    builtin = Path(str(resources.files("elbo_t2ialign.segmentation") / "metadata" / value))
    if (builtin / "classes.json").is_file():
        return builtin
    raise ConfigError(
        f"dataset metadata {value!r}: no classes.json there; use one of {list(BUILTIN)} or a folder with classes.json"
    )


def split_file(meta: Path, split: str) -> Path:
    """`val` -> val_id.txt, `val_100` -> val_id_100.txt; a plain file name or path works too."""
    head, _, tail = split.partition("_")
    candidates = [meta / f"{head}_id{'_' + tail if tail else ''}.txt", meta / f"{split}.txt", Path(split)]
    for path in candidates:
        if path.is_file():
            return path
    known = sorted(p.stem.replace("_id", "", 1) for p in meta.glob("*_id*.txt"))
    raise ConfigError(
        f"split {split!r} not found in {meta} (looked for {candidates[0].name}); available: {known}"
    )


def read_split(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [n for n in names if n]


class SegDataset:
    """One split of one dataset; image index = position in the split list."""

    def __init__(self, dcfg: dict[str, Any]) -> None:
        self.cfg = dcfg
        meta = metadata_dir(str(dcfg.get("metadata") or dcfg["name"]))
        info = read_json(meta / "classes.json")
        self.name = str(dcfg.get("name") or info.get("dataset"))
        self.classes: list[dict[str, Any]] = info["classes"]
        self.class_names = [c["name"] for c in self.classes]  # id = position + 1
        declared = info.get("num_classes_without_background", len(self.classes))
        if declared != len(self.classes):
            raise ConfigError(
                f"{meta}/classes.json declares {declared} classes but lists {len(self.classes)}"
            )
        self.data_root = Path(str(dcfg.get("data_root") or info["data_root"])).expanduser()
        self.image_template = str(dcfg.get("image_path") or info.get("image_path") or "")
        self.gt_template = str(dcfg.get("gt_path") or info.get("gt_path") or "")
        if not self.image_template or not self.gt_template:
            raise ConfigError(
                f"dataset {self.name}: set image_path and gt_path (templates with {{img_name}})"
            )
        self.phrase_template = dcfg.get("phrase_path")
        self.split = str(dcfg.get("split") or "val")
        self.images = read_split(split_file(meta, self.split))
        self.convention = GroundTruthConvention(
            num_classes=len(self.classes),
            ignore_index=dcfg.get("ignore_index"),
            id_shift=int(dcfg.get("id_shift") or 0),
            max_id=dcfg.get("max_id"),
        )
        self.metadata = meta
        cache = dcfg.get("label_cache") or default_label_cache(self.name, self.data_root)
        self.labels = LabelCache(Path(cache).expanduser(), self)

    def identity(self) -> dict[str, Any]:
        """What a run folder records about its data: split and class digests, absolute data paths."""
        return {
            "name": self.name,
            "split": self.split,
            "num_images": len(self.images),
            "split_digest": list_digest(self.images),
            "classes_digest": list_digest(self.class_names),
            "data_root": str(self.data_root.resolve()),
            "metadata": str(self.metadata.resolve()),
        }

    # -- paths --
    def _fill(self, template: str, name: str) -> Path:
        return Path(template.format(data_root=self.data_root, img_name=name))

    def image_path(self, name: str) -> Path:
        return self._fill(self.image_template, name)

    def mask_path(self, name: str) -> Path:
        return self._fill(self.gt_template, name)

    # -- loading --
    def load_image(self, name: str) -> Image.Image:
        """RGB image, fully decoded (a truncated file fails here, not later). As the reference reads
        its datasets: `Image.open(path).convert("RGB")`, the stored pixels (no EXIF rotation, an
        alpha channel dropped, the masks being aligned with the stored pixels); 16-bit, 32-bit and
        float images, which that conversion would clip at 255, are rescaled by their range
        (`core.adapters.base.to_rgb`)."""
        image = _open(self.image_path(name), f"image {name}")
        return to_rgb(image) if image.mode in WIDE_MODES else image.convert("RGB")

    def load_labels(self, name: str) -> np.ndarray:
        """(H, W) int32 ground truth after the dataset's convention."""
        mask = _open(self.mask_path(name), f"mask of {name}")
        if mask.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise InputError(
                f"mask of {name} ({self.mask_path(name)}) is {mask.mode}; need one label id per pixel"
            )
        try:
            return self.convention.apply(np.asarray(mask))
        except InputError as err:
            raise InputError(f"mask of {name} ({self.mask_path(name)}): {err}") from None

    def load_example(self, name: str) -> tuple[Image.Image, ImageInfo]:
        """Image and its labels; a mask whose size differs from the image is an error."""
        image = self.load_image(name)
        if min(image.size) < 2:  # the aligner's own limit (core/images.py), as a per-image error
            raise InputError(
                f"image {name} is {image.width}x{image.height}; heatmaps need at least 2x2 pixels"
            )
        info = self.labels.get(name)
        if info.size != (image.height, image.width):
            raise InputError(
                f"mask of {name} is {info.size[1]}x{info.size[0]} but the image is {image.width}x{image.height}"
            )
        return image, info

    def phrases_for(self, name: str, class_ids: list[int]) -> tuple[list[str] | None, str]:
        """Per-image phrases (method.md §9) aligned with `class_ids`, and where they came from.

        A phrase file is either {class name: phrase} or, as `prepare_data --aep-prompts` writes it,
        {"subject": [class, ...], "phrase": [phrase, ...]} in the reference's order; a class takes the
        phrase of its first subject entry (as the reference's `subject.index(class)`), else its name.
        """
        table = self.phrase_table(name)
        if table is None:
            return None, ("class_names (no phrase file)" if self.phrase_template else "class_names")
        names = [self.class_names[i - 1] for i in class_ids]
        return [str(table.get(n, n)) for n in names], "phrase_file"

    def phrase_table(self, name: str) -> dict[str, str] | None:
        """{class name: phrase} of the image's phrase file; None without one."""
        lists = self.phrase_lists(name)
        if lists is None:
            return None
        table: dict[str, str] = {}
        for subject, phrase in zip(*lists, strict=True):
            table.setdefault(subject, phrase)  # the first entry of a subject wins
        return table

    def phrase_lists(self, name: str) -> tuple[list[str], list[str]] | None:
        """The image's (subjects, phrases) in file order, e.g. for a collection prompt from all phrases."""
        if not self.phrase_template:
            return None
        path = self._fill(str(self.phrase_template), name)
        if not path.is_file():
            return None
        try:
            data = read_json(path)
        except (OSError, ValueError) as err:
            raise InputError(f"phrase file of {name} ({path}) is unreadable: {err}") from None
        if isinstance(data, dict) and isinstance(data.get("phrase"), list):
            subjects, phrases = data.get("subject"), data["phrase"]
            if not isinstance(subjects, list) or len(subjects) != len(phrases):
                raise InputError(
                    f"phrase file of {name} ({path}): 'subject' and 'phrase' must be lists of equal length"
                )
            return [str(x) for x in subjects], [str(x) for x in phrases]
        if not isinstance(data, dict):
            raise InputError(f"phrase file of {name} ({path}) must hold a JSON object")
        unknown = sorted(set(data) - set(self.class_names))
        if unknown:
            raise InputError(
                f"phrase file of {name} ({path}) names class(es) {unknown} absent from classes.json"
            )
        return list(data), [str(v) for v in data.values()]


def _open(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise InputError(f"{what}: file not found: {path}")
    try:
        img = Image.open(path)
        img.load()
    except Image.DecompressionBombError as err:  # above 2 x Image.MAX_IMAGE_PIXELS: PIL refuses it
        raise InputError(f"{what}: {path} is too large for PIL ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        if storage_fault(err):  # permission denied is the machine's fault, not the image's
            raise
        raise InputError(f"{what}: cannot decode {path}: {err}") from None
    return img


def default_label_cache(name: str, data_root: Path) -> Path:
    """<project cache>/labels/<dataset>-<digest of the data root>.json: never inside the user's data."""
    digest = hashlib.sha256(str(data_root.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "labels" / f"{name}-{digest}.json"


def _is_label_cache(data: Any) -> bool:
    """A file this project wrote (tagged; untagged caches of earlier versions have exactly these keys)."""
    if not isinstance(data, dict):
        return False
    return data.get("format") == LABEL_CACHE_FORMAT or (
        set(data) == {"convention", "images"} and isinstance(data["images"], dict)
    )


class LabelCache:
    """Image-level labels from the masks, computed once, cached as JSON (dataset.label_cache, by
    default in the project's cache folder). A file at that path that this project did not write
    is never replaced.

    Each entry keeps the mask file's size and modification time; a mask that changed since
    (a regenerated synthetic dataset, a corrected annotation) is read again.
    """

    def __init__(self, path: Path, dataset: SegDataset) -> None:
        self.path, self.dataset = path, dataset
        self.key = {"dataset": dataset.name, **asdict(dataset.convention)}
        self.entries, self.stamps = self._read()
        self.dirty = 0

    def _read(self) -> tuple[dict[str, ImageInfo], dict[str, list[int] | None]]:
        """Cached labels and mask stamps on disk (empty when missing or of another convention)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}, {}
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(
                f"label cache {self.path} is unreadable ({err}); set dataset.label_cache=<another file>"
            ) from None
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not _is_label_cache(data):
            raise ConfigError(
                f"dataset.label_cache {self.path} holds a file that is not a label cache of this "
                "project; it is left untouched: set dataset.label_cache=<another file> or move it away"
            )
        if data.get("convention") != self.key:
            return {}, {}
        images = data["images"]
        entries = {k: ImageInfo(list(v["class_ids"]), tuple(v["size"])) for k, v in images.items()}
        return entries, {k: v.get("stamp") for k, v in images.items()}

    def _stamp(self, name: str) -> list[int] | None:
        try:
            st = Path(self.dataset.mask_path(name)).stat()
        except OSError:
            return None  # loading the mask reports the problem
        return [st.st_size, st.st_mtime_ns]

    def get(self, name: str) -> ImageInfo:
        stamp = self._stamp(name)  # None: the mask is gone, the cached labels still serve
        if name not in self.entries or (stamp is not None and self.stamps.get(name) != stamp):
            labels = self.dataset.load_labels(name)
            ids = np.unique(labels)
            self.entries[name] = ImageInfo([int(i) for i in ids if i > 0], tuple(labels.shape))
            self.stamps[name] = stamp
            self.dirty += 1
            if self.dirty >= 100:
                self.save()
        return self.entries[name]

    def save(self) -> None:
        """Merge with what is on disk (other shards) and write atomically; failure only warns."""
        if not self.dirty:
            return
        try:
            disk, disk_stamps = self._read()
        except ConfigError as err:
            log.warning("label cache not saved: %s", err)
            return
        merged = {**disk, **self.entries}
        stamps = {**disk_stamps, **self.stamps}
        images = {k: {**asdict(v), "stamp": stamps.get(k)} for k, v in sorted(merged.items())}
        data = {"format": LABEL_CACHE_FORMAT, "convention": self.key, "images": images}
        try:
            write_json_atomic(self.path, data)
            self.dirty = 0
        except OSError as err:
            log.warning(
                "could not cache image labels at %s (%s); they will be recomputed next time", self.path, err
            )
            self.dirty = 0
