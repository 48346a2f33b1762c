"""Pictures and files for the page: maps over the image, label maps, the download bundle."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

DISPLAY = 256  # images smaller than this (the testbed's 64 px) are enlarged for the page, pixels kept


def _enlarge(rgb: np.ndarray) -> Image.Image:
    img = Image.fromarray(rgb)
    side = max(img.size)
    if side < DISPLAY:
        k = -(-DISPLAY // side)
        img = img.resize((img.width * k, img.height * k), Image.NEAREST)
    return img


def heat_over(image: Image.Image, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """(H, W) heat in [0, 1] coloured by `cmap` over the image (resized to the heat's size)."""
    from matplotlib import colormaps

    base = np.asarray(image.convert("RGB").resize(heat.shape[::-1]), dtype=np.float32)
    colour = colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    return _enlarge((base * (1 - alpha) + colour * alpha).round().astype(np.uint8))


COLOUR_NAMES = ("blue", "orange", "green", "red", "purple", "brown", "pink", "grey", "olive", "cyan")


def colour_name(class_id: int) -> str:
    """The name of the colour `labels_over` gives a class id (matplotlib's tab10, cycling)."""
    return COLOUR_NAMES[(class_id - 1) % 10]


def labels_over(image: Image.Image | None, labels: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """Class ids coloured (tab10, cycling; background black, ignored pixels (IGNORE) white) over the
    image, or alone."""
    from matplotlib import colormaps

    from elbo_t2ialign.segmentation.datasets import IGNORE

    palette = np.vstack([[0, 0, 0], colormaps["tab10"](np.arange(10))[:, :3] * 255.0, [255, 255, 255]])
    colour = palette[np.where(labels == IGNORE, 11, np.where(labels > 0, (labels - 1) % 10 + 1, 0))]
    if image is None:
        return _enlarge(colour.round().astype(np.uint8))
    base = np.asarray(image.convert("RGB").resize(labels.shape[::-1]), dtype=np.float32)
    mixed = np.where((labels > 0)[..., None], base * (1 - alpha) + colour * alpha, base)
    return _enlarge(mixed.round().astype(np.uint8))


def plain(image: Image.Image) -> Image.Image:
    return _enlarge(np.asarray(image.convert("RGB")))


def bundle(folder: Path, name: str) -> Path:
    """Every file of `folder` (maps as .npy and .png, result.json) zipped into `<folder>/../<name>.zip`."""
    out = folder.parent / f"{name}.zip"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, path.name)
    return out
