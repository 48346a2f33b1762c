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
                              "variants": [names on disk], "elbo_from": run folder (only if reused),
                              "prompt": the collection prompt when the runner built one (phrase
                              files, captions), "caption", "appended_to_caption": [class words],
                              "caption_words_dropped": n (only when shortened to fit),
                              "collect_prompts": [the collection prompt(s)], "prompt_of": {class:
                              index into collect_prompts}, "truncated": [classes cut off, only with
                              elbo.prompt_overflow=truncate]}
                             ("elbo": summed ELBO loss, null when no variant needed it; "tau": of
                             the configured setting; no "variants": elbo and baseline)
        elbo_<id>.png        calibrated heatmap of class <id> (ground-truth id, 3 digits),
                             8-bit grayscale, value = round(255 * heat), image-sized
        baseline_<id>.png    the strength-1 map from the same captured attention
        <variant>_<id>.png   every other variant of `variants` (s2_<id>.png, fixed3_<id>.png,
                             cross_<id>.png, ...), from the same network passes
        tokens.npy           save_token_maps=true: every text token's cross-attention, (P, R, R, L)
      maps/.tmp-<image>/     the image in flight (a killed run leaves at most this one)
      captions.json          dataset.prompt=caption: {"captioner": its settings, "captions":
                             {image: caption}}, written before the model loads (captioning.py)
      skipped/<image>.json   an image that could not be read: {"image", "index", "error"}
      damaged/<image>/       a finished image whose files were found missing or unreadable on
                             resume, moved aside (the image is computed again)
      identity.json          what produced the maps: dataset (split and class digests, data paths)
                             and model (weight digest or hub revision); a relaunch must match it
      variants.json          each variant's settings, in the order they were first asked for
      .lock, .lock.shard<i>-of-<n>   held by the running launch (pid, host, start time)
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

from pathlib import Path
from typing import Any

from PIL import Image

from elbo_t2ialign.runfolder import RunFolder, read_json

VARIANTS = ("elbo", "baseline")  # calibrated map, strength-1 map: what a folder without variants.json holds


class SegmentationFolder(RunFolder):
    """Paths inside one segmentation run folder; creating it never removes anything."""

    log_name = "segment.log"

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
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
        return sorted(
            p.name for p in self.maps.iterdir() if not p.name.startswith(".tmp-") and self.is_done(p.name)
        )

    def damaged_dir(self, name: str) -> Path:
        path, n = self.root / "damaged" / name, 1
        while path.exists():
            path, n = self.root / "damaged" / f"{name}.{n}", n + 1
        return path

    def problems(self, name: str) -> list[str]:
        """What is wrong with the files of a finished image (empty when every file is readable)."""
        folder = self.image_dir(name)
        try:
            scores = read_json(folder / "scores.json")
            ids, (height, width) = [int(i) for i in scores["class_ids"]], scores["size"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return [f"{folder / 'scores.json'} unreadable ({type(err).__name__}: {err})"]
        found = []
        for variant in scores.get("variants") or VARIANTS:  # the maps this image's scores.json lists
            for class_id in ids:
                path = folder / heatmap_name(variant, class_id)
                try:
                    with Image.open(path) as img:
                        img.load()
                        size = img.size
                except FileNotFoundError:
                    found.append(f"{path} missing")
                    continue
                except (OSError, SyntaxError, ValueError) as err:
                    found.append(f"{path} unreadable ({err})")
                    continue
                if size != (width, height):
                    found.append(f"{path} is {size[0]}x{size[1]}, expected {width}x{height}")
        return found

    def skipped_images(self) -> dict[str, dict[str, Any]]:
        """Image -> its skip record; a damaged record (only a note of why an image was skipped) is
        reported as such rather than stopping the evaluation."""
        if not self.skipped.is_dir():
            return {}
        out = {}
        for path in sorted(self.skipped.glob("*.json")):
            try:
                out[path.stem] = dict(read_json(path))
            except (ValueError, TypeError) as err:
                out[path.stem] = {"image": path.stem, "error": f"skip record {path} unreadable ({err})"}
        return out


def heatmap_name(variant: str, class_id: int) -> str:
    return f"{variant}_{class_id:03d}.png"
