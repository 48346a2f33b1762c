"""metrics.md (the table a paper would print) and the evaluator's plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from elbo_t2ialign.runfolder import save_figure_atomic, write_text_atomic
from elbo_t2ialign.segmentation import ablation

COLUMNS = ("mIoU", "precision", "recall", "FP", "FN", "F1")


def _num(x: Any, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return ["| " + " | ".join(r) + " |" for r in (header, align, *rows)]


def write_markdown(m: dict[str, Any], path: Path) -> None:
    """Main table with the delta, the ablation over the run's variants, size buckets, per-class IoU
    and notes on the data (without `elbo` or `baseline` in the run: the ablation and the notes)."""
    mode = {
        "sweep": "oracle sweep over 0.01..0.99 (each method its best)",
        "fixed": "fixed",
    }[m["threshold_mode"]]
    if m["threshold_mode"] == "sweep" and m.get("threshold_search") == "binary":
        mode = "the reference implementation's binary search over 0.01..0.99 (each method its own)"
    lines = [
        f"# Segmentation: {m['dataset']} ({m['split']}), model {m['model']}",
        "",
        f"Images evaluated: {m['num_images']} of {m['num_expected']}; threshold: {mode}.",
        "",
    ]
    if "elbo" in m and "baseline" in m:
        lines += _comparison(m)
    else:
        lines += ablation.markdown(m)
    lines += ["", *_notes(m)]
    write_text_atomic(path, "\n".join(lines) + "\n")


def _comparison(m: dict[str, Any]) -> list[str]:
    base, elbo = m["baseline"], m["elbo"]
    lines: list[str] = []
    rows = [
        ["baseline (strength 1)", _num(base["threshold"]), *(_num(base[k]) for k in COLUMNS)],
        [
            f"ELBO-T2IAlign (strength {m['strength']})",
            _num(elbo["threshold"]),
            *(_num(elbo[k]) for k in COLUMNS),
        ],
        ["delta", "", *(_num(_diff(elbo[k], base[k]), signed=True) for k in COLUMNS)],
    ]
    if "crf" in elbo:
        rows.insert(2, ["baseline + CRF", _num(base["threshold"]), *(_num(base["crf"][k]) for k in COLUMNS)])
        rows.insert(
            3, ["ELBO-T2IAlign + CRF", _num(elbo["threshold"]), *(_num(elbo["crf"][k]) for k in COLUMNS)]
        )
    lines += _table(["method", "threshold", *COLUMNS], rows)
    lines += ["", *ablation.markdown(m)]
    rule = (
        "runs of instances // 10 + 1, as the reference"
        if m.get("bucket_rule") == "fixed-size"
        else "10 equal-count buckets"
    )
    lines += [f"## mIoU by ground-truth area ({rule}, small objects first)", ""]
    lines += _table(
        ["bucket", "area / image", "instances", "baseline", "ELBO", "delta"],
        [
            [
                str(b["bucket"]),
                f"{b['min_ratio']:.4f}-{b['max_ratio']:.4f}" if b["count"] else "-",
                str(b["count"]),
                _num(b["mIoU"]),
                _num(e["mIoU"]),
                _num(_diff(e["mIoU"], b["mIoU"]), signed=True),
            ]
            for b, e in zip(base["size_buckets"], elbo["size_buckets"], strict=True)
        ],
    )
    lines += ["", "## IoU per class", ""]
    classes = sorted(
        set(base["per_class"]) | set(elbo["per_class"]),
        key=lambda c: (base["per_class"].get(c) or elbo["per_class"][c])["id"],
    )
    lines += _table(
        ["class", "baseline", "ELBO", "delta", "gt pixels"],
        [
            [
                c,
                _num(_get(base, c)),
                _num(_get(elbo, c)),
                _num(_diff(_get(elbo, c), _get(base, c)), signed=True),
                str((base["per_class"].get(c) or elbo["per_class"][c])["gt_pixels"]),
            ]
            for c in classes
        ],
    )
    return lines


def _get(result: dict[str, Any], cls: str) -> float | None:
    row = result["per_class"].get(cls)
    return None if row is None else row["IoU"]


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _notes(m: dict[str, Any]) -> list[str]:
    notes = ["## Notes", ""]
    if m["skipped"]:
        notes.append(
            f"- {len(m['skipped'])} image(s) skipped (unreadable input, see skipped/): "
            + ", ".join(sorted(m["skipped"])[:20])
        )
    if m["unfinished"]:
        notes.append(
            f"- {m['unfinished']} image(s) of the split are not finished yet: the run is incomplete."
            + (" The segmentation is still running: evaluate again when it ends." if m.get("running") else "")
        )
    fallback = {k: v for k, v in m["phrase_sources"].items() if k.startswith("class_names (")}
    if fallback:
        notes.append(
            f"- {sum(fallback.values())} image(s) had no per-image phrase file; their prompts used "
            "class names (method.md §9 fallback), so numbers are not comparable with phrase prompts."
        )
    if len(notes) == 2:
        notes.append("- every image of the split was evaluated.")
    return notes


def write_plots(m: dict[str, Any], overlays: list[dict[str, Any]], folder: Path) -> list[Path]:
    """mIoU against threshold, mIoU per size bucket, and an overlay figure; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    labels = {"baseline": "baseline (strength 1)", "elbo": f"ELBO-T2IAlign (strength {m['strength']})"}
    files = [folder / "miou_vs_threshold.png", folder / "miou_by_size.png", folder / "overlays.png"]

    fig, ax = plt.subplots(figsize=(6, 4))
    for v in ("baseline", "elbo"):
        curve = np.array([np.nan if y is None else y for y in m[v]["curve"]["mIoU"]], dtype=float)
        line = ax.plot(m[v]["curve"]["thresholds"], curve, label=labels[v])[0]
        ax.axvline(m[v]["threshold"], color=line.get_color(), linestyle=":")
    ax.set(xlabel="threshold", ylabel="mIoU (%)", title=f"{m['dataset']} {m['split']}")
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, files[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(m["baseline"]["size_buckets"]))
    for k, v in enumerate(("baseline", "elbo")):
        ax.bar(x + (k - 0.5) * 0.4, [b["mIoU"] for b in m[v]["size_buckets"]], width=0.4, label=labels[v])
    ax.set(xlabel="ground-truth area bucket (small -> large)", ylabel="mIoU (%)", xticks=x)
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, files[1], dpi=120)
    plt.close(fig)

    _overlay_figure(plt, overlays, labels, files[2])
    return files


