"""The shapes world: synthetic images with per-pixel ground truth and captions.

Every image is a pure function of (seed, split, index): 64x64 RGB, a textured
noisy background and 1-3 solid shapes of distinct classes, drawn back to
front (later shapes occlude earlier ones). The ground truth holds the visible
pixels of each shape (0 = background, class id = position in `CLASSES` + 1).
Shape sizes span from a few pixels to half the image, and the class
frequencies are skewed (`CLASS_WEIGHTS`: some classes are rare).

Every class has a typical colour (`CLASS_HUES`: circles are red-ish, squares
blue-ish, ...), drawn with random hue jitter, saturation and brightness, on a
muted background; the caption names the shapes only ("a photo of a circle and
a square"). So, as for real photos ("grass is green"), the words tell what a
heavily noised image no longer shows (which colours and outlines to restore),
and using them needs a link from each word to the pixels of its object.
Why not random colours named in the caption ("a red circle")? A model with a
frozen random CLIP encoder then has to bind the colour word to the next word
before it can use either, and the one trained that way attended to the wrong
object as often as to the right one (elbo_t2ialign/testbed/README.md).

Written to disk in the layout of the real datasets (`classes.json` with path
templates, split lists `val_id.txt`, `val_id_100.txt`, `val_id_10.txt`,
`val_id_rare.txt`, `val_id_occlusion.txt`, PNG images and 8-bit masks), so the
ordinary segmentation runner reads it as `dataset=shapes` (splits `val`,
`val_100`, `val_10`, `val_rare`, `val_occlusion`):

    python -m elbo_t2ialign.testbed.world --out datasets/shapes    # about 2 s
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart")
# Relative frequency of each class as an object (same order as CLASSES): the
# last two are rare (about 1 object in 20 each).
CLASS_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 0.7, 0.7, 0.3, 0.3)
RARE_CLASSES = ("diamond", "heart")
# The typical colour of each class: hue in degrees (8 hues 45 degrees apart) and its name.
CLASS_HUES = {
    "circle": (0.0, "red"),
    "square": (225.0, "blue"),
    "triangle": (135.0, "green"),
    "star": (45.0, "orange"),
    "cross": (270.0, "purple"),
    "ring": (180.0, "cyan"),
    "diamond": (315.0, "magenta"),
    "heart": (90.0, "lime"),
}
HUE_JITTER = 8.0  # degrees, uniform
SATURATION = (0.6, 0.95)
BRIGHTNESS = (0.55, 0.95)
SYNONYMS = {
    "circle": ["circle", "disc", "disk", "dot"],
    "square": ["square", "box"],
    "triangle": ["triangle"],
    "star": ["star"],
    "cross": ["cross", "plus"],
    "ring": ["ring", "donut", "annulus"],
    "diamond": ["diamond", "rhombus", "lozenge"],
    "heart": ["heart"],
}
BACKGROUND_WORDS = ["background", "texture", "wall", "floor", "ground", "pattern"]
# Words of every caption and prompt the testbed uses: the offline tokenizer
# holds each as one token.
VOCABULARY = ("a", "an", "photo", "of", "and", *CLASSES)

IMAGE_SIZE = 64
SUPERSAMPLE = 4

# The splits written by `write_dataset`: name -> (split kind, number of images).
# "val" follows the training distribution; "val_rare" holds at least one rare
# class per image; "val_occlusion" stacks 2-3 shapes on top of each other.
DEFAULT_SPLITS = {"val": ("standard", 300), "val_rare": ("rare", 200), "val_occlusion": ("occlusion", 200)}
# The training stream (generated in memory by the trainer, never written by default).
TRAIN_SPLIT = "train"
_SPLIT_CODES = {"train": 1, "val": 2, "val_rare": 3, "val_occlusion": 4}
# Bumped whenever the generator draws different scenes for the same (seed, split, index);
# written to classes.json so that a folder of an older world is noticed and rewritten.
WORLD_VERSION = 2


@dataclass
class ShapeObject:
    cls: str
    rgb: tuple  # fill colour, 0..255
    cx: float  # centre, pixels
    cy: float
    size: float  # half extent, pixels
    angle: float  # degrees
    aspect: float  # x scale / y scale
    visible: float = 1.0  # fraction of the shape's own pixels left visible

    @property
    def class_id(self) -> int:
        return CLASSES.index(self.cls) + 1


@dataclass
class Sample:
    name: str
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8, 0 = background, class id otherwise
    objects: list[ShapeObject]  # in drawing order (back to front)

    @property
    def classes(self) -> list[str]:
        return [o.cls for o in self.objects]

    @property
    def caption(self) -> str:
        return caption(self.classes)


# ----------------------------------------------------------------- captions


def caption(classes) -> str:
    """'a photo of a circle and a square' (classes in the given order)."""
    return "a photo of " + " and ".join(f"{_article(c)} {c}" for c in classes)


def class_colour(cls: str, rng: np.random.Generator) -> tuple:
    """A fill colour of the class's hue family, (r, g, b) in 0..255."""
    hue = (CLASS_HUES[cls][0] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 360.0
    rgb = colorsys.hsv_to_rgb(hue / 360.0, rng.uniform(*SATURATION), rng.uniform(*BRIGHTNESS))
    return tuple(round(255 * c, 1) for c in rgb)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def class_list_caption(classes) -> str:
    """The method's collection prompt form: 'a photo of circle, square'."""
    return "a photo of " + ", ".join(classes)


# ------------------------------------------------------------ shape geometry


def _polygon_inside(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon, vectorised over points."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        crosses = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


def _star_polygon(points: int = 5, outer: float = 1.0, inner: float = 0.42) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_STAR = _star_polygon()
_TRIANGLE = np.array([[0.0, -1.0], [0.98, 0.72], [-0.98, 0.72]])


def shape_inside(cls: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether local coordinates (u right, v down, shape within about [-1, 1]) are inside."""
    if cls == "circle":
        return u * u + v * v <= 1.0
    if cls == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if cls == "triangle":
        return _polygon_inside(u, v, _TRIANGLE)
    if cls == "star":
        return _polygon_inside(u, v, _STAR)
    if cls == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if cls == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if cls == "diamond":
        return np.abs(u) / 0.6 + np.abs(v) <= 1.0
    if cls == "heart":
        x, y = 1.15 * u, -1.15 * v + 0.25
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    raise ValueError(f"unknown shape class {cls!r}; known: {CLASSES}")


# ----------------------------------------------------------------- rendering


def coverage(obj: ShapeObject, size: int = IMAGE_SIZE) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (H, W) float32 in [0, 1]."""
    out = np.zeros((size, size), np.float32)
    reach = obj.size * max(obj.aspect, 1.0) * 1.5 + 1  # a bound on the rotated shape's extent
    x0, x1 = max(int(obj.cx - reach), 0), min(int(obj.cx + reach) + 1, size)
    y0, y1 = max(int(obj.cy - reach), 0), min(int(obj.cy + reach) + 1, size)
    if x1 <= x0 or y1 <= y0:
        return out
    ss = SUPERSAMPLE
    xs = (np.arange(x0 * ss, x1 * ss) + 0.5) / ss  # supersample centres, pixel units
    ys = (np.arange(y0 * ss, y1 * ss) + 0.5) / ss
    dx, dy = np.meshgrid(xs - obj.cx, ys - obj.cy, indexing="xy")
    a = math.radians(obj.angle)
    u = (math.cos(a) * dx + math.sin(a) * dy) / (obj.size * obj.aspect)
    v = (-math.sin(a) * dx + math.cos(a) * dy) / obj.size
    inside = shape_inside(obj.cls, u, v).astype(np.float32)
    out[y0:y1, x0:x1] = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
    return out


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise: a random (cells x cells) grid bilinearly upsampled to (size, size), in [-1, 1]."""
    g = rng.uniform(-1, 1, size=(cells + 1, cells + 1))
    t = np.linspace(0, cells, size, endpoint=False)
    i = t.astype(int)
    f = t - i
    rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]  # (size, cells + 1)
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def render_background(rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A textured, noisy background, (H, W, 3) float in [0, 255]."""
    base = rng.uniform(40, 215, size=3)
    grey = base.mean()
    base = grey + rng.uniform(0.1, 0.35) * (base - grey)  # muted, so coloured shapes stand out
    yy, xx = np.mgrid[0:size, 0:size] / size
    kind = rng.integers(4)
    if kind == 0:  # smooth blotches
        tex = _smooth_noise(rng, size, int(rng.integers(2, 9)))
    elif kind == 1:  # stripes
        theta, freq = rng.uniform(0, np.pi), rng.uniform(2, 8)
        tex = np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy) + rng.uniform(0, 6.3))
    elif kind == 2:  # checks
        n = rng.uniform(3, 10)
        tex = np.where((np.floor(xx * n) + np.floor(yy * n)) % 2 == 0, 1.0, -1.0)
    else:  # linear gradient
        theta = rng.uniform(0, 2 * np.pi)
        tex = 2 * (np.cos(theta) * (xx - 0.5) + np.sin(theta) * (yy - 0.5))
    tint = rng.uniform(-1, 1, size=3) * 0.15 + 1.0
    img = base[None, None, :] + rng.uniform(12, 40) * tex[..., None] * tint[None, None, :]
    img += rng.normal(0, rng.uniform(3, 12), size=(size, size, 3))
    return img


def render(objects: list[ShapeObject], rng: np.random.Generator, size: int = IMAGE_SIZE):
    """Image (H, W, 3) uint8 and mask (H, W) uint8 of objects drawn back to front."""
    img = render_background(rng, size)
    mask = np.zeros((size, size), np.uint8)
    covers = []
    for obj in objects:
        alpha = coverage(obj, size)[..., None]
        colour = np.array(obj.rgb, np.float32)
        # a soft shading gradient and a little grain inside the shape
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size]
        shade = ((xx - obj.cx) * np.cos(theta) + (yy - obj.cy) * np.sin(theta)) / max(obj.size, 1.0)
        fill = colour[None, None, :] + 10.0 * shade[..., None] + rng.normal(0, 4, size=(size, size, 3))
        img = img * (1 - alpha) + fill * alpha
        own = alpha[..., 0] >= 0.5
        mask[own] = obj.class_id
        covers.append(own)
    for obj, own in zip(objects, covers, strict=True):
        n = int(own.sum())
        obj.visible = float((mask[own] == obj.class_id).sum() / n) if n else 0.0
    return np.clip(img, 0, 255).round().astype(np.uint8), mask


