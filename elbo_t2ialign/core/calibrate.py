"""Calibration (PROTOCOL 4-5): class token positions, layer weights, the
ELBO exponent, self-attention refinement and image-sized heatmaps."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from elbo_t2ialign.core.capture import LayerInfo, stage_index

# ---------------------------------------------------------------- tokens


def find_subsequence(seq: Sequence[int], sub: Sequence[int], start: int = 0) -> int:
    """Index of the first occurrence of `sub` in `seq` at or after `start`, or -1 (an empty `sub`
    is found at `start`). The one token sub-sequence search of the package."""
    seq, sub = list(seq), list(sub)
    n = len(sub)
    for i in range(start, len(seq) - n + 1):
        if seq[i : i + n] == sub:
            return i
    return -1


def locate_tokens(token_ids: Callable[[str, bool], list[int]], prompt: str, name: str,
                  search_from: int = 0, search_to: int | None = None) -> list[int]:
    """Positions of `name`'s tokens in `prompt`'s token sequence (with special tokens).

    The first occurrence of the name's token sub-sequence (tokenised without
    BOS/EOS) lying inside positions [search_from, search_to). Raises if there is none.
    """
    prompt_ids, name_ids = token_ids(prompt, True), token_ids(name, False)
    if not name_ids:
        raise ValueError(f"{name!r} tokenises to nothing; give a non-empty class name or word")
    n, stop = len(name_ids), len(prompt_ids) if search_to is None else min(search_to, len(prompt_ids))
    start = find_subsequence(prompt_ids[: max(stop, 0)], name_ids, search_from)
    if start >= 0:
        return list(range(start, start + n))
    where = "" if (search_from, stop) == (0, len(prompt_ids)) else f" between token positions {search_from} and {stop}"
    raise ValueError(
        f"cannot locate {name!r} in prompt {prompt!r}{where}: its tokens {name_ids} do not occur in the "
        f"prompt's tokens {prompt_ids}. Use the word as it appears in the prompt."
    )


def leading_specials(token_ids: Callable[[str, bool], list[int]], text: str) -> int:
    """Number of special tokens (BOS) the tokenizer puts before the text's own tokens."""
    offset = find_subsequence(token_ids(text, True), token_ids(text, False))
    return max(offset, 0)


def template_start(token_ids: Callable[[str, bool], list[int]], template: str) -> int:
    """Token position where the text filled into `template` ("a photo of {}") begins, so that a
    class that is also a template word ("photo", "a", "of") is found in the class list, not in the
    template (the reference searches from the start of the prompt)."""
    prefix = template.split("{}")[0].strip()
    lead = leading_specials(token_ids, template.replace("{}", "x"))
    return lead + (len(token_ids(prefix, False)) if prefix else 0)


def class_token_positions(token_ids, prompt: str, names: Sequence[str], start: int = 0) -> dict[str, list[int]]:
    """Token positions of every class in the collection prompt, searched left to right from
    token `start` so that a class repeated inside another's name does not steal its tokens."""
    out, cursor = {}, start
    for name in names:
        try:
            pos = locate_tokens(token_ids, prompt, name, cursor)
        except ValueError:
            pos = locate_tokens(token_ids, prompt, name, start)
        out[name] = pos
        cursor = pos[-1] + 1
    return out


# --------------------------------------------------------------- weights


def gaussian_layer_weights(layers: list[LayerInfo], sigma: float) -> dict[str, float]:
    """w_l = exp(-(l - l_mid)^2 / (2 sigma^2)) over the cross-carrying layers, renormalised to sum
    to their count. l_mid = (#down cross layers) + (#mid cross layers - 1) / 2, or the stack centre."""
    cross = sorted((layer for layer in layers if layer.has_cross), key=lambda x: x.order)
    n_down = sum(layer.path == "down" for layer in cross)
    n_mid = sum(layer.path == "mid" for layer in cross)
    l_mid = n_down + (n_mid - 1) / 2 if n_mid else (len(cross) - 1) / 2
    raw = [math.exp(-((i - l_mid) ** 2) / (2 * sigma**2)) for i in range(len(cross))]
    scale = len(cross) / sum(raw)
    return {layer.name: w * scale for layer, w in zip(cross, raw, strict=True)}


def stage_layer_weights(layers: list[LayerInfo], stage_weights: Sequence[float], block: str) -> dict[str, float]:
    """One weight per resolution stage (stages counted over the layers that carry `block`)."""
    carrying = [layer for layer in layers if (layer.has_cross if block == "cross" else layer.has_self)]
    stages = stage_index(carrying)
    n_stages = max(stages.values()) + 1
    if len(stage_weights) != n_stages:
        raise ValueError(
            f"{len(stage_weights)} stage weights given but this model's {block}-attention layers form "
            f"{n_stages} resolution stages ({sorted({x.resolution for x in carrying}, reverse=True)} ...); "
            f"give {n_stages} weights"
        )
    return {layer.name: float(stage_weights[stages[layer.name]]) for layer in carrying}


def self_stage_weights(layers: list[LayerInfo], spec) -> dict[str, float]:
    """Self-attention refinement weights. "first_last": the first and last stage (the finest
    resolution of the down and up paths in a UNet; all layers of a one-stage transformer);
    "last": the last stage; or an explicit per-stage list."""
    carrying = [layer for layer in layers if layer.has_self]
    if not carrying:
        return {}
    n_stages = max(stage_index(carrying).values()) + 1
    if isinstance(spec, str):
        chosen = {"first_last": {0, n_stages - 1}, "last": {n_stages - 1}}.get(spec)
        if chosen is None:
            raise ValueError(f"unknown self-attention weight spec {spec!r}; use first_last, last or a list")
        spec = [1.0 if s in chosen else 0.0 for s in range(n_stages)]
    return stage_layer_weights(layers, list(spec), "self")


# ------------------------------------------------------------- calibration


def temperatures(losses: Sequence[float], strength: float, fixed: bool = False) -> list[float]:
    """tau_i = strength ** n_i with n the min-max normalised loss (PROTOCOL 3.5-3.6)."""
    if fixed:
        return [float(strength)] * len(losses)
    lo, hi = min(losses), max(losses)
    return [float(strength ** ((x - lo) / (hi - lo + 1e-10))) for x in losses]


def minmax(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min() + 1e-10)


def class_cross_maps(cross: torch.Tensor, positions: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Aggregated cross map (R*R, L) -> per class (R*R,), min-max normalised."""
    return {name: minmax(cross[:, pos].mean(dim=1)) for name, pos in positions.items()}


def self_attention_refine(a: torch.Tensor, s1: torch.Tensor | None, s2: torch.Tensor | None) -> torch.Tensor:
    """S2 @ (S1 @ a); a missing matrix is skipped."""
    for s in (s1, s2):
        if s is not None:
            a = s @ a
    return a


def to_image(a: torch.Tensor, res: int, size: tuple[int, int]) -> np.ndarray:
    """(R*R,) -> (H, W) float32 in [0, 1]: bilinear resize to the image size, min-max."""
    w, h = size
    grid = F.interpolate(a.reshape(1, 1, res, res).float(), size=(h, w), mode="bilinear", align_corners=False)
    return minmax(grid[0, 0]).cpu().numpy().astype(np.float32)
