"""Map difference between two segmentation run folders of the same images and classes.

    python scripts/compare_maps.py RUN_A RUN_B [--variants baseline elbo cross]

Per variant: the mean and the largest absolute difference of the 8-bit maps (in [0, 1]) over the
images both finished, over all classes and over the classes whose collection prompt differs
between the two runs (scores.json "collect_prompts" / "prompt_of"; docs/interpretations.md).
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image


def _prompt(scores: dict, name: str) -> str:
    return scores["collect_prompts"][scores["prompt_of"][name]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--variants", nargs="+", default=["baseline", "elbo", "cross"])
    args = parser.parse_args()
    images = sorted(
        p.name for p in (args.a / "maps").iterdir() if (args.b / "maps" / p.name / "scores.json").is_file()
    )
    diffs = {v: {"all": [], "moved": []} for v in args.variants}
    moved_images = 0
    for image in images:
        sa, sb = (json.loads((run / "maps" / image / "scores.json").read_text()) for run in (args.a, args.b))
        moved = [c for c in sa["classes"] if _prompt(sa, c) != _prompt(sb, c)]
        moved_images += bool(moved)
        for cid, c in zip(sa["class_ids"], sa["classes"], strict=True):
            for v in args.variants:
                ma, mb = (
                    np.asarray(Image.open(run / "maps" / image / f"{v}_{cid:03d}.png"), np.float32) / 255
                    for run in (args.a, args.b)
                )
                d = np.abs(ma - mb)
                diffs[v]["all"].append((d.mean(), d.max()))
                if c in moved:
                    diffs[v]["moved"].append((d.mean(), d.max()))
    print(f"{len(images)} images, {moved_images} with classes in other prompts")
    for v, parts in diffs.items():
        for part, values in parts.items():
            if values:
                arr = np.array(values)
                print(
                    f"{v:9s} {part:5s} maps {len(arr):4d}  mean |diff| {arr[:, 0].mean():.4f}  max {arr[:, 1].max():.3f}"
                )


if __name__ == "__main__":
    main()