# ------------------------------------------------------------------ sampling


def _sample_object(rng, cls, size_range, near=None, size=IMAGE_SIZE) -> ShapeObject:
    lo, hi = size_range
    s = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    if near is None:
        margin = min(s * 0.6, size * 0.3)
        cx, cy = rng.uniform(margin, size - margin, size=2)
    else:  # heavy occlusion: centre within about half a size of the shape below
        r = rng.uniform(0.2, 0.7) * max(near.size, s)
        phi = rng.uniform(0, 2 * np.pi)
        cx = float(np.clip(near.cx + r * np.cos(phi), 4, size - 4))
        cy = float(np.clip(near.cy + r * np.sin(phi), 4, size - 4))
    return ShapeObject(
        cls=cls,
        rgb=class_colour(cls, rng),
        cx=float(cx),
        cy=float(cy),
        size=s,
        angle=float(rng.uniform(-25, 25)),
        aspect=float(rng.uniform(0.85, 1.15)),
    )


def _choose_classes(rng, n: int, weights, must_have=None) -> list[str]:
    w = np.asarray(weights, np.float64)
    chosen = []
    if must_have:
        chosen.append(str(rng.choice(list(must_have))))
    while len(chosen) < n:
        p = w.copy()
        for c in chosen:
            p[CLASSES.index(c)] = 0
        chosen.append(CLASSES[int(rng.choice(len(CLASSES), p=p / p.sum()))])
    order = rng.permutation(len(chosen))
    return [chosen[i] for i in order]


