"""Optional dense-CRF post-processing of a thresholded label map (method.md §6).

Uses the `pydensecrf` module, installed by the PyPI package `pydensecrf2`
(a maintained fork of pydensecrf). It is not a dependency of the project:
it has no wheel for every platform and builds from source where it has none.

Two unary terms (the pairwise terms are the same for both):

- `onehot` (default, the reference implementation's): the label map as one-hot
  probabilities over *all* classes of the dataset, clipped to [0.01, 0.99], energy
  -log(p). This is what the reference computes with SimpleCRF's `densecrf`, which
  clips the probabilities it is given and runs the same Krähenbühl code.
- `confidence`: pydensecrf's `unary_from_labels` with confidence 0.7 for the
  thresholded label over the image's own classes (background and the classes the
  image holds), the rest spread evenly; the project's earlier choice.
"""

from __future__ import annotations

import numpy as np

from elbo_t2ialign.segmentation.config import SegmentationError

# method.md §6: bilateral kernel weight w1, spatial alpha, colour beta; smoothness w2, gamma; iterations.
W1, ALPHA, BETA, W2, GAMMA, ITERATIONS = 10, 80, 13, 3, 3, 5
CLIP = (0.01, 0.99)  # SimpleCRF clips the probabilities it is given to this range before -log
GT_PROB = 0.7  # `confidence` unary: confidence given to the thresholded labels
UNARIES = ("onehot", "confidence")

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


def check_unary(unary: str) -> None:
    if unary not in UNARIES:
        raise SegmentationError(f"CRF unary must be one of {', '.join(UNARIES)}, got {unary!r}")


def unary_energy(labels: np.ndarray, label_ids: np.ndarray, unary: str = "onehot") -> np.ndarray:
    """(H, W) labels (every value one of `label_ids`) -> (L, H*W) float32 energies, L = len(label_ids),
    row j for label `label_ids[j]`, pixels in row-major order."""
    check_unary(unary)
    local = np.searchsorted(label_ids, labels).reshape(-1)  # label_ids ascending
    n, size = len(label_ids), local.size
    if unary == "onehot":
        low, high = (-np.log(np.float32(p)) for p in CLIP)
        energy = np.full((n, size), low, np.float32)
    else:  # pydensecrf's unary_from_labels(gt_prob=0.7, zero_unsure=False), written out
        high = -np.log(np.float32(GT_PROB))
        energy = np.full((n, size), -np.log(np.float32((1 - GT_PROB) / (n - 1))), np.float32)
    energy[local, np.arange(size)] = high
    return energy


def crf_labels(
    image: np.ndarray,
    labels: np.ndarray,
    class_ids: list[int],
    num_classes: int | None = None,
    unary: str = "onehot",
) -> np.ndarray:
    """image: (H, W, 3) uint8 RGB; labels: (H, W) ids in {0} + class_ids -> refined (H, W) ids.

    `onehot` runs the CRF over all `num_classes` dataset ids (0..num_classes-1), `confidence` over
    background and `class_ids`. A map with one label only (an image without object classes, or one
    where nothing passed the threshold) is returned as it is: every other label has the same unary
    energy and receives no pairwise support, so the CRF cannot change it.
    """
    check_unary(unary)
    if np.unique(labels).size <= 1:
        return np.asarray(labels).copy()
    import pydensecrf.densecrf as dcrf

    if unary == "onehot":
        if num_classes is None:
            raise ValueError("the onehot unary needs num_classes (the dataset's classes with background)")
        ids = np.arange(int(num_classes), dtype=np.int64)
    else:
        ids = np.asarray([0, *sorted(class_ids)], dtype=np.int64)  # local label j <-> dataset id ids[j]
    height, width = labels.shape
    # a fresh C-ordered uint8 copy: the image often comes from np.asarray(PIL image), which is
    # read-only, and pydensecrf's buffer interface refuses read-only arrays
    rgb = np.array(image, dtype=np.uint8, order="C", copy=True)
    crf = dcrf.DenseCRF2D(width, height, len(ids))
    crf.setUnaryEnergy(np.ascontiguousarray(unary_energy(labels, ids, unary)))
    # bilateral before Gaussian, the order SimpleCRF adds them in (the messages are summed in that order)
    crf.addPairwiseBilateral(sxy=ALPHA, srgb=BETA, rgbim=rgb, compat=W1)
    crf.addPairwiseGaussian(sxy=GAMMA, compat=W2)
    q = np.array(crf.inference(ITERATIONS)).reshape(len(ids), height, width)  # (L, H, W)
    return ids[q.argmax(0)]
