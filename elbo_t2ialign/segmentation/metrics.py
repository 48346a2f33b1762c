"""Segmentation metrics (method.md §6) with mmsegmentation's arithmetic.

Heatmaps are stored as 8 bits, so a pixel's max heat takes one of 256 values.
`SweepAccumulator` keeps, in one pass, per-class histograms over those values;
every threshold 0.01..0.99 is then read off exactly (no search that assumes a
unimodal curve, no binning error).

Prediction rule: argmax over the image's class maps (ties -> the lower class
id), background where the max heat is below the threshold.

The reference implementation's choices are kept as options: its binary search
for the threshold (`binary_search_threshold`, which assumes a curve with one peak)
and its size buckets (`size_buckets(rule="fixed-size")`: runs of len // n + 1).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from elbo_t2ialign.segmentation.datasets import IGNORE

THRESHOLDS = np.arange(1, 100) / 100.0  # 0.01 .. 0.99
LEVELS = np.arange(256) / 255.0  # the heat an 8-bit value stands for
METRICS = ("IoU", "precision", "recall", "FP", "FN", "F1")
SEARCHES = ("sweep", "binary")  # threshold choice: exact best of the sweep, or the reference's binary search
BUCKET_RULES = ("equal", "fixed-size")  # size buckets: equal counts, or the reference's runs of len // n + 1


def predict(maps: np.ndarray, class_ids: list[int], threshold: float) -> np.ndarray:
    """(K, H, W) uint8 maps of classes `class_ids` -> (H, W) int64 labels (0 = background)."""
    if len(class_ids) == 0:
        return np.zeros(maps.shape[1:], dtype=np.int64)
    heat = LEVELS[maps]  # (K, H, W) float64
    labels = np.asarray(class_ids, dtype=np.int64)[heat.argmax(0)]
    labels[heat.max(0) < threshold] = 0
    return labels


def intersect_and_union(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> tuple[np.ndarray, ...]:
    """Per-class (intersect, union, pred, label) pixel areas as mmseg counts them; IGNORE pixels dropped."""
    valid = gt != IGNORE
    pred, gt = pred[valid], gt[valid]
    inter = np.bincount(pred[pred == gt], minlength=num_classes)[:num_classes]
    area_pred = np.bincount(pred, minlength=num_classes)[:num_classes]
    area_gt = np.bincount(gt, minlength=num_classes)[:num_classes]
    return inter, area_pred + area_gt - inter, area_pred, area_gt


def class_metrics(
    inter: np.ndarray, union: np.ndarray, area_pred: np.ndarray, area_gt: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-class ratios; 0/0 gives NaN, which the means skip (class absent from both)."""
    inter, union, area_pred, area_gt = (
        np.asarray(a, dtype=np.float64) for a in (inter, union, area_pred, area_gt)
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "IoU": inter / union,
            "precision": inter / area_pred,
            "recall": inter / area_gt,
            "FP": (area_pred - inter) / union,
            "FN": (area_gt - inter) / union,
            "F1": 2 * inter / (area_pred + area_gt),
        }


