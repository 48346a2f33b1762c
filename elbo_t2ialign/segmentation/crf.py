"""Optional dense-CRF post-processing of a thresholded label map (method.md §6).

Uses the `pydensecrf` module, installed by the PyPI package `pydensecrf2`
(a maintained fork of pydensecrf). It is not a dependency of the project:
it has no wheel for every platform and builds from source where it has none.
"""

from __future__ import annotations

import numpy as np

from elbo_t2ialign.segmentation.config import SegmentationError

# method.md §6: bilateral kernel weight w1, spatial alpha, colour beta; smoothness w2, gamma; iterations.
W1, ALPHA, BETA, W2, GAMMA, ITERATIONS = 10, 80, 13, 3, 3, 5
GT_PROB = 0.7  # confidence given to the thresholded labels in the unary term (not fixed by the method)

INSTALL_HINT = (
    "the dense CRF option needs the 'pydensecrf' module: install the PyPI package 'pydensecrf2' "
    '(pip install pydensecrf2, or pip install -e ".[crf]"; it compiles from source where no wheel '
    "exists, so a C++ compiler must be available), or run without --crf"
)


def require() -> None:
    """Fail early, with the package to install, when the CRF is unavailable."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        raise SegmentationError(INSTALL_HINT) from None


def crf_labels(image: np.ndarray, labels: np.ndarray, class_ids: list[int]) -> np.ndarray:
    """image: (H, W, 3) uint8 RGB; labels: (H, W) ids in {0} + class_ids -> refined (H, W) ids."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    ids = np.asarray([0, *class_ids], dtype=np.int64)  # local label j <-> dataset id ids[j]
    local = np.searchsorted(ids, labels)  # class_ids are ascending
    height, width = labels.shape
    # a fresh C-ordered uint8 copy: the image often comes from np.asarray(PIL image), which is
    # read-only, and pydensecrf's buffer interface refuses read-only arrays
    rgb = np.array(image, dtype=np.uint8, order="C", copy=True)
    crf = dcrf.DenseCRF2D(width, height, len(ids))
    crf.setUnaryEnergy(unary_from_labels(local, len(ids), gt_prob=GT_PROB, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=GAMMA, compat=W2)
    crf.addPairwiseBilateral(sxy=ALPHA, srgb=BETA, rgbim=rgb, compat=W1)
    q = np.array(crf.inference(ITERATIONS)).reshape(len(ids), height, width)  # (K+1, H, W)
    return ids[q.argmax(0)]
