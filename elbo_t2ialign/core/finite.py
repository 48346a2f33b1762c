"""Non-finite numbers (NaN, infinity) where they arise: the image latents, the ELBO losses, the
attention maps, a sampler's latents. A half-precision overflow on a real model or damaged weights
give NaN or infinity; min-max normalisation would turn them into maps that look like results (all
zero, or NaN written as 0 in a PNG), so each is refused with its cause named (docs/reliability.md)."""

from __future__ import annotations

import torch


class NonFiniteError(ValueError):
    """A tensor of the computation holds NaN or infinity; `what` names it (the same for every image a
    broken model or dtype spoils, so that a run can tell that case apart)."""

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        self.what = what


def advice(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return (
            "float16 overflows on some models and images: run in float32 or bfloat16 (model.dtype=float32 "
            "or model.dtype=bfloat16 on the command line, dtype= in the API)"
        )
    return (
        f"with {str(dtype).replace('torch.', '')} this points to damaged weights: check the model's files "
        "(download it again)"
    )


def check_finite(tensor: torch.Tensor | None, what: str, dtype: torch.dtype) -> None:
    """Raise `NonFiniteError` naming `what` when `tensor` holds NaN or infinity (one device sync)."""
    if tensor is None or bool(torch.isfinite(tensor).all()):
        return
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    raise NonFiniteError(
        f"non-finite numbers in {what} ({nan} NaN, {inf} infinite of {tensor.numel()} values); "
        f"{advice(dtype)}",
        what,
    )
