"""The images the API accepts, as one PIL image: a PIL image, a path to an image file, or a uint8 array."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def as_image(image: Any) -> Image.Image:
    """A PIL image, a path to one, or an (H, W) / (H, W, 3|4) uint8 array; at least 2x2 pixels."""
    if isinstance(image, (str, Path)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as img:
                image = img.copy()
        except OSError as err:
            raise ValueError(f"cannot read an image from {path}: {err}") from None
    elif isinstance(image, np.ndarray):
        if (
            image.dtype != np.uint8
            or image.ndim not in (2, 3)
            or (image.ndim == 3 and image.shape[2] not in (3, 4))
        ):
            raise ValueError(
                f"an image array must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4); got "
                f"{image.dtype} {image.shape}"
            )
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(
            f"image must be a PIL image, a file path or a uint8 array, got {type(image).__name__}"
        )
    if image.width < 2 or image.height < 2:
        raise ValueError(f"the image is {image.width}x{image.height}; heatmaps need at least 2x2 pixels")
    return image
