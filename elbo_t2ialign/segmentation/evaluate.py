"""Evaluator: reads a run folder (see `layout.py`), writes metrics.json, metrics.md and plots.

Every calibration variant of the run (by default calibrated `elbo` and strength-1
`baseline`; see `variants.py`) is evaluated from one pass over the stored
heatmaps: an exact sweep over thresholds 0.01..0.99 (or one fixed threshold),
overall / per-class / per-size-bucket metrics, optional CRF, and the ablation
table and plots of `ablation.py`. The reference implementation's threshold
search, size buckets and CRF unary are options (`search`, `buckets`, `crf_unary`).
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from elbo_t2ialign.cli import DamagedFileError, cli_errors, damaged, debug_requested
from elbo_t2ialign.runfolder import (
    IDENTITY_FILE,
    REPO_ROOT,
    lock_held,
    read_config,
    read_json,
    read_record,
    write_json_atomic,
)
from elbo_t2ialign.segmentation import ablation
from elbo_t2ialign.segmentation import crf as dense_crf
from elbo_t2ialign.segmentation.config import SegmentationError
from elbo_t2ialign.segmentation.datasets import SegDataset
from elbo_t2ialign.segmentation.layout import VARIANTS, SegmentationFolder, heatmap_name
from elbo_t2ialign.segmentation.metrics import (
    BUCKET_RULES,
    SEARCHES,
    THRESHOLDS,
    SweepAccumulator,
    best_threshold,
    binary_search_threshold,
    choose_threshold,
    class_metrics,
    intersect_and_union,
    predict,
    summary,
)
from elbo_t2ialign.segmentation.report import write_markdown, write_plots

log = logging.getLogger(__name__)


def evaluate(
    run_dir: str | Path,
    threshold: float | None = None,
    crf: bool = False,
    out_dir: str | Path | None = None,
    overlays: int = 4,
    progress: bool = True,
    search: str = "sweep",
    buckets: str = "equal",
    crf_unary: str = "onehot",
) -> dict[str, Any]:
    """Evaluate a run folder; returns the metrics also written to `<out_dir>/metrics.json`.

    search: "sweep" (the exact best threshold) or "binary" (the reference implementation's binary
    search); buckets: "equal" (equal-count size buckets) or "fixed-size" (the reference's runs of
    len // 10 + 1); crf_unary: "onehot" (the reference's) or "confidence" (see `crf.py`)."""
    folder = SegmentationFolder(run_dir)
    if not folder.config.is_file():
        raise SegmentationError(f"{run_dir} is not a segmentation run folder (no config.yaml)")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise SegmentationError(f"--threshold must lie in (0, 1), got {threshold}")
    if search not in SEARCHES:
        raise SegmentationError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
    if buckets not in BUCKET_RULES:
        raise SegmentationError(f"buckets must be one of {', '.join(BUCKET_RULES)}, got {buckets!r}")
    dense_crf.check_unary(crf_unary)
    if crf:
        dense_crf.require()
    conf = read_config(
        folder.config, resolve=True, keys=("dataset", "model"), remedy="restore it from a copy"
    )
    dataset = SegDataset(dataset_config(folder, conf))  # type: ignore[arg-type]
    names = _finished_in_split_order(folder, dataset)
    check_readable(folder, dataset, names)
    settings = ablation.evaluated_variants(folder, names)
    accs = {v: SweepAccumulator(len(dataset.class_names) + 1) for v in settings}
    sources: Counter[str] = Counter()
    for name in tqdm(names, desc="evaluate", unit="img", disable=not progress):
        gt, ids, maps, scores = load_image_result(folder, dataset, name, list(settings))
        sources[scores.get("phrase_source", "class_names")] += 1
        for v in settings:
            accs[v].add(gt, ids, maps[v], name)
    results = {v: _variant_result(accs[v], dataset, threshold, search, buckets) for v in settings}
    if crf:
        for v, crf_summary in _crf_pass(folder, dataset, names, results, crf_unary, progress).items():
            results[v]["crf"] = crf_summary
    metrics = _assemble(conf, folder, dataset, names, results, sources, threshold)
    metrics.update(threshold_search=search, bucket_rule=buckets, **({"crf_unary": crf_unary} if crf else {}))
    metrics["variants"] = {v: {**results[v], "setting": settings[v]} for v in settings}
    metrics["ablation"] = ablation.rows(results, accs, settings)
    out = Path(out_dir) if out_dir else folder.root
    write_json_atomic(out / "metrics.json", _json_safe(metrics))
    write_markdown(metrics, out / "metrics.md")
    if set(VARIANTS) <= set(results):  # the calibrated-against-baseline figures
        write_plots(metrics, _overlay_rows(folder, dataset, names[:overlays], results), out / "plots")
    ablation.write_plots(metrics, out / "plots")
    log.info(
        "%s -> %s",
        ", ".join(f"{v} mIoU {r['mIoU']:.2f} (th {r['threshold']:.2f})" for v, r in results.items()),
        out,
    )
    if crf:
        log.info(
            "with dense CRF: %s",
            ", ".join(f"{v} mIoU {r['crf']['mIoU']:.2f}" for v, r in results.items() if "crf" in r),
        )
    return metrics


def _finished_in_split_order(folder: SegmentationFolder, dataset: SegDataset) -> list[str]:
    """Finished images of the split, in split order (outputs of images outside the split are left out)."""
    finished = set(folder.finished_images())
    names = [n for n in dataset.images if n in finished]
    if len(names) < len(finished):
        log.warning(
            "%d finished image(s) are not in split %s and are not evaluated",
            len(finished) - len(names),
            dataset.split,
        )
    if not names:
        raise SegmentationError(
            f"{folder.root} has no finished images (maps/<image>/scores.json); run segmentation first"
        )
    return names


def dataset_config(folder: SegmentationFolder, conf: dict[str, Any]) -> dict[str, Any]:
    """The run's dataset config with its data paths as the run resolved them (identity.json), so the
    evaluator finds the data from any working directory; older folders: relative paths are tried
    from the working directory, then from the repository root."""
    dcfg = dict(conf["dataset"])
    recorded = folder.root / IDENTITY_FILE
    if recorded.is_file():
        remedy = "restore it, or move it away (the data is then looked up by the config's paths)"
        try:
            paths = read_record(recorded, dict, remedy)["dataset"]
            return {**dcfg, "data_root": paths["data_root"], "metadata": paths["metadata"]}
        except (KeyError, TypeError) as err:
            raise damaged(recorded, f"no dataset paths: {type(err).__name__} {err}", remedy) from None
    for key in ("data_root", "metadata"):
        value = dcfg.get(key)
        if value and not Path(value).expanduser().exists() and (REPO_ROOT / value).exists():
            dcfg[key] = str(REPO_ROOT / value)
    return dcfg


def check_readable(folder: SegmentationFolder, dataset: SegDataset, names: list[str]) -> None:
    """Every file the evaluation reads: all problems named at once, not the first one only."""
    problems = [f"{name}: {p}" for name in names for p in folder.problems(name)]
    problems += [
        f"{name}: ground truth {dataset.mask_path(name)} missing"
        for name in names
        if not dataset.mask_path(name).is_file()
    ]
    if problems:
        shown = "; ".join(problems[:20]) + (
            f"; ... ({len(problems) - 20} more)" if len(problems) > 20 else ""
        )
        raise DamagedFileError(
            f"{len(problems)} file(s) missing or unreadable: {shown}. Rerun the segmentation "
            "command with the same config: it recomputes damaged images"
        )


def load_image_result(
    folder: SegmentationFolder,
    dataset: SegDataset,
    name: str,
    variants: list[str] | tuple[str, ...] = VARIANTS,
) -> tuple[np.ndarray, list[int], dict[str, np.ndarray], dict[str, Any]]:
    """Ground truth (H, W), class ids, {variant: (K, H, W) uint8 maps} and scores.json of one image."""
    scores = read_json(folder.image_dir(name) / "scores.json")
    ids = [int(i) for i in scores["class_ids"]]
    gt = dataset.load_labels(name)
    maps = {}
    for v in variants:
        stack = [_read_map(folder.image_dir(name) / heatmap_name(v, c), gt.shape, name) for c in ids]
        maps[v] = np.stack(stack) if stack else np.zeros((0, *gt.shape), np.uint8)
    return gt, ids, maps, scores


def _read_map(path: Path, shape: tuple[int, ...], name: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L") if img.mode != "L" else img)
    except (OSError, SyntaxError) as err:
        raise SegmentationError(f"heatmap of {name} unreadable: {path}: {err}") from None
    if arr.shape != shape:
        raise SegmentationError(
            f"heatmap {path} is {arr.shape[::-1]} but the mask of {name} is {shape[::-1]}"
        )
    return arr


def _variant_result(
    acc: SweepAccumulator, dataset: SegDataset, fixed: float | None, search: str, buckets: str
) -> dict[str, Any]:
    curve = acc.curve()
    th = fixed if fixed is not None else choose_threshold(curve, search)
    overall, per_class = acc.at(th)
    names = ["background", *dataset.class_names]
    table = {}
    for c, cname in enumerate(names):
        if per_class["gt_pixels"][c] + per_class["pred_pixels"][c] == 0:
            continue  # class absent from both ground truth and prediction
        row = {k: float(per_class[k][c] * 100) for k in ("IoU", "precision", "recall", "FP", "FN", "F1")}
        row.update(
            id=c, gt_pixels=int(per_class["gt_pixels"][c]), pred_pixels=int(per_class["pred_pixels"][c])
        )
        table[cname] = row
    at = dict(zip(THRESHOLDS.tolist(), curve.tolist(), strict=True))
    found = {"sweep": best_threshold(curve), "binary": binary_search_threshold(curve)}
    return {
        **overall,
        "threshold": th,
        "per_class": table,
        "size_buckets": acc.size_buckets(th, rule=buckets),
        "curve": {"thresholds": THRESHOLDS.tolist(), "mIoU": curve.tolist()},
        # both searches on this curve, so a report can show where the reference's would have stopped
        "searches": {k: {"threshold": t, "mIoU": at[t]} for k, t in found.items()},
    }


def _crf_pass(
    folder: SegmentationFolder,
    dataset: SegDataset,
    names: list[str],
    results: dict[str, Any],
    unary: str = "onehot",
    progress: bool = True,
) -> dict[str, Any]:
    """Second pass: CRF on each variant's thresholded label map, pooled areas -> summary."""
    n = len(dataset.class_names) + 1
    totals = {v: [np.zeros(n, np.int64) for _ in range(4)] for v in results}
    for name in tqdm(names, desc="dense CRF", unit="img", disable=not progress):
        gt, ids, maps, _ = load_image_result(folder, dataset, name, list(results))
        rgb = np.asarray(dataset.load_image(name))
        for v in results:
            thresholded = predict(maps[v], ids, results[v]["threshold"])
            labels = dense_crf.crf_labels(rgb, thresholded, ids, num_classes=n, unary=unary)
            for total, part in zip(totals[v], intersect_and_union(labels, gt, n), strict=True):
                total += part
    return {
        v: {**summary(class_metrics(*totals[v])), "threshold": results[v]["threshold"], "unary": unary}
        for v in results
    }


def _assemble(
    conf: Any,
    folder: SegmentationFolder,
    dataset: SegDataset,
    names: list[str],
    results: dict[str, Any],
    sources: Counter[str],
    threshold: float | None,
) -> dict[str, Any]:
    limit = conf.get("num_images")
    expected = dataset.images if limit in (None, "") else dataset.images[: int(limit)]
    skipped = folder.skipped_images()
    done = set(names)
    return {
        "dataset": dataset.name,
        "split": dataset.split,
        "model": conf["model"].get("name"),
        "strength": conf.get("elbo", {}).get("strength"),
        "threshold_mode": "fixed" if threshold is not None else "sweep",
        "num_images": len(names),
        "num_expected": len(expected),
        "skipped": {k: v.get("error") for k, v in skipped.items() if k not in done},
        "unfinished": sum(n not in done and n not in skipped for n in expected),
        "running": lock_held(folder.root),  # a segmentation launch still writes the folder
        "phrase_sources": dict(sources),
        **{v: results[v] for v in VARIANTS if v in results},
        **(
            {"delta_mIoU": results["elbo"]["mIoU"] - results["baseline"]["mIoU"]}
            if set(VARIANTS) <= set(results)
            else {}
        ),
    }


def _overlay_rows(
    folder: SegmentationFolder, dataset: SegDataset, names: list[str], results: dict[str, Any]
) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        gt, ids, maps, _ = load_image_result(folder, dataset, name)
        rows.append(
            {
                "name": name,
                "image": np.asarray(dataset.load_image(name)),
                "gt": gt,
                "classes": ids,
                "heat": maps["elbo"].max(0) if ids else np.zeros(gt.shape, np.uint8),  # (H, W) uint8
                **{f"pred_{v}": predict(maps[v], ids, results[v]["threshold"]) for v in VARIANTS},
            }
        )
    return rows


def _json_safe(obj: Any) -> Any:
    """NaN (metric undefined) -> null, so metrics.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m elbo_t2ialign.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dir", help="a folder written by python -m elbo_t2ialign.segment")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="fixed threshold in (0, 1) instead of the oracle sweep over 0.01..0.99",
    )
    parser.add_argument(
        "--search",
        choices=SEARCHES,
        default="sweep",
        help="threshold choice: sweep = the exact best of 0.01..0.99 (default); binary = the reference "
        "implementation's binary search (assumes one peak; reproduces its threshold and mIoU)",
    )
    parser.add_argument(
        "--buckets",
        choices=BUCKET_RULES,
        default="equal",
        help="size buckets: equal = 10 equal-count buckets (default); fixed-size = the reference's runs "
        "of len // 10 + 1 instances (the last ones can be empty)",
    )
    parser.add_argument("--crf", action="store_true", help="also report dense-CRF post-processed metrics")
    parser.add_argument(
        "--crf-unary",
        choices=dense_crf.UNARIES,
        default="onehot",
        help="onehot = the reference's unary (one-hot over all classes, clipped to [0.01, 0.99]; default); "
        "confidence = 0.7 for the thresholded label over the image's own classes",
    )
    parser.add_argument("--out", default=None, help="where to write metrics and plots (default: run_dir)")
    parser.add_argument("--overlays", type=int, default=4, help="images in the overlay figure")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an expected error too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    debug = debug_requested(["--debug"] if args.debug else [])[0]
    cli_errors(
        lambda: evaluate(
            args.run_dir,
            args.threshold,
            args.crf,
            args.out,
            args.overlays,
            not args.no_progress,
            search=args.search,
            buckets=args.buckets,
            crf_unary=args.crf_unary,
        ),
        (SegmentationError,),
        debug,
    )
    return 0