def sample_scene(rng: np.random.Generator, kind: str = "standard", weights=CLASS_WEIGHTS):
    """Random objects (drawing order) + rendered image and mask for one scene kind."""
    if kind not in ("standard", "rare", "occlusion"):
        raise ValueError(f"unknown scene kind {kind!r}")
    for _ in range(100):
        if kind == "occlusion":
            n = int(rng.choice([2, 3], p=[0.5, 0.5]))
            size_range, min_visible = (7.0, 22.0), 0.12
        else:
            n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
            size_range, min_visible = (2.5, 24.0), 0.3
        classes = _choose_classes(rng, n, weights, must_have=RARE_CLASSES if kind == "rare" else None)
        objects: list[ShapeObject] = []
        for cls in classes:
            near = objects[-1] if (kind == "occlusion" and objects) else None
            objects.append(_sample_object(rng, cls, size_range, near=near))
        image, mask = render(objects, rng)
        counts = [(mask == o.class_id).sum() for o in objects]
        if all(o.visible >= min_visible for o in objects) and min(counts) >= 3:
            return objects, image, mask
    raise RuntimeError("could not place the shapes of a scene in 100 tries")


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    code = _SPLIT_CODES.get(split)
    if code is None:  # any other split name gets a stable code of its own
        code = 1000 + sum((i + 1) * ord(ch) for i, ch in enumerate(split))
    return np.random.default_rng(np.random.SeedSequence([seed, code, index]))


def generate(index: int, split: str = "val", seed: int = 0, kind: str | None = None) -> Sample:
    """Scene number `index` of `split` (a pure function of its arguments)."""
    if kind is None:
        kind = DEFAULT_SPLITS.get(split, ("standard", 0))[0]
    rng = scene_rng(seed, split, index)
    objects, image, mask = sample_scene(rng, kind)
    return Sample(name=f"{split}_{index:05d}", image=image, mask=mask, objects=objects)


# ------------------------------------------------------------------ on disk


def is_current(folder: str | Path, seed: int = 0) -> bool:
    """Whether `folder` holds the shapes world of this generator version and seed."""
    path = Path(folder) / "classes.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, or damaged: the world is written again
        return False
    return (
        isinstance(meta, dict) and meta.get("world_version") == WORLD_VERSION and meta.get("seed", 0) == seed
    )


