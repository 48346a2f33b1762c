"""The evaluator's IoU arithmetic against mmsegmentation's IoUMetric (extra `[mmseg]`)."""

import numpy as np
import pytest
import torch

from elbo_t2ialign.segmentation.datasets import GroundTruthConvention
from elbo_t2ialign.segmentation.metrics import (
    SweepAccumulator,
    class_metrics,
    intersect_and_union,
    predict,
    summary,
)

iou_metric = pytest.importorskip(
    "mmseg.evaluation", reason="mmsegmentation not installed (pip install -e '.[mmseg]')"
)

NUM_CLASSES = 7  # with background; 5 only predicted, 6 nowhere (NaN, left out of the mean)
THRESHOLD = 0.37


def random_images(seed, count=7):
    """(raw mask with 255 regions, class ids, (K, H, W) uint8 maps) per image."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        h, w = rng.integers(9, 30, 2)
        raw = rng.integers(0, 5, (h, w)).astype(np.uint8)
        raw[: rng.integers(1, 4)] = 255  # an ignored border
        raw[rng.random((h, w)) < 0.1] = 255  # and scattered ignored pixels
        ids = sorted(rng.choice(np.arange(1, 6), rng.integers(1, 4), replace=False).tolist())
        maps = rng.integers(0, 256, (len(ids), h, w)).astype(np.uint8)
        images.append((raw, ids, maps))
    return images


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_iou_miou_and_ignore_match_mmseg(seed):
    metric = iou_metric.IoUMetric(ignore_index=255, iou_metrics=["mIoU"])
    metric.dataset_meta = {"classes": [f"c{i}" for i in range(NUM_CLASSES)]}
    convention = GroundTruthConvention(num_classes=NUM_CLASSES - 1, ignore_index=255)
    acc = SweepAccumulator(NUM_CLASSES)
    totals = [np.zeros(NUM_CLASSES, np.int64) for _ in range(4)]
    for raw, ids, maps in random_images(seed):
        gt = convention.apply(raw)
        acc.add(gt, ids, maps)
        pred = predict(maps, ids, THRESHOLD)
        for total, part in zip(totals, intersect_and_union(pred, gt, NUM_CLASSES), strict=True):
            total += part
        sample = {
            "pred_sem_seg": {"data": torch.from_numpy(pred)[None]},
            "gt_sem_seg": {"data": torch.from_numpy(raw.astype(np.int64))[None]},
        }
        metric.process({}, [sample])

    areas = [sum(r[i] for r in metric.results) for i in range(4)]  # torch tensors, as mmseg sums them
    theirs = metric.total_area_to_metrics(*areas, metrics=["mIoU"])["IoU"]  # numpy, NaN for absent classes
    theirs_miou = metric.compute_metrics(metric.results)["mIoU"]  # rounded to 2 decimals by mmseg

    summary_sweep, per_class_sweep = acc.at(THRESHOLD)  # the evaluator's main path (histograms)
    per_class_direct = class_metrics(*totals)  # its CRF path (label maps)
    for ours, ours_summary in (
        (per_class_sweep, summary_sweep),
        (per_class_direct, summary(per_class_direct)),
    ):
        np.testing.assert_allclose(ours["IoU"], theirs, rtol=1e-6, equal_nan=True)  # mmseg divides in float32
        assert ours_summary["mIoU"] == pytest.approx(theirs_miou, abs=0.005)
    assert np.isnan(theirs[6]) and theirs[5] == 0.0
    for mine, theirs_area in zip(totals, areas, strict=True):
        assert mine.tolist() == theirs_area.long().tolist()
    # ignore handling matters here: counting the 255 pixels as background changes the areas
    with_ignored = sum(int((raw == 255).sum()) for raw, _, _ in random_images(seed))
    assert (
        with_ignored > 0
        and int(totals[3].sum()) == sum(raw.size for raw, _, _ in random_images(seed)) - with_ignored
    )
