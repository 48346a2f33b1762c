"""Figures of a `HeatmapResult` over its image (DAAM-style overlays), without pyplot.

    result.plot(image)                       # per word: image | baseline | ELBO-calibrated | cross-attention
    result.overlay("cat", image)             # one map over the image
    result.overlay("cat", image, kind="cross", ax=my_ax)

Figures are `matplotlib.figure.Figure` objects on an Agg canvas: nothing is registered with pyplot,
so no window opens and no figure piles up in a loop; save one with `fig.savefig(path)`, and a notebook
shows one returned as a cell's value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes


class HeatmapResult(Protocol):
    """What the figures read of an `elbo_t2ialign.HeatmapResult` (named here, not imported: the
    core loads this module when `result.plot` is called, so it must not import the core back)."""

    heatmaps: Mapping[str, np.ndarray]
    baseline_heatmaps: Mapping[str, np.ndarray]
    cross: Mapping[str, np.ndarray]
    losses: Mapping[str, float | None]
    tau: Mapping[str, float]


# kind -> (HeatmapResult attribute, what it is)
KINDS = {
    "baseline": ("baseline_heatmaps", "baseline (uncalibrated)"),
    "elbo": ("heatmaps", "ELBO-calibrated"),
    "cross": ("cross", "cross-attention"),
}
DEFAULT_KINDS = ("baseline", "elbo", "cross")


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas (not known to pyplot)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def heatmap(result: HeatmapResult, name: str, kind: str = "elbo") -> np.ndarray:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    maps = getattr(result, KINDS[kind][0])
    if name not in maps:
        raise KeyError(f"no map for {name!r}; this result has maps for {list(maps)}")
    return maps[name]


def panel_title(result: HeatmapResult, name: str, kind: str) -> str:
    """'baseline (tau 1)', 'ELBO-calibrated: tau 1.73, loss 0.0812' or 'cross-attention'."""
    if kind == "baseline":
        return "baseline (tau 1)"
    if kind == "elbo":
        loss = result.losses.get(name)
        shown = "loss not computed" if loss is None else f"loss {loss:.4g}"
        return f"ELBO-calibrated: tau {result.tau[name]:.3g}, {shown}"
    return KINDS[kind][1]


def _rgb(image: Any, shape: tuple[int, ...]) -> np.ndarray:
    from elbo_t2ialign.core.images import as_image

    rgb = np.asarray(as_image(image).convert("RGB"))
    if rgb.shape[:2] != tuple(shape):
        raise ValueError(
            f"the maps are {shape[1]}x{shape[0]} (WxH) but the image is {rgb.shape[1]}x{rgb.shape[0]}; "
            "pass the image the maps were made from"
        )
    return rgb


def _draw(ax: Axes, rgb: np.ndarray, heat: np.ndarray | None, alpha: float, cmap: str, title: str) -> None:
    ax.imshow(rgb)
    if heat is not None:
        ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def overlay(
    result: HeatmapResult,
    name: str,
    image: Any,
    kind: str = "elbo",
    ax: Axes | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    title: str | None = None,
) -> Figure:
    """One map of `name` (kind: elbo, baseline or cross) over the image; into `ax` when given.
    Returns the figure that holds it."""
    heat = heatmap(result, name, kind)
    rgb = _rgb(image, heat.shape)
    if ax is None:
        ax = new_figure(4.0, 4.0 * rgb.shape[0] / rgb.shape[1] + 0.4).subplots()
    _draw(
        ax, rgb, heat, alpha, cmap, f"{name}: {panel_title(result, name, kind)}" if title is None else title
    )
    return ax.figure


def plot(
    result: HeatmapResult,
    image: Any,
    names: Sequence[str] | None = None,
    kinds: Sequence[str] = DEFAULT_KINDS,
    alpha: float = 0.5,
    cmap: str = "jet",
    panel: float = 2.6,
    title: str | None = None,
) -> Figure:
    """A grid: one row per word (all by default), the image and then one overlay per kind; the
    ELBO-calibrated panel's title holds tau and the loss. `title` defaults to the collection prompt."""
    names = list(result.heatmaps) if names is None else list(names)
    if not names:
        raise ValueError("names is empty: give at least one word of the result")
    for kind in kinds:
        heatmap(result, names[0], kind)  # checks the kind names
    first = heatmap(result, names[0])
    rgb = _rgb(image, first.shape)
    aspect = rgb.shape[0] / rgb.shape[1]
    fig = new_figure(panel * (1 + len(kinds)), panel * aspect * len(names) + 0.5)
    axes = fig.subplots(len(names), 1 + len(kinds), squeeze=False)
    for row, name in zip(axes, names, strict=True):
        positions = result.token_positions.get(name)
        _draw(row[0], rgb, None, alpha, cmap, f"'{name}'" + (f" (tokens {positions})" if positions else ""))
        for ax, kind in zip(row[1:], kinds, strict=True):
            _draw(ax, rgb, heatmap(result, name, kind), alpha, cmap, panel_title(result, name, kind))
    heading = result.prompts.get("collect") if title is None else title
    if heading:
        fig.suptitle(heading, fontsize=10)
    return fig
