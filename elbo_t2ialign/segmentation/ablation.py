"""The ablation report of a run with several calibration variants (`variants.py`).

The evaluator accumulates every variant in its one pass over the masks; from those results this
module makes one row per variant (mIoU, precision, recall, F1 and mIoU of small / medium / large
objects, each variant at its own threshold, with deltas to `baseline`), the markdown table, and
two plots: mIoU against calibration strength, and every variant's mIoU against threshold.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from elbo_t2ialign.runfolder import read_json, save_figure_atomic
from elbo_t2ialign.segmentation.config import SegmentationError
from elbo_t2ialign.segmentation.layout import SegmentationFolder
from elbo_t2ialign.segmentation.metrics import SweepAccumulator
from elbo_t2ialign.segmentation.variants import recorded, written

log = logging.getLogger(__name__)

SIZES = ("small", "medium", "large")  # equal-count thirds of the ground-truth instances by area
ROW_METRICS = ("mIoU", "precision", "recall", "F1", *SIZES)


def evaluated_variants(folder: SegmentationFolder, names: list[str]) -> dict[str, dict[str, Any]]:
    """Variant -> setting, in the order the run recorded them, for the variants that every
    finished image has; a variant only some images have (a run still adding it) is left out."""
    counts: Counter[str] = Counter()
    for name in names:
        counts.update(written(read_json(folder.image_dir(name) / "scores.json")))
    settings = recorded(folder, list(counts))
    partial = [f"{v} ({counts[v]} of {len(names)} images)" for v in settings if 0 < counts[v] < len(names)]
    if partial:
        log.warning(
            "not evaluated, not finished on every image yet: %s; rerun the segmentation to add them",
            ", ".join(partial),
        )
    complete = {v: s for v, s in settings.items() if counts[v] == len(names)}
    if not complete:
        raise SegmentationError(
            f"{folder.root}: no calibration variant is finished on every image "
            f"({', '.join(partial)}); rerun the segmentation to finish them"
        )
    return complete


def rows(
    results: dict[str, dict[str, Any]], accs: dict[str, SweepAccumulator], settings: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per variant; "delta" holds the differences to baseline when the run has it."""
    out = []
    for v, result in results.items():
        sizes = [b["mIoU"] for b in accs[v].size_buckets(result["threshold"], len(SIZES))]
        if len(sizes) < len(SIZES):  # fewer than three objects in the run
            sizes = [float("nan")] * len(SIZES)
        row = {
            "variant": v,
            **settings[v],
            "threshold": result["threshold"],
            **{k: result[k] for k in ROW_METRICS[:4]},
            **dict(zip(SIZES, sizes, strict=True)),
            **({"crf_mIoU": result["crf"]["mIoU"]} if "crf" in result else {}),
            **({"searches": result["searches"]} if "searches" in result else {}),
        }
        out.append(row)
    base = next((r for r in out if r["variant"] == "baseline"), None)
    for row in out:
        if base is not None and row is not base:
            row["delta"] = {k: row[k] - base[k] for k in ROW_METRICS if k in row}
    return out


