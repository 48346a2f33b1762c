"""ELBO phrase weights and weighted prompt embeddings (method.md §7).

Weights follow `w_p = round(strength ** n_p, 2)` with `n_p` the min-max normalised distance between
the full-prompt and the phrase-only prediction. They are applied the way Compel applies "(phrase)1.2":
every text encoder's output at the phrase's token positions is moved away from the empty prompt's
output, `e' = e_empty + w * (e - e_empty)`; positions with weight 1 keep `e` exactly and pooled
embeddings are not weighted. Because that rule is per position and per feature, it is applied to the
adapter's conditioning directly (SDXL's two encoders are concatenated along features, SD3's CLIP and
T5 blocks along the sequence), so every family shares one code path.

A weight below 1 (any strength < 1 gives them) is Compel's "downweight": besides that scaling, the
embedding is blended towards the prompt encoded with the phrase's tokens masked out of the text
encoders' attention (scaled the same way), with blend weight tan((1 - w) * pi / 2) against 1 for the
unmasked one, one such term per phrase below 1: w = 0.5 is half-way, w -> 0 the masked prompt.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from elbo_t2ialign.core.adapters.base import Cond, ModelAdapter
from elbo_t2ialign.core.calibrate import find_subsequence

log = logging.getLogger(__name__)

WEIGHTED_KEY = "encoder_hidden_states"  # the per-token text embeddings; pooled ones stay unweighted


def phrase_weights(distances: Sequence[float] | torch.Tensor, strength: float) -> list[float]:
    """Distances d_p (P,) -> weights round(strength ** n_p, 2); all ones with fewer than two phrases
    or when every distance is equal."""
    d = [float(x) for x in (distances.tolist() if isinstance(distances, torch.Tensor) else distances)]
    if len(d) < 2:
        return [1.0] * len(d)
    lo, hi = min(d), max(d)
    if not hi > lo:
        return [1.0] * len(d)
    return [round(float(strength) ** ((x - lo) / (hi - lo)), 2) for x in d]


def compel_syntax(
    prompt: str, phrases: Sequence[str], weights: Sequence[float], float32_numbers: bool = False
) -> str:
    """The prompt in Compel's syntax, e.g. "(a cat)1.2 and (a dog)1 ..." (logs, the weights JSON, and
    prompt_syntax=compel). Phrases are located left to right, each after the previous one.

    float32_numbers: write each weight as the reference writes it, the Python repr of its float32 value
    ("(a cat)1.2000000476837158"): Compel reads the same weight either way, but SD3, which the
    reference gives this string as text, sees other tokens."""
    out, cursor = [], 0
    for phrase, weight in zip(phrases, weights, strict=True):
        start = prompt.find(phrase, cursor)
        if start < 0:
            raise ValueError(f"phrase {phrase!r} is not in the prompt {prompt!r} after position {cursor}")
        number = repr(float(np.float32(weight))) if float32_numbers else f"{weight:g}"
        out += [prompt[cursor:start], f"({phrase}){number}"]
        cursor = start + len(phrase)
    return "".join(out + [prompt[cursor:]])


def token_positions(adapter: ModelAdapter, prompt: str, phrases: Sequence[str]) -> list[list[int]]:
    """For each phrase, its positions along `encoder_hidden_states`' sequence axis.

    Phrases are located in order (each after the previous one) as token sub-sequences of the prompt,
    in every text block. A phrase missing from the CLIP tokens is an error; one missing from the T5
    tokens (SentencePiece can split differently in context) is weighted in the CLIP block only, with a
    warning.
    """
    positions: list[list[int]] = [[] for _ in phrases]
    for name, tokenizer, offset, length, required, _ in adapter.text_blocks():
        ids = list(tokenizer(prompt, add_special_tokens=True, truncation=False).input_ids)
        cursor = 0
        for k, phrase in enumerate(phrases):
            start, sub = -1, []
            # byte-level BPE spells a phrase after a space differently ("Ġcat"): try that too
            for text in (phrase, " " + phrase):
                sub = list(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)
                start = find_subsequence(ids, sub, cursor) if sub else -1
                if start >= 0:
                    break
            if start < 0:
                msg = (
                    f"cannot locate phrase {phrase!r} in the {name} tokens of prompt {prompt!r} "
                    f"(phrase tokens {sub}, prompt tokens {ids})"
                )
                if required:
                    raise ValueError(msg)
                log.warning("%s; weighting it in the CLIP tokens only", msg)
                continue
            positions[k] += [offset + i for i in range(start, start + len(sub)) if i < length]
            cursor = start + len(sub)
    return positions


def downweight_blend(weight: float) -> float:
    """Compel's blend weight of the masked prompt for a phrase weighted below 1: tan((1 - w) pi / 2)
    (0 at w = 1, 1 at w = 0.5; w is floored at 1e-5 to stay finite)."""
    return math.tan((1.0 - max(1e-5, float(weight))) * math.pi / 2)


def weight_conditioning(
    cond: Cond,
    empty: Cond,
    positions: Sequence[Sequence[int]],
    weights: Sequence[float],
    masked: Mapping[int, Cond] | None = None,
) -> Cond:
    """Compel-style weighted conditioning: cond with each phrase's token embeddings scaled about the
    empty prompt's; for each phrase k with a weight below 1, blended with `masked[k]` (the prompt
    encoded with phrase k's tokens masked, `ModelAdapter.encode_prompt_masked`) scaled the same way.
    cond/empty batch 1; returns `cond` itself when every weight is 1."""
    if len(positions) != len(weights):
        raise ValueError(f"{len(positions)} phrases but {len(weights)} weights")
    emb = cond[WEIGHTED_KEY]  # (1, L, D)
    scale = torch.ones(emb.shape[1], dtype=torch.float32, device=emb.device)  # (L,)
    for pos, w in zip(positions, weights, strict=True):
        scale[list(pos)] = float(w)
    if bool((scale == 1).all()):
        return cond
    base = empty[WEIGHTED_KEY].to(emb.device, torch.float32)
    keep = (scale == 1)[None, :, None]

    def scaled(e: torch.Tensor) -> torch.Tensor:  # (1, L, D) float32
        return torch.where(keep, e.float(), base + (e.float() - base) * scale[None, :, None])

    low = [k for k, w in enumerate(weights) if w < 1]
    missing = [k for k in low if masked is None or k not in masked]
    if missing:
        raise ValueError(f"phrases {missing} are weighted below 1 and need their masked conditioning")
    parts = [scaled(emb)] + [scaled(masked[k][WEIGHTED_KEY].to(emb.device)) for k in low]  # type: ignore[index]
    if not low:
        return {**cond, WEIGHTED_KEY: parts[0].to(emb.dtype)}
    blend = torch.tensor([1.0] + [downweight_blend(weights[k]) for k in low], device=emb.device)
    blend = (
        blend / blend.sum()
    )  # normalised, then a weighted sum over the stacked embeddings (Compel's order)
    weighted = (torch.stack(parts, dim=1) * blend[None, :, None, None]).sum(dim=1)  # (1, L, D)
    return {**cond, WEIGHTED_KEY: weighted.to(emb.dtype)}
