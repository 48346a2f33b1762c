"""Dense CRF with the real `pydensecrf` module (PyPI: pydensecrf2, extra `[crf]`)."""

import json

import numpy as np
import pytest
from PIL import Image

from elbo_t2ialign.devtools.fixtures import PixelAligner, fixture_config, random_samples, write_dataset
from elbo_t2ialign.segmentation import evaluate, run

pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 not installed (pip install -e '.[crf]')")

from elbo_t2ialign.segmentation import crf  # noqa: E402


@pytest.mark.parametrize("unary", ["onehot", "confidence"])
def test_crf_snaps_noisy_labels_to_colour_edges_on_a_read_only_image(unary):
    h, w = 40, 48
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, : w // 2] = (220, 30, 30)  # red left half: class 7
    rgb[:, w // 2 :] = (20, 40, 200)  # blue right half: class 3
    truth = np.where(np.arange(w)[None, :] < w // 2, 7, 3).repeat(h, 0)
    rng = np.random.default_rng(0)
    noisy = truth.copy()
    flip = rng.random((h, w)) < 0.15
    noisy[flip] = rng.choice([0, 3, 7], flip.sum())
    image = np.asarray(Image.fromarray(rgb))  # read-only, as the evaluator passes it
    assert not image.flags.writeable
    refined = crf.crf_labels(image, noisy, [3, 7], num_classes=9, unary=unary)
    assert (noisy != truth).mean() > 0.08
    assert (refined == truth).all()
    assert set(np.unique(refined).tolist()) == {3, 7}  # dataset ids come back, not local indices


def test_evaluate_with_crf_reports_crf_rows(tmp_path):
    classes = ["cat", "dog", "boat"]
    data = write_dataset(tmp_path / "data", classes, random_samples(classes, 3, convention="voc"))
    out = run(fixture_config(data, tmp_path / "run", "voc"), aligner=PixelAligner())
    m = evaluate(out, crf=True, progress=False, overlays=0)
    saved = json.loads((out / "metrics.json").read_text())
    text = (out / "metrics.md").read_text()
    for variant, row in (("baseline", "| baseline + CRF |"), ("elbo", "| ELBO-T2IAlign + CRF |")):
        assert 0.0 <= m[variant]["crf"]["mIoU"] <= 100.0
        assert saved[variant]["crf"]["mIoU"] == pytest.approx(m[variant]["crf"]["mIoU"])
        assert saved[variant]["crf"]["threshold"] == m[variant]["threshold"]
        assert row in text and f"{m[variant]['crf']['mIoU']:.2f}" in text


def test_unary_energies_by_hand():
    labels = np.array([[0, 2], [5, 2]])
    # onehot over all 6 dataset ids: p = 0.99 for the label, 0.01 for every other id
    e = crf.unary_energy(labels, np.arange(6), "onehot")
    assert e.shape == (6, 4) and e.dtype == np.float32
    expected = np.full((6, 4), -np.log(0.01))
    expected[[0, 2, 5, 2], [0, 1, 2, 3]] = -np.log(0.99)
    np.testing.assert_allclose(e, expected, rtol=1e-5)  # float32 energies
    # confidence over background + the image's classes {2, 5}: 0.7 for the label, 0.3 / 2 for the others
    e = crf.unary_energy(labels, np.array([0, 2, 5]), "confidence")
    expected = np.full((3, 4), -np.log(0.15))
    expected[[0, 1, 2, 1], [0, 1, 2, 3]] = -np.log(0.7)
    np.testing.assert_allclose(e, expected, rtol=1e-5)  # float32 energies


def test_confidence_unary_equals_pydensecrfs_unary_from_labels():
    from pydensecrf.utils import unary_from_labels

    labels = np.random.default_rng(1).choice([0, 4, 9], size=(6, 7))
    ours = crf.unary_energy(labels, np.array([0, 4, 9]), "confidence")
    theirs = unary_from_labels(np.searchsorted([0, 4, 9], labels), 3, gt_prob=0.7, zero_unsure=False)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_onehot_unary_equals_simplecrf_as_the_reference_calls_it():
    """The reference runs SimpleCRF's densecrf on one-hot probabilities over all classes; where
    SimpleCRF builds (pip install simplecrf), the labels must be identical."""
    simplecrf = pytest.importorskip("denseCRF", reason="SimpleCRF not installed (pip install simplecrf)")
    rng = np.random.default_rng(0)
    for _ in range(6):
        h, w, n = int(rng.integers(20, 60)), int(rng.integers(20, 60)), int(rng.integers(3, 22))
        image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        image[: h // 2, : w // 2] = (200, 30, 30)
        labels = rng.choice([0, 1, n - 1], size=(h, w))
        labels[: h // 2, : w // 2] = 1
        probability = np.zeros((h, w, n), np.float32)
        probability[np.arange(h)[:, None], np.arange(w)[None, :], labels] = 1
        reference = simplecrf.densecrf(
            image, probability, (10.0, 80, 13, 3.0, 3, 5.0)
        )  # the reference's params
        ours = crf.crf_labels(image, labels, [1, n - 1], num_classes=n)
        assert (ours != labels).any()  # the CRF changed something, so the comparison says something
        np.testing.assert_array_equal(reference.astype(np.int64), ours)


def test_a_map_with_one_label_comes_back_unchanged():
    image = np.zeros((5, 6, 3), np.uint8)
    for unary in ("onehot", "confidence"):
        for labels, ids in ((np.zeros((5, 6), np.int64), []), (np.full((5, 6), 3), [3])):
            np.testing.assert_array_equal(
                crf.crf_labels(image, labels, ids, num_classes=4, unary=unary), labels
            )


@pytest.mark.parametrize("unary", ["onehot", "confidence"])
def test_evaluate_with_crf_on_a_split_with_an_object_free_image(tmp_path, unary):
    classes = ["cat", "dog", "boat"]
    samples = random_samples(classes, 3, convention="voc")
    image, mask = samples["img_001"]
    samples["img_001"] = (image, np.zeros_like(mask))  # no object class at all (COCO has such images)
    data = write_dataset(tmp_path / "data", classes, samples)
    out = run(fixture_config(data, tmp_path / "run", "voc"), aligner=PixelAligner())
    m = evaluate(out, crf=True, progress=False, overlays=0, crf_unary=unary)
    assert m["num_images"] == 3 and m["crf_unary"] == unary
    for variant in ("baseline", "elbo"):
        assert 0.0 <= m[variant]["crf"]["mIoU"] <= 100.0 and m[variant]["crf"]["unary"] == unary