def markdown(m: dict[str, Any]) -> list[str]:
    """The ablation section of metrics.md (also what `make demo` prints)."""
    table = m["ablation"]
    crf = all("crf_mIoU" in r for r in table)
    searched = m.get("threshold_search", "sweep")
    other = "binary" if searched == "sweep" else "sweep"
    # the other threshold search's choice, shown when it differs from this one for some variant
    show_other = m["threshold_mode"] != "fixed" and any(
        "searches" in r and r["searches"][other]["threshold"] != r["searches"][searched]["threshold"]
        for r in table
    )
    other_name = {"binary": "binary search (reference)", "sweep": "exact sweep"}[other]
    header = [
        "variant",
        "setting",
        "threshold",
        *ROW_METRICS,
        *(["mIoU + CRF"] if crf else []),
        *([f"{other_name}: threshold, mIoU"] if show_other else []),
    ]
    body = []
    for r in table:
        delta = r.get("delta", {})
        cells = [_cell(r[k], delta.get(k)) for k in ROW_METRICS]
        body.append(
            [
                r["variant"],
                r["label"],
                f"{r['threshold']:.2f}",
                *cells,
                *([_cell(r["crf_mIoU"])] if crf else []),
                *([_other_search(r, searched, other)] if show_other else []),
            ]
        )
    lines = ["## Ablation: every calibration variant of this run", ""]
    lines += [
        "| " + " | ".join(x) + " |" for x in (header, ["---"] * 3 + ["---:"] * (len(header) - 3), *body)
    ]
    lines += [
        "",
        "Each variant at its own best threshold"
        + (" (fixed threshold)" if m["threshold_mode"] == "fixed" else "")
        + (" as the reference's binary search finds it" if searched == "binary" else "")
        + "; in brackets: the difference to `baseline`. small / medium / large: mIoU over the ground-truth "
        "objects in the smallest, middle and largest third by area (equal counts). All variants come "
        "from the same network passes (same noise, same attention), so their differences are the "
        "calibration's alone."
        + (
            f" Last column: the threshold the {other_name} picks on the same curve, and its mIoU "
            "(the reference implementation's binary search assumes a curve with one peak)."
            if show_other
            else ""
        ),
        "",
    ]
    return lines


def _other_search(row: dict[str, Any], searched: str, other: str) -> str:
    found, mine = row["searches"][other], row["searches"][searched]
    if found["threshold"] == mine["threshold"]:
        return "same"
    return f"{found['threshold']:.2f}, {_cell(found['mIoU'])}"


def _cell(value: float | None, delta: float | None = None) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:.2f}" if delta is None or not np.isfinite(delta) else f"{value:.2f} ({delta:+.2f})"


def write_plots(m: dict[str, Any], folder: Path) -> list[Path]:
    """plots/miou_vs_strength.png and plots/threshold_curves.png; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / "miou_vs_strength.png", folder / "threshold_curves.png"]
    title = f"{m['dataset']} {m['split']}, model {m['model']}"

    fig, ax = plt.subplots(figsize=(6, 4))
    families = {
        (True, False): "ELBO temperature",
        (True, True): "fixed temperature",
        (False, False): "ELBO temperature, cross-attention only",
        (False, True): "fixed, cross-attention only",
    }
    for (refine, fixed), label in families.items():
        # strength 1 is the same map with or without a fixed temperature: it starts both lines
        rows = sorted(
            (
                r
                for r in m["ablation"]
                if r["refine"] == refine and (r["fixed"] == fixed or r["strength"] == 1.0)
            ),
            key=lambda r: r["strength"],
        )
        if not any(r["fixed"] == fixed for r in rows):
            continue
        ax.plot(
            [r["strength"] for r in rows],
            [r["mIoU"] for r in rows],
            marker="o" if refine else "s",
            linestyle="--" if fixed else "-",
            label=label,
        )
        for r in rows:
            if r["fixed"] == fixed:  # a strength-1 point shared by two lines is named once
                ax.annotate(
                    r["variant"],
                    (r["strength"], r["mIoU"]),
                    textcoords="offset points",
                    xytext=(4, -10) if fixed else (-4, 5),
                    ha="left" if fixed else "right",
                    fontsize=7,
                )
    ax.set(
        xlabel="strength (tau = strength ** normalised ELBO loss; fixed: tau = strength)",
        ylabel="mIoU (%)",
        title=title,
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure_atomic(fig, files[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v, result in m["variants"].items():
        curve = np.array([np.nan if y is None else y for y in result["curve"]["mIoU"]], dtype=float)
        line = ax.plot(result["curve"]["thresholds"], curve, label=f"{v}: {result['setting']['label']}")[0]
        ax.plot(result["threshold"], result["mIoU"], marker="o", color=line.get_color())
    ax.set(xlabel="threshold", ylabel="mIoU (%)", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, files[1], dpi=120)
    plt.close(fig)
    return files
