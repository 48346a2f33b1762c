"""Dense CRF with the real `pydensecrf` module (PyPI: pydensecrf2, extra `[crf]`)."""

import json

import numpy as np
import pytest
from PIL import Image

from elbo_t2ialign.devtools.fixtures import PixelAligner, fixture_config, random_samples, write_dataset
from elbo_t2ialign.segmentation import evaluate, run

pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 not installed (pip install -e '.[crf]')")

from elbo_t2ialign.segmentation import crf  # noqa: E402


def test_crf_snaps_noisy_labels_to_colour_edges_on_a_read_only_image():
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
    refined = crf.crf_labels(image, noisy, [3, 7])
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
