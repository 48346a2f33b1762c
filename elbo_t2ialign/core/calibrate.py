"""Calibration (method.md §3.5-5): class token positions, the ELBO exponent, self-attention
refinement and image-sized heatmaps."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

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


def locate_tokens(
    token_ids: Callable[[str, bool], list[int]],
    prompt: str,
    name: str,
    search_from: int = 0,
    search_to: int | None = None,
) -> list[int]:
    """Positions of `name`'s tokens in `prompt`'s token sequence (with special tokens).

    The first occurrence of the name's token sub-sequence (tokenised without
    BOS/EOS) lying inside positions [search_from, search_to). Raises if there is none.
    """
    prompt_ids, name_ids = token_ids(prompt, True), token_ids(name, False)
    if not name_ids:
        raise ValueError(f"{name!r} tokenises to nothing; give a non-empty class name or word")
    stop = len(prompt_ids) if search_to is None else min(search_to, len(prompt_ids))
    # byte-level BPE tokenizers (Qwen, Mistral) spell a word after a space differently ("Ġcat") from
    # the word alone ("cat"); CLIP and T5 tokenizers give the same ids both ways
    for ids in (name_ids, token_ids(" " + name, False)):
        start = find_subsequence(prompt_ids[: max(stop, 0)], ids, search_from)
        if start >= 0:
            return list(range(start, start + len(ids)))
    where = (
        ""
        if (search_from, stop) == (0, len(prompt_ids))
        else f" between token positions {search_from} and {stop}"
    )
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


def class_token_positions(
    token_ids, prompt: str, names: Sequence[str], start: int = 0
) -> dict[str, list[int]]:
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


# ------------------------------------------------------------- calibration


def temperatures(losses: Sequence[float], strength: float, fixed: bool = False) -> list[float]:
    """tau_i = strength ** n_i with n the min-max normalised loss (method.md §3.5-3.6)."""
    if fixed:
        return [float(strength)] * len(losses)
    lo, hi = min(losses), max(losses)
    return [float(strength ** ((x - lo) / (hi - lo + 1e-10))) for x in losses]


def minmax(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min() + 1e-10)


def class_cross_maps(cross: torch.Tensor, positions: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Aggregated cross map (R*R, L) -> per class (R*R,), min-max normalised; a class without
    tokens (cut off a truncated prompt) gets zeros."""
    return {
        name: minmax(cross[:, pos].mean(dim=1)) if pos else cross.new_zeros(cross.shape[0])
        for name, pos in positions.items()
    }


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
