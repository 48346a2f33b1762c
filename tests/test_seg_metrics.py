"""Evaluator arithmetic: hand-computed IoUs (mmseg conventions) and the exact threshold sweep."""

import numpy as np
import pytest

from elbo_t2ialign.segmentation.datasets import IGNORE
from elbo_t2ialign.segmentation.metrics import (
    THRESHOLDS,
    SweepAccumulator,
    best_threshold,
    binary_search_threshold,
    class_metrics,
    intersect_and_union,
    summary,
)


def test_intersect_and_union_by_hand():
    gt = np.array([[0, 1, 1], [2, 2, IGNORE]])
    pred = np.array([[0, 1, 2], [2, 0, 1]])  # the last pixel is ignored whatever it predicts
    inter, union, area_pred, area_gt = intersect_and_union(pred, gt, 4)
    assert inter.tolist() == [1, 1, 1, 0]
    assert area_pred.tolist() == [2, 1, 2, 0]
    assert area_gt.tolist() == [1, 2, 2, 0]
    assert union.tolist() == [2, 2, 3, 0]
    per_class = class_metrics(inter, union, area_pred, area_gt)
    np.testing.assert_allclose(per_class["IoU"][:3], [1 / 2, 1 / 2, 1 / 3])
    assert np.isnan(per_class["IoU"][3])  # class 3 occurs nowhere: left out of the mean
    m = summary(per_class)
    assert m["mIoU"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3 * 100)
    assert m["precision"] == pytest.approx((1 / 2 + 1 / 1 + 1 / 2) / 3 * 100)
    assert m["recall"] == pytest.approx((1 / 1 + 1 / 2 + 1 / 2) / 3 * 100)
    assert m["FP"] == pytest.approx((1 / 2 + 0 / 2 + 1 / 3) / 3 * 100)
    assert m["FN"] == pytest.approx((0 / 2 + 1 / 2 + 1 / 3) / 3 * 100)
    assert m["F1"] == pytest.approx((2 / 3 + 2 / 3 + 2 / 4) / 3 * 100)


def test_areas_are_pooled_over_images_before_dividing():
    # mmseg's total_area_to_metrics: sum areas over the dataset, then one IoU per class.
    acc = SweepAccumulator(2)
    acc.add(np.array([[1, 1, 1, 1]]), [1], np.array([[[255, 255, 255, 255]]], np.uint8))  # IoU_1 = 4/4
    acc.add(np.array([[1, 0, 0, 0]]), [1], np.array([[[255, 255, 0, 0]]], np.uint8))  # IoU_1 = 1/2
    _, per_class = acc.at(0.5)
    assert per_class["IoU"][1] == pytest.approx(5 / 6)  # pooled: TP 5, P 6, T 5 (the per-image mean is 3/4)
    assert per_class["IoU"][0] == pytest.approx(2 / 3)  # background: TP 2, P 2, T 3


def test_sweep_by_hand():
    # two classes on a 1x4 image; pixel 3 is a tie (30, 30) that goes to the lower id
    maps = np.array([[[255, 100, 0, 30]], [[0, 200, 50, 30]]], np.uint8)
    gt = np.array([[1, 2, 0, 1]])
    acc = SweepAccumulator(3)
    acc.add(gt, [1, 2], maps)
    # th 0.5: max heat [1, .78, .20, .12] -> prediction [1, 2, 0, 0]: IoUs 1/2 (bg), 1/2, 1
    # th 0.1: every max is >= 0.1 -> prediction [1, 2, 2, 1]: IoUs 0 (bg), 1, 1/2
    curve = acc.curve()
    assert curve[49] == pytest.approx(100 * (1 / 2 + 1 / 2 + 1) / 3)
    assert curve[9] == pytest.approx(100 * (0 + 1 + 1 / 2) / 3)


