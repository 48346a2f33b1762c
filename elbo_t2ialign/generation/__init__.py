"""Composable generation with ELBO phrase weights (PROTOCOL 7): phrases, weighting, sampler, CLIP score.

    python -m elbo_t2ialign.generate model=sd15 prompts=ane          # images + per-step weights
    python -m elbo_t2ialign.generation.evaluate <run_dir>             # CLIP score, table, grid
"""

from .phrases import PhraseExtractor, load_spacy
from .sampler import ElboSampler, SampleResult
from .weighting import phrase_weights, token_positions, weight_conditioning

__all__ = [
    "ElboSampler", "PhraseExtractor", "SampleResult", "load_spacy", "phrase_weights", "token_positions",
    "weight_conditioning",
]