def ensure_dataset(folder: str | Path, seed: int = 0) -> bool:
    """Write the world into `folder` unless it is already there; True when it (re)wrote it.

    Only generated files are rewritten (same names, deterministic content), so a folder of an
    older generator version is brought up to date rather than evaluated against the new model.
    """
    if is_current(folder, seed):
        return False
    path = Path(folder) / "classes.json"
    why = "missing" if not path.is_file() else "from another generator version or seed"
    print(f"writing the shapes world to {folder} ({why}) ...", flush=True)
    write_dataset(folder, seed=seed)
    return True


def classes_json(data_root: str = "./datasets/shapes") -> dict:
    return {
        "dataset": "shapes",
        "world_version": WORLD_VERSION,
        "data_root": data_root,
        "image_path": "{data_root}/images/{img_name}.png",
        "gt_path": "{data_root}/masks/{img_name}.png",
        "num_classes_without_background": len(CLASSES),
        "classes": [{"name": c, "synonyms": SYNONYMS[c]} for c in CLASSES],
        "background_words": BACKGROUND_WORDS,
        "class_colours": {c: name for c, (_, name) in CLASS_HUES.items()},
        "class_weights": list(CLASS_WEIGHTS),
        "rare_classes": list(RARE_CLASSES),
    }


def split_list_name(split: str) -> str:
    """The list file of a split in the real datasets' naming: val -> val_id.txt, val_rare -> val_id_rare.txt."""
    head, _, tail = split.partition("_")
    return f"{head}_id_{tail}.txt" if tail else f"{head}_id.txt"


def write_dataset(out: str | Path, seed: int = 0, splits: dict | None = None, data_root: str | None = None):
    """Write images, masks, split lists, captions and classes.json under `out`.

    Deterministic: the same seed writes byte-identical files. Every file goes through a temporary
    name (a full disk or Ctrl-C leaves no half image), and classes.json, which `is_current` reads,
    comes last. Returns the number of images written per split.
    """
    from PIL import Image

    from elbo_t2ialign.runfolder import save_image_atomic
    from elbo_t2ialign.runfolder import write_text_atomic as write

    out = Path(out)
    splits = DEFAULT_SPLITS if splits is None else splits
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    meta: dict[str, dict] = {}
    written = {}
    for split, (kind, count) in splits.items():
        names = []
        for i in range(count):
            s = generate(i, split=split, seed=seed, kind=kind)
            save_image_atomic(Image.fromarray(s.image), out / "images" / f"{s.name}.png")
            save_image_atomic(Image.fromarray(s.mask), out / "masks" / f"{s.name}.png")
            meta[s.name] = {"caption": s.caption, "objects": [asdict(o) for o in s.objects]}
            names.append(s.name)
        write(out / split_list_name(split), "\n".join(names) + "\n")
        if split == "val":  # the small subsets the real datasets have
            write(out / "val_id_100.txt", "\n".join(names[:100]) + "\n")
            write(out / "val_id_10.txt", "\n".join(names[:10]) + "\n")
        written[split] = count
    if data_root is None:
        data_root = str(out) if out.is_absolute() or str(out).startswith(".") else f"./{out}"
    root = data_root
    write(out / "captions.json", json.dumps({k: v["caption"] for k, v in meta.items()}, indent=0) + "\n")
    write(out / "objects.json", json.dumps({k: v["objects"] for k, v in meta.items()}) + "\n")
    write(
        out / "README.md",
        f"Generated by `python -m elbo_t2ialign.testbed.world` (seed {seed}); regenerate rather than edit.\n",
    )
    write(out / "classes.json", json.dumps({**classes_json(root), "seed": seed}, indent=1) + "\n")
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="datasets/shapes", help="output folder (default: datasets/shapes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val", type=int, default=DEFAULT_SPLITS["val"][1], help="images in the val split")
    p.add_argument("--rare", type=int, default=DEFAULT_SPLITS["val_rare"][1])
    p.add_argument("--occlusion", type=int, default=DEFAULT_SPLITS["val_occlusion"][1])
    p.add_argument("--train", type=int, default=0, help="also write this many training images")
    p.add_argument("--ensure", action="store_true", help="only write when missing or of another version")
    args = p.parse_args(argv)
    if args.ensure:
        if not ensure_dataset(args.out, args.seed):
            print(f"{args.out} already holds the shapes world (version {WORLD_VERSION}, seed {args.seed})")
        return
    splits = {
        "val": ("standard", args.val),
        "val_rare": ("rare", args.rare),
        "val_occlusion": ("occlusion", args.occlusion),
    }
    if args.train:
        splits["train"] = ("standard", args.train)
    t0 = time.perf_counter()
    written = write_dataset(args.out, seed=args.seed, splits=splits)
    total = sum(written.values())
    print(f"wrote {total} images to {args.out} ({written}) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