def _brute_force(images, num_classes, th):
    """Independent loop: threshold each pixel, then count areas class by class."""
    inter, area_pred, area_gt = (np.zeros(num_classes) for _ in range(3))
    for gt, ids, maps in images:
        height, width = gt.shape
        for y in range(height):
            for x in range(width):
                if gt[y, x] == IGNORE:
                    continue
                pred = 0
                if ids:
                    values = [maps[k, y, x] / 255.0 for k in range(len(ids))]
                    best = max(range(len(ids)), key=lambda k: (values[k], -k))
                    pred = ids[best] if values[best] >= th else 0
                area_pred[pred] += 1
                area_gt[gt[y, x]] += 1
                inter[pred] += pred == gt[y, x]
    union = area_pred + area_gt - inter
    occurs = union > 0
    return float(np.mean(inter[occurs] / union[occurs]) * 100), inter, area_pred, area_gt


def _random_images(seed, num_classes=6, n=5):
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        shape = (int(rng.integers(3, 7)), int(rng.integers(3, 7)))
        ids = sorted(
            rng.choice(
                np.arange(1, num_classes), size=int(rng.integers(0 if i == 0 else 1, 4)), replace=False
            ).tolist()
        )
        # few distinct values -> many ties; 51/255 and 204/255 equal the thresholds 0.2 and 0.8 exactly
        maps = rng.choice(
            np.array([0, 3, 25, 26, 51, 100, 127, 128, 204, 255], np.uint8), size=(len(ids), *shape)
        )
        gt = rng.integers(0, num_classes, size=shape)
        gt[rng.random(shape) < 0.15] = IGNORE
        images.append((gt, ids, maps))
    return images


@pytest.mark.parametrize("seed", [0, 1])
def test_sweep_equals_brute_force_at_every_threshold(seed):
    images = _random_images(seed)
    acc = SweepAccumulator(6)
    for gt, ids, maps in images:
        acc.add(gt, ids, maps.astype(np.uint8) if len(ids) else np.zeros((0, *gt.shape), np.uint8))
    curve = acc.curve()
    for k, th in enumerate(THRESHOLDS):
        expected, inter, area_pred, area_gt = _brute_force(images, 6, th)
        assert curve[k] == pytest.approx(expected, abs=1e-9), th
    _, per_class = acc.at(0.42)
    _, inter, area_pred, area_gt = _brute_force(images, 6, 0.42)
    assert per_class["pred_pixels"].tolist() == area_pred.tolist()
    assert per_class["gt_pixels"].tolist() == area_gt.tolist()


def _reference_runs(n_items: int, n_buckets: int) -> list[int]:
    """Bucket sizes as the reference cuts them: runs of n // buckets + 1, the last ones short or empty."""
    size = n_items // n_buckets + 1
    return [max(0, min(size, n_items - b * size)) for b in range(n_buckets)]


@pytest.mark.parametrize("rule", ["equal", "fixed-size"])
def test_size_buckets_equal_brute_force(rule):
    images = _random_images(3, n=12)
    acc = SweepAccumulator(6)
    for i, (gt, ids, maps) in enumerate(images):
        acc.add(gt, ids, maps.astype(np.uint8), f"im{i}")
    th = 0.3
    instances = []  # (area ratio, class, TP, P, T) per (image, ground-truth class)
    for gt, ids, maps in images:
        for c in ids:
            _, inter, area_pred, area_gt = _brute_force([(gt, ids, maps)], 6, th)
            instances.append(((gt == c).sum() / gt.size, c, inter[c], area_pred[c], area_gt[c]))
    instances.sort(key=lambda t: t[0])
    buckets = acc.size_buckets(th, n_buckets=4, rule=rule)
    expected = (
        [len(part) for part in np.array_split(np.arange(len(instances)), 4)]
        if rule == "equal"
        else _reference_runs(len(instances), 4)
    )
    assert [b["count"] for b in buckets] == expected
    start = 0
    for b in buckets:
        if not b["count"]:
            assert np.isnan(b["mIoU"])
            continue
        part = instances[start : start + b["count"]]
        start += b["count"]
        ious = []
        for c in sorted({p[1] for p in part}):
            tp, p_, t_ = (sum(x[k] for x in part if x[1] == c) for k in (2, 3, 4))
            if p_ + t_ - tp > 0:
                ious.append(tp / (p_ + t_ - tp))
        assert b["mIoU"] == pytest.approx(np.mean(ious) * 100)
        assert b["min_ratio"] == pytest.approx(part[0][0]) and b["max_ratio"] == pytest.approx(part[-1][0])


