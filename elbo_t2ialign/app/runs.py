"""What the page shows of segmentation run folders, read only, and only below one root folder.

`RunsRoot.resolve` is the one door from the page to the disk: a path typed on the page (or picked)
is taken relative to the root, resolved (symbolic links and `..` included) and refused unless it
stays below the root. The numbers come from the run folder's own files through the evaluator's
readers (`load_image_result`, `predict`, `intersect_and_union`): per image, each variant's labels at
the threshold the evaluator chose for it (metrics.json), and that image's mean IoU over the classes
in its ground truth or prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from elbo_t2ialign.runfolder import read_json

SIZES = ("small", "medium", "large")
UNEVALUATED_THRESHOLD = 0.5  # a run without metrics.json (still running): labels at this threshold


class PathRefused(ValueError):
    """A path from the page that leaves the runs folder, or does not exist below it."""


class RunsRoot:
    def __init__(self, root: str | Path):
        self.given = str(root)  # as given (runs=), for messages
        self.root = Path(root).expanduser().resolve()

    def resolve(self, given: str | Path) -> Path:
        """`given` (relative to the root, or absolute) as a folder below the root, else PathRefused."""
        text = str(given).strip()
        if not text:
            raise PathRefused("no run folder given: pick one of the list")
        path = Path(text).expanduser()
        path = (path if path.is_absolute() else self.root / path).resolve()
        if path != self.root and self.root not in path.parents:
            raise PathRefused(f"refused: {text} is outside the runs folder {self.given}; pick a run below it")
        if not path.is_dir():
            raise PathRefused(f"{text} is not a folder below the runs folder {self.given}")
        return path

    def segmentation_runs(self) -> list[tuple[str, Any]]:
        """(path relative to the root, results.Run) of every segmentation run below the root."""
        from elbo_t2ialign.results import collect

        if not self.root.is_dir():
            return []
        out = []
        for run in collect([self.root]):
            if run.task == "segment" and run.folder is not None:
                folder = run.folder.resolve()
                if folder == self.root or self.root in folder.parents:
                    out.append((str(folder.relative_to(self.root)) or ".", run))
        return out


@dataclass
class ImageRow:
    name: str
    classes: list[str]
    smallest: float  # area of the smallest ground-truth object, % of the image's labelled pixels
    iou: dict[str, float]  # variant -> this image's mIoU (%)
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> class -> IoU (%)
    size: str = ""  # small | medium | large: tercile of `smallest` among the run's images


@dataclass
class RunView:
    folder: Path
    state: str  # done | unevaluated | partial (results.Run.state)
    done: int
    expected: int | None
    thresholds: dict[str, float]  # variant -> threshold used for its labels
    evaluated: bool  # thresholds from metrics.json (else UNEVALUATED_THRESHOLD)
    labels: dict[str, str]  # variant -> its setting
    rows: list[ImageRow]
    class_names: list[str]
    report: str  # metrics.md, or a line saying the run is not evaluated yet

    def summary(self) -> str:
        total = "?" if self.expected is None else str(self.expected)
        line = f"**{self.folder.name}**: {self.state}, {self.done} of {total} images finished"
        if not self.evaluated:
            line += (
                f"; not evaluated yet, so labels use threshold {UNEVALUATED_THRESHOLD} "
                "(`python -m elbo_t2ialign.evaluate` on it gives the chosen thresholds)"
            )
        else:
            line += "; thresholds " + ", ".join(f"{v} {t:.2f}" for v, t in self.thresholds.items())
        return line


def dataset_of(folder: Path):
    """(SegmentationFolder, SegDataset) of a run folder, the data found as the evaluator finds it."""
    from elbo_t2ialign.runfolder import read_config
    from elbo_t2ialign.segmentation.datasets import SegDataset
    from elbo_t2ialign.segmentation.evaluate import dataset_config
    from elbo_t2ialign.segmentation.layout import SegmentationFolder

    seg = SegmentationFolder(folder)
    conf = read_config(seg.config, resolve=True, keys=("dataset", "model"))
    return seg, SegDataset(dataset_config(seg, conf))


def image_scores(
    gt: np.ndarray, ids: list[int], maps: np.ndarray, threshold: float, class_names: list[str]
) -> tuple[float, dict[str, float]]:
    """(mIoU %, class -> IoU %) of one image's (K, H, W) uint8 maps at `threshold`: the evaluator's
    labels and areas, averaged over the classes present in the ground truth or the prediction."""
    from elbo_t2ialign.segmentation.metrics import intersect_and_union, predict

    pred = predict(maps, ids, threshold)
    names = ["background", *class_names]
    inter, union, _, _ = intersect_and_union(pred, gt, len(names))
    per_class = {names[c]: 100.0 * inter[c] / union[c] for c in range(len(names)) if union[c] > 0}
    return (float(np.mean(list(per_class.values()))) if per_class else math.nan), per_class


def read_run_view(folder: Path) -> RunView:
    """Every finished image of a segmentation run folder with its per-variant numbers."""
    from elbo_t2ialign.results import read_run
    from elbo_t2ialign.segmentation.datasets import IGNORE
    from elbo_t2ialign.segmentation.evaluate import load_image_result
    from elbo_t2ialign.segmentation.layout import VARIANTS

    run = read_run(folder)
    if run is None or run.task != "segment":
        raise PathRefused(f"{folder.name} is not a segmentation run folder (no readable config.yaml)")
    seg, dataset = dataset_of(folder)
    metrics_path = folder / "metrics.json"
    metrics = read_json(metrics_path) if metrics_path.is_file() else None
    names = seg.finished_images()
    if metrics and metrics.get("variants"):
        thresholds = {v: float(r["threshold"]) for v, r in metrics["variants"].items()}
    elif metrics:
        thresholds = {v: float(metrics[v]["threshold"]) for v in VARIANTS if v in metrics}
    else:
        thresholds = {}
    rows = []
    for name in names:
        scores = read_json(seg.image_dir(name) / "scores.json")
        variants = list(scores.get("variants") or VARIANTS)
        gt, ids, maps, _ = load_image_result(seg, dataset, name, variants)
        valid = gt != IGNORE
        areas = [int(((gt == c) & valid).sum()) for c in ids]
        smallest = 100.0 * min((a for a in areas if a > 0), default=0) / max(int(valid.sum()), 1)
        row = ImageRow(name, [dataset.class_names[c - 1] for c in ids], smallest, {})
        for v in variants:
            th = thresholds.get(v, UNEVALUATED_THRESHOLD)
            row.iou[v], row.per_class[v] = image_scores(gt, ids, maps[v], th, dataset.class_names)
        rows.append(row)
    _size_buckets(rows)
    report = (folder / "metrics.md").read_text(encoding="utf-8") if (folder / "metrics.md").is_file() else ""
    return RunView(
        folder=folder,
        state=run.state,
        done=run.done,
        expected=run.expected,
        thresholds={v: thresholds.get(v, UNEVALUATED_THRESHOLD) for v in run.labels or VARIANTS},
        evaluated=bool(metrics),
        labels=dict(run.labels),
        rows=rows,
        class_names=list(dataset.class_names),
        report=report or "_not evaluated yet: no metrics.md_",
    )


def _size_buckets(rows: list[ImageRow]) -> None:
    """Each image's size class: the tercile of its smallest object's area among the run's images."""
    order = sorted(range(len(rows)), key=lambda i: rows[i].smallest)
    for rank, i in enumerate(order):
        rows[i].size = SIZES[min(rank * 3 // max(len(rows), 1), 2)]


COLUMNS = ["image", "classes", "smallest object %", "size", "IoU baseline", "IoU elbo", "change"]
SORTS = {
    "IoU change, most helped first": ("change", True),
    "IoU change, most hurt first": ("change", False),
    "image name": ("image", False),
    "smallest object first": ("smallest object %", False),
}


def table(view: RunView, sort: str, cls: str = "all", size: str = "all") -> list[list[Any]]:
    """Rows of COLUMNS: filtered by a class the image holds and by its size class, sorted."""
    out = []
    for r in view.rows:
        if cls != "all" and cls not in r.classes:
            continue
        if size != "all" and r.size != size:
            continue
        base, elbo = r.iou.get("baseline", math.nan), r.iou.get("elbo", math.nan)
        out.append(
            [r.name, ", ".join(r.classes), round(r.smallest, 2), r.size, round(base, 2), round(elbo, 2)]
            + [round(elbo - base, 2)]
        )
    key, reverse = SORTS[sort]
    col = COLUMNS.index(key)
    # NaN (a variant missing) sorts last either way
    out.sort(key=lambda row: (isinstance(row[col], float) and math.isnan(row[col]), row[col]))
    if reverse:
        nan_rows = [row for row in out if isinstance(row[col], float) and math.isnan(row[col])]
        out = [row for row in out if row not in nan_rows][::-1] + nan_rows
    return out
