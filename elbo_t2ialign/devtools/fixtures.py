"""Small synthetic datasets in the published layout and a pixel-based stand-in aligner.

For tests and smoke runs of the runner and evaluator without a diffusion
model: each class has a gray code; images paint a class's region with its code
and `PixelAligner` maps "closeness to the code" to heat, so heatmaps are
deterministic, cheap and correlated with the ground truth.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from elbo_t2ialign.core.aligner import Evidence

IMAGE_PATH = "{data_root}/images/{img_name}.png"
GT_PATH = "{data_root}/masks/{img_name}.png"


def class_code(name: str) -> int:
    """Gray level (40..239) that stands for a class in fixture images."""
    return 40 + zlib.crc32(name.encode()) % 200


@dataclass
class FakeResult:
    heatmaps: dict[str, np.ndarray]  # ELBO-calibrated, (H, W) float32 in [0, 1]
    baseline_heatmaps: dict[str, np.ndarray]  # tau 1
    losses: dict[str, float]
    tau: dict[str, float]


@dataclass
class PixelEvidence(Evidence):
    """`Evidence` of image-sized maps: `cross` holds the clean closeness maps (the stand-in for the
    cross-attention), `refined` the noisy normalised ones (the stand-in for the refinement)."""

    refined: dict[str, np.ndarray] = field(default_factory=dict)

    def maps(self, strength: float = 1.0, fixed: bool = False, refine: bool = True) -> dict[str, np.ndarray]:
        taus = self.temperatures(strength, fixed)
        source = self.refined if refine else self.cross
        return {n: (source[n] ** taus[n]).astype(np.float32) for n in self.names}


@dataclass
class PixelAligner:
    """Deterministic stand-in with the `Aligner.observe` and `Aligner.heatmaps` signatures; records
    its calls (with "elbo": "computed", "given" or None for the stand-in of the ELBO forwards)."""

    strength: float = 3.0
    noise: float = 0.05
    calls: list[dict[str, Any]] = field(default_factory=list)

    def observe(
        self,
        image: Image.Image,
        class_names: list[str],
        phrases: list[str] | None = None,
        seed: int | None = None,
        *,
        prompt: str | None = None,
        need_elbo: bool = True,
        elbo_losses: dict[str, float] | None = None,
    ) -> PixelEvidence:
        gray = np.asarray(image.convert("L"), dtype=np.float32)  # (H, W)
        rng = np.random.default_rng(seed)
        clean, raw = {}, {}
        for name in class_names:
            clean[name] = np.clip(1.0 - np.abs(gray - class_code(name)) / 30.0, 0.0, 1.0)
            heat = clean[name] + rng.uniform(0.0, self.noise, gray.shape).astype(np.float32)
            raw[name] = (heat / heat.max()).astype(np.float32)
        if elbo_losses is not None:
            losses, how = {n: float(elbo_losses[n]) for n in class_names}, "given"
        elif need_elbo and len(class_names) > 1:
            losses, how = (
                {n: float(1.0 - raw[n].mean()) for n in class_names},
                "computed",
            )  # stand-in for the ELBO
        else:
            losses, how = None, None
        self.calls.append(
            {
                "size": image.size,
                "classes": list(class_names),
                "phrases": phrases,
                "seed": seed,
                "prompt": prompt,
                "elbo": how,
            }
        )
        return PixelEvidence(list(class_names), losses, clean, None, None, 0, image.size, refined=raw)

    def heatmaps(
        self,
        image: Image.Image,
        class_names: list[str],
        phrases: list[str] | None = None,
        seed: int | None = None,
    ) -> FakeResult:
        evidence = self.observe(image, class_names, phrases, seed)
        return FakeResult(
            evidence.maps(self.strength),
            evidence.maps(1.0),
            evidence.losses or {},
            evidence.temperatures(self.strength),
        )


def write_dataset(
    root: Path,
    class_names: list[str],
    samples: dict[str, tuple[np.ndarray, np.ndarray]],
    splits: dict[str, list[str]] | None = None,
    name: str = "fixture",
) -> Path:
    """Write classes.json, images/<n>.png, masks/<n>.png (raw ids) and <split>_id.txt files."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    info = {
        "dataset": name,
        "data_root": str(root),
        "image_path": IMAGE_PATH,
        "gt_path": GT_PATH,
        "num_classes_without_background": len(class_names),
        "classes": [{"name": c, "synonyms": [c]} for c in class_names],
        "background_words": [],
    }
    (root / "classes.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    for img_name, (image, mask) in samples.items():
        Image.fromarray(image).save(root / "images" / f"{img_name}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{img_name}.png")
    for split, names in (splits or {"val": list(samples)}).items():
        head, _, tail = split.partition("_")
        (root / f"{head}_id{'_' + tail if tail else ''}.txt").write_text(
            "\n".join(names) + "\n", encoding="utf-8"
        )
    return root


def random_samples(
    class_names: list[str], n: int, size: tuple[int, int] = (24, 32), seed: int = 0, convention: str = "plain"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """n images with 1-3 rectangles each; masks encoded in a dataset's raw convention.

    convention: "plain" (ids as is), "voc" (255 on object borders), "coco" (ids - 1, background as
    stuff ids 80..181 or 255).
    """
    rng = np.random.default_rng(seed)
    height, width = size
    out = {}
    for i in range(n):
        labels = np.zeros(size, np.int64)
        for _ in range(int(rng.integers(1, 4))):
            c = int(rng.integers(1, len(class_names) + 1))
            y0, x0 = int(rng.integers(0, height - 4)), int(rng.integers(0, width - 4))
            y1, x1 = y0 + int(rng.integers(3, height // 2 + 2)), x0 + int(rng.integers(3, width // 2 + 2))
            labels[y0:y1, x0:x1] = c
        gray = np.full(size, 12.0)  # background level, far from every class code
        for c in range(1, len(class_names) + 1):
            gray[labels == c] = class_code(class_names[c - 1])
        gray = np.clip(gray + rng.normal(0, 6, size), 0, 255)
        image = np.repeat(gray[..., None], 3, axis=2).astype(np.uint8)  # (H, W, 3)
        out[f"img_{i:03d}"] = (image, encode_mask(labels, convention, rng))
    return out


def encode_mask(labels: np.ndarray, convention: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """Labels 0..C -> raw mask values of a convention (the inverse of GroundTruthConvention)."""
    rng = rng or np.random.default_rng(0)
    if convention == "plain":
        return labels.astype(np.uint8)
    if convention == "voc":
        raw = labels.astype(np.uint8)
        edge = np.zeros(labels.shape, bool)
        edge[1:] |= labels[1:] != labels[:-1]
        edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
        raw[edge] = 255
        return raw
    if convention == "coco":
        stuff = rng.choice(np.r_[80:182, 255], size=labels.shape)
        return np.where(labels > 0, labels - 1, stuff).astype(np.uint8)
    raise ValueError(f"unknown convention {convention!r}")


CONVENTIONS = {  # dataset-config keys that decode each raw convention above
    "plain": {"ignore_index": None, "id_shift": 0, "max_id": None},
    "voc": {"ignore_index": 255, "id_shift": 0, "max_id": None},
    "coco": {"ignore_index": None, "id_shift": 1, "max_id": 80},
}


def fixture_config(root: Path, output_dir: Path, convention: str = "plain", **top: Any) -> dict[str, Any]:
    """A complete runner config for a folder written by `write_dataset` (fake model entry)."""
    dataset = {
        "name": "fixture",
        "root": str(root),
        "metadata": str(root),
        "data_root": str(root),
        "split": "val",
        "image_path": None,
        "gt_path": None,
        "phrase_path": None,
        "label_cache": None,
        **CONVENTIONS[convention],
    }
    return {
        "model": {"name": "pixel", "id": "none"},
        "dataset": dataset,
        "elbo": {"strength": 3.0},
        "seed": 0,
        "device": "cpu",
        "output_dir": str(output_dir),
        "on_error": "skip",
        "shard": None,
        "num_images": None,
        "progress": False,
        **top,
    }