def test_best_threshold_is_the_global_maximum_of_a_two_peaked_curve():
    curve = np.zeros(len(THRESHOLDS))
    curve[10], curve[80] = 50.0, 60.0  # a search assuming one peak, started in the middle, finds 0.11
    curve[79] = curve[81] = 55.0
    assert best_threshold(curve) == pytest.approx(0.81)
    curve[20] = 60.0  # ties -> the lowest threshold
    assert best_threshold(curve) == pytest.approx(0.21)


def test_fixed_size_buckets_leave_the_last_ones_empty_with_24_instances():
    acc = SweepAccumulator(2)
    for k in range(24):  # image k: one object of class 1 covering k + 1 of 100 pixels
        gt = np.zeros((10, 10), np.int64)
        gt.flat[: k + 1] = 1
        acc.add(gt, [1], (gt * 200).astype(np.uint8)[None], f"im{k}")
    buckets = acc.size_buckets(0.5, n_buckets=10, rule="fixed-size")
    assert [b["count"] for b in buckets] == [3] * 8 + [0, 0]  # 24 // 10 + 1 = 3 per run
    assert [b["min_ratio"] for b in buckets[:8]] == pytest.approx([(3 * b + 1) / 100 for b in range(8)])
    assert all(np.isnan(b["mIoU"]) for b in buckets[8:])
    assert all(b["mIoU"] == pytest.approx(100.0) for b in buckets[:8])  # maps equal the masks
    assert [b["count"] for b in acc.size_buckets(0.5, 10)] == [3, 3, 3, 3, 2, 2, 2, 2, 2, 2]


def _reference_search(curve: np.ndarray, start: int = 1, end: int = 99) -> float:
    """The reference's loop as it reads, on integer percents: compare mid and mid + 1, keep the half
    the curve rises into."""
    value = {pct: curve[pct - 1] for pct in range(1, 100)}  # THRESHOLDS[i] = (i + 1) / 100
    left, right = start, end
    while left < right:
        mid = (left + right) // 2
        if value[mid] < value[mid + 1]:
            left = mid + 1
        else:
            right = mid
    return left / 100


def test_binary_search_stops_at_the_lower_peak_where_the_curve_falls_at_the_middle():
    pct = np.arange(1, 100)
    # peaks at 0.30 (50) and 0.80 (60), valley at 0.55: at the first midpoint (0.50) the curve falls
    curve = np.where(pct <= 55, 50 - np.abs(pct - 30) * 0.5, 60 - np.abs(pct - 80) * 0.5)
    assert best_threshold(curve) == pytest.approx(0.80)
    assert binary_search_threshold(curve) == 0.30 == _reference_search(curve)
    curve[pct == 51] = 70.0  # now rising at the first midpoint: the search leaves 0.51 behind for 0.80
    assert best_threshold(curve) == pytest.approx(0.51)
    assert binary_search_threshold(curve) == 0.80 == _reference_search(curve)


@pytest.mark.parametrize("seed", range(5))
def test_binary_search_equals_the_reference_loop_on_random_curves(seed):
    rng = np.random.default_rng(seed)
    curve = np.round(rng.random(99) * 10, 1)  # plateaus and ties included
    assert binary_search_threshold(curve) == _reference_search(curve)
    images = _random_images(seed)  # and on a real mIoU curve
    acc = SweepAccumulator(6)
    for gt, ids, maps in images:
        acc.add(gt, ids, maps.astype(np.uint8) if len(ids) else np.zeros((0, *gt.shape), np.uint8))
    assert binary_search_threshold(acc.curve()) == _reference_search(acc.curve())