def summary(per_class: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over classes that occur, in percent: mIoU, precision, recall, FP, FN, F1."""
    out = {}
    for key in METRICS:
        values = per_class[key]
        out["mIoU" if key == "IoU" else key] = (
            float(np.nanmean(values) * 100) if np.isfinite(values).any() else float("nan")
        )
    return out


class SweepAccumulator:
    """Histograms over (class, max-heat level) from which every threshold is read exactly."""

    def __init__(self, num_classes: int) -> None:
        n = num_classes  # with background
        self.num_classes = n
        self.gt_area = np.zeros(n, np.int64)  # T_c
        self.pred_hist = np.zeros((n, 256), np.int64)  # valid pixels with argmax c, by level
        self.tp_hist = np.zeros((n, 256), np.int64)  # ... and ground truth c
        self.all_hist = np.zeros(256, np.int64)  # valid pixels by level
        self.bg_hist = np.zeros(256, np.int64)  # valid pixels with ground truth 0, by level
        self.instances: list[dict[str, Any]] = []  # one per (image, ground-truth class)

    def add(self, gt: np.ndarray, class_ids: list[int], maps: np.ndarray, image: str = "") -> None:
        """gt: (H, W) labels with IGNORE; maps: (K, H, W) uint8 for `class_ids` (the image's classes)."""
        valid = gt != IGNORE
        g = gt[valid]  # (N,)
        if len(class_ids):
            level = maps.max(0)[valid].astype(np.int64)  # (N,)
            local = maps.argmax(0)[valid].astype(np.int64)  # (N,) index into class_ids
        else:
            level, local = np.zeros_like(g, dtype=np.int64), np.zeros_like(g, dtype=np.int64)
        self.gt_area += np.bincount(g, minlength=self.num_classes)
        self.all_hist += np.bincount(level, minlength=256)
        self.bg_hist += np.bincount(level[g == 0], minlength=256)
        if not len(class_ids):
            return
        ids = np.asarray(class_ids, dtype=np.int64)
        k = len(ids)
        pred = np.bincount(local * 256 + level, minlength=k * 256).reshape(k, 256)
        hit = ids[local] == g
        tp = np.bincount(local[hit] * 256 + level[hit], minlength=k * 256).reshape(k, 256)
        self.pred_hist[ids] += pred
        self.tp_hist[ids] += tp
        for j, c in enumerate(ids.tolist()):
            self.instances.append(
                {
                    "image": image,
                    "class_id": c,
                    "gt": int((g == c).sum()),
                    "ratio": float((g == c).sum()) / gt.size,
                    "pred": pred[j].astype(np.int32),
                    "tp": tp[j].astype(np.int32),
                }
            )

    def areas(self, thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
        """(intersect, union, pred, gt) areas, each (C+1, len(thresholds))."""
        fg = (LEVELS[None, :] >= np.asarray(thresholds)[:, None]).astype(np.int64)  # (n_th, 256)
        area_pred = self.pred_hist @ fg.T
        inter = self.tp_hist @ fg.T
        area_pred[0] = self.all_hist @ (1 - fg).T  # background: max heat below the threshold
        inter[0] = self.bg_hist @ (1 - fg).T
        area_gt = np.repeat(self.gt_area[:, None], len(thresholds), axis=1)
        return inter, area_pred + area_gt - inter, area_pred, area_gt

    def curve(self, thresholds: np.ndarray = THRESHOLDS) -> np.ndarray:
        """mIoU (percent) at each threshold."""
        per_class = class_metrics(*self.areas(thresholds))["IoU"]  # (C+1, n_th)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a threshold with no pixels at all -> NaN
            return np.nanmean(per_class, axis=0) * 100

    def at(self, threshold: float) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Summary and per-class metrics at one threshold."""
        inter, union, area_pred, area_gt = (a[:, 0] for a in self.areas(np.array([threshold])))
        per_class = class_metrics(inter, union, area_pred, area_gt)
        per_class["gt_pixels"], per_class["pred_pixels"] = area_gt, area_pred
        return summary(per_class), per_class

    def size_buckets(
        self, threshold: float, n_buckets: int = 10, rule: str = "equal"
    ) -> list[dict[str, Any]]:
        """mIoU per ground-truth-area bucket: instances sorted by area / image area, small first.

        rule "equal": `n_buckets` (at most one per instance) buckets of equal counts (sizes differ by at
        most one). rule "fixed-size" (the reference implementation's): consecutive runs of
        `len // n_buckets + 1` instances, so the last buckets can be short or empty (count 0, mIoU NaN).
        Within a bucket, each class's instances are pooled (TP, P, T summed) as in the dataset mIoU.
        """
        if rule not in BUCKET_RULES:
            raise ValueError(f"bucket rule must be one of {BUCKET_RULES}, got {rule!r}")
        if not self.instances:
            return []
        fg = (LEVELS >= threshold).astype(np.int64)
        ratio = np.array([inst["ratio"] for inst in self.instances])
        order = np.argsort(ratio, kind="stable")
        if rule == "equal":
            groups = np.array_split(order, min(n_buckets, len(order)))
        else:
            size = len(order) // n_buckets + 1
            groups = [order[b * size : (b + 1) * size] for b in range(n_buckets)]
        buckets = []
        for b, idx in enumerate(groups):
            inter, area_pred, area_gt = (np.zeros(self.num_classes, np.int64) for _ in range(3))
            for i in idx:
                inst = self.instances[i]
                c = inst["class_id"]
                inter[c] += inst["tp"] @ fg
                area_pred[c] += inst["pred"] @ fg
                area_gt[c] += inst["gt"]
            iou = class_metrics(inter, area_pred + area_gt - inter, area_pred, area_gt)["IoU"]
            empty = len(idx) == 0
            buckets.append(
                {
                    "bucket": b,
                    "count": len(idx),
                    "min_ratio": float("nan") if empty else float(ratio[idx].min()),
                    "max_ratio": float("nan") if empty else float(ratio[idx].max()),
                    "mIoU": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else float("nan"),
                }
            )
        return buckets


def best_threshold(curve: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> float:
    """The threshold of highest mIoU (the lowest one on ties)."""
    if not np.isfinite(curve).any():
        raise ValueError("no pixels to evaluate")
    return float(thresholds[int(np.nanargmax(curve))])


def binary_search_threshold(curve: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> float:
    """The reference implementation's threshold search over `thresholds` (0.01..0.99 by default).

    It keeps an interval [lo, hi] of threshold indices and looks at the two middle neighbours: if the
    mIoU rises from mid to mid + 1 the best is taken to lie above mid, otherwise at or below it. That is
    exact for a curve with one peak; on a curve with several it can stop at a lower one. Values are
    compared as they are (ties and NaN move the interval down, as the reference's `<` does).
    """
    lo, hi = 0, len(thresholds) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if curve[mid] < curve[mid + 1]:
            lo = mid + 1
        else:
            hi = mid
    return float(thresholds[lo])


def choose_threshold(curve: np.ndarray, search: str, thresholds: np.ndarray = THRESHOLDS) -> float:
    """`search` "sweep": the exact best (`best_threshold`); "binary": the reference's search."""
    if search not in SEARCHES:
        raise ValueError(f"threshold search must be one of {SEARCHES}, got {search!r}")
    if search == "binary":
        return binary_search_threshold(curve, thresholds)
    return best_threshold(curve, thresholds)
