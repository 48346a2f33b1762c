"""The run folder of a segmentation run: one place that knows every path.

Layout (``<run>`` is ``cfg.output_dir``)::

    <run>/
      config.yaml            resolved config of the first launch (a resume must match it)
      run.json               git revision, seed, dataset, split, model, creation time
      launches.jsonl         one line per launch: time, shard, argv, git revision, host
      segment.log            the runner's log (segment.shard<i>-of-<n>.log when sharded)
      variants.json          the calibration variants ever asked of this folder, in order:
                             [{"name", "strength", "fixed", "refine", "label"}] (variants.py)
      maps/<image>/          one folder per finished image, renamed into place when complete
        scores.json          {"image", "index", "seed", "size": [H, W], "class_ids", "classes",
                              "phrases", "phrase_source", "elbo": {class: float}, "tau": {class: float},
                              "variants": [names on disk], "elbo_from": run folder (only if reused)}
                             ("elbo": summed ELBO loss, null when no variant needed it; "tau": of
                             the configured setting; no "variants": elbo and baseline)
        elbo_<id>.png        calibrated heatmap of class <id> (ground-truth id, 3 digits),
                             8-bit grayscale, value = round(255 * heat), image-sized
        baseline_<id>.png    the strength-1 map from the same captured attention
        <variant>_<id>.png   every other variant of `variants` (s2_<id>.png, fixed3_<id>.png,
                             cross_<id>.png, ...), from the same network passes
      maps/.tmp-<image>/     the image in flight (a killed run leaves at most this one)
      skipped/<image>.json   an image that could not be read: {"image", "index", "error"}
      metrics.json           evaluator: {"elbo": {...}, "baseline": {...}, "delta_mIoU", ...,
                             "variants": {name: {...}}, "ablation": [one row per variant]}
      metrics.md             evaluator: the paper's table with the delta, the ablation table,
                             size buckets, classes
      plots/                 miou_vs_threshold.png, miou_by_size.png, overlays.png,
                             miou_vs_strength.png, threshold_curves.png (every variant)

``metrics.json`` keys read by other tools: ``elbo.mIoU``, ``elbo.threshold``,
``baseline.mIoU``, ``baseline.threshold`` (mIoU in percent, threshold in [0, 1]).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

VARIANTS = ("elbo", "baseline")  # calibrated map, strength-1 map: what a folder without variants.json holds


class RunFolder:
    """Paths inside one run folder; creating it never removes anything."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.run_info = self.root / "run.json"
        self.launches = self.root / "launches.jsonl"
        self.maps = self.root / "maps"
        self.skipped = self.root / "skipped"
        self.plots = self.root / "plots"

    def image_dir(self, name: str) -> Path:
        return self.maps / name

    def temp_dir(self, name: str) -> Path:
        return self.maps / f".tmp-{name}"

    def skip_record(self, name: str) -> Path:
        return self.skipped / f"{name}.json"

    def is_done(self, name: str) -> bool:
        return (self.image_dir(name) / "scores.json").is_file()

    def finished_images(self) -> list[str]:
        """Names of images whose folder is complete (temporary folders excluded)."""
        if not self.maps.is_dir():
            return []
        return sorted(p.name for p in self.maps.iterdir() if not p.name.startswith(".tmp-") and self.is_done(p.name))

    def skipped_images(self) -> dict[str, dict[str, Any]]:
        if not self.skipped.is_dir():
            return {}
        return {p.stem: read_json(p) for p in sorted(self.skipped.glob("*.json"))}


def heatmap_name(variant: str, class_id: int) -> str:
    return f"{variant}_{class_id:03d}.png"


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary name in the same folder, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