def _colour(labels: np.ndarray) -> np.ndarray:
    """Class ids -> palette index 1..20 (cycling); background and ignored pixels -> 0 (black)."""
    return np.where(labels > 0, (labels - 1) % 20 + 1, 0)


def _overlay_figure(plt: Any, rows: list[dict[str, Any]], labels: dict[str, str], path: Path) -> None:
    from matplotlib.colors import ListedColormap

    palette = ListedColormap(np.vstack([[0, 0, 0, 1], plt.get_cmap("tab20")(np.arange(20))]))
    titles = ["image", "ground truth", "ELBO heat (max over classes)", labels["baseline"], labels["elbo"]]
    fig, axes = plt.subplots(max(len(rows), 1), 5, figsize=(15, 3 * max(len(rows), 1)), squeeze=False)
    for r, row in enumerate(rows):
        axes[r, 0].imshow(row["image"])
        axes[r, 1].imshow(_colour(row["gt"]), cmap=palette, vmin=0, vmax=20, interpolation="nearest")
        axes[r, 2].imshow(row["image"])
        axes[r, 2].imshow(row["heat"], cmap="jet", alpha=0.5, vmin=0, vmax=255)
        for c, v in ((3, "baseline"), (4, "elbo")):
            axes[r, c].imshow(row["image"])
            axes[r, c].imshow(
                _colour(row[f"pred_{v}"]), cmap=palette, vmin=0, vmax=20, alpha=0.6, interpolation="nearest"
            )
        axes[r, 0].set_ylabel(row["name"], fontsize=8)
    for c, title in enumerate(titles):
        axes[0, c].set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)
    plt.close(fig)
