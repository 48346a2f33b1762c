"""What the page accepts: upload limits (file size, pixels) and word lists."""

from __future__ import annotations

import os
from dataclasses import dataclass

from PIL import Image


@dataclass
class Limits:
    max_upload_mb: float = 20.0
    max_pixels: int = 16_000_000

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def check_upload(path: str, limits: Limits) -> Image.Image:
    """The uploaded file as an RGB image, or ValueError with the limit it breaks."""
    size = os.path.getsize(path)
    if size > limits.max_bytes:
        raise ValueError(
            f"refused: the file is {size / 2**20:.1f} MB, above the upload limit of "
            f"{limits.max_upload_mb:g} MB; send a smaller image"
        )
    try:
        img = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as err:  # PIL's own limit, far above any sensible one here
        raise ValueError(f"refused: {err}") from None
    with img:
        width, height = img.size
        if width * height > limits.max_pixels:
            raise ValueError(
                f"refused: the image is {width}x{height} = {width * height / 1e6:.1f} megapixels, "
                f"above the limit of {limits.max_pixels / 1e6:g}; resize it first"
            )
        return img.convert("RGB")


def split_words(text: str) -> list[str]:
    return [w.strip() for w in (text or "").split(",") if w.strip()]
