"""Composable generation with ELBO phrase weights (method.md §7): phrases, weighting, sampler, CLIP score.

python -m elbo_t2ialign.generate model=sd15 prompts=ane          # images + per-step weights
python -m elbo_t2ialign.generation.evaluate <run_dir>             # CLIP score, table, grid
"""

from elbo_t2ialign.generation.phrases import PhraseExtractor, load_spacy
from elbo_t2ialign.generation.sampler import ElboSampler, SampleResult
from elbo_t2ialign.generation.weighting import phrase_weights, token_positions, weight_conditioning

__all__ = [
    "ElboSampler",
    "PhraseExtractor",
    "SampleResult",
    "load_spacy",
    "phrase_weights",
    "token_positions",
    "weight_conditioning",
]
